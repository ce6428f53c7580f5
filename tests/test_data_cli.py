"`vlm-nb data validate|convert|split` as a user runs them."
import json, shutil
from pathlib import Path
import pytest
from PIL import Image
from vlm_nb.data import shared_path, read_dataset

SAMPLES = shared_path('samples')
needs_shared = pytest.mark.skipif(SAMPLES is None, reason='../shared/samples not present')

def _write(p, recs): p.write_text(json.dumps(recs)); return p

@pytest.fixture
def small(tmp_path):
    Image.new('RGB', (100, 80), 'white').save(tmp_path/'a.png'); Image.new('RGB', (50, 50)).save(tmp_path/'b.png')
    recs = [{'id': f's{i}', 'image': 'a.png' if i % 2 else 'b.png',
             'conversations': [{'from': 'human', 'value': '<image>\nWho?'},
                               {'from': 'gpt', 'value': '<think>\n<tool_call>Identify [1, 2, 30, 40]</tool_call><tool_response>Ann</tool_response>\n</think>\n<answer>Ann</answer>'}]}
            for i in range(10)]
    return _write(tmp_path/'ok.json', recs), tmp_path

def test_validate_clean_file(cli, small):
    f, root = small
    r = cli('data', 'validate', f, '--images', root, '--json'); assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout); assert rep['n_samples'] == 10 and rep['n_errors'] == 0

def test_validate_reports_each_defect_with_sample_id(cli, tmp_path):
    Image.new('RGB', (64, 64)).save(tmp_path/'a.png')
    recs = [{'id': 'missing', 'image': 'nope.png', 'conversations': [{'from': 'human', 'value': '<image>\nq'}, {'from': 'gpt', 'value': 'a'}]},
            {'id': 'escape', 'image': '../a.png', 'conversations': [{'from': 'human', 'value': '<image>\nq'}, {'from': 'gpt', 'value': 'a'}]},
            {'id': 'count', 'image': 'a.png', 'conversations': [{'from': 'human', 'value': 'q'}, {'from': 'gpt', 'value': 'a'}]},
            {'id': 'empty', 'image': 'a.png', 'conversations': [{'from': 'human', 'value': '<image>\nq'}, {'from': 'gpt', 'value': '  '}]},
            {'id': 'order', 'image': 'a.png', 'conversations': [{'from': 'gpt', 'value': 'a'}, {'from': 'human', 'value': '<image>\nq'}]},
            {'id': 'call', 'image': 'a.png', 'conversations': [{'from': 'human', 'value': '<image>\nq'}, {'from': 'gpt', 'value': '<tool_call>Crop [1, 2, nan, 4]</tool_call>'}]},
            {'id': 'unclosed', 'image': 'a.png', 'conversations': [{'from': 'human', 'value': '<image>\nq'}, {'from': 'gpt', 'value': '<think>\nhmm'}]},
            {'id': 'placeholder', 'image': 'a.png', 'conversations': [{'from': 'human', 'value': '<image>\nq'}, {'from': 'gpt', 'value': 'see {Tool call} ok'}]}]
    f = _write(tmp_path/'bad.json', recs)
    r = cli('data', 'validate', f, '--images', tmp_path, '--json'); assert r.returncode == 1
    got = {(p['sample'], p['code']) for p in json.loads(r.stdout)['problems']}
    for want in [('missing', 'missing-image'), ('escape', 'image-path'), ('count', 'image-count'), ('empty', 'empty-turn'),
                 ('order', 'role-order'), ('call', 'bad-tool-call'), ('unclosed', 'unclosed-tag'), ('placeholder', 'placeholder')]:
        assert want in got, want
    txt = cli('data', 'validate', f, '--images', tmp_path).stdout
    assert 'fix:' in txt and '[missing]' in txt

def test_validate_bad_input_is_one_line(cli, tmp_path):
    r = cli('data', 'validate', tmp_path/'nothing.json'); assert r.returncode == 2 and r.stderr.startswith('error:')
    (tmp_path/'junk.json').write_bytes(b'\xff\xfe not json')
    r = cli('data', 'validate', tmp_path/'junk.json'); assert r.returncode == 2 and r.stderr.count('\n') == 1

@needs_shared
def test_shared_samples_validate_and_report_real_defects(cli):
    r = cli('data', 'validate', SAMPLES/'refcoco_qa_pairs_sample.jsonl', '--json'); assert r.returncode == 1
    assert json.loads(r.stdout)['counts'] == {'placeholder': 1}
    for f in ['identity_qa_pairs_sample.json', 'refcoco_qa_pairs_croptool_sample.json', 'train_data.json', 'data_example.json']:
        assert cli('data', 'validate', SAMPLES/f).returncode == 0, f

@needs_shared
def test_convert_qna_to_canonical_conversations(cli, tmp_path):
    out = tmp_path/'conv.json'
    r = cli('data', 'convert', SAMPLES/'refcoco_qa_pairs_sample.jsonl', out, '--system-prompt', 'tools', '--json'); assert r.returncode == 0, r.stderr
    ds = read_dataset(out); assert len(ds) == 50 and ds.fmt == 'llava'
    assert all(s.system and s.turns[1].text.startswith('<image>\n') for s in ds)
    assert not any('{Crop' in s.turns[-1].text for s in ds)
    rep = json.loads(cli('data', 'validate', out, '--json').stdout)
    assert rep['counts'] == {'placeholder': 1}       # the one real defect survives conversion and is still reported
    back = tmp_path/'back.jsonl'
    assert cli('data', 'convert', out, back, '--to', 'messages').returncode == 0
    assert len(read_dataset(back)) == 50

def test_split_by_image_is_disjoint_and_deterministic(cli, small, tmp_path):
    f, _ = small
    a = json.loads(cli('data', 'split', f, '--by-image', '--val', '0.5', '--seed', '3', '--out', tmp_path/'a', '--json').stdout)
    cli('data', 'split', f, '--by-image', '--val', '0.5', '--seed', '3', '--out', tmp_path/'b')
    assert a['train'] + a['val'] == 10
    tr, va = read_dataset(tmp_path/'a'/'train.json'), read_dataset(tmp_path/'a'/'val.json')
    assert not ({i for s in tr for i in s.images} & {i for s in va for i in s.images})
    assert (tmp_path/'a'/'train.json').read_text() == (tmp_path/'b'/'train.json').read_text()
