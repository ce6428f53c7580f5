"End-to-end checks of vlm_nb.engine, vlm_nb.batch and vlm_nb.infer: the CLI, and the remote loop against a real `transformers serve` on 127.0.0.1."
import os, sys, json, time, shutil, socket, subprocess, contextlib, io
from pathlib import Path
import pytest
os.environ.setdefault('HF_HUB_OFFLINE', '1')
from PIL import Image
from conftest import transformers_serve


@pytest.fixture(scope='module')
def work(tmp_path_factory): return tmp_path_factory.mktemp('engine')

@pytest.fixture(scope='module')
def tiny_ovis(work):
    from vlm_nb.models import make_tiny
    return make_tiny('ovis2_5', work/'ovis')

def _cli(*argv):
    from vlm_nb.infer import infer_main
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e): rc = infer_main([str(a) for a in argv])
    return rc, o.getvalue(), e.getvalue()

def test_infer_cli_json_and_errors(work, tiny_ovis):
    img = work/'photo.png'; Image.new('RGB', (96, 64), (200, 30, 30)).save(img)
    rc, out, err = _cli('--model', tiny_ovis, '--image', img, '--prompt', 'What is red?', '--greedy', '--max-new-tokens', 6,
                        '--thinking', '--thinking-budget', 3, '--json', '--save', work/'traj')
    assert rc == 0, err
    d = json.loads(out)
    assert set(d) >= {'text', 'answer', 'trajectory'} and d['n_new_tokens'] <= 6
    assert (work/'traj'/'trajectory.json').exists()
    assert 'Considering the limited time by the user' in d['text']          # budget 3 < 6 tokens: the nudge went in
    for argv, msg in [(['--model', tiny_ovis, '--image', work/'missing.png', '--prompt', 'x'], 'error: image not found'),
                      (['--model', work/'nomodel', '--image', img, '--prompt', 'x'], f"error: {work/'nomodel'}: no such model folder"),
                      (['--model', tiny_ovis, '--image', img], 'error: --prompt is required'),
                      (['--model', tiny_ovis, '--input', work], 'error: --input needs --out')]:
        rc, out, err = _cli(*argv)
        assert rc != 0 and err.startswith(msg) and err.count('\n') == 1, (argv, err)

def test_infer_cli_batch_resumes(work, tiny_ovis):
    src = work/'imgs'; src.mkdir(exist_ok=True)
    Image.new('RGB', (64, 64)).save(src/'a.png'); (src/'bad.png').write_bytes(b'\x89PNG broken')
    args = ['--model', tiny_ovis, '--input', src, '--out', work/'bout', '--prompt', 'Describe.', '--greedy', '--max-new-tokens', 2, '--json']
    rc, out, err = _cli(*args)
    assert rc == 0 and json.loads(out)['ok'] == 1 and json.loads(out)['unreadable'] == 1, err
    rc, out, err = _cli(*args)
    assert json.loads(out)['skipped_done'] == 2

def _scripted_generation_config(tok, turns, eos):
    "Server-side greedy script via sequence_bias: each turn is (anchor text, script text, bias); keys are anchor+prefix."
    seqs = []
    for anchor, script, bias in turns:
        a, s = tok.encode(anchor, add_special_tokens=False), tok.encode(script, add_special_tokens=False) + [eos]
        seqs += [[a + s[:i + 1], bias] for i in range(len(s))]
    return {'sequence_bias': seqs, 'do_sample': False, 'eos_token_id': [eos], 'pad_token_id': eos, 'max_new_tokens': 64}

def test_remote_loop_against_transformers_serve(work):
    exe = shutil.which('transformers')
    if exe is None: pytest.skip('the `transformers` CLI is not installed')
    try: import fastapi, uvicorn  # noqa: F401
    except ImportError: pytest.skip('transformers serve needs fastapi and uvicorn')
    # transformers serve loads VLM processors with their video processor, which needs torchvision (not installed here),
    # so the server runs a tiny text-only model with the same tokenizer; the image parts are accepted and ignored.
    # It is a Llama, not a Qwen3: for Qwen model types transformers serve applies a built-in response parser that moves
    # <think> into `reasoning_content` and parses <tool_call> bodies as JSON (HTTP 500 on `Identify [..]`).
    import torch, transformers as T
    from vlm_nb.models import build_tokenizer_dir, _tiny_text
    ck = work/'llm'; build_tokenizer_dir('internvl3_5', ck)
    tok = T.AutoTokenizer.from_pretrained(str(ck)); torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(**_tiny_text(tok))).save_pretrained(str(ck))
    with transformers_serve(ck, work/'serve.log') as port:
        from vlm_nb.engine import GenConfig
        from vlm_nb.infer import RemoteEngine
        eos = tok.convert_tokens_to_ids('<|im_end|>')
        gc = _scripted_generation_config(tok, [
            ('<|im_start|>assistant\n', 'Look. <tool_call>Identify [1, 2, 30, 40]</tool_call>', 100.),
            ('</tool_response><|im_end|>\n<|im_start|>assistant\n', '<answer>an unknown person</answer>', 200.)], eos)
        eng = RemoteEngine(f'http://127.0.0.1:{port}/v1', str(ck), tools='crop,identify', timeout=120, max_retries=1,
                           extra_body={'generation_config': json.dumps(gc)}, config=GenConfig(greedy=True, max_new_tokens=60))
        tr = eng.run([Image.new('RGB', (64, 48), (200, 0, 0))], 'Who is this?')
        assert tr.n_tool_calls == 1, tr.text
        assert tr.results[0].text == '<tool_response>unknown person</tool_response>'
        assert tr.text.startswith('Look. <tool_call>Identify [1, 2, 30, 40]</tool_call><tool_response>unknown person</tool_response>')
        assert tr.answer == 'an unknown person' and tr.finish_reason == 'eos'

def test_images_loaded_from_paths_keep_their_key_for_galleries(tmp_path):
    "Identify finds a person by the image's path, so images the CLI loads from disk must keep that path."
    from PIL import Image
    from vlm_nb.engine import _load_images, _as_registry
    from vlm_nb.tools import image_key, parse_tool_calls, AnnotationGallery
    p = tmp_path/'images'/'0001.png'; p.parent.mkdir(); Image.new('RGB', (64, 48)).save(p)
    (im,) = _load_images([str(p)])
    assert image_key(im) == str(p)
    gallery = AnnotationGallery({'images/0001.png': [{'bbox': [10, 10, 30, 40], 'name': 'Ada'}]})
    res = _as_registry('default', gallery).execute([im], parse_tool_calls('<tool_call>Identify [10, 10, 30, 40]</tool_call>')[0])
    assert res.text == 'Ada'


# ---------------------------------------------------------------- batched tool loop == sequential engine
_OPTS = {'internvl3_5': {'max_tiles': 1}, 'qwen2_5_vl': {'max_pixels': 200*200}, 'qwen3_vl': {'max_pixels': 200*200}, 'ovis2_5': {}}

def _requests(tok, photo, wide):
    "Seven requests: two images and several prompt lengths, Crop/Identify at different steps (two rows crop at the same step), early stops, a shared prompt, text only."
    from vlm_nb.engine import ForcedContinuation as F
    from vlm_nb.batch import Request
    crop, ident = '<tool_call>Crop [40, 60, 120, 200]</tool_call>', '<tool_call>Identify [10, 10, 100, 150]</tool_call>'
    def req(images, prompt, script=None, then='free', free=12):
        "A request scripted to write `script` (then `free` tokens of its own, or stop)."
        procs = [F(tok, script, then)] if script else []
        return Request(images, prompt, procs, {'max_new_tokens': (len(procs[0].ids) if procs else 0) + free})
    return [req([photo], 'What is red?', crop, free=20),
            req([wide], 'Where is the blue box? Say it briefly.', crop, free=14),   # pauses with the first: one result forward
            req([wide], 'Who is there? Tell me everything you see.', 'Well, ' * 4 + ident, 'eos', free=30),
            req([photo], 'What is red?', 'Look: ' * 7 + ident + 'So. ' + crop, free=10),
            req([], 'Say hello.', free=9),
            req([wide, photo], 'Compare the two pictures.', 'Hm, ' * 2 + crop, free=25),
            req([photo], 'Is it red?', 'Yes.', 'eos', free=30)]

@pytest.mark.parametrize('family,layout', [('internvl3_5', None), ('qwen2_5_vl', None), ('qwen3_vl', None), ('ovis2_5', None),
                                           ('internvl3_5', 'turn')])
def test_batched_tool_loop_equals_sequential(work, family, layout):
    "Greedy, fp32, CPU: every row of the batched loop writes exactly the tokens the one-at-a-time engine writes (either tool layout)."
    from vlm_nb.models import make_tiny, load_model
    from vlm_nb.engine import ToolEngine
    import vlm_nb.batch   # gives ToolEngine its batched loop (generate_batch, run_batch)
    d = work/f'tiny_{family}'
    if not (d/'config.json').exists(): make_tiny(family, d)
    model, ad = load_model(d, **_OPTS[family], **({'tool_layout': layout} if layout else {}))
    if layout: assert ad.tool_layout == layout
    eng = ToolEngine(model, ad, tools='crop,identify')
    photo = Image.new('RGB', (320, 240), (30, 90, 160)); photo.paste((220, 40, 40), (40, 60, 120, 200))
    wide = Image.new('RGB', (300, 200), (200, 190, 60)); wide.paste((20, 40, 240), (10, 10, 100, 150))
    alone = [eng.run(r.images, r.prompt, r.logits_processors, greedy=True, **r.overrides) for r in _requests(ad.tokenizer, photo, wide)]
    sched = []
    together = [None]*7
    for j, t in eng.generate_batch(_requests(ad.tokenizer, photo, wide), max_batch=4, schedule=sched, greedy=True): together[j] = t
    for j, (a, b) in enumerate(zip(alone, together)):
        assert not isinstance(b, Exception), b
        assert b.ids == a.ids, (j, next(i for i, (x, y) in enumerate(zip(a.ids + [None], b.ids + [None])) if x != y))
        assert (b.finish_reason, b.n_tool_calls, b.text) == (a.finish_reason, a.n_tool_calls, a.text), j
    assert [t.n_tool_calls for t in together] == [1, 1, 1, 2, 0, 1, 0]
    assert [t.finish_reason for t in together] == ['length', 'length', 'eos', 'length', 'length', 'length', 'eos']
    assert [s.data['kind'] for s in together[3].results] == ['text', 'image']
    assert {e['kind'] for e in sched} >= {'prefill', 'fork', 'decode', 'tool', 'paused', 'result', 'finished'}
    assert max(e['lane'] for e in sched) == 3 and sum(e['kind'] == 'finished' for e in sched) == 7
    starts = [e['start'] for e in sched if e['kind'] == 'result']
    assert len(starts) > len(set(starts))                        # two rows' tool results went through one forward
    starts = [e['start'] for e in sched if e['kind'] == 'prefill']
    assert len(starts) > len(set(starts))                        # and distinct prompts were prefilled together

@pytest.mark.parametrize('family', ['qwen2_5_vl', 'qwen3_vl'])
def test_qwen_kv_continuation_equals_reprefill(work, family):
    "After a tool image is appended to the KV cache (mRoPE positions continued), every later step's logits equal a full re-prefill's."
    import torch
    from vlm_nb.models import make_tiny, load_model
    from vlm_nb.engine import ToolEngine, GenConfig, ForcedContinuation
    model, ad = load_model(make_tiny(family, work/family))
    eng = ToolEngine(model, ad, tools='crop,identify', config=GenConfig(greedy=True))
    photo = Image.new('RGB', (224, 168), (30, 90, 160)); photo.paste((220, 40, 40), (40, 60, 120, 140))
    script = ad.tokenizer.encode("Let me look. <tool_call>Crop [40, 60, 120, 140]</tool_call>", add_special_tokens=False)

    def run(reuse):
        seen = []
        def record(ctx, logits): seen.append((len(ctx), logits.detach().float().clone())); return logits
        tr = eng.run([photo], 'What is red?', [record, ForcedContinuation(ad.tokenizer, script, 'free')],
                     max_new_tokens=len(script) + 24, max_tool_calls=1, reuse_cache=reuse)
        return tr, seen
    (a, la), (b, lb) = run(True), run(False)
    assert [r.data['kind'] for r in a.results] == ['image'] and a.n_new_tokens > len(script) + 8   # free tokens after the crop
    assert a.ids == b.ids and [n for n, _ in la] == [n for n, _ in lb]
    close = a.ids.index(ad.tid('</tool_call>'), a.prompt_len)
    assert sum(n > close + 1 for n, _ in la) >= 8                                  # steps sampled after the appended image
    assert all(torch.equal(torch.isinf(x), torch.isinf(y)) for (_, x), (_, y) in zip(la, lb))   # the banned placeholders, both ways
    worst = max(float((x - y)[torch.isfinite(x)].abs().max()) for (_, x), (_, y) in zip(la, lb))
    assert worst < 1e-4, worst

def test_stray_placeholder_is_text_in_both_loops(work):
    "A placeholder forced into an answer (no image behind it) neither crashes the one-at-a-time engine nor splits it from the batched loop (Qwen's 3-D positions); the model's own sampling never picks one."
    from vlm_nb.models import make_tiny, load_model
    from vlm_nb.engine import ToolEngine, ForcedContinuation as F
    from vlm_nb.batch import Request
    d = work/'tiny_qwen2_5_vl'
    if not (d/'config.json').exists(): make_tiny('qwen2_5_vl', d)
    model, ad = load_model(d, **_OPTS['qwen2_5_vl'])
    eng, tok = ToolEngine(model, ad, tools='crop,identify'), ad.tokenizer
    photo = Image.new('RGB', (320, 240), (30, 90, 160))
    script = tok.encode('Hm ', add_special_tokens=False) + [ad.image_token_id] + tok.encode(' ok', add_special_tokens=False)
    reqs = lambda: [Request([photo], 'Hi', [F(tok, script, 'free')], {'max_new_tokens': 12}), Request([photo], 'Hello there', [], {'max_new_tokens': 12})]
    alone = [eng.run(r.images, r.prompt, r.logits_processors, greedy=True, **r.overrides) for r in reqs()]
    together = eng.run_batch(reqs(), greedy=True)
    assert [t.ids for t in together] == [t.ids for t in alone]
    new = [t.ids[t.prompt_len:] for t in alone]
    assert new[0].count(ad.image_token_id) == 1 and not set(new[1]) & set(eng.banned_ids)   # the forced one only

def test_batched_sampling_equals_sequential(work):
    "Sampling, each row with its own seed and settings (temperature, top-k, top-p, min-p, repetition penalty, greedy): the batched loop, which samples all rows in one pass, draws exactly the one-at-a-time tokens."
    from vlm_nb.models import make_tiny, load_model
    from vlm_nb.engine import ToolEngine
    import vlm_nb.batch   # gives ToolEngine its batched loop (generate_batch, run_batch)
    d = work/'tiny_internvl3_5'
    if not (d/'config.json').exists(): make_tiny('internvl3_5', d)
    model, ad = load_model(d, **_OPTS['internvl3_5'])
    eng = ToolEngine(model, ad, tools='crop,identify')
    photo = Image.new('RGB', (320, 240), (30, 90, 160)); photo.paste((220, 40, 40), (40, 60, 120, 200))
    wide = Image.new('RGB', (300, 200), (200, 190, 60)); wide.paste((20, 40, 240), (10, 10, 100, 150))
    settings = [dict(temperature=1.0, top_k=20, top_p=0.95), dict(temperature=0.6), dict(temperature=1.0, top_k=0, top_p=0.9, min_p=0.05),
                dict(temperature=0.8, top_k=50, top_p=0.8, min_p=0.1, repetition_penalty=1.3), dict(greedy=True),
                dict(temperature=1.2, top_k=5, repetition_penalty=1.1), dict(temperature=1.0, top_k=0, top_p=1.0)]
    def reqs():
        rs = _requests(ad.tokenizer, photo, wide)
        for k, (r, s) in enumerate(zip(rs, settings)): r.overrides.update(s, seed=100 + k)
        return rs
    alone = [eng.run(r.images, r.prompt, r.logits_processors, **r.overrides) for r in reqs()]
    together = eng.run_batch(reqs(), max_batch=4)
    for j, (a, b) in enumerate(zip(alone, together)):
        assert not isinstance(b, Exception), b
        assert b.ids == a.ids, (j, settings[j])
    greedy = [eng.run(r.images, r.prompt, r.logits_processors, **{**r.overrides, 'greedy': True}) for r in reqs()]
    assert sum(g.ids != a.ids for g, a in zip(greedy, alone)) >= 4                # the free tokens really were sampled

def test_tool_result_groups_stay_within_the_budget():
    "Paused rows' tool results are grouped so that rows x (longest past + longest new) stays within the budget; every row is in exactly one group."
    import random
    from vlm_nb.batch import _by_tokens
    rng = random.Random(0)
    for _ in range(300):
        k, budget = rng.randint(0, 12), rng.choice([64, 500, 4096, 16384])
        new, past = [rng.randint(1, 600) for _ in range(k)], [rng.randint(0, 5000) for _ in range(k)]
        groups = _by_tokens(new, budget, past)
        assert sorted(i for g in groups for i in g) == list(range(k))
        for g in groups:
            assert len(g) == 1 or len(g)*(max(new[i] for i in g) + max(past[i] for i in g)) <= budget
    assert _by_tokens([5, 5, 5], 30, [5, 5, 100]) == [[0, 1], [2]]              # the past counts, not only the new tokens
    assert _by_tokens([5, 5, 5], 30) == [[0, 1, 2]]
