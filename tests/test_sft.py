"SFT/LoRA training end to end on tiny models (CPU): families x modes, merge, torchrun, DeepSpeed ZeRO-2, kill -9 + resume."
import json, os, re, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')
from vlm_nb.models import make_tiny, build_tokenizer_dir, load_model
from vlm_nb.synthetic import build_tool_dataset, SceneConfig
from vlm_nb.sft import load_config, train_sft, train_merge_main, steps_per_epoch, SFTCollator, build_sequences
from vlm_nb.models import get_adapter, load_tokenizer

ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false', 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
ADAPTER_OPTS = {'internvl3_5': {'max_tiles': 1}, 'ovis2_5': {}}

@pytest.fixture(scope='module')
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp('sft')
    models = {f: make_tiny(f, d/f'tiny_{f}', tokenizer_dir=build_tokenizer_dir(f, d/f'tok_{f}', shared=False)) for f in ADAPTER_OPTS}
    build_tool_dataset(d/'syn', n_images=6, seed=0, cfg=SceneConfig(256, 192), progress=False)
    return {'dir': d, 'models': models, 'train': d/'syn'/'tool_data'/'train.json', 'images': d/'syn'/'images'}

def write_cfg(world, name, family='internvl3_5', **kw):
    c = {'model': str(world['models'][family]), 'train_data': str(world['train']), 'image_root': str(world['images']),
         'adapter': ADAPTER_OPTS[family], 'output_dir': str(world['dir']/name), 'max_samples': 8, 'batch_size': 2,
         'max_steps': 3, 'lr': 1e-3, 'logging_steps': 1, 'save_steps': 100, 'progress': False, **kw}
    p = world['dir']/f'{name}.json'; p.write_text(json.dumps(c)); return p

@pytest.mark.parametrize('family', ['internvl3_5', 'ovis2_5'])
@pytest.mark.parametrize('mode', ['full', 'lora'])
def test_train_family_mode(world, family, mode):
    cfg = load_config(write_cfg(world, f'run_{family}_{mode}', family, mode=mode, packing=(mode == 'lora')))
    r = train_sft(cfg)
    assert r['steps'] == 3 and len(r['losses']) == 3 and all(l == l for l in r['losses'])
    final = Path(r['final'])
    assert (final/'tokenizer_config.json').exists() and (final/'chat_template.jinja').exists()
    if mode == 'full':
        assert r['trainable']['vision'][0] == 0 and r['trainable']['llm'][0] > 0   # the vision tower is frozen by default
        m, ad = load_model(final); assert ad.family == family
    else:
        assert r['trainable']['llm'][0] == 0 and r['trainable']['lora'][0] > 0
        assert (final/'adapter_config.json').exists() and (final/'preprocessor_config.json').exists()

def test_freeze_and_eval_early_stopping(world):
    cfg = load_config(write_cfg(world, 'run_freeze', freeze=['vision', 'projector'], eval_data=str(world['train']), max_steps=4,
                                eval_steps=2, early_stopping_patience=1))
    r = train_sft(cfg)
    assert r['trainable']['vision'][0] == 0 and r['trainable']['projector'][0] == 0 and r['trainable']['llm'][0] > 0
    assert r['eval_loss'] is not None

def test_merge_cli_logits_equal(world):
    from peft import PeftModel
    cfg = load_config(write_cfg(world, 'run_merge', 'ovis2_5', mode='lora', lora={'r': 4, 'targets': 'all'}))
    r = train_sft(cfg)
    out = world['dir']/'merged'
    assert train_merge_main([r['final'], '--out', str(out)]) == 0
    for f in ('config.json', 'tokenizer_config.json', 'chat_template.jinja', 'preprocessor_config.json'): assert (out/f).exists(), f
    mm, adm = load_model(out)
    base, adb = load_model(world['models']['ovis2_5'])
    pm = PeftModel.from_pretrained(base, r['final']).eval()
    seqs = build_sequences(world['train'], adm, world['images'], max_samples=2)
    b = SFTCollator(adm, stats=False)(list(seqs)); b.pop('labels')
    with torch.no_grad(): la, lb = adb.forward(pm, **b).logits, adm.forward(mm, **b).logits
    assert torch.allclose(la, lb, atol=1e-4), (la - lb).abs().max()

def test_vision_trained_when_asked(world):
    r = train_sft(load_config(write_cfg(world, 'run_vision', max_steps=1), ['--freeze', '']))
    assert r['trainable']['vision'][0] == r['trainable']['vision'][1] > 0

def _torchrun(cfg, *extra, timeout=900, nproc=2):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port', str(_port()),
           '-m', 'vlm_nb.sft', str(cfg), '--json', *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads([l for l in p.stdout.splitlines() if l.startswith('{"family"')][-1])

def _port():
    import socket
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def test_torchrun_two_processes(world):
    r = _torchrun(write_cfg(world, 'run_ddp', max_steps=-1, epochs=1))
    assert (r['world_size'], r['dist_backend']) == (2, 'gloo')
    assert r['max_steps'] == steps_per_epoch(r['n_train'], 2, 1, 2) == 2   # T-07: world-size-aware
    world['ddp_losses'] = r['losses']

def _same_step(world, name, *extra, timeout=900):
    "First-step loss and gradient norm on the same 4 samples: 1 process x batch 4 vs 2 processes x batch 2."
    kw = dict(max_samples=4, max_steps=1, lr=1e-6, group_by_length=False)
    one = _torchrun(write_cfg(world, f'{name}_1', batch_size=4, **kw), *extra, timeout=timeout, nproc=1)
    two = _torchrun(write_cfg(world, f'{name}_2', batch_size=2, **kw), *extra, timeout=timeout)
    assert (one['world_size'], two['world_size'], two['dist_backend']) == (1, 2, 'gloo')
    assert two['losses'][0] == pytest.approx(one['losses'][0], rel=1e-5)
    assert two['grad_norms'][0] == pytest.approx(one['grad_norms'][0], rel=1e-5)
    return one, two

def test_loss_independent_of_process_count(world):
    _same_step(world, 'run_same_ddp')

@pytest.mark.slow   # the first DeepSpeed run JIT-builds its CPU comm op (minutes)
def test_deepspeed_zero2_cpu(world):
    one, two = _same_step(world, 'run_same_ds', '--deepspeed', 'zero2', timeout=1500)
    assert two['accelerator'] == 'cpu'

@pytest.mark.slow
def test_deepspeed_zero3_shards_at_load(world):
    r = _torchrun(write_cfg(world, 'run_z3', max_steps=1, batch_size=1), '--deepspeed', 'zero3', timeout=1500)
    local, total = r['params_on_rank']
    assert r['world_size'] == 2 and 0.4 < local / total < 0.6, r['params_on_rank']   # loaded under zero.Init: half each
    assert r['steps'] == 1 and r['losses'][0] == r['losses'][0]

def test_kill_and_resume_matches_uninterrupted(world):
    common = dict(max_steps=8, save_steps=3, max_samples=12, batch_size=4, save_total_limit=None)
    ref = train_sft(load_config(write_cfg(world, 'run_ref', **common)))
    cfg = write_cfg(world, 'run_kill', **common)
    out = world['dir']/'run_kill'
    cmd = [sys.executable, '-m', 'vlm_nb.sft', str(cfg), '--json']
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    t0 = time.time()
    while not (out/'checkpoint-3'/'trainer_state.json').exists():
        assert p.poll() is None and time.time() - t0 < 600, 'run ended before its first checkpoint'
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL); p.wait()
    assert not (out/'final').exists(), 'the run finished before it was killed'
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["resumed_from"] is not None and s["steps"] == 8
    # the uninterrupted run's losses: equal to float noise (a resume from the wrong weights, data order or optimizer state
    # differs by > 1e-3; since the lazy/length-grouped data path step 5 differs in the 7th digit, cause not yet found)
    assert s['losses'] == pytest.approx(ref['losses'], rel=1e-6)

# --- issue 25/24: data a user can trust, the chunked loss ---
from vlm_nb.sft import plan_sequences, train_sft_main, SFTConfig, VLMTrainer
from vlm_nb.data import load_samples, save_samples, Sample, Turn

@pytest.mark.parametrize('family', ['internvl3_5', 'ovis2_5'])
def test_chunked_loss_equals_model_loss(world, family):
    from transformers import TrainingArguments
    m, ad = load_model(world['models'][family], **ADAPTER_OPTS[family])
    seqs = list(build_sequences(world['train'], ad, world['images'], max_samples=4))
    for packing in (False, True):
        b = SFTCollator(ad, packing=packing, stats=False, max_tokens=4096)(seqs)
        n = torch.tensor(int((b['labels'][:, 1:] != -100).sum()))
        args = TrainingArguments(output_dir=str(world['dir']/'loss'), use_cpu=True, report_to='none')
        out = {}
        for impl, kw in (('model', {}), ('chunked', {}), ('chunked4', {'loss_chunk_tokens': 4})):
            m.zero_grad()
            loss = VLMTrainer(model=m, args=args, adapter=ad, loss_impl=impl[:7], **kw).compute_loss(m, b, num_items_in_batch=n)
            loss.backward()
            out[impl] = (float(loss.detach()), torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
        for impl in ('chunked', 'chunked4'):
            assert out[impl][0] == pytest.approx(out['model'][0], rel=1e-5)
            assert float((out[impl][1] - out['model'][1]).norm() / out['model'][1].norm()) < 1e-5

def _plan_proc(args):
    "One process of a 2-process preparation (run as a script: `python -c` with rank and world)."
    data, model, images, cache, rank = args
    code = ("import sys; from vlm_nb.sft import plan_sequences; from vlm_nb.models import load_model\n"
            f"_, ad = load_model({model!r}, max_tiles=1)\n"
            f"plan_sequences({data!r}, ad, {images!r}, cache_dir={cache!r}, part_size=3, workers=0, rank={rank}, world=2, merge=False)")
    return subprocess.Popen([sys.executable, '-c', code], env=ENV, stderr=subprocess.PIPE, text=True)

def test_two_process_preparation_equals_one(world):
    m, ad = load_model(world['models']['internvl3_5'], max_tiles=1)
    one = plan_sequences(world['train'], ad, world['images'], cache_dir=world['dir']/'plan1', workers=0)
    args = [(str(world['train']), str(world['models']['internvl3_5']), str(world['images']), str(world['dir']/'plan2'), r) for r in (0, 1)]
    procs = [_plan_proc(a) for a in args]
    for p in procs: assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
    parts = list((world['dir']/'plan2').glob('.*.parts/part-*'))
    assert len(parts) == -(-len(load_samples(world['train'])) // 3)      # every part planned by one of the two processes
    two = plan_sequences(world['train'], ad, world['images'], cache_dir=world['dir']/'plan2', part_size=3, workers=0)   # joins them
    assert [x[0] for x in two.meta] == [x[0] for x in one.meta]
    for f, dt in (('ids.bin', 'int32'), ('roles.bin', 'uint8')):
        assert (two.folder/f).read_bytes() == (one.folder/f).read_bytes(), f
    a, b = one[2], two[2]
    assert a.id == b.id and (a.input_ids == b.input_ids).all() and (a.roles == b.roles).all()

def _broken_dataset(world):
    "12 samples: 8 good, 2 with missing images, one with a 0-byte image, one with an unclosed `</tool_call`."
    import shutil
    d = world['dir']/'broken'; (d/'images').mkdir(parents=True, exist_ok=True)
    good = load_samples(world['train'])[:8]
    for s in good:
        shutil.copy(Path(world['images'])/s.images[0], d/'images'/Path(s.images[0]).name); s.images = ['images/' + Path(s.images[0]).name]
    (d/'images'/'empty.jpg').write_bytes(b'')
    q = lambda img, ans, sid: Sample([Turn('user', '<image>\nWhat is it?'), Turn('assistant', ans)], [img], id=sid)
    bad = [q('images/gone1.jpg', 'A card.', 'bad_missing1'), q('images/gone2.jpg', 'A card.', 'bad_missing2'),
           q('images/empty.jpg', 'A card.', 'bad_zero_bytes'), q(good[0].images[0], '<tool_call>Crop [1, 2, 30, 40]</tool_call', 'bad_unclosed')]
    save_samples(good + bad, d/'train.json')
    return d/'train.json'

def test_broken_dataset_refused_with_every_reason(world, capfd):
    data = _broken_dataset(world)
    cfg = write_cfg(world, 'run_broken', train_data=str(data), image_root=None, max_samples=None, max_steps=1)
    assert train_sft_main([str(cfg)]) == 2
    err = capfd.readouterr().err
    for sid, why in (('bad_missing1', 'image file not found'), ('bad_missing2', 'image file not found'),
                     ('bad_zero_bytes', 'unreadable image'), ('bad_unclosed', 'unclosed <tool_call>')):
        assert re.search(rf"{sid}: .*{re.escape(why)}", err), (sid, err)
    assert 'built 8, skipped 4' in err and '--max_skip_fraction' in err
    assert train_sft_main([str(cfg), '--max_skip_fraction', '0.34']) == 0     # or train the rest, saying which were left out
    assert 'skipped 2 missing-image: bad_missing1, bad_missing2' in capfd.readouterr().err

def test_resume_says_what_and_refuses_other_runs(world, capfd):
    cfg = write_cfg(world, 'run_resume', mode='lora', lora={'r': 4}, max_steps=2, save_steps=1)
    assert train_sft_main([str(cfg)]) == 0
    capfd.readouterr()
    assert train_sft_main([str(cfg), '--max_steps', '3']) == 0
    assert re.search(r"resuming from .*checkpoint-2 \(step 2, data fingerprint [0-9a-f]{16}\)", capfd.readouterr().err)
    assert train_sft_main([str(cfg), '--max_steps', '4', '--lora.r', '8']) == 2
    err = capfd.readouterr().err
    assert 'other LoRA shape' in err and '--resume false' in err and 'size mismatch' not in err
    other = world['dir']/'other.json'; other.write_text(json.dumps(json.loads(Path(world['train']).read_text())[:6]))
    assert train_sft_main([str(cfg), '--max_steps', '4', '--train_data', str(other)]) == 2
    assert 'other data' in capfd.readouterr().err
    assert train_sft_main([str(cfg), '--max_steps', '1', '--lora.r', '8', '--resume', 'false']) == 0   # the way out works
    assert train_sft_main([str(cfg), '--lora.rank', '8']) == 2
    assert "did you mean 'lora.r'" in capfd.readouterr().err

def _vanish_setup(world, name, **kw):
    "A planned run whose most used image is then deleted: training meets it at load time."
    import shutil
    d = world['dir']/f'{name}_data'; shutil.copytree(world['images'], d/'images', dirs_exist_ok=True)
    samples = load_samples(world['train'])[:8]
    save_samples(samples, d/'train.json')
    cfg = load_config(write_cfg(world, name, train_data=str(d/'train.json'), image_root=str(d/'images'), batch_size=1, **kw))
    from vlm_nb.sft import sft_dataset
    _, ad = load_model(world['models']['internvl3_5'], max_tiles=1)
    sft_dataset(cfg, ad, cfg.train_data, cfg.image_root, cfg.max_samples)       # planned while every image is there
    from collections import Counter
    (d/'images'/Counter(s.images[0] for s in samples).most_common(1)[0][0]).unlink()
    return cfg

def test_vanished_image_one_process_trains_on(world):
    cfg = _vanish_setup(world, 'run_vanish1', max_steps=-1, epochs=1, group_by_length=False)
    r = train_sft(cfg)
    assert r['steps'] == 8 and all(l == l for l in r['losses'])

def test_vanished_image_two_processes_train_on(world):
    cfg = _vanish_setup(world, 'run_vanish2', max_steps=-1, epochs=1)
    p = world['dir']/'run_vanish2.json'
    p.write_text(json.dumps({**json.loads(p.read_text()), 'train_data': cfg.train_data, 'image_root': cfg.image_root}))
    r = _torchrun(p, timeout=600)
    assert r['world_size'] == 2 and r['steps'] == 4
