"""Tests of `vlm_nb.eval`: hand-computed metrics on canned outputs, and `vlm-nb eval rec` / `eval tools` end to end."""
import json, os
from pathlib import Path
import numpy as np
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
from vlm_nb.eval import (wilson_ci, parse_pred_box, RecItem, score_rec, rec_items, Reference, as_reference,
                         trajectory_facts, score_trajectories, avg_at_k, METRIC_KEYS, eval_rec_main, eval_tools_main,
                         read_train_log, training_curves, plot_training, plot_mask, mask_runs, plot_trajectory, plot_boxes)
from vlm_nb.synthetic import build_tool_dataset, load_refcoco
from vlm_nb.tools import answer_match
from vlm_nb.data import load_samples


# ---------------------------------------------------------------- pure metrics

def test_wilson_hand_values():
    # (k, n) -> textbook 95% Wilson intervals
    for (k, n), (lo, hi) in {(3, 4): (0.30064, 0.95442), (2, 4): (0.15004, 0.84996), (45, 50): (0.78640, 0.95652),
                             (0, 10): (0.0, 0.27753), (10, 10): (0.72247, 1.0)}.items():
        got = wilson_ci(k, n)
        assert got[0] == pytest.approx(lo, abs=1e-5) and got[1] == pytest.approx(hi, abs=1e-5), (k, n, got)
    assert wilson_ci(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError): wilson_ci(3, 2)


@pytest.mark.parametrize('text,family,resized,space', [
    ('[64, 48, 320, 240]', None, None, 'abs'),
    ('[0.1, 0.1, 0.5, 0.5]', None, None, 'norm1'),
    ('{"bbox_2d": [100, 100, 500, 500]}', 'qwen3_vl', None, 'norm1000'),
    ('{"bbox_2d": [32, 24, 160, 120]}', 'qwen2_5_vl', (320, 240), 'resized'),
    ('<ref>x</ref><box>[[100, 100, 500, 500]]</box>', 'internvl3_5', None, 'norm1000'),
    ('<ref>x</ref><box>(0.1,0.1),(0.5,0.5)</box>', 'ovis2_5', None, 'norm1'),
    ('<think>\n<tool_call>Crop [1, 1, 9, 9]</tool_call>\n</think>\n<answer>[64, 48, 320, 240]</answer>', None, None, 'abs'),
])
def test_parse_pred_box_families(text, family, resized, space):
    p = parse_pred_box(text, family, (640, 480), resized)
    assert p['space'] == space and p['box'] == pytest.approx([64, 48, 320, 240])


def test_parse_pred_box_none():
    assert parse_pred_box('I cannot see it', size=(10, 10)) is None
    assert parse_pred_box('<tool_call>Crop [1, 2, 3, 4]</tool_call>', size=(10, 10)) is None


def test_score_rec_hand_computed():
    items = [RecItem(f'refcoco:{i}:0', 'a.png', (100, 100), 'x', [0, 0, 60, 60], 'refcoco', 'val') for i in range(3)]
    items.append(RecItem('refcocog:9:0', 'a.png', (100, 100), 'x', [0, 0, 60, 60], 'refcocog', 'val'))
    r = score_rec(items, [[0, 0, 60, 60], [30, 0, 90, 60], [0, 0, 40, 60], None])   # IoU 1, 1/3, 2/3, miss
    assert (r['acc@0.5'], r['n'], r['hits'], r['parsed'], r['ci95']) == (0.5, 4, 2, 3, [0.15, 0.85])
    assert r['mean_iou'] == pytest.approx(0.5)
    assert r['splits']['refcoco/val']['acc@0.5'] == pytest.approx(2 / 3) and r['splits']['refcocog/val']['hits'] == 0
    assert r['splits']['refcoco/val']['ci95'] == [round(v, 4) for v in wilson_ci(2, 3)]


def test_answer_match():
    assert answer_match('It says 77.', '77') and not answer_match('177', '77')
    assert answer_match('Bo Wu and Ada Li', 'Ada Li and Bo Wu') and not answer_match('Ada Li', 'Ada Li and Bo Wu')
    # the counter-examples the two earlier copies got wrong
    assert answer_match('A', 'A', ['red', 'blue']) and not answer_match('', 'A') and not answer_match('the', 'A')
    assert not answer_match('-5', '5') and not answer_match('3 or 2', '3') and not answer_match('cat or dog', 'cat')
    assert not answer_match('Alice, Bob and Carol', 'Alice and Bob') and not answer_match('not closed', 'closed')


def test_strict_and_lenient_accuracy():
    s = score_trajectories(['<think>\nIt is 7.\n</think>\n7', '<answer>7</answer>'], [R_CROP, R_CROP])
    assert (s['answer_accuracy'], s['answer_accuracy_strict']) == (1.0, 0.5)


def _step(kind, text='', **d): return {'kind': kind, 'text': text, **d}

T_CROP = {'steps': [_step('text', '<think>\n'), _step('tool_call', '<tool_call>Crop [20, 20, 80, 80]</tool_call>', name='Crop', bbox=[20, 20, 80, 80], error=None),
                    _step('tool_result', '', result='image'), _step('text', '\n</think>\n<answer>7</answer>')]}
T_NONE = '<think>\nI see it.\n</think>\n<answer>1</answer>'
T_IDENT = {'steps': [_step('tool_call', '<tool_call>Identify [10, 10, 50, 90]</tool_call>', name='Identify', bbox=[10, 10, 50, 90], error=None),
                     # the shape `vlm_nb.engine.Trajectory.to_dict` writes for a text result
                     {'kind': 'text', 'text': '<tool_response>Ada Li</tool_response>', 'box': [10, 10, 50, 90], 'message': 'Ada Li', 'n_tokens': 6},
                     _step('text', '<answer>Ada Li</answer>')]}
T_FAKE = '<think><tool_call>Crop [5, 5, 1, 1]</tool_call><tool_response>Cy Xu</tool_response></think><answer>Cy Xu</answer>'
R_CROP = Reference('c', ['a.png'], 'What number?', '7', crops=[[20, 20, 80, 100]], kind='crop')
R_ID1 = Reference('i1', ['a.png'], 'Who?', 'Ada Li', identities=[('Ada Li', [10, 10, 50, 90])], kind='identify')
R_ID2 = Reference('i2', ['a.png'], 'Who?', 'Bo Wu', identities=[('Bo Wu', [60, 10, 95, 90])], kind='identify')


def test_score_trajectories_hand_computed():
    s = score_trajectories([T_CROP, T_NONE, T_IDENT, T_FAKE], [R_CROP, R_CROP, R_ID1, R_ID2])
    assert {k: s[k] for k in METRIC_KEYS + ('n',)} == {
        'tool_call_rate': 0.75, 'tool_call_validity': 2 / 3, 'crop_iou': 0.375, 'answer_accuracy': 0.5,
        'answer_accuracy_strict': 0.5, 'identity_accuracy': 0.5, 'self_written_tool_response_rate': 0.25, 'turns_per_answer': 1.5, 'n': 4}
    assert s['answer_accuracy_ci95'] == [0.15, 0.85]
    assert s['counts']['self_written_tool_responses'] == 1 and s['counts']['tool_calls'] == 3


def test_score_trajectories_undefined_metrics_are_none():
    s = score_trajectories([T_NONE], [Reference('x', [], 'q?', '1', kind='count')])
    assert (s['tool_call_validity'], s['crop_iou'], s['identity_accuracy'], s['tool_call_rate']) == (None, None, None, 0.0)
    with pytest.raises(ValueError): score_trajectories([T_NONE], [])


def test_identity_via_gallery():
    gal = {'images': {'a.png': [{'bbox': [10, 10, 50, 90], 'name': 'Ada Li'}]}}
    t = '<tool_call>Identify [12, 10, 50, 88]</tool_call><answer>Ada Li</answer>'
    assert score_trajectories([t], [R_ID1], gallery=gal)['identity_accuracy'] == 1.0
    assert score_trajectories([t], [R_ID2], gallery=gal)['identity_accuracy'] == 0.0


def test_trajectory_facts_engine_object():
    engine = pytest.importorskip('vlm_nb.engine')
    t = engine.Trajectory('q', steps=[engine.Step('text', '<think>'), engine.Step('tool_call', '<tool_call>Crop [1, 1, 9, 9]</tool_call>', data={'name': 'Crop', 'bbox': [1, 1, 9, 9], 'error': None}),
                                      engine.Step('tool_result', '', data={'kind': 'image'}), engine.Step('text', '</think><answer>x</answer>')])
    f = trajectory_facts(t)
    assert (len(f.calls), f.calls[0]['result_kind'], f.turns, f.self_written, f.answer) == (1, 'image', 2, 0, 'x')
    assert trajectory_facts(t.to_dict()).calls == f.calls


def test_avg_at_k():
    a = score_trajectories([T_CROP, T_NONE, T_IDENT, T_FAKE], [R_CROP, R_CROP, R_ID1, R_ID2])
    b = score_trajectories([T_CROP, T_CROP, T_IDENT, T_IDENT], [R_CROP, R_CROP, R_ID1, R_ID2])
    m = avg_at_k([a, b])
    assert (m['k'], m['n'], m['answer_accuracy'], m['std']['answer_accuracy']) == (2, 4, 0.625, 0.125)


# ---------------------------------------------------------------- figures

def test_training_log_and_figures(tmp_path):
    hist = [{'loss': 2.0 - 0.1 * s, 'learning_rate': 1e-4, 'step': s} for s in range(1, 6)] + [{'eval_loss': 1.5, 'step': 5}]
    (tmp_path/'checkpoint-5').mkdir(); (tmp_path/'checkpoint-5'/'trainer_state.json').write_text(json.dumps({'log_history': hist}))
    assert read_train_log(tmp_path) == hist
    assert training_curves(hist)['eval_loss'] == [(5, 1.5)]
    from PIL import Image
    img = Image.new('RGB', (100, 100), 'white')
    figs = [plot_training(hist), plot_mask(np.array([0] * 10 + [3] * 20 + [1] * 5)), plot_trajectory(T_CROP, img, R_CROP),
            plot_boxes(img, [0, 0, 50, 50], [10, 10, 60, 60], [[5, 5, 70, 70]])]
    for i, f in enumerate(figs): f.savefig(tmp_path/f'{i}.png'); assert (tmp_path/f'{i}.png').stat().st_size > 1000
    assert mask_runs([0, 0, 1]) == [('prompt', 0, 2), ('trained', 2, 3)]


# ---------------------------------------------------------------- CLI end to end

@pytest.fixture(scope='module')
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp('evsyn')
    build_tool_dataset(d, 12, progress=False)
    return d


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    from vlm_nb.models import make_tiny
    return make_tiny('qwen2_5_vl', tmp_path_factory.mktemp('tiny')/'qwen')


def _run(fn, argv, capsys):
    rc = fn([str(a) for a in argv]); o = capsys.readouterr(); return rc, o.out, o.err


def test_eval_rec_cli_canned(synth, tmp_path, capsys):
    items = rec_items(load_refcoco(synth/'annotations'), 'val')
    p = tmp_path/'preds.jsonl'
    # every third item exact (hit); the others answered in InternVL 0-1000 text for a box far off (miss)
    p.write_text(''.join(json.dumps({'key': it.key, 'box': it.box} if i % 3 == 0 else {'key': it.key, 'text': '<box>[[0, 0, 5, 5]]</box>'}) + '\n'
                         for i, it in enumerate(items)))
    rc, out, err = _run(eval_rec_main, ['--predictions', p, '--annotations', synth/'annotations', '--images', synth/'images',
                                        '--family', 'internvl3_5', '--json'], capsys)
    assert rc == 0, err
    rep = json.loads(out)
    k = (len(items) + 2) // 3
    assert (rep['n'], rep['hits'], rep['acc@0.5']) == (len(items), k, k / len(items))
    assert rep['ci95'] == [round(v, 4) for v in wilson_ci(k, len(items))]
    assert sum(s['n'] for s in rep['splits'].values()) == len(items) and all('/val' in s for s in rep['splits'])


@pytest.mark.parametrize('argv,code', [
    (['--annotations', 'ANN', '--images', 'IMG'], 2),                                            # no model/server/predictions
    (['--predictions', 'P', '--annotations', 'NOPE', '--images', 'IMG'], 1),                     # missing annotations
    (['--predictions', 'P', '--annotations', 'ANN', '--images', 'IMG', '--split', 'testB'], 2),  # empty split
    (['--predictions', 'P', '--annotations', 'ANN', '--images', 'IMG', '--limit', '0'], 2),
    (['--predictions', 'BAD', '--annotations', 'ANN', '--images', 'IMG'], 2),                    # corrupt JSONL
])
def test_eval_rec_cli_bad_input(synth, tmp_path, capsys, argv, code):
    (tmp_path/'p.jsonl').write_text('{"box": [0, 0, 1, 1]}\n' * 500); (tmp_path/'bad.jsonl').write_text('{nope\n')
    sub = {'ANN': synth/'annotations', 'IMG': synth/'images', 'P': tmp_path/'p.jsonl', 'BAD': tmp_path/'bad.jsonl', 'NOPE': tmp_path/'none'}
    rc, out, err = _run(eval_rec_main, [sub.get(a, a) for a in argv], capsys)
    assert rc == code and err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err, err


def test_eval_rec_cli_tiny_model(synth, tiny, tmp_path, capsys):
    rc, out, err = _run(eval_rec_main, ['--model', tiny, '--annotations', synth/'annotations', '--images', synth/'images',
                                        '--limit', '3', '--max-new-tokens', '8', '--json', '--out', tmp_path/'o'], capsys)
    assert rc == 0, err
    rep = json.loads(out)
    assert rep['n'] == 3 and rep['family'] == 'qwen2_5_vl' and set(rep['splits'])
    preds = [json.loads(l) for l in (tmp_path/'o'/'predictions.jsonl').read_text().splitlines()]
    assert len(preds) == 3
    # the report is the tally of its own predictions: hits recomputed from the boxes, rate, interval and parse count
    from vlm_nb.data import iou
    hits = [p['box'] is not None and iou(p['box'], p['gt']) >= 0.5 for p in preds]
    assert [p['hit'] for p in preds] == hits
    assert (rep['hits'], rep['parsed']) == (sum(hits), sum(p['box'] is not None for p in preds))
    assert rep['acc@0.5'] == pytest.approx(sum(hits) / 3, abs=1e-4) and rep['ci95'] == [round(v, 4) for v in wilson_ci(sum(hits), 3)]


def _canned_runs(synth, n=3):
    refs = [as_reference(s) for s in load_samples(synth/'tool_data'/'train.json')][:n]
    gal = json.loads((synth/'tool_data'/'gallery.json').read_text())
    from vlm_nb.synthetic import gallery_lookup
    def right(r):
        steps = [_step('text', '<think>\n')]
        for b in r.crops: steps += [_step('tool_call', '', name='Crop', bbox=b, error=None), _step('tool_result', '', result='image')]
        for _, b in r.identities:
            steps += [_step('tool_call', '', name='Identify', bbox=b, error=None),
                      _step('tool_result', f'<tool_response>{gallery_lookup(gal, r.images[0], b)}</tool_response>', result='text')]
        return {'steps': steps + [_step('text', f'\n</think>\n<answer>{r.answer}</answer>')]}
    seed0 = [right(r) | {'meta': {'sample_id': r.id, 'seed': 0}} for r in refs]
    seed1 = [{'text': '<answer>no idea</answer>', 'meta': {'sample_id': refs[0].id, 'seed': 1}}] + \
            [right(r) | {'meta': {'sample_id': r.id, 'seed': 1}} for r in refs[1:]]
    return refs, seed0 + seed1[::-1]      # matched by sample id, not file order


def test_eval_tools_cli_canned(synth, tmp_path, capsys):
    refs, trajs = _canned_runs(synth)
    tj = tmp_path/'t.jsonl'; tj.write_text(''.join(json.dumps(t) + '\n' for t in trajs))
    nt = tmp_path/'nt.jsonl'; nt.write_text(''.join(json.dumps({'text': '<answer>?</answer>'}) + '\n' for _ in refs))
    rc, out, err = _run(eval_tools_main, ['--trajectories', tj, '--no-tools-trajectories', nt, '--data', synth/'tool_data'/'train.json',
                                          '--images', synth/'images', '--limit', '3', '--json', '--out', tmp_path/'o'], capsys)
    assert rc == 0, err
    rep = json.loads(out); m = rep['metrics']
    n_tool = sum(bool(r.crops or r.identities) for r in refs)
    assert (m['n'], m['k']) == (3, 2)
    assert [s['answer_accuracy'] for s in rep['per_seed']] == [1.0, 2 / 3]
    assert m['answer_accuracy'] == pytest.approx(5 / 6)
    assert [s['tool_call_rate'] for s in rep['per_seed']] == [n_tool / 3, (n_tool - bool(refs[0].crops or refs[0].identities)) / 3]
    assert m['tool_call_validity'] == 1.0 and m['self_written_tool_response_rate'] == 0.0
    assert rep['no_tools']['metrics']['answer_accuracy'] == 0.0 and rep['tool_gain'] == pytest.approx(5 / 6)
    assert {p.name for p in (tmp_path/'o').iterdir()} == {'report.json', 'report.md', 'figures', 'trajectories'}
    assert (tmp_path/'o'/'figures'/'metrics.png').exists() and (tmp_path/'o'/'figures'/'trajectory_0.png').exists()
    assert '| answer_accuracy |' in (tmp_path/'o'/'report.md').read_text()


@pytest.mark.parametrize('extra,code', [(['--seeds', 'x'], 2), (['--limit', '-1'], 2), (['--gallery', 'nope.json'], 2)])
def test_eval_tools_cli_bad_input(synth, tmp_path, capsys, extra, code):
    tj = tmp_path/'t.jsonl'; tj.write_text('{"text": "<answer>1</answer>"}\n' * 50)
    rc, out, err = _run(eval_tools_main, ['--trajectories', tj, '--data', synth/'tool_data'/'train.json', '--images', synth/'images'] + extra, capsys)
    assert rc == code and err.startswith('error: ') and err.count('\n') == 1, err
    rc, out, err = _run(eval_tools_main, ['--trajectories', tj, '--data', tmp_path/'missing.json', '--images', synth/'images'], capsys)
    assert rc == 2 and err.startswith('error: data file not found')


def test_eval_tools_cli_tiny_model(synth, tiny, tmp_path, capsys):
    pytest.importorskip('vlm_nb.engine')
    rc, out, err = _run(eval_tools_main, ['--model', tiny, '--data', synth/'tool_data'/'train.json', '--images', synth/'images',
                                          '--limit', '2', '--seeds', '0,1', '--max-new-tokens', '12', '--no-tools', '--json',
                                          '--out', tmp_path/'o', '--figures', '1'], capsys)
    assert rc == 0, err
    rep = json.loads(out); m = rep['metrics']
    assert (m['n'], m['k'], rep['seeds']) == (2, 2, [0, 1])
    assert 'no_tools' in rep and len(list((tmp_path/'o'/'trajectories').iterdir())) == 4
    # the report's numbers are the metrics of the saved trajectories, seed by seed, and their mean over seeds
    refs = json.loads((synth/'tool_data'/'train.json').read_text())[:2]
    for seed, per in zip((0, 1), rep['per_seed']):
        ts = [json.loads(l) for l in (tmp_path/'o'/'trajectories'/f'tools_seed{seed}.jsonl').read_text().splitlines()]
        s = score_trajectories(ts, refs)
        assert {k: s[k] for k in METRIC_KEYS} == {k: per[k] for k in METRIC_KEYS}, seed
    for k in METRIC_KEYS:
        vals = [p[k] for p in rep['per_seed'] if p[k] is not None]
        assert m[k] == (pytest.approx(sum(vals) / len(vals)) if vals else None), k
    nt = rep['no_tools']['metrics']
    assert nt['turns_per_answer'] == 1.0                      # without tools no result is ever appended
    assert rep['tool_gain'] == pytest.approx(m['answer_accuracy'] - nt['answer_accuracy'])


def test_eval_tools_batched_equals_one_by_one(synth, tiny, tmp_path, capsys):
    "The same report and trajectories whether the samples decode together (batch 4) or one by one (batch 1)."
    pytest.importorskip('vlm_nb.engine')
    reps = []
    for bs in (4, 1):
        rc, out, err = _run(eval_tools_main, ['--model', tiny, '--data', synth/'tool_data'/'train.json', '--images', synth/'images',
                                              '--limit', '4', '--seeds', '3', '--max-new-tokens', '10', '--batch-size', str(bs),
                                              '--json', '--out', tmp_path/f'o{bs}', '--figures', '0'], capsys)
        assert rc == 0, err
        reps.append(json.loads(out))
    assert reps[0]['metrics'] == reps[1]['metrics']
    def trajs(d):                                        # every saved trajectory, without its timings
        out = [json.loads(l) for f in sorted((d/'trajectories').glob('*.jsonl')) for l in f.read_text().splitlines()]
        for t in out: t.pop('timings', None)
        return out
    assert trajs(tmp_path/'o4') == trajs(tmp_path/'o1') and len(trajs(tmp_path/'o1')) == 4


def test_eval_tools_cli_server(synth, tmp_path, capsys):
    "`eval tools --server URL --served-model NAME` runs the tool loop against a served model: its calls are executed and scored."
    pytest.importorskip('openai')
    from vlm_nb.refcoco import StubChatServer
    reply = lambda msgs: '<answer>7</answer>' if len(msgs) > 2 else '<tool_call>Crop [0, 0, 40, 40]</tool_call>'   # a call, then an answer once its result came back
    with StubChatServer(reply, model='tiny-served') as srv:
        args = ['--server', srv.url, '--data', synth/'tool_data'/'train.json', '--images', synth/'images', '--limit', '2', '--json']
        rc, out, err = _run(eval_tools_main, args, capsys)                 # the name is required, and the error says so
        assert rc == 2 and '--served-model' in err and not out
        rc, out, err = _run(eval_tools_main, args + ['--served-model', 'tiny-served', '--out', tmp_path/'o'], capsys)
        assert rc == 0, err
        m = json.loads(out)['metrics']
        assert (m['n'], m['tool_call_rate'], m['tool_call_validity'], m['turns_per_answer']) == (2, 1.0, 1.0, 2.0)
        assert len(srv.bodies) == 4 and {b['model'] for b in srv.bodies} == {'tiny-served'}
        second = srv.bodies[1]['messages']                                 # the crop comes back after the call, as an image
        assert 'Crop [0, 0, 40, 40]' in json.dumps(second[-2]) and 'image_url' in json.dumps(second[-1])


def test_eval_tools_server_checkpoint_layout(synth, tmp_path, capsys):
    "A local copy of the served checkpoint as --served-model gives its family and tool layout: an InternVL model trained with inline tool results is refused, with the reason."
    pytest.importorskip('openai')
    from vlm_nb.models import make_tiny
    args = ['--server', 'http://127.0.0.1:9/v1', '--data', synth/'tool_data'/'train.json', '--images', synth/'images', '--limit', '1', '--json']
    ivl = make_tiny('internvl3_5', tmp_path/'ivl'); capsys.readouterr()
    rc, out, err = _run(eval_tools_main, args + ['--served-model', ivl], capsys)
    assert rc != 0 and err.startswith('error: ') and "tool_layout 'inline'" in err and not out
    from vlm_nb.webui import webui_parser, make_engine                  # the web UI reads the checkpoint the same way
    a = webui_parser().parse_args(['--server', 'http://127.0.0.1:9/v1', '--served-model', str(make_tiny('qwen3_vl', tmp_path/'q3'))])
    e = make_engine(a)
    assert (e.family, e.tool_layout) == ('qwen3_vl', 'turn')
