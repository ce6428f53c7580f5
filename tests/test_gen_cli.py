"""End-to-end tests of `vlm-nb gen synthetic` and `vlm-nb gen identity`, including kill-and-resume."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ('train.json', 'val.json', 'test.json', 'gallery.json', 'report.json')


def _env():
    env = dict(os.environ)
    env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
    return env


def _cli(group_cmd, args, timeout=300):
    "Run one subcommand in a fresh process: via the `vlm-nb` dispatcher when it knows it, else the module function."
    words = group_cmd.split()
    fn = {'gen synthetic': ('vlm_nb.synthetic', 'gen_synthetic_main'), 'gen identity': ('vlm_nb.identity', 'gen_identity_main')}[group_cmd]
    code = (f"import sys\ntry:\n    from vlm_nb.cli import COMMANDS, main\n    ok = {tuple(words)!r} in COMMANDS\nexcept ImportError: ok = False\n"
            f"if ok: sys.exit(main({words!r} + sys.argv[1:]))\n"
            f"from {fn[0]} import {fn[1]}\nsys.exit({fn[1]}(sys.argv[1:]))")
    return subprocess.run([sys.executable, '-c', code, *map(str, args)], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout)


def _outputs(d):
    return {n: (Path(d)/n).read_bytes() for n in OUTPUTS}


@pytest.fixture(scope='module')
def syn(tmp_path_factory):
    d = tmp_path_factory.mktemp('syn')
    p = _cli('gen synthetic', ['--out', d, '--images', 30, '--seed', 4, '--json', '--quiet'])
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert s['written'] == 30 and s['splits']['val'] > 0 and s['splits']['test'] > 0
    return d


def test_synthetic_layouts_and_determinism(syn, tmp_path):
    ann = syn/'annotations'
    assert sorted(p.name for p in (ann/'hf').glob('*.jsonl')) == ['refcoco+.jsonl', 'refcoco.jsonl', 'refcocog.jsonl']
    for ds, by in (('refcoco', 'unc'), ('refcoco+', 'unc'), ('refcocog', 'umd')):
        assert (ann/ds/f'refs({by}).p').exists() and (ann/ds/'instances.json').exists()
    sys.path.insert(0, str(ROOT))
    from vlm_nb.synthetic import load_refcoco
    hf, refer = load_refcoco(ann, layout='hf'), load_refcoco(ann, layout='refer')
    assert hf == refer and len(hf) == 30
    # same seed, fresh folder -> byte-identical tree; rerun -> everything skipped
    p = _cli('gen synthetic', ['--out', tmp_path/'again', '--images', 30, '--seed', 4, '--json', '--quiet'])
    assert p.returncode == 0, p.stderr
    files = lambda r: {str(f.relative_to(r)): f.read_bytes() for f in sorted(Path(r).rglob('*')) if f.is_file()}
    assert files(tmp_path/'again') == files(syn)
    p = _cli('gen synthetic', ['--out', tmp_path/'again', '--images', 30, '--seed', 4, '--json', '--quiet'])
    assert json.loads(p.stdout.strip().splitlines()[-1])['skipped'] == 30


def test_bad_input_is_one_line_error(tmp_path):
    p = _cli('gen synthetic', ['--out', tmp_path, '--images', 0])
    assert p.returncode != 0 and p.stderr.strip().startswith('error:') and 'Traceback' not in p.stderr
    p = _cli('gen identity', ['--annotations', tmp_path/'missing', '--images', tmp_path, '--out', tmp_path/'o'])
    assert p.returncode != 0 and p.stderr.strip().startswith('error:') and 'Traceback' not in p.stderr


def test_identity_from_synthetic(syn, tmp_path):
    out = tmp_path/'id'
    p = _cli('gen identity', ['--annotations', syn/'annotations', '--images', syn/'images', '--out', out, '--seed', 1, '--json', '--quiet'])
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    assert rep['rejected'] == {} and rep['samples']['train'] > 0 and rep['samples']['val'] > 0
    train, held = (json.loads((out/'train.json').read_text()),
                   json.loads((out/'val.json').read_text()) + json.loads((out/'test.json').read_text()))
    assert not ({r['image'] for r in train} & {r['image'] for r in held})
    from vlm_nb.tools import load_gallery, parse_tool_calls
    gal = load_gallery(out/'gallery.json')
    for r in train + held:
        assert (syn/'images'/r['image']).exists()
        gpt = r['conversations'][-1]['value']
        assert r['conversations'][1]['value'].count('<image>') == 1 and '{{' not in gpt
        calls = parse_tool_calls(gpt)
        assert calls and all(c.ok and c.name == 'Identify' for c in calls)
        # every Identify call's box is answered by the gallery with the name written after it
        import re
        names = re.findall(r'</tool_call><tool_response>([^<]+)</tool_response>', gpt)
        assert [gal.identify(None, c.bbox, r['image']) for c in calls] == names


def _run_identity_killed(syn, out, k):
    "Start `gen identity` in a subprocess that dies abruptly (os._exit, like SIGKILL) after k shards."
    code = ("import os, sys\nfrom vlm_nb.identity import generate_identity\nseen = []\n"
            "def hook(i):\n    seen.append(i)\n    if len(seen) >= int(sys.argv[4]): os._exit(137)\n"
            "generate_identity(sys.argv[1], sys.argv[2], sys.argv[3], seed=1, progress=False, on_shard=hook)\n")
    p = subprocess.run([sys.executable, '-c', code, str(syn/'annotations'), str(syn/'images'), str(out), str(k)],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert p.returncode == 137, p.stderr


def test_kill_and_resume_gives_identical_outputs(syn, tmp_path):
    ref = tmp_path/'ref'
    assert _cli('gen identity', ['--annotations', syn/'annotations', '--images', syn/'images', '--out', ref, '--seed', 1, '--quiet']).returncode == 0
    out = tmp_path/'killed'
    _run_identity_killed(syn, out, 7)
    assert not (out/'train.json').exists()                      # nothing merged, nothing half-written
    shards = sorted((out/'.shards').rglob('*.json'))
    assert len(shards) == 7
    (shards[0].parent/'.stray.json.tmp').write_text('{"half')  # what a kill inside atomic_write leaves
    shards[1].write_text(shards[1].read_text()[:10])            # a corrupt shard is redone, not trusted
    p = _cli('gen identity', ['--annotations', syn/'annotations', '--images', syn/'images', '--out', out, '--seed', 1, '--resume', '--json', '--quiet'])
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])['resumed_shards'] == 6
    assert _outputs(out) == _outputs(ref)
    # rerunning a finished run (with or without --resume, with workers) changes nothing
    for extra in (['--resume'], ['--workers', '2']):
        assert _cli('gen identity', ['--annotations', syn/'annotations', '--images', syn/'images', '--out', out, '--seed', 1, '--quiet', *extra]).returncode == 0
        assert _outputs(out) == _outputs(ref)


def test_sigkill_mid_run_then_resume(syn, tmp_path):
    "A real SIGKILL from outside while shards are being written; the resumed run matches an uninterrupted one."
    ref = tmp_path/'ref'
    assert _cli('gen identity', ['--annotations', syn/'annotations', '--images', syn/'images', '--out', ref, '--seed', 1, '--quiet']).returncode == 0
    out = tmp_path/'sig'
    code = ("import sys, time\nfrom vlm_nb.identity import generate_identity\n"
            "generate_identity(sys.argv[1], sys.argv[2], sys.argv[3], seed=1, progress=False, on_shard=lambda i: time.sleep(0.2))\n")
    p = subprocess.Popen([sys.executable, '-c', code, str(syn/'annotations'), str(syn/'images'), str(out)], env=_env(), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while time.time() - t0 < 60 and len(list((out/'.shards').rglob('*.json')) if (out/'.shards').exists() else []) < 3: time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
    finally: p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL and not (out/'train.json').exists()
    r = _cli('gen identity', ['--annotations', syn/'annotations', '--images', syn/'images', '--out', out, '--seed', 1, '--resume', '--quiet'])
    assert r.returncode == 0, r.stderr
    assert _outputs(out) == _outputs(ref)
