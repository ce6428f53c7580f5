"""`kill -9` at random moments of long jobs: rerunning resumes and ends with the outputs of an uninterrupted run, and no
half-written file is ever visible under a final name (only temp files or nothing).

Covered by their owners: SFT kill+resume (test_sft.py), gen identity (test_gen_cli.py), gen refcoco (test_refcoco.py).
Here: gen synthetic, batch inference (`vlm-nb infer --input`), GRPO (real SIGKILL + a torn log line), SFT's final save,
and GRPO's checkpoint loading of an untrusted state.pt."""
import json, os, random, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from conftest import ROOT
from vlm_nb.reliability import kill_when, visible_partials, tree_bytes, malicious_pickles

ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false', 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1',
       'PYTHONPATH': str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', '')}
RNG = random.Random(int(os.environ.get('VLM_NB_KILL_SEED', '17')))    # where to kill; fixed by default so CI is repeatable


def py(code, *args): return [sys.executable, '-c', code, *map(str, args)]

def dispatch(words, module, fn):
    "Code running `vlm-nb WORDS ARGV` through the dispatcher when it knows the command, else the module function."
    return (f"import sys\nfrom vlm_nb.cli import COMMANDS, main\nif {tuple(words)!r} in COMMANDS: sys.exit(main({list(words)!r} + sys.argv[1:]))\n"
            f"from {module} import {fn}\nsys.exit({fn}(sys.argv[1:]))")

def n_files(d, pattern): return len(list(Path(d).glob(pattern))) if Path(d).exists() else 0


# ---------------------------------------------------------------- gen synthetic
SYN = ['--images', 40, '--seed', 5, '--size', '256x192', '--quiet', '--json']

@pytest.fixture(scope='module')
def syn_ref(tmp_path_factory):
    d = tmp_path_factory.mktemp('synref')
    p = subprocess.run(py(dispatch(('gen', 'synthetic'), 'vlm_nb.synthetic', 'gen_synthetic_main'), '--out', d, *SYN),
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr
    return tree_bytes(d)


@pytest.mark.parametrize('phase', ['images', 'annotations'])
def test_gen_synthetic_killed(syn_ref, tmp_path, phase):
    out = tmp_path/'out'
    k = RNG.randint(3, 30)
    ready = (lambda: n_files(out/'images', '*.png') >= k) if phase == 'images' else (lambda: (out/'annotations').exists())
    cmd = py(dispatch(('gen', 'synthetic'), 'vlm_nb.synthetic', 'gen_synthetic_main'), '--out', out, *SYN)
    rc, killed = kill_when(cmd, ready, timeout=120, env=ENV, poll=0.002)
    if not killed: pytest.skip('the run finished before the kill point (machine too fast for this phase)')
    assert rc == -signal.SIGKILL
    assert visible_partials(out) == []                       # only complete files (or temp files) after the kill
    assert n_files(out/'images', '*.png') < 40 or phase == 'annotations'
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout.splitlines()[-1])
    assert s['skipped'] >= (k if phase == 'images' else 1) - 1
    assert tree_bytes(out) == syn_ref


# ---------------------------------------------------------------- batch inference
@pytest.fixture(scope='module')
def infer_world(tmp_path_factory):
    from vlm_nb.models import make_tiny
    from vlm_nb.synthetic import make_scene, render_scene, SceneConfig
    d = tmp_path_factory.mktemp('infer')
    model = make_tiny('qwen2_5_vl', d/'model', seed=0)
    (d/'imgs').mkdir()
    for i in range(1, 9): render_scene(make_scene(i, 0, SceneConfig(256, 192))).save(d/'imgs'/f'{i:02d}.png')
    (d/'imgs'/'09_broken.png').write_bytes(b'not a png')
    return {'dir': d, 'model': model, 'imgs': d/'imgs'}

def _infer_cmd(w, out):
    return py(dispatch(('infer',), 'vlm_nb.infer', 'infer_main'), '--model', w['model'], '--input', w['imgs'], '--out', out,
              '--prompt', 'What is here?', '--greedy', '--max-new-tokens', 6, '--max-tool-calls', 1, '--batch-size', 2, '--json')

def _answers(out):
    return {f.name: {k: v for k, v in json.loads(f.read_text()).items() if k in ('id', 'status', 'text', 'answer', 'error')}
            for f in sorted(Path(out).glob('*.json')) if f.name != 'summary.json'}


def test_batch_infer_killed(infer_world, tmp_path):
    w = infer_world
    ref = subprocess.run(_infer_cmd(w, tmp_path/'ref'), capture_output=True, text=True, env=ENV, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    st = json.loads(ref.stdout.splitlines()[-1])
    assert (st['ok'], st['unreadable'], st['error']) == (8, 1, 0)
    out, k = tmp_path/'killed', RNG.randint(2, 6)
    rc, killed = kill_when(_infer_cmd(w, out), lambda: n_files(out, '[0-9]*.json') >= k, timeout=240, env=ENV, poll=0.005)
    assert killed and rc == -signal.SIGKILL, 'the batch finished before it could be killed'
    assert visible_partials(out) == [] and not (out/'summary.json').exists()
    done = n_files(out, '[0-9]*.json')
    p = subprocess.run(_infer_cmd(w, out), capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    st2 = json.loads(p.stdout.splitlines()[-1])
    assert st2['skipped_done'] == done and st2['total'] == 9
    assert _answers(out) == _answers(tmp_path/'ref')


# ---------------------------------------------------------------- GRPO
FAST = dict(prompts_per_step=1, num_generations=2, scripted='call', scripted_jitter=0.3, max_new_tokens=6, lr=1e-3,
            adapter={'max_pixels': 160*160}, synthetic_images=2, save_every=1)
KEYS = ['step', 'loss', 'reward_mean', 'tool_calls_executed', 'tool_failures', 'tasks']

@pytest.fixture(scope='module')
def grpo_model(tmp_path_factory):
    from vlm_nb.models import make_tiny
    return str(make_tiny('qwen2_5_vl', tmp_path_factory.mktemp('grpo')/'model', seed=0))

def _log(d): return [{k: r[k] for k in KEYS} for r in map(json.loads, (Path(d)/'log.jsonl').read_text().splitlines())]

_GRPO = ("import json, sys\nfrom vlm_nb.grpo import GRPOConfig, train_grpo\n"
         "cfg = GRPOConfig(**json.loads(sys.argv[1]))\nprint(json.dumps(train_grpo(cfg)))\n")


@pytest.mark.slow
def test_grpo_sigkill_resumes(grpo_model, tmp_path):
    from vlm_nb.grpo import GRPOConfig, train_grpo
    base = dict(model=grpo_model, steps=3, **FAST)
    ref = train_grpo(GRPOConfig(output_dir=str(tmp_path/'ref'), **base))
    out = tmp_path/'killed'
    cfg = json.dumps({**base, 'output_dir': str(out)})
    k = RNG.randint(1, 2)
    rc, killed = kill_when(py(_GRPO, cfg), lambda: n_files(out/'checkpoints', 'step-*') and
                           max(int(p.name[5:]) for p in (out/'checkpoints').glob('step-*')) >= k, timeout=300, env=ENV, poll=0.005)
    assert killed and rc == -signal.SIGKILL, 'the run finished before it could be killed'
    assert not (out/'final').exists()
    assert [p for p in visible_partials(out) if not p.startswith('log.jsonl')] == []
    p = subprocess.run(py(_GRPO, cfg), capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.splitlines()[-1])
    assert res['resumed_from'] >= k and res['steps'] == 3
    assert _log(out) == _log(tmp_path/'ref') and res['rewards'] == ref['rewards']


def test_grpo_resume_with_torn_log_line(grpo_model, tmp_path):
    from vlm_nb.grpo import GRPOConfig, train_grpo
    base = dict(model=grpo_model, output_dir=str(tmp_path/'run'), **FAST)
    train_grpo(GRPOConfig(steps=1, **base))
    with open(tmp_path/'run'/'log.jsonl', 'a') as f: f.write('{"step": 2, "loss": 0.1')       # the kill hit mid-write
    res = train_grpo(GRPOConfig(steps=2, **base))
    assert res['resumed_from'] == 1 and res['steps'] == 2 and [r['step'] for r in _log(tmp_path/'run')] == [1, 2]


def test_grpo_refuses_a_malicious_checkpoint(tmp_path):
    from vlm_nb.grpo import load_checkpoint
    marker = tmp_path/'PWNED'
    ck = tmp_path/'checkpoints'/'step-000001'; ck.mkdir(parents=True)
    (ck/'state.pt').write_bytes(malicious_pickles(marker)['builtins.open'])
    (ck/'trainer.json').write_text(json.dumps({'step': 1, 'config': {}}))
    model = torch.nn.Linear(2, 2); opt = torch.optim.AdamW(model.parameters())
    try: load_checkpoint(ck, model, opt)
    except Exception: pass
    assert not marker.exists(), 'loading the checkpoint ran the pickled payload'


def test_grpo_loads_its_own_checkpoints_safely(tmp_path):
    "What a weights_only-safe format needs to hold: the checkpoint loads and restores the same numbers."
    from vlm_nb.grpo import save_checkpoint, load_checkpoint, GRPOConfig
    model = torch.nn.Linear(3, 2); opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward(); opt.step()
    ck = save_checkpoint(tmp_path, 7, model, opt, GRPOConfig())
    assert visible_partials(tmp_path) == [] and not list((tmp_path/'checkpoints').glob('.tmp-*'))
    m2 = torch.nn.Linear(3, 2); o2 = torch.optim.AdamW(m2.parameters(), lr=0.1)
    assert load_checkpoint(ck, m2, o2) == 7 and torch.equal(m2.weight, model.weight)


# ---------------------------------------------------------------- SFT final save
_SFT_KILLED_IN_FINAL_SAVE = """
import json, os, sys
import safetensors.torch as st
real = st.save_file
def dying_save(tensors, filename, *a, **k):
    if os.sep + 'final' + os.sep in str(filename):             # a kill -9 while the final weights are being written
        with open(filename, 'wb') as f: f.write(b'partial')
        os._exit(137)
    return real(tensors, filename, *a, **k)
st.save_file = dying_save
from vlm_nb.sft import load_config, train_sft
train_sft(load_config(sys.argv[1]))
"""

@pytest.mark.slow
def test_sft_final_save_is_atomic(tmp_path):
    from vlm_nb.models import make_tiny
    from vlm_nb.synthetic import build_tool_dataset, SceneConfig
    model = make_tiny('qwen2_5_vl', tmp_path/'model', seed=0)
    build_tool_dataset(tmp_path/'syn', n_images=2, seed=0, cfg=SceneConfig(256, 192), progress=False)
    out = tmp_path/'run'
    cfg = {'model': str(model), 'train_data': str(tmp_path/'syn'/'tool_data'/'train.json'), 'image_root': str(tmp_path/'syn'/'images'),
           'adapter': {'max_pixels': 160*160}, 'output_dir': str(out), 'max_samples': 2, 'batch_size': 1, 'max_steps': 1,
           'save_steps': 100, 'progress': False, 'mode': 'full'}
    (tmp_path/'cfg.json').write_text(json.dumps(cfg))
    p = subprocess.run(py(_SFT_KILLED_IN_FINAL_SAVE, tmp_path/'cfg.json'), capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 137, p.stderr[-2000:]            # died inside the final save
    assert not (out/'final').exists() and visible_partials(out) == [], sorted(os.listdir(out/'final'))
