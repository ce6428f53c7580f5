"End-to-end tests of `vlm-nb gen refcoco`: validation, split safety, resume after a kill, remote and local backends."
import os, sys, json, time, signal, shutil, subprocess, importlib.util, contextlib, io
from pathlib import Path
import pytest
from conftest import transformers_serve
from vlm_nb.refcoco import *
from vlm_nb.refcoco import LEFTOVER
from vlm_nb.synthetic import generate_synthetic, load_refcoco
from vlm_nb.tools import parse_tool_calls
from vlm_nb.validate import validate_dataset

OUT_FILES = ('train.json', 'val.json', 'report.json', 'report.png')

def gen(*args):
    "Run gen_refcoco_main in-process: (rc, parsed --json summary or stdout, stderr)."
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e): rc = gen_refcoco_main([str(a) for a in args])
    out = o.getvalue()
    try: out = json.loads(out)
    except json.JSONDecodeError: pass
    return rc, out, e.getvalue()

def outputs(d): return {f: (Path(d)/f).read_bytes() for f in OUT_FILES}

@pytest.fixture(scope='module')
def syn(tmp_path_factory):
    d = tmp_path_factory.mktemp('syn'); generate_synthetic(d, n_images=40, progress=False)
    return d

def heldout_ids(ann):
    "Image ids that any dataset puts in a non-train split."
    return {f"{im['image_id']:012d}" for im in load_refcoco(ann) for o in im['objects'] for rs in o['refs'].values() for r in rs if r['split'] != 'train'}

def check_output(out, images):
    for name in ('train.json', 'val.json'):
        recs = json.loads((out/name).read_text())
        rep = validate_dataset(out/name, images)
        assert rep.errors == [], rep.errors[:3]
        for r in recs:
            conv = {m['from']: m['value'] for m in r['conversations']}
            assert conv['human'].count('<image>') == 1 and '<image>' not in conv['gpt'] and isinstance(r['image'], str)
            assert (images/r['image']).is_file() and not Path(r['image']).is_absolute()
            calls = parse_tool_calls(conv['gpt'])
            assert calls and all(c.error is None and c.name == 'Crop' for c in calls)
            assert not LEFTOVER.search(conv['gpt']) and '{Tool call}' not in conv['gpt']
    return json.loads((out/'train.json').read_text()), json.loads((out/'val.json').read_text())

@pytest.mark.parametrize('layout', ['refer', 'hf'])
def test_output_validates_and_keeps_heldout_images_out_of_train(syn, tmp_path, layout):
    ann = syn/'annotations' if layout == 'refer' else syn/'annotations'/'hf'
    rc, summ, err = gen('--annotations', ann, '--images', syn/'images', '--out', tmp_path/'o', '--json', '--no-progress')
    assert rc == 0, err
    train, val = check_output(tmp_path/'o', syn/'images')
    assert len(train) > 20 and len(val) > 0 and summ['train'] == len(train)
    assert not {r['image_id'] for r in train} & heldout_ids(ann)
    rep = json.loads((tmp_path/'o'/'report.json').read_text())
    assert rep['images']['excluded_test_split'] > 0 and rep['filter']['kept'] == len(train) + len(val)
    assert (tmp_path/'o'/'report.png').read_bytes()[:4] == b'\x89PNG'

def test_both_layouts_give_the_same_dataset(syn, tmp_path):
    for name, ann in (('a', syn/'annotations'), ('b', syn/'annotations'/'hf')):
        assert gen('--annotations', ann, '--images', syn/'images', '--out', tmp_path/name, '--no-progress')[0] == 0
    assert (tmp_path/'a'/'train.json').read_bytes() == (tmp_path/'b'/'train.json').read_bytes()

def test_an_image_in_val_of_any_dataset_never_reaches_train(syn, tmp_path):
    ann = tmp_path/'ann'; shutil.copytree(syn/'annotations'/'hf', ann)
    rows = [json.loads(l) for l in (ann/'refcocog.jsonl').read_text().splitlines() if l.strip()]
    moved = sorted({r['image_id'] for r in rows if r['split'] == 'train'})[:3]
    for r in rows:
        if r['image_id'] in moved: r['split'] = 'val'          # RefCOCO still says train: the datasets disagree
    (ann/'refcocog.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    assert gen('--annotations', ann, '--images', syn/'images', '--out', tmp_path/'o', '--no-progress')[0] == 0
    train, val = check_output(tmp_path/'o', syn/'images')
    ids = {f'{i:012d}' for i in moved}
    assert not ids & {r['image_id'] for r in train} and ids <= {r['image_id'] for r in val}

def test_interrupted_run_resumes_to_identical_bytes(syn, tmp_path):
    entries = prepare_entries(syn/'annotations', tmp_path/'full')
    run_refcoco(entries, tmp_path/'full', images_root=syn/'images', progress=False)
    for workers in (1, 2):
        out = tmp_path/f'cut{workers}'
        class Kill(Exception): pass
        def stop(i, iid):
            if i == 4: raise Kill
        with pytest.raises(Kill): run_refcoco(entries, out, images_root=syn/'images', workers=workers, on_shard=stop, progress=False)
        assert not (out/'train.json').exists()
        rep = run_refcoco(entries, out, images_root=syn/'images', workers=workers, resume=True, progress=False)
        assert rep['_run']['reused_shards'] >= 5
        assert outputs(out) == outputs(tmp_path/'full')
        shards = sorted(p.name for p in (out/'shards').iterdir())
        assert len(shards) == len(set(shards)) == rep['images']['processed'] and not any(s.endswith('.tmp') for s in shards)

def _cli(*args):
    code = 'import sys; from vlm_nb.refcoco import gen_refcoco_main; sys.exit(gen_refcoco_main(sys.argv[1:]))'
    return [sys.executable, '-c', code, *map(str, args)]

def test_killed_subprocess_resumes_to_identical_bytes(syn, tmp_path):
    with StubChatServer(delay=0.03) as srv:
        base = ['--annotations', syn/'annotations', '--images', syn/'images', '--generator', 'openai', '--base-url', srv.url,
                '--workers', '2', '--no-progress', '--json', '--retries', '1', '--timeout', '10', '--backoff', '0.05']
        assert gen(*base, '--out', tmp_path/'full')[0] == 0
        out = tmp_path/'killed'
        p = subprocess.Popen(_cli(*base, '--out', out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, 'MPLBACKEND': 'Agg'})
        t0 = time.time()
        while time.time() - t0 < 120 and p.poll() is None:
            if (out/'shards').exists() and len(list((out/'shards').glob('*.json'))) >= 6: break
            time.sleep(0.02)
        assert p.poll() is None, 'the run finished before it could be killed'
        p.send_signal(signal.SIGKILL); p.wait()
        assert not (out/'train.json').exists()
        n_before = len(list((out/'shards').glob('*.json')))
        rc, summ, err = gen(*base, '--out', out, '--resume')
        assert rc == 0, err
        assert summ['reused_shards'] == n_before and summ['reused_shards'] + summ['new_shards'] == summ['images']
    assert outputs(out) == outputs(tmp_path/'full')

def test_retries_and_failed_images_are_retried_on_resume(syn, tmp_path):
    base = ['--annotations', syn/'annotations', '--images', syn/'images', '--generator', 'openai', '--limit', '6',
            '--no-progress', '--json', '--timeout', '5', '--backoff', '0.05']
    with StubChatServer(fail_first=3) as srv:
        rc, summ, err = gen(*base, '--base-url', srv.url, '--out', tmp_path/'ok', '--retries', '4', '--workers', '1')
        assert rc == 0, err
        assert summ['requests']['retries'] == 3 and summ['failed_images'] == 0
    with StubChatServer(fail_first=10**6) as srv:   # a server that never recovers
        rc, summ, err = gen(*base, '--base-url', srv.url, '--out', tmp_path/'down', '--retries', '1', '--workers', '2')
        assert rc == 1 and 'resume' in err and summ['failed_images'] > 0
        assert json.loads((tmp_path/'down'/'report.json').read_text())['images']['failed']
    with StubChatServer() as srv:                   # back up: --resume fills the gaps
        rc, summ, err = gen(*base, '--base-url', srv.url, '--out', tmp_path/'down', '--retries', '1', '--resume')
        assert rc == 0, err
    assert outputs(tmp_path/'down') == outputs(tmp_path/'ok')

def test_cli_errors_are_one_line(tmp_path, syn):
    rc, _, err = gen('--annotations', tmp_path/'nope', '--images', syn/'images', '--out', tmp_path/'o')
    assert rc == 2 and err.startswith('error:') and 'Traceback' not in err
    rc, _, err = gen('--annotations', syn/'annotations', '--images', syn/'images', '--out', tmp_path/'o', '--generator', 'openai')
    assert rc == 2 and '--base-url' in err

# ---- real local model backends -------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tiny_lm(tmp_path_factory):
    "A tiny random text-only Qwen3 causal LM with the project's tokenizer (content is nonsense; plumbing is tested)."
    torch = pytest.importorskip('torch')
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from vlm_nb.models import load_tokenizer
    d = tmp_path_factory.mktemp('tiny_lm')
    tok = load_tokenizer('qwen3_vl')
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen3ForCausalLM(cfg).save_pretrained(d); tok.save_pretrained(d)
    return d

def test_hf_backend_with_a_tiny_local_model(tiny_lm, syn):
    entries = [e for e in build_entries(refs_from_images(load_refcoco(syn/'annotations'))) if e['split'] == 'train']
    chat = HFChat(tiny_lm, max_new_tokens=8)
    qa = ChatGenerator(chat, per_image=1, name='hf').generate(dict(entries[0], size=[512, 384]))
    assert len(qa) == 1 and qa[0]['targets'] and (qa[0].get('error') == 'unparsed' or qa[0]['Q'].endswith('?'))

@pytest.mark.skipif(not (importlib.util.find_spec('fastapi') and importlib.util.find_spec('uvicorn') and shutil.which('transformers')),
                    reason='`transformers serve` needs fastapi + uvicorn')
def test_openai_backend_against_transformers_serve(tiny_lm, syn, tmp_path):
    with transformers_serve(tiny_lm, tmp_path/'serve.log', timeout=240, must_start=True) as port:
        base = ['--annotations', syn/'annotations', '--images', syn/'images', '--out', tmp_path/'o', '--generator', 'openai',
                '--base-url', f'http://127.0.0.1:{port}/v1', '--model', tiny_lm, '--per-image', '1', '--max-tokens', '16',
                '--workers', '2', '--no-progress', '--json', '--timeout', '60']
        rc, summ, err = gen(*base, '--limit', '3')
        assert rc == 0, err
        rep = json.loads((tmp_path/'o'/'report.json').read_text())
        assert rep['stages']['generated'] == summ['candidates'] > 0 and summ['requests'].get('failed', 0) == 0
        shards = list((tmp_path/'o'/'shards').glob('*.json'))
        assert len(shards) == summ['images']
        rc, summ2, err = gen(*base, '--limit', '5', '--resume')
        assert rc == 0, err
        assert summ2['reused_shards'] == len(shards) and summ2['new_shards'] == summ2['images'] - len(shards)
        check_output(tmp_path/'o', syn/'images')

def test_semantic_dedupe_with_a_local_sentence_transformer():
    pytest.importorskip('sentence_transformers')
    path = os.environ.get('VLM_NB_ST_MODEL')
    if not path or not Path(path).is_dir(): pytest.skip('set VLM_NB_ST_MODEL to a local sentence-transformers folder')
    emb = SentenceEmbedder(path)
    assert dedupe_semantic(['man in a red shirt', 'the man in the red shirt', 'a yellow bus'], emb) == ['the man in the red shirt', 'a yellow bus']

def test_bench_small():
    b = bench_refcoco(3000, workers=1)
    assert b['references'] == 3000 and b['candidates'] > 0 and b['kept'] > 0.9 * b['candidates']
    assert b['refs_per_s'] == pytest.approx(3000 / b['seconds'], rel=0.05)   # the rate is the measured time's, not a constant
