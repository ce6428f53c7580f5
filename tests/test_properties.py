"""Property-based tests (hypothesis) that extend the module notebooks' own: loader and validator round trips, JSONL and
dataset readers on random bytes, tool execution on random boxes/images/coordinate spaces, geometry, and the sequence
builder on the two families tests/test_sequences.py does not fuzz plus hostile conversations.

Budget: $VLM_NB_FUZZ_EXAMPLES examples per property (default 25; e.g. 500 for a nightly run)."""
import json, math, os, tempfile
from pathlib import Path
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import numpy as np, pytest
from PIL import Image
from hypothesis import given, settings, assume, strategies as st, HealthCheck
from vlm_nb.reliability import fuzz_examples
from vlm_nb.data import (Sample, Turn, Dataset, write_dataset, read_dataset, read_jsonl, dataset_records, DataFormatError,
                         convert_box, iou, clamp_box, is_valid_box, box_area)
from vlm_nb.tools import parse_tool_calls, parse_box, default_registry, ToolCall, COORD_SPACES, format_tool_call
from vlm_nb.validate import check_sample

N = fuzz_examples(25)
FUZZ = settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck), database=None)

def bare(ss):
    "One sample with nothing but turns: hits the read_dataset bug below, excluded from the round-trip properties."
    return len(ss) == 1 and ss[0].id is None and not ss[0].images and not ss[0].meta

_chars = st.characters(blacklist_categories=('Cs',))            # any unicode except lone surrogates (not encodable)
_text = st.text(alphabet=_chars, max_size=30)
_frag = st.sampled_from(['<image>', '<image>\n', '<tool_call>', '</tool_call>', '<tool_response>', '</tool_response>', '<think>',
                         '</think>', '<answer>', '</answer>', 'Crop [1, 2, 30, 40]', 'Identify [0,0,5,5]', '{Tool call}', '{Crop obj 1 [1,2,3,4]}',
                         '[', ']', 'nan', '-1', '1e999', '"', '\\', '\n', ' ', 'é', '李', '\u202f', '\x00'])
_msg = st.lists(st.one_of(_text, _frag), max_size=8).map(''.join)
_json = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False) | _text,
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=6)


@st.composite
def samples(draw, roles=('system', 'user', 'assistant')):
    turns = [Turn(draw(st.sampled_from(roles)), draw(_msg)) for _ in range(draw(st.integers(0, 5)))]
    images = draw(st.lists(st.text(alphabet='abc/._-é 0123', min_size=1, max_size=12), max_size=3))
    meta = draw(st.dictionaries(st.text(alphabet='mnopq_', min_size=1, max_size=6).map(lambda k: 'm_' + k), _json, max_size=3))
    sid = draw(st.one_of(st.none(), st.text(alphabet=_chars, min_size=1, max_size=8), st.integers(0, 10**6)))
    return Sample(turns, images, [], sid, meta)


# ---------------------------------------------------------------- loaders
@FUZZ
@given(st.lists(samples(), min_size=1, max_size=4), st.sampled_from(['llava', 'messages']), st.sampled_from(['.json', '.jsonl']))
def test_loader_round_trip(ss, fmt, suffix):
    "write -> read -> write gives the same bytes, and the samples' turns, images, ids and metadata survive."
    assume(not bare(ss))
    with tempfile.TemporaryDirectory() as d:
        p, q = Path(d)/f'a{suffix}', Path(d)/f'b{suffix}'
        write_dataset(ss, p, fmt)
        ds = read_dataset(p)
        assert ds.problems == [] and len(ds) == len(ss) and ds.fmt == fmt
        for a, b in zip(ss, ds):
            assert [(t.role, t.text) for t in a.turns] == [(t.role, t.text) for t in b.turns]
            assert (a.images, a.id, a.meta) == (b.images, b.id, b.meta)
        write_dataset(ds, q)
        assert q.read_bytes() == p.read_bytes()
        assert dataset_records(read_dataset(q)) == dataset_records(ds)


@pytest.mark.parametrize('fmt', ['llava', 'messages'])
@pytest.mark.parametrize('suffix', ['.jsonl'])
def test_single_bare_record_round_trip(tmp_path, fmt, suffix):
    s = Sample([Turn('user', 'hi'), Turn('assistant', 'yo')])
    write_dataset([s], tmp_path/f'x{suffix}', fmt)
    ds = read_dataset(tmp_path/f'x{suffix}')
    assert len(ds) == 1 and ds.problems == []


@FUZZ
@given(st.lists(st.binary(max_size=60), max_size=8))
def test_jsonl_reader_accounts_for_every_line(lines):
    "Random bytes: every non-blank line is either a record or a problem naming its line; nothing raises."
    with tempfile.TemporaryDirectory() as d:
        p = Path(d)/'x.jsonl'; p.write_bytes(b'\n'.join(l.replace(b'\n', b' ').replace(b'\r', b' ') for l in lines) + b'\n')
        recs, probs = read_jsonl(p)
        nonblank = [i + 1 for i, l in enumerate(p.read_bytes().split(b'\n')[:-1]) if l.strip()]
        assert sorted([i for i, _ in recs] + [int(w.split()[1]) for w, _ in probs]) == nonblank
        try: ds = read_dataset(p)
        except DataFormatError as e: assert 'line' in str(e)
        else: assert len(ds.samples) + len(ds.problems) >= len(recs) - sum(isinstance(r, dict) and 'QnA' in r for _, r in recs)


@FUZZ
@given(st.lists(_json, max_size=5))
def test_read_dataset_on_random_json(objs):
    "Any JSON array: each element becomes samples or a recorded problem, never an exception."
    with tempfile.TemporaryDirectory() as d:
        p = Path(d)/'x.json'; p.write_text(json.dumps(objs))
        ds = read_dataset(p)
        assert len(ds.problems) <= len(objs) and all(w.startswith(('record', 'line')) for w, _ in ds.problems)


# ---------------------------------------------------------------- validator
@FUZZ
@given(samples(roles=('system', 'user', 'assistant', 'tool')))
def test_validator_never_raises_and_is_stable_under_round_trip(s):
    probs = check_sample(s)
    assert all(p.level in ('error', 'warning') and p.code and p.sample == s.name for p in probs)
    if not s.turns: assert [p.code for p in probs] == ['empty-conversation']
    if sum(t.text.count('<image>') for t in s.turns if t.role in ('user', 'system')) != len(s.images):
        assert 'image-count' in [p.code for p in probs] or not s.turns
    if bare([s]): return
    with tempfile.TemporaryDirectory() as d:
        write_dataset([s], Path(d)/'x.jsonl')
        (s2,) = read_dataset(Path(d)/'x.jsonl').samples
        assert [(p.code, p.message) for p in check_sample(s2)] == [(p.code, p.message) for p in probs]


# ---------------------------------------------------------------- tools
_num = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**12, 10**12), st.floats(-5, 300))
_size = st.tuples(st.integers(1, 300), st.integers(1, 300))

@FUZZ
@given(_size, st.lists(_num, min_size=0, max_size=6), st.sampled_from(['Crop', 'Identify']), st.sampled_from(COORD_SPACES),
       _size, st.integers(-1, 2), st.sampled_from(['canonical', 'json']))
def test_tool_execution_never_raises(size, box, name, space, resized, image, syntax):
    "Any box (inf, nan, negative, huge, wrong length), any coordinate space, any image index: a result, never an exception."
    if syntax == 'json':
        text = '<tool_call>' + json.dumps({'name': name, 'arguments': {'bbox': box, 'image': image}}) + '</tool_call>'
    else: text = f"<tool_call>{name} [{', '.join(map(str, box))}]</tool_call>"
    calls = parse_tool_calls(text)
    assert len(calls) == 1
    c = calls[0]
    reg = default_registry(); img = Image.new('RGB', size, (1, 2, 3))
    tool = reg.get(name)
    r = tool.execute([img], c, coords=space, resized=resized)
    assert r.kind in ('image', 'text', 'error')
    if r.kind == 'error': assert isinstance(r.text, str) and r.text
    if r.kind == 'image':
        assert c.ok and 1 <= r.image.size[0] <= size[0] and 1 <= r.image.size[1] <= size[1]
        x1, y1, x2, y2 = r.box
        assert 0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box) or len(box) != 4: assert not c.ok
    assert reg.execute([img], c).kind in ('image', 'text', 'error')


@FUZZ
@given(st.text(alphabet=st.sampled_from(list('0123456789.,-+eE [](){}_xabinf\'"')), max_size=40) | _text)
def test_parse_box_never_raises(body):
    box, err = parse_box(body)
    assert (box is None) != (err is None)
    if box is not None: assert len(box) == 4 and all(math.isfinite(v) for v in box)


@FUZZ
@given(st.lists(st.floats(0, 1e5, allow_nan=False), min_size=4, max_size=4), st.sampled_from(['Crop', 'Identify']),
       st.text(alphabet=_chars, max_size=20), st.text(alphabet=_chars, max_size=20))
def test_calls_survive_surrounding_text(b, name, before, after):
    "A formatted call embedded in arbitrary text is found with its box (unless the text itself forms a tag around it)."
    assume('<' not in before + after and '{' not in before + after)
    b = [round(v, 2) for v in b]
    text = before + format_tool_call(name, b) + after
    calls = [c for c in parse_tool_calls(text) if c.syntax == 'canonical']
    assert len(calls) == 1 and calls[0].name == name and np.allclose(calls[0].bbox, b)


# ---------------------------------------------------------------- geometry
_box4 = st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=4, max_size=4)

@FUZZ
@given(_box4, _box4, st.sampled_from(['xywh', 'cxcywh']))
def test_geometry(a, b, fmt):
    assert np.allclose(convert_box(convert_box(a, 'xyxy', fmt), fmt, 'xyxy'), a, atol=1e-6)
    v = iou(a, b)
    assert 0 <= v <= 1 + 1e-9 and math.isclose(v, iou(b, a), abs_tol=1e-9)
    c = clamp_box(a, (640, 480))
    assert 0 <= c[0] <= 640 and 0 <= c[3] <= 480 and box_area(c) <= 640 * 480
    if is_valid_box(a): assert math.isclose(iou(a, a), 1.0)


# ---------------------------------------------------------------- sequence builder
from test_sequences import conversations, check_property, ad_for, IMG  # noqa: E402  (reuse, don't duplicate)
from vlm_nb.sequences import SequenceBuilder, TRAINED, TOOL_RESPONSE, IMAGE


@pytest.mark.parametrize('fam', ['ovis2_5', 'qwen3_vl'])
@settings(max_examples=max(5, N // 2), deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(case=conversations())
def test_builder_other_families(fam, case):
    "The test_sequences property on the families it does not fuzz: labels only on assistant text, image counts, exact decode."
    check_property(ad_for(fam), case)


@st.composite
def hostile_conversations(draw):
    roles = draw(st.lists(st.sampled_from(['system', 'user', 'assistant', 'tool']), max_size=5))
    turns = [Turn(r, draw(_msg)) for r in roles]
    return Sample(turns, images=[IMG] * draw(st.integers(0, 2)), id='h')


@pytest.mark.parametrize('fam', ['internvl3_5', 'qwen2_5_vl'])
@settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(ss=st.lists(hostile_conversations(), min_size=1, max_size=3))
def test_builder_on_hostile_conversations(fam, ss):
    "Wrong roles, wrong <image> counts, stray tags: every sample is built or skipped with a reason; nothing raises."
    b = SequenceBuilder(ad_for(fam), pixels=False, max_length=2048)
    out = b.build_many(ss, align=True)
    assert len(out) == len(ss)
    assert b.report.built + len(b.report.skipped) == len(ss) and all(r for _, r in b.report.skipped)
    for q in out:
        if q is None: continue
        trained = q.labels != -100
        assert (q.roles[trained] == TRAINED).all() and not trained[(q.roles == TOOL_RESPONSE) | (q.roles == IMAGE)].any()
        assert q.n_image_tokens == sum(len(bl.token_ids) for bl in q.blocks) == sum(e - a for a, e in q.block_spans)
