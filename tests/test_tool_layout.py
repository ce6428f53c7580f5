"""One tool layout per model, honoured identically by training, the local engine, GRPO and a real server.

The sequence builder, `ToolEngine` (hence GRPO rollouts) and `RemoteEngine` must put a tool result in the same place
(`inline`: inside the assistant turn; `turn`: in a user turn `<tool_response>\\n…\\n</tool_response>`), token for token.
The server test runs `transformers serve` through tests/_serve_launcher.py, which logs the ids the server tokenizes."""
import json, os, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault('HF_HUB_OFFLINE', '1')

# what the model writes: after a 'turn' result it starts a new assistant turn, so the text follows `assistant\n` directly
SCRIPTS = {'inline': "<think>\nI zoom in. <tool_call>Crop [40, 60, 120, 200]</tool_call>\nRed. <tool_call>Identify [40, 60, 120, 200]</tool_call>"
                     "So nobody known.\n</think>\n<answer>red</answer>",
           'turn': "<think>\nI zoom in. <tool_call>Crop [40, 60, 120, 200]</tool_call>Red. <tool_call>Identify [40, 60, 120, 200]</tool_call>"
                   "So nobody known.\n</think>\n<answer>red</answer>"}
BODY = ("<think>\nI zoom in. <tool_call>Crop [40, 60, 120, 200]</tool_call><image>\nRed. <tool_call>Identify [40, 60, 120, 200]</tool_call>"
        "<tool_response>unknown person</tool_response>So nobody known.\n</think>\n<answer>red</answer>")
QUESTION = 'What is red?'

def _photo():
    a = np.zeros((480, 640, 3), np.uint8); a[60:200, 40:120] = (220, 30, 30); a[300:, 300:] = (30, 30, 220)
    return Image.fromarray(a)

@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    from vlm_nb.models import make_tiny
    d = tmp_path_factory.mktemp('layout')
    return {f: make_tiny(f, d/f) for f in ('internvl3_5', 'qwen3_vl', 'ovis2_5')}

def _sample(eng, photo, body=BODY):
    from vlm_nb.data import Sample, Turn
    return Sample([Turn('system', eng.system_text(True)), Turn('user', eng.user_text(QUESTION, 1)), Turn('assistant', body)],
                  images=[photo], id='layout')

@pytest.mark.parametrize('family,layout', [('internvl3_5', 'inline'), ('qwen3_vl', 'turn'), ('ovis2_5', 'turn'),
                                           ('qwen3_vl', 'inline'), ('internvl3_5', 'turn')])
def test_engine_grpo_and_builder_agree(ckpts, family, layout):
    "The local engine's context is the training sequence of the same conversation; GRPO trains exactly the sampled tokens."
    from vlm_nb.models import load_model
    from vlm_nb.engine import ToolEngine, GenConfig, ForcedContinuation
    from vlm_nb.sequences import build_sequence, TRAINED, IMAGE
    from vlm_nb.grpo import TokenRecorder, rollout_from_trajectory
    opts = {'max_tiles': 1} if family == 'internvl3_5' else {}
    model, ad = load_model(ckpts[family], tool_layout=layout, **opts)
    assert ad.tool_layout == layout
    eng = ToolEngine(model, ad, tools='crop,identify', config=GenConfig(greedy=True, thinking=True, max_new_tokens=300))
    photo, rec = _photo(), TokenRecorder()
    tr = eng.run([photo], QUESTION, [ForcedContinuation(ad.tokenizer, SCRIPTS[layout], 'eos'), rec])
    assert tr.n_tool_calls == 2 and tr.finish_reason == 'eos', tr.text
    seq = build_sequence(_sample(eng, photo), ad)
    assert tr.ids == seq.input_ids.tolist()                       # token for token, image blocks included
    ro = rollout_from_trajectory(tr, rec.positions)
    P = tr.prompt_len
    closes = [i + 1 for i in np.flatnonzero(seq.input_ids == ad.tid('</tool_call>')).tolist() if i >= P]   # the model's calls
    sft_trained = set(np.flatnonzero(seq.roles == TRAINED).tolist())
    if layout == 'turn':                                          # SFT also trains the `<|im_end|>` closing each call's turn
        assert len(closes) == 2 and all(seq.input_ids[c] == ad.tid('<|im_end|>') and c in sft_trained for c in closes)
        sft_trained -= set(closes)                                # ... which GRPO did not sample: injected, masked
    assert set(np.flatnonzero(ro.roles == TRAINED).tolist()) == sft_trained
    assert (ro.roles[P:] == IMAGE).tolist() == (seq.roles[P:] == IMAGE).tolist()   # the crop block, nothing else
    text = ad.tokenizer.decode([i for i in tr.ids[P:] if i >= 0])
    if layout == 'turn': assert '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nunknown person\n</tool_response>' in text
    else: assert '</tool_call><tool_response>unknown person</tool_response>So nobody' in text and text.count('<|im_start|>') == 0

def test_remote_engine_refuses_inline_models(ckpts):
    from vlm_nb.infer import RemoteEngine
    from vlm_nb.models import record_tool_layout
    class Never:
        chat = None
    with pytest.raises(ValueError, match='cannot continue an assistant turn with an image'):
        RemoteEngine('http://unused', 'ivl', tools='crop', client=Never(), checkpoint=ckpts['internvl3_5'])
    assert RemoteEngine('http://unused', 'q3', tools='crop', client=Never(), checkpoint=ckpts['qwen3_vl']).tool_layout == 'turn'
    record_tool_layout(ckpts['internvl3_5'], 'turn')              # an InternVL model trained for serving
    try: assert RemoteEngine('http://unused', 'ivl', tools='crop', client=Never(), checkpoint=ckpts['internvl3_5']).family == 'internvl3_5'
    finally: (ckpts['internvl3_5']/'vlm_nb.json').unlink()

from conftest import transformers_serve

def test_served_turn_model_sees_the_training_ids(ckpts, tmp_path):
    "`transformers serve` tokenizes RemoteEngine's requests into exactly the training sequence's prefixes."
    for mod in ('fastapi', 'uvicorn', 'openai'): pytest.importorskip(mod, reason=f'transformers serve needs {mod}')
    from vlm_nb.models import load_model, record_tool_layout
    from vlm_nb.engine import ToolEngine, GenConfig
    from vlm_nb.infer import RemoteEngine
    from vlm_nb.sequences import build_sequence, TRAINED
    from vlm_nb.tools import ToolResult, default_registry, parse_tool_calls
    ck = ckpts['qwen3_vl']; record_tool_layout(ck, 'turn')
    model, ad = load_model(ck)
    photo = _photo()
    seq = build_sequence(_sample(ToolEngine(model, ad, tools='crop,identify'), photo), ad)
    starts = [a for a, _ in seq.runs(TRAINED)]                    # where the model writes: after each prompt / tool turn
    assert len(starts) == 3
    log, ids_log = tmp_path/'serve.log', tmp_path/'ids.jsonl'
    with transformers_serve(ck, log, launcher=True, env={'VLM_NB_SERVE_IDS': str(ids_log)}) as port:
        eng = RemoteEngine(f'http://127.0.0.1:{port}/v1', str(ck), tools='crop,identify', checkpoint=ck, timeout=120, max_retries=0,
                           system=ToolEngine(model, ad, tools='crop,identify').system_text(True), config=GenConfig(greedy=True))
        reg = default_registry()
        script = SCRIPTS['turn']
        crop, ident = parse_tool_calls(script, legacy=False)
        seg1 = script[:crop.end]; seg2 = script[crop.end:ident.end]
        msgs = [{'role': 'system', 'content': eng.system_text(True)}, {'role': 'user', 'content': eng.content(eng_user(QUESTION), [photo])}]
        convs = [list(msgs)]
        msgs += [{'role': 'assistant', 'content': seg1}, eng.tool_message(reg.execute([photo], crop))]; convs.append(list(msgs))
        res = reg.execute([photo], ident); assert res.kind == 'text'
        msgs += [{'role': 'assistant', 'content': seg2}, eng.tool_message(res)]; convs.append(list(msgs))
        for m in convs:   # no `stop`: transformers serve passes the VLM processor where stop strings need a tokenizer (HTTP 500)
            eng.client.chat.completions.create(model=eng.model, messages=m, max_tokens=1, temperature=0.0)
        served = [json.loads(l) for l in ids_log.read_text().splitlines()]
        assert len(served) == 3, log.read_text()[-2000:]
        for got, s in zip(served, starts): assert got == seq.input_ids[:s].tolist()

def eng_user(q): return '<image>\n' + q
