"""Hostile inputs against every entry point that reads data, and the security contract (see nbs/17_reliability.ipynb).

Contract: a clear error naming the sample, or a recorded skip; long runs continue; summaries count what was skipped;
CLIs print one `error:` line, never a traceback. Bugs found here were pinned as strict xfails, then fixed."""
import builtins, json, os, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pytest
from PIL import Image
from conftest import ROOT, run_cli
from vlm_nb.reliability import (HOSTILE_IMAGES, HOSTILE_RECORDS, hostile_images, hostile_dataset, malicious_pickles,
                                audit_package, bomb_png)
from vlm_nb.data import load_image, ImageLoadError, read_dataset, read_jsonl, DataFormatError, Sample, Turn
from vlm_nb.tools import parse_tool_calls, default_registry, ToolCall
from vlm_nb.validate import check_sample
from vlm_nb.synthetic import generate_synthetic, safe_pickle_load, UnsafePickleError, load_refcoco, SceneConfig

LINE = {k: i + 1 for i, k in enumerate(HOSTILE_RECORDS)}   # JSONL line of each hostile record


def no_traceback(p):
    "A CLI run that failed cleanly: one `error:` line, no traceback."
    assert 'Traceback' not in p.stderr, p.stderr[-1500:]
    if p.returncode != 0 and p.stderr.strip(): assert p.stderr.strip().splitlines()[-1].startswith('error:'), p.stderr[-500:]


@pytest.fixture(scope='module')
def hd(tmp_path_factory):
    d = tmp_path_factory.mktemp('hostile')
    return {'dir': d, 'path': hostile_dataset(d, marker=d/'PWNED'), 'images': d/'images', 'marker': d/'PWNED'}


@pytest.fixture(scope='module')
def syn(tmp_path_factory):
    d = tmp_path_factory.mktemp('syn')
    generate_synthetic(d, 6, seed=3, cfg=SceneConfig(192, 144), progress=False)
    return d


# ---------------------------------------------------------------- images
@pytest.mark.parametrize('name', list(HOSTILE_IMAGES))
def test_load_image(tmp_path, name):
    p = hostile_images(tmp_path)[name]
    what, want = HOSTILE_IMAGES[name]
    try: im = load_image(p)
    except ImageLoadError as e:
        assert 'refused' in want, f'{name} ({what}) refused: {e}'
        assert name in str(e)                                   # the error names the file
        return
    assert 'ok' in want, f'{name} ({what}) was accepted'
    assert im.mode == 'RGB' and im.size == Image.open(p).size


def test_sixteen_bit_keeps_contrast_and_alpha_goes_on_white(tmp_path):
    ims = hostile_images(tmp_path)
    a = np.asarray(load_image(ims['gray16.png']))
    assert a.min() < 10 and a.max() > 200                      # scaled from 16 bits, not clipped to white
    Image.new('RGBA', (8, 8), (0, 0, 0, 0)).save(tmp_path/'clear.png')
    assert np.asarray(load_image(tmp_path/'clear.png')).min() == 255


def test_escaping_paths(hd):
    root = hd['images']
    for bad in ('../outside.png', str(hd['dir']/'outside.png'), 'link.png', 'sub/../../outside.png'):
        with pytest.raises(ImageLoadError, match='escapes|absolute'): load_image(bad, root)
    assert load_image('rgb.jpg', root).size == (64, 48)
    os.makedirs(root/'sub', exist_ok=True)
    if not (root/'sub'/'inside.png').is_symlink(): os.symlink(root/'rgb.jpg', root/'sub'/'inside.png')
    assert load_image('sub/inside.png', root).size == (64, 48)   # a symlink that stays inside is fine


def test_validator_flags_what_load_image_refuses(tmp_path):
    "The validator passes bomb_small.png, which every training/inference path then refuses."
    ims = hostile_images(tmp_path)
    for name, (_, want) in HOSTILE_IMAGES.items():
        if want != 'refused' or name == 'bomb_small.png': continue
        s = Sample([Turn('user', '<image>\nq'), Turn('assistant', 'a')], images=[name], id=name)
        assert [p.code for p in check_sample(s, tmp_path)] == ['bad-image'], name


def test_validator_flags_images_over_the_pixel_limit(tmp_path):
    hostile_images(tmp_path)
    s = Sample([Turn('user', '<image>\nq'), Turn('assistant', 'a')], images=['bomb_small.png'], id='big')
    assert any(p.level == 'error' for p in check_sample(s, tmp_path))


# ---------------------------------------------------------------- dataset files
def test_read_dataset_records_unreadable_lines(hd):
    ds = read_dataset(hd['path'])
    bad = [k for k, (_, w) in HOSTILE_RECORDS.items() if w == 'unreadable']
    assert sorted(w for w, _ in ds.problems) == sorted(f'line {LINE[k]}' for k in bad)
    assert [s.id for s in ds.samples] == [k for k in HOSTILE_RECORDS if k not in bad]
    msgs = dict(ds.problems)
    assert 'UTF-8' in msgs[f"line {LINE['bad_utf8']}"] and 'JSON' in msgs[f"line {LINE['bad_json']}"]


def test_read_dataset_whole_file_unreadable(tmp_path):
    (tmp_path/'bin.jsonl').write_bytes(b'\xff\xfe\x00garbage\n\x89PNG\n')
    with pytest.raises(DataFormatError, match='no readable JSON records'): read_dataset(tmp_path/'bin.jsonl')
    (tmp_path/'arr.json').write_text(json.dumps([{'conversations': 'x'}, 5, {'id': 1, 'conversations': []}]))
    ds = read_dataset(tmp_path/'arr.json')
    assert len(ds.samples) == 1 and [w for w, _ in ds.problems] == ['record 0', 'record 1']
    (tmp_path/'empty.json').write_text('')
    assert len(read_dataset(tmp_path/'empty.json').samples) == 0


def test_validate_cli_names_every_case(hd, cli):
    p = cli('data', 'validate', hd['path'], '--images', hd['images'], '--json')
    no_traceback(p)
    assert p.returncode == 1
    rep = json.loads(p.stdout)
    named = {pr['sample'] for pr in rep['problems'] if pr['level'] == 'error'}
    for k, (what, want) in HOSTILE_RECORDS.items():
        key = f'line {LINE[k]}' if want == 'unreadable' else k
        assert (key in named) == (want != 'ok'), (k, what)
    assert rep['counts']['unreadable-record'] == 5 and rep['n_samples'] == len(HOSTILE_RECORDS) - 5
    assert not hd['marker'].exists()


def test_masks_cli_records_skips(hd, cli):
    p = cli('masks', hd['path'], '--family', 'internvl3_5', '--images', hd['images'], '--json', timeout=300)
    no_traceback(p)
    assert p.returncode == 0
    rows = {r['id']: r for r in map(json.loads, p.stdout.splitlines())}
    for k in ('dotdot', 'absolute', 'symlink', 'missing', 'corrupt', 'bomb', 'two_markers', 'empty_conv', 'huge'):
        assert 'skipped' in rows[k] and rows[k]['skipped'], k                 # a recorded skip with its reason
    assert 'escapes' in rows['dotdot']['skipped'] and 'bomb' in rows['bomb']['skipped']
    assert rows['good']['n_images'] == 1 and rows['good']['n_trained'] > 0
    assert not hd['marker'].exists()


def test_masks_cli_reports_unreadable_lines(hd, cli):
    p = cli('masks', hd['path'], '--family', 'internvl3_5', '--images', hd['images'], '--limit', '1', timeout=300)
    out = p.stdout + p.stderr
    assert all(f'line {LINE[k]}' in out for k, (_, w) in HOSTILE_RECORDS.items() if w == 'unreadable'), out[-800:]


# ---------------------------------------------------------------- tools
BOXES = ['0, 0, 1, 1', '0, 0, 1e9, 1e9', '-5, -5, -1, -1', '10, 10, 5, 5', '0.5, 0.5, 0.6, 0.6', '3999, 2999, 4000, 3000',
         'inf, 0, 1, 1', 'nan, 0, 1, 1', '1e999, 0, 1, 2', '1, 2, 3', '']

@pytest.mark.parametrize('size', [(1, 1), (4000, 3000), (1, 3000)])
def test_crop_extremes(size):
    reg = default_registry(); img = Image.new('RGB', size, (9, 9, 9))
    for b in BOXES:
        for text in (f'<tool_call>Crop [{b}]</tool_call>', f'<tool_call>{{"name": "Crop", "arguments": {{"bbox": [{b}]}}}}</tool_call>'):
            (c,) = parse_tool_calls(text)
            r = reg.execute([img], c)
            assert r.kind in ('image', 'error'), (b, r)
            if r.kind == 'image': assert 1 <= r.image.size[0] <= size[0] and 1 <= r.image.size[1] <= size[1]
            else: assert r.text
    ok = reg.execute([img], parse_tool_calls('<tool_call>Crop [0, 0, 1, 1]</tool_call>')[0])
    assert ok.kind == 'image'


def test_crop_on_unreadable_image_paths(tmp_path):
    ims = hostile_images(tmp_path); reg = default_registry()
    (c,) = parse_tool_calls('<tool_call>Crop [0, 0, 10, 10]</tool_call>')
    for n in ('bomb.png', 'truncated.png', 'empty.jpg'):
        r = reg.execute([ims[n]], c)
        assert r.kind == 'error' and n in r.text
    assert reg.execute([ims['gray16.png']], c).kind == 'image'
    assert reg.execute([], c).kind == 'error' and reg.execute(None, c).kind == 'error'


def test_code_in_tool_arguments_is_an_error(tmp_path, monkeypatch, cli):
    marker = tmp_path/'PWNED'
    code = f"__import__('pathlib').Path('{marker}').touch()"
    texts = [f'<tool_call>Crop [{code}]</tool_call>', f'<tool_call>Crop [{code}, 1, 2, 3]</tool_call>',
             '<tool_call>{"name": "Crop", "arguments": {"bbox": "' + code.replace("'", "\\'") + '"}}</tool_call>',
             '<tool_call>{"name": "Crop", "arguments": "' + code.replace("'", "\\'") + '"}</tool_call>',
             f'{{Crop obj 1 [{code}]}}', f"<tool_call>{code}</tool_call>"]
    def boom(*a, **k): raise AssertionError('eval/exec called on tool arguments')
    monkeypatch.setattr(builtins, 'eval', boom); monkeypatch.setattr(builtins, 'exec', boom)
    reg = default_registry(); img = Image.new('RGB', (32, 32))
    for t in texts:
        calls = parse_tool_calls(t)
        assert calls and all(c.error for c in calls), (t, calls)
        assert all(reg.execute([img], c).kind == 'error' for c in calls)
        s = Sample([Turn('user', '<image>\nq'), Turn('assistant', f'<think>\n{t}\n</think>\n<answer>x</answer>')], images=['a.png'], id='c')
        assert any(p.code in ('bad-tool-call', 'placeholder', 'legacy-call', 'unknown-tool') for p in check_sample(s)), t
    monkeypatch.undo()
    p = cli('tools', 'parse', '--json', input='\n'.join(texts))
    assert p.returncode == 0 and all(c['error'] for c in json.loads(p.stdout))
    assert not marker.exists()


# ---------------------------------------------------------------- annotation pickles and generators
def test_restricted_unpickler_refuses_payloads(tmp_path, syn):
    marker = tmp_path/'PWNED'
    for name, payload in malicious_pickles(marker).items():
        with pytest.raises(UnsafePickleError, match='refusing'): safe_pickle_load(payload)
    assert not marker.exists()
    ann = tmp_path/'ann'; shutil.copytree(syn/'annotations'/'refcoco', ann/'refcoco')
    (ann/'refcoco'/'refs(unc).p').write_bytes(malicious_pickles(marker)['os.system'])
    with pytest.raises(UnsafePickleError): load_refcoco(ann)
    assert not marker.exists()
    assert len(load_refcoco(syn/'annotations'/'refcoco')) > 0          # the real pickles still load


def _pickled_annotations(syn, d, kind):
    shutil.copytree(syn/'annotations'/'refcoco', d/'refcoco')
    pk = d/'refcoco'/'refs(unc).p'
    pk.write_bytes(malicious_pickles(d/'PWNED')['builtins.open'] if kind == 'malicious' else pk.read_bytes()[:60])
    return d


@pytest.mark.parametrize('kind', ['malicious', 'truncated'])
@pytest.mark.parametrize('cmd', ['identity', 'refcoco'])
def test_gen_cli_malicious_pickle_is_one_line_error(syn, tmp_path, cli, cmd, kind):
    ann = _pickled_annotations(syn, tmp_path/'ann', kind)
    p = cli('gen', cmd, '--annotations', ann, '--images', syn/'images', '--out', tmp_path/'out', timeout=300)
    assert not (ann/'PWNED').exists()
    assert p.returncode != 0 and 'Traceback' not in p.stderr and p.stderr.strip().startswith('error:'), p.stderr[-300:]


def test_gen_cli_malicious_pickle_never_runs(syn, tmp_path, cli):
    "Whatever the error path, the payload never executes."
    for cmd in ('identity', 'refcoco'):
        ann = _pickled_annotations(syn, tmp_path/f'ann_{cmd}', 'malicious')
        p = cli('gen', cmd, '--annotations', ann, '--images', syn/'images', '--out', tmp_path/f'out_{cmd}', timeout=300)
        assert p.returncode != 0 and 'refusing to unpickle' in p.stderr and not (ann/'PWNED').exists()


def _hf_rows(syn):
    return [json.loads(l) for l in (syn/'annotations'/'hf'/'refcoco.jsonl').read_text().splitlines()]


def test_gen_identity_corrupt_annotations(syn, tmp_path, cli):
    rows = _hf_rows(syn)
    def run(name, lines):
        d = tmp_path/name; d.mkdir(); (d/'refcoco.jsonl').write_bytes(lines)
        return cli('gen', 'identity', '--annotations', d, '--images', syn/'images', '--out', tmp_path/f'out_{name}', '--quiet', '--json')
    enc = lambda rs: b''.join(json.dumps(r).encode() + b'\n' for r in rs)
    p = run('utf8', enc(rows[:2]) + b'{"image_id": "\xff"}\n' + enc(rows[2:]))
    no_traceback(p); assert p.returncode != 0 and 'line 3' in p.stderr and 'UTF-8' in p.stderr
    p = run('badbox', enc([{**rows[0], 'bbox': ['x', 1, 2, 3]}] + rows[1:]))
    no_traceback(p); assert p.returncode != 0 and 'line 1' in p.stderr
    p = run('missingkey', enc([{k: v for k, v in rows[0].items() if k != 'image_id'}] + rows[1:]))
    no_traceback(p); assert p.returncode != 0 and 'line 1' in p.stderr
    persons = [r for r in rows if r['category_id'] == 1]
    p = run('nanbox', enc([{**r, 'bbox': [float('nan'), 0, 1e999, -4]} if r in persons[:1] else r for r in rows]))
    no_traceback(p); assert p.returncode == 0, p.stderr


def test_gen_identity_hostile_images(syn, tmp_path, cli):
    "Escaping, absolute, missing and unreadable images are counted in `missing_images`; the run continues."
    rows = _hf_rows(syn)
    ids = sorted({r['image_id'] for r in rows if r['category_id'] == 1})
    assert len(ids) >= 3
    imgs = tmp_path/'images'; shutil.copytree(syn/'images', imgs)
    (tmp_path/'outside.png').write_bytes((imgs/'000001.png').read_bytes())
    os.symlink(tmp_path/'outside.png', imgs/'link.png')
    bad = {ids[0]: '../outside.png', ids[1]: str(tmp_path/'outside.png'), ids[2]: 'link.png'}
    for r in rows:
        if r['image_id'] in bad:
            info = json.loads(r['raw_image_info']); info['file_name'] = bad[r['image_id']]; r['raw_image_info'] = json.dumps(info)
    d = tmp_path/'ann'; d.mkdir(); (d/'refcoco.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    p = cli('gen', 'identity', '--annotations', d, '--images', imgs, '--out', tmp_path/'out', '--quiet', '--json')
    no_traceback(p); assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout.splitlines()[-1])
    assert rep['missing_images'] == 3 and rep['images_with_persons'] == len(ids)
    used = {r['image'] for s in ('train', 'val', 'test') for r in json.loads((tmp_path/'out'/f'{s}.json').read_text())}
    assert not used & set(bad.values())


def test_gen_identity_corrupt_image_without_size_is_skipped(syn, tmp_path, cli):
    rows = _hf_rows(syn)
    imgs = tmp_path/'images'; shutil.copytree(syn/'images', imgs)
    first = min(r['image_id'] for r in rows if r['category_id'] == 1)
    for r in rows:
        info = json.loads(r['raw_image_info']); info.pop('width', None); info.pop('height', None); r['raw_image_info'] = json.dumps(info)
        if r['image_id'] == first: victim = info['file_name']
    (imgs/victim).write_bytes(b'not an image at all')
    d = tmp_path/'ann'; d.mkdir(); (d/'refcoco.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    p = cli('gen', 'identity', '--annotations', d, '--images', imgs, '--out', tmp_path/'out', '--quiet', '--json')
    no_traceback(p)
    assert p.returncode == 0 and json.loads(p.stdout.splitlines()[-1])['missing_images'] == 1, p.stderr[-300:]


# ---------------------------------------------------------------- batch inference
class FakeEngine:
    "Stands in for ToolEngine: answers with the image size (batch_infer only needs `run_batch`)."
    def __init__(self): self.seen = []
    def run_batch(self, reqs, **kw):
        from vlm_nb.engine import Trajectory
        out = []
        for ims, prompt in reqs:
            self.seen.append(prompt); t = Trajectory(prompt, ims); t.add('text', f'<answer>{ims[0].size}</answer>'); t.finish_reason = 'stop'
            out.append(t)
        return out


def test_batch_infer_records_unreadable(hd, tmp_path):
    from vlm_nb.infer import batch_infer
    eng = FakeEngine()
    st = batch_infer(eng, hd['path'], tmp_path/'out', image_root=hd['images'], progress=False)
    ds = read_dataset(hd['path'])
    assert st['total'] == len(ds.samples) and st['ok'] + st['unreadable'] + st['error'] == st['total']
    recs = {json.loads(f.read_text())['id']: json.loads(f.read_text()) for f in (tmp_path/'out').glob('*.json') if f.name != 'summary.json'}
    for k in ('dotdot', 'absolute', 'symlink', 'missing', 'corrupt', 'bomb'):
        assert recs[k]['status'] == 'unreadable' and recs[k]['error'], k
    assert recs['good']['status'] == 'ok' and recs['good']['answer'] == '(64, 48)'
    assert json.loads((tmp_path/'out'/'summary.json').read_text())['unreadable'] == 6
    folder = tmp_path/'folder'; shutil.copytree(hd['images'], folder, symlinks=True)
    st = batch_infer(FakeEngine(), folder, tmp_path/'out2', prompt='What?', progress=False)
    assert st['unreadable'] >= 5 and st['ok'] >= 9 and st['error'] == 0           # every broken file recorded, the rest answered


def test_batch_infer_counts_unreadable_lines(hd, tmp_path):
    from vlm_nb.infer import batch_infer
    st = batch_infer(FakeEngine(), hd['path'], tmp_path/'out', image_root=hd['images'], progress=False)
    n_lines = len(HOSTILE_RECORDS)
    accounted = st['ok'] + st['unreadable'] + st['error'] + sum(v for k, v in st.items() if 'record' in k or 'line' in k)
    assert accounted == n_lines, st


# ---------------------------------------------------------------- eval on malformed predictions
@pytest.fixture(scope='module')
def tool_data(tmp_path_factory):
    from vlm_nb.synthetic import build_tool_dataset
    d = tmp_path_factory.mktemp('tools')
    build_tool_dataset(d, 3, seed=2, cfg=SceneConfig(192, 144), progress=False)
    return d


def _write_lines(path, rec, n): path.write_text(''.join(json.dumps(rec) + '\n' for _ in range(n))); return path

def _n_rec(syn):
    from vlm_nb.eval import rec_items
    return len(rec_items(load_refcoco(syn/'annotations'), 'all'))


@pytest.mark.parametrize('pred', [{'box': 'abc'}, {'box': [float('nan'), 0, 10, 10]}, {'text': 12345}, {'text': None},
                                  {'text': '[' * 50_000}, {'text': '[1, 2, 3, 4]', 'resized': 'x'}], ids=lambda v: str(v)[:40])
def test_eval_rec_tolerable_predictions(syn, tmp_path, cli, pred):
    f = _write_lines(tmp_path/'p.jsonl', pred, _n_rec(syn))
    p = cli('eval', 'rec', '--predictions', f, '--annotations', syn/'annotations', '--images', syn/'images', '--split', 'all', '--json')
    no_traceback(p)


@pytest.mark.parametrize('pred', [{'box': [1, 2]}, {'box': 5}, {'box': [None, 1, 2, 3]}], ids=lambda v: str(v)[:40])
def test_eval_rec_malformed_predictions(syn, tmp_path, cli, pred):
    f = _write_lines(tmp_path/'p.jsonl', pred, _n_rec(syn))
    p = cli('eval', 'rec', '--predictions', f, '--annotations', syn/'annotations', '--images', syn/'images', '--split', 'all', '--json')
    no_traceback(p)


def _eval_tools(td, traj, cli):
    return cli('eval', 'tools', '--trajectories', traj, '--data', td/'tool_data'/'train.json', '--images', td/'images', '--json')


@pytest.mark.parametrize('traj', [{'text': None}, [1, 2], {'text': '<tool_call>Crop [1, 2]</tool_call><answer>x</answer>'},
                                  {'text': '<tool_call>Crop [inf, nan, -1, 1e999]</tool_call><tool_response>me</tool_response>'}], ids=lambda v: str(v)[:40])
def test_eval_tools_tolerable_trajectories(tool_data, tmp_path, cli, traj):
    n = len(json.loads((tool_data/'tool_data'/'train.json').read_text()))
    p = _eval_tools(tool_data, _write_lines(tmp_path/'t.jsonl', traj, n), cli)
    no_traceback(p); assert p.returncode == 0


def test_eval_tools_code_in_trajectory_never_runs(tool_data, tmp_path, cli):
    marker = tmp_path/'PWNED'
    n = len(json.loads((tool_data/'tool_data'/'train.json').read_text()))
    t = {'text': f"<tool_call>Crop [__import__('pathlib').Path('{marker}').touch()]</tool_call><answer>x</answer>"}
    p = _eval_tools(tool_data, _write_lines(tmp_path/'t.jsonl', t, n), cli)
    assert p.returncode == 0 and not marker.exists()


@pytest.mark.parametrize('traj', [{'text': 5}, {'steps': 'garbage'}, {'steps': [1, 'x', None]}, {'text': 'x', 'meta': 'zzz'},
                                  {'steps': [{'kind': 'tool_call', 'text': '', 'name': 'Crop', 'bbox': 'x'}]}], ids=lambda v: str(v)[:40])
def test_eval_tools_malformed_trajectories(tool_data, tmp_path, cli, traj):
    n = len(json.loads((tool_data/'tool_data'/'train.json').read_text()))
    p = _eval_tools(tool_data, _write_lines(tmp_path/'t.jsonl', traj, n), cli)
    no_traceback(p)


# ---------------------------------------------------------------- security
def test_source_audit():
    "No eval/exec, no bare pickle, no trust_remote_code, no shell=True in the package; the one torch.load is GRPO's (see test_killed_jobs)."
    hits = audit_package(ROOT/'vlm_nb')
    assert {f: [w for _, w in h] for f, h in hits.items()} in ({}, {'grpo.py': ['torch.load(weights_only=False)']}), hits


def test_no_trust_remote_code(tmp_path, monkeypatch):
    "load_model and load_tokenizer never pass trust_remote_code (checked on the calls, not just the source)."
    import transformers
    from vlm_nb import models
    tok = models.load_tokenizer('internvl3_5')
    seen = []
    class FakeModel:
        @classmethod
        def from_pretrained(cls, path, **kw): seen.append(('model', kw)); return cls()
        def to(self, d): return self
        def eval(self): return self
    monkeypatch.setattr(models.FamilyAdapter, 'load_model_class', lambda self: FakeModel)
    monkeypatch.setattr(transformers.AutoTokenizer, 'from_pretrained', classmethod(lambda cls, p, **kw: seen.append(('tok', kw)) or tok))
    models._TOK_CACHE.clear()
    d = tmp_path/'ckpt'; d.mkdir()
    for mt in ('internvl', 'qwen2_5_vl', 'qwen3_vl'):
        (d/'config.json').write_text(json.dumps({'model_type': mt}))
        try: models.load_model(d)
        except Exception as e:
            if 'unsupported model_type' in str(e): continue
            raise
    assert seen and all(not kw.get('trust_remote_code') for _, kw in seen), seen
    (d/'config.json').write_text(json.dumps({'model_type': 'internvl_chat'}))          # the remote-code release is refused
    with pytest.raises(ValueError, match='remote-code'): models.load_model(d)


def test_webui_defaults():
    pytest.importorskip('vlm_nb.webui')
    from vlm_nb.webui import launch_kwargs, webui_parser, DEFAULT_MAX_FILE_SIZE
    kw = launch_kwargs()
    assert kw['server_name'] == '127.0.0.1' and kw['share'] is False and kw['allowed_paths'] == []
    assert kw['max_file_size'] == DEFAULT_MAX_FILE_SIZE and DEFAULT_MAX_FILE_SIZE
    a = webui_parser().parse_args([])
    assert a.host == '127.0.0.1' and a.max_file_size == DEFAULT_MAX_FILE_SIZE


def test_network_clients_have_timeouts():
    pytest.importorskip('openai')
    from vlm_nb.infer import RemoteEngine, _infer_parser
    from vlm_nb.refcoco import OpenAIChat
    from vlm_nb.eval import ServerGrounder
    url = 'http://127.0.0.1:9/v1'
    clients = {'engine.RemoteEngine': RemoteEngine(url, 'm').client, 'refcoco.OpenAIChat': OpenAIChat(url, 'm').client,
               'eval.ServerGrounder': ServerGrounder(url, 'm').chat.client}
    for name, c in clients.items():
        t = c.timeout
        secs = t if isinstance(t, (int, float)) else getattr(t, 'read', None)
        assert secs is not None and 0 < secs <= 600, (name, t)
        assert c.max_retries <= 5, name
    assert _infer_parser().parse_args(['--image', 'x', '--prompt', 'q', '--server', url]).timeout == 120


def test_gen_synthetic_small_sizes(tmp_path, cli):
    p = cli('gen', 'synthetic', '--out', tmp_path, '--images', 3, '--size', '128x96', '--quiet')
    no_traceback(p)
    assert p.returncode == 0 or 'size' in p.stderr, p.stderr
