"Heavier checks of vlm_nb.sequences: every family, real samples, constructed cases, tiny-model forward passes, a property test."
import os, re, tempfile
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import numpy as np, pytest, torch
from PIL import Image
from hypothesis import given, settings, strategies as st, HealthCheck
from vlm_nb.data import Sample, Turn, read_dataset, shared_path
from vlm_nb.models import FAMILIES, get_adapter, make_tiny, load_model
from vlm_nb.sequences import *

def adapter(fam, tool_layout='inline'):
    "The oracles below describe the 'inline' tool layout; `test_turn_layout_cases` checks 'turn'."
    return get_adapter(fam, max_tiles=1, tool_layout=tool_layout) if fam == 'internvl3_5' else get_adapter(fam, tool_layout=tool_layout)

_ADS = {}
def ad_for(fam):
    if fam not in _ADS: _ADS[fam] = adapter(fam)
    return _ADS[fam]

IMG = Image.new('RGB', (200, 160), (20, 120, 220))
SYS = "You can use Crop and Identify tools."

_MARKER_AFTER_CALL = re.compile(r'(</tool_call>[ \t\r\n]*)<image>')
_RESPONSE = re.compile(r'<tool_response>.*?(?:</tool_response>|\Z)', re.S)

def expected_trained(s):
    "Oracle independent of the builder: each assistant body without its <tool_response> blocks and the <image> marker after a call."
    return ''.join(_RESPONSE.sub('', _MARKER_AFTER_CALL.sub(r'\1', t.text)) + '<|im_end|>' for t in s.assistant_turns)

_CROP = re.compile(r'<tool_call>Crop \[\s*-?[\d.]+\s*,\s*-?[\d.]+\s*,\s*-?[\d.]+\s*,\s*-?[\d.]+\s*\]</tool_call>(?!\s*<tool_response>)')

def n_crops(s):
    "Well-formed Crop calls without a response in the data (oracle by regex; none can run when the sample has no image)."
    return sum(len(_CROP.findall(t.text)) for t in s.assistant_turns) if s.images else 0

def assert_every_call_answered(q, ad):
    "Right after each trained </tool_call> (past trained whitespace) comes a tool result: an image block or a <tool_response>."
    ids, close = q.input_ids, ad.tid('</tool_call>')
    for i in np.flatnonzero((ids == close) & (q.roles == TRAINED)):
        j = i + 1
        while j < len(q) and q.roles[j] == TRAINED and not ad.tokenizer.decode([int(ids[j])]).strip(): j += 1
        assert j < len(q) and q.roles[j] in (IMAGE, TOOL_RESPONSE), (q.id, i, ad.tokenizer.decode(ids[max(0, i - 12):j + 1].tolist()))

CASES = {
    'several_calls': ("<think>\nFirst <tool_call>Crop [0, 0, 50, 50]</tool_call><image>\nthen <tool_call>Crop [10, 10, 120, 90]</tool_call><image> and "
                      "<tool_call>Crop [100, 20, 200, 160]</tool_call>\nok\n</think>\n<answer>Three crops.</answer>"),
    'response_whitespace': ("<think>\n<tool_call>Identify [1.0,2.0,30.0,40.0]</tool_call>\n\n<tool_response>Ann</tool_response>  \n"
                            "<tool_call>Identify [5.0,5.0,60.0,70.0]</tool_call> <tool_response>\nBo\n</tool_response>\nDone.\n</think>\n<answer>Ann and Bo.</answer>"),
    'names': ("<think>\n<tool_call>Identify [1.0,2.0,30.0,40.0]</tool_call><tool_response>Liam O'Connor</tool_response>"
              "The first is Liam\u202fO'Connor; then <tool_call>Identify [3.0,4.0,50.0,60.0]</tool_call><tool_response>Zoë Ångström 李</tool_response>"
              "\n</think>\n<answer>Liam O'Connor and Zoë Ångström 李.</answer>"),
    'no_think': "A plain answer without thinking.",
    'mentions_tool_response': "<think>\nNo tool_response is needed; the word tool_response is just text.\n</think>\n<answer>Yes.</answer>",
}

def case_sample(name, body):
    return Sample([Turn('system', SYS), Turn('user', '<image>\nQuestion?'), Turn('assistant', body)], images=[IMG], id=name)

def multi_turn():
    return Sample([Turn('system', SYS), Turn('user', '<image>\nWhat is it?'), Turn('assistant', CASES['several_calls']),
                   Turn('user', 'And who?'), Turn('assistant', CASES['names']), Turn('user', 'Short?'), Turn('assistant', 'Yes.')],
                  images=[IMG], id='multi')

@pytest.mark.parametrize('fam', FAMILIES)
def test_constructed_cases(fam):
    ad = ad_for(fam)
    samples = [case_sample(k, v) for k, v in CASES.items()] + [multi_turn()]
    b = SequenceBuilder(ad, keep_thinking=True)   # Ovis2.5 would drop earlier turns' thinking, as its template
    seqs = b.build_many(samples, align=True)
    assert b.report.skipped == []
    for s, q in zip(samples, seqs):
        assert ''.join(q.trained_spans()) == expected_trained(s), s.id
        assert q.n_images == len(s.images) + n_crops(s)
        assert_every_call_answered(q, ad)
        assert q.n_image_tokens == sum(len(blk.token_ids) for blk in q.blocks)
        lab = q.labels
        assert (lab[q.roles != TRAINED] == -100).all() and (lab[q.roles == TRAINED] >= 0).all()
        for a, e in q.runs(TOOL_RESPONSE):    # every masked response run is a whole response
            t = ad.tokenizer.decode(q.input_ids[a:e].tolist())
            assert t.startswith('<tool_response>') and t.endswith('</tool_response>')
        for (a, e), src in zip(q.block_spans, q.block_sources):   # each tool image right after its </tool_call>
            if src == 'tool': assert q.input_ids[a - 1] == ad.tid('</tool_call>')
        # system and user text is never trained
        tr = ''.join(q.trained_spans())
        assert SYS not in tr and 'Question?' not in tr

@pytest.mark.parametrize('fam', FAMILIES)
def test_last_turn_only_and_prompt_cache(fam):
    ad = ad_for(fam)
    q = SequenceBuilder(ad, train_turns='last').build(multi_turn())
    assert ''.join(q.trained_spans()) == 'Yes.<|im_end|>'
    assert (q.roles == CONTEXT).sum() > 0
    full = SequenceBuilder(ad).build(multi_turn())
    assert np.array_equal(full.input_ids, q.input_ids)    # same tokens, different labels
    # the prompt part equals the adapter's own encoding of the rendered prompt
    s = case_sample('no_think', CASES['no_think'])
    seq = SequenceBuilder(ad).build(s)
    prompt = ad.render_prompt([{'role': 'system', 'content': SYS}, {'role': 'user', 'content': '<image>\nQuestion?'}],
                              add_generation_prompt=True, enable_thinking=False)
    ids = ad.encode_with_images(prompt, seq.blocks[:1])
    assert seq.input_ids[:len(ids)].tolist() == ids

@pytest.mark.parametrize('fam', FAMILIES)
def test_shared_samples(fam):
    root = shared_path('samples')
    if root is None: pytest.skip('../shared/samples not present')
    b = SequenceBuilder(ad_for(fam), missing='placeholder', image_root=root/'images', pixels=False, keep_thinking=True)
    for f in sorted(root.glob('*.json*')):
        ds = read_dataset(f)
        for s, q in zip(ds.samples, b.build_many(ds.samples, align=True)):
            if q is None: continue
            assert ''.join(q.trained_spans()) == expected_trained(s), (f.name, q.id)
            assert_every_call_answered(q, b.adapter)
    # the video sample, and the one whose answer holds a generator's leftover `{Tool call}` (`vlm-nb data validate` calls it an error)
    assert [(i, r.split(':')[0]) for i, r in b.report.skipped] == [('sample_007_video', 'video samples are not supported by the sequence builder'),
                                                                   ('000000581739', 'placeholder')]

def test_truncation_never_cuts_an_image():
    ad = ad_for('qwen2_5_vl')
    s = case_sample('several_calls', CASES['several_calls'])
    full = SequenceBuilder(ad).build(s)
    a, e = full.block_spans[2]
    b = SequenceBuilder(ad, max_length=(a + e)//2)
    q = b.build(s)
    assert len(q) == a and q.n_images == 2 and q.trimmed == len(full) - a
    assert b.report.trimmed and b.report.trimmed[0][0] == 'several_calls'
    b = SequenceBuilder(ad, max_length=(a + e)//2, overflow='skip')
    assert b.build(s) is None and 'too long' in b.report.skipped[0][1]
    b = SequenceBuilder(ad, max_length=5)
    assert b.build(s) is None and 'nothing trained' in b.report.skipped[0][1]

@pytest.mark.parametrize('fam', FAMILIES)
def test_forward_pad_and_pack_agree(fam):
    d = make_tiny(fam, tempfile.mkdtemp())
    model, ad = load_model(d, **({'max_tiles': 1} if fam == 'internvl3_5' else {}))
    small = Image.new('RGB', (96, 80), (200, 30, 30))
    samples = [Sample([Turn('system', SYS), Turn('user', '<image>\nQ?'), Turn('assistant', CASES['several_calls'].replace('100, 20, 200, 160', '10, 20, 96, 80'))],
                      images=[small], id='a'),
               Sample([Turn('user', 'Hi'), Turn('assistant', 'Hello.'), Turn('user', 'More?'), Turn('assistant', CASES['names'])], id='b'),
               Sample([Turn('user', '<image>\nWhat?'), Turn('assistant', 'A red square.')], images=[small], id='c')]
    seqs = SequenceBuilder(ad).build_many(samples)
    assert len(seqs) == 3
    with torch.no_grad():
        lp = float(ad.forward(model, **pad_collate(seqs, ad)).loss)
        lk = float(ad.forward(model, **pack_collate(seqs, ad)).loss)
        lm = float(ad.forward(model, **pack_collate(seqs, ad, attention='mask')).loss)
    assert np.isfinite(lp) and abs(lk - lp) < 1e-4 and abs(lm - lp) < 1e-4, (lp, lk, lm)

# --- property test: random conversations ---
_text = st.text(alphabet="abcxyz éß'\n.,:<>/_-", min_size=0, max_size=30)
_name = st.text(alphabet="ABCabc 'éÅ李-", min_size=1, max_size=12).filter(lambda s: s.strip())
_box = st.tuples(st.integers(0, 150), st.integers(0, 120), st.integers(10, 50), st.integers(10, 40)).map(
    lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])
# each piece: (text as stored, the text that must be trained, crops it adds, responses it must end up with)
_piece = st.one_of(
    _text.map(lambda t: (t, t, 0, ())), st.just((' tool_response ', ' tool_response ', 0, ())),
    st.builds(lambda b, m: (f"<tool_call>Crop [{b[0]}, {b[1]}, {b[2]}, {b[3]}]</tool_call>" + m,
                            f"<tool_call>Crop [{b[0]}, {b[1]}, {b[2]}, {b[3]}]</tool_call>" + m.replace('<image>', ''), 1, ('crop',)),
              _box, st.sampled_from(['', '<image>', '\n<image>'])),
    st.builds(lambda b, ws, n: (f"<tool_call>Identify [{b[0]:.1f},{b[1]:.1f},{b[2]:.1f},{b[3]:.1f}]</tool_call>{ws}<tool_response>{n}</tool_response>",
                                f"<tool_call>Identify [{b[0]:.1f},{b[1]:.1f},{b[2]:.1f},{b[3]:.1f}]</tool_call>{ws}", 0, (f"<tool_response>{n}</tool_response>",)),
              _box, st.sampled_from(['', ' ', '\n', '\n\n ']), _name))
_body = st.lists(_piece, min_size=1, max_size=6).map(lambda ps: tuple(''.join(p[i] for p in ps) if i < 2 else
                                                                      (sum(p[2] for p in ps) if i == 2 else sum((p[3] for p in ps), ())) for i in range(4))
                                                     ).filter(lambda b: b[0].strip())

@st.composite
def conversations(draw):
    "(sample, expected trained text, expected crop images, expected tool responses) — expectations built with the sample."
    nonblank = lambda t: t if t.strip() else 'S'   # a blank turn is an 'empty-turn' error of the validation gate: skipped, not built
    turns = [Turn('system', nonblank(draw(_text)))] if draw(st.booleans()) else []
    n_img = draw(st.integers(0, 1))
    trained, crops, resps = '', 0, ()
    for k in range(draw(st.integers(1, 3))):
        u = nonblank(draw(_text))
        body, tr, nc, rs = draw(_body)
        turns += [Turn('user', ('<image>\n' if (k == 0 and n_img) else '') + u), Turn('assistant', body)]
        trained += tr + '<|im_end|>'; crops += nc; resps += rs
    # without an image a Crop cannot run: the engine answers with an error, and so does the training sequence
    resps = tuple('<tool_response>Error: Crop needs an image' if r == 'crop' else r for r in resps if n_img == 0 or r != 'crop')
    return Sample(turns, images=[IMG] * n_img, id='h'), trained, crops if n_img else 0, resps

def check_property(ad, case):
    s, trained_text, crops, resps = case
    q = SequenceBuilder(ad, pixels=False, keep_thinking=True).build(s)
    assert q is not None
    lab = q.labels
    trained = lab != -100
    assert (q.roles[trained] == TRAINED).all()                                  # labels only on assistant tokens
    assert not trained[q.roles == TOOL_RESPONSE].any() and not trained[q.roles == IMAGE].any()
    assert ''.join(q.trained_spans()) == trained_text
    assert q.n_image_tokens == sum(len(b.token_ids) for b in q.blocks) == sum(e - a for a, e in q.block_spans)
    assert q.n_images == len(s.images) + crops
    got = [ad.tokenizer.decode(q.input_ids[a:e].tolist()) for a, e in q.runs(TOOL_RESPONSE)]
    assert len(got) == len(resps) and all(g.startswith(r) and g.endswith('</tool_response>') for g, r in zip(got, resps)), (got, resps)
    assert_every_call_answered(q, ad)

@pytest.mark.parametrize('fam', ['internvl3_5', 'qwen2_5_vl'])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conversations())
def test_property_random_conversations(fam, case):
    check_property(ad_for(fam), case)


_TURN_CLOSE = re.compile(r'</tool_call>\s*(?:<image>)?\s*(?:<tool_response>.*?(?:</tool_response>|\Z))?\s*', re.S)

@pytest.mark.parametrize('fam', ['qwen2_5_vl', 'qwen3_vl', 'internvl3_5'])
def test_turn_layout_cases(fam):
    "'turn' layout: every call ends its assistant turn (`<|im_end|>` trained), the result sits in a masked user turn, and the\n    body continues in the next turn without the whitespace after the result (oracle by regex, independent of the builder)."
    ad = adapter(fam, 'turn')
    samples = [case_sample(k, v) for k, v in CASES.items()] + [multi_turn()]
    seqs = SequenceBuilder(ad).build_many(samples, align=True)
    for s, q in zip(samples, seqs):
        want = ''.join(_TURN_CLOSE.sub('</tool_call><|im_end|>', t.text) + '<|im_end|>' for t in s.assistant_turns)
        assert ''.join(q.trained_spans()) == want, s.id
        assert q.n_images == len(s.images) + n_crops(s)
        for a, e in q.runs(TOOL_RESPONSE):
            t = ad.tokenizer.decode(q.input_ids[a:e].tolist())
            assert t.startswith(('\n<|im_start|>user\n<tool_response>\n', '\n</tool_response><|im_end|>')), t
            assert t.endswith(('<|im_start|>assistant\n', '<tool_response>\n')), t
        n_calls = len(re.findall(r'<tool_call>.*?</tool_call>', ''.join(t.text for t in s.assistant_turns)))
        assert sum(ad.tokenizer.decode(q.input_ids[a:e].tolist()).count('<|im_start|>user\n<tool_response>') for a, e in q.runs(TOOL_RESPONSE)) == n_calls

@pytest.mark.parametrize('fam', ['qwen2_5_vl', 'qwen3_vl'])
def test_mrope_vectorised_equals_loop(fam):
    "Every Qwen test sequence (constructed cases, multi-turn, the shared samples): one at a time, padded and packed."
    from vlm_nb.models import mrope_positions, _mrope_loop
    ad = ad_for(fam)
    samples = [case_sample(k, v) for k, v in CASES.items()] + [multi_turn()]
    seqs = SequenceBuilder(ad).build_many(samples)
    root = shared_path('samples')
    if root is not None:
        for f in sorted(root.glob('*.json*')):
            seqs += SequenceBuilder(ad, missing='placeholder', image_root=root/'images', pixels=False, keep_thinking=True).build_many(read_dataset(f).samples)
    if root is not None: assert len(seqs) > len(samples)                      # the shared samples were built too
    def both(ids, grids, am=None, start=0):
        a = mrope_positions(ids, ad.image_token_id, grids, am, start)
        assert torch.equal(a, _mrope_loop(ids, ad.image_token_id, grids, am, start))
    for q in seqs:
        g = [b.pixel['image_grid_thw'] for b in q.blocks]
        both(torch.as_tensor(q.input_ids)[None], torch.cat(g) if g else None, start=3)
    for i in range(0, len(seqs), 4):   # padded batches with attention masks
        b = pad_collate(seqs[i:i + 4], ad, pixels=False)
        g = [x.pixel['image_grid_thw'] for q in seqs[i:i + 4] for x in q.blocks]
        both(b['input_ids'], torch.cat(g) if g else None, b['attention_mask'])


class PlainBuilder(SequenceBuilder):
    "The builder without its shortcuts: every text through the tokenizer's own call, one at a time; every parse done afresh."
    def _encode(self, texts): return [self.tok(t, add_special_tokens=False)['input_ids'] for t in texts]
    def _tool_calls(self, text):
        from vlm_nb.tools import parse_tool_calls
        return parse_tool_calls(text)
    def _tagged(self, text):
        from vlm_nb.sequences import _parse_tagged
        return _parse_tagged(text)

def mixed_samples():
    "Crop, identity and plain conversations, the constructed cases, a multi-turn one, broken ones, and ../shared's samples when present."
    out = bench_samples(150, seed=3) + [case_sample(k, v) for k, v in CASES.items()] + [multi_turn()]
    out += [Sample([Turn('user', '<image>\nQ?'), Turn('assistant', '<tool_call>Crop [1, 2, 30, 40]</tool_call')], [IMG], id='bad_unclosed'),
            Sample([Turn('user', '<image>\nQ?'), Turn('assistant', 'A {Tool call} left.')], [IMG], id='bad_placeholder'),
            Sample([Turn('user', 'No image?'), Turn('assistant', 'Legacy {Crop cup [1, 2, 30, 40]} form.')], [], id='legacy')]
    root = shared_path('samples')
    if root is not None:
        for f in sorted(root.glob('*.json*')): out += read_dataset(f).samples
    return out, (root/'images' if root is not None else None)

@pytest.mark.parametrize('fam', FAMILIES)
def test_fast_build_equals_plain(fam):
    "Tokenizing each distinct text once in one batched call and parsing each sample's calls once changes nothing: same ids, roles, labels, blocks, report."
    samples, root = mixed_samples()
    for layout in ('inline', 'turn'):
        ad = adapter(fam, layout)
        kw = dict(missing='placeholder', image_root=root, pixels=False)
        fast, plain = SequenceBuilder(ad, block_cache={}, **kw), PlainBuilder(ad, block_cache={}, **kw)
        a, b = fast.build_many(samples, chunk=16, align=True), plain.build_many(samples, chunk=16, align=True)
        assert fast._memo and fast.report.as_dict() == plain.report.as_dict()
        assert sum(q is not None for q in a) > 150 and {'bad_unclosed', 'bad_placeholder'} <= {i for i, _ in fast.report.skipped}
        for x, y in zip(a, b):
            assert (x is None) == (y is None)
            if x is None: continue
            assert x.id == y.id and x.block_spans == y.block_spans and x.block_sources == y.block_sources and x.trimmed == y.trimmed
            assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.roles, y.roles) and np.array_equal(x.labels, y.labels), x.id
