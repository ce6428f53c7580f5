"""GRPO with tools in the rollouts: rewards against adversarial completions, advantages by hand, zero gradient on
masked tokens of real rollouts, a CPU run that is killed and resumed to the same numbers, and the CLI."""
import contextlib, dataclasses, io, json, math, os
from pathlib import Path
import pytest, torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')
from vlm_nb.grpo import (GRPOConfig, GRPOTask, Rollout, RewardWeights, simulate_rollout, score_rollout, synthetic_tasks,
                         group_advantages, token_logprobs, policy_loss, loss_weights, prepare_policy, generate_group,
                         generate_groups, train_grpo, train_grpo_main, load_grpo_config, _unwrap, resolve_device, resolve_dtype,
                         reward_crop, best_assignment, _exact_assignment, rollout_logprobs, rollout_inputs, lr_factor)
from vlm_nb.sequences import PROMPT, TRAINED, TOOL_RESPONSE, IMAGE, CONTEXT
from vlm_nb.tools import ToolRegistry
from vlm_nb.builtin_tools.crop_tool import CropTool
from vlm_nb.builtin_tools.identify_tool import IdentifyTool

FAST = dict(prompts_per_step=1, num_generations=2, scripted='call', scripted_jitter=0.3, max_new_tokens=6, lr=1e-3,
            adapter={'max_pixels': 160*160}, synthetic_images=2)


@pytest.fixture(scope='module')
def data():
    tasks, gallery = synthetic_tasks(2)
    reg = ToolRegistry([CropTool(), IdentifyTool(gallery)])
    crop = next(t for t in tasks if t.meta['kind'] == 'crop')
    ident = next(t for t in tasks if t.meta['kind'] == 'identify' and len(t.names) == 1)
    return tasks, gallery, reg, crop, ident


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    "A tiny random Qwen2.5-VL checkpoint folder, shared by the tests."
    from vlm_nb.models import make_tiny
    return str(make_tiny('qwen2_5_vl', tmp_path_factory.mktemp('tiny')/'model', seed=0))


def _b(b): return '[' + ', '.join(f'{v:.0f}' for v in b) + ']'


def test_adversarial_rewards(data):
    _, _, reg, crop, ident = data
    W, H = crop.images[0].size
    cb, pb, name, ans = crop.boxes[0], ident.boxes[0], ident.names[0], crop.answer
    pad = [cb[0] - 4, cb[1] - 4, cb[2] + 4, cb[3] + 4]
    crop_cases = {
        'good': f"<think>\n<tool_call>Crop {_b(pad)}</tool_call>\nIt shows {ans}.\n</think>\n<answer>{ans}</answer>",
        'empty': '',
        'no_tool': f"<think>\nEasy.\n</think>\n<answer>{ans}</answer>",
        'inverted': f"<think>\n<tool_call>Crop {_b([cb[2], cb[3], cb[0], cb[1]])}</tool_call>\n</think>\n<answer>{ans}</answer>",
        'outside': f"<think>\n<tool_call>Crop {_b([W + 5, H + 5, W + 50, H + 50])}</tool_call>\n</think>\n<answer>{ans}</answer>",
        'unclosed_answer': f"<think>\n<tool_call>Crop {_b(pad)}</tool_call>\n</think>\n<answer>{ans}",
        'over_budget': "<think>\n" + f"<tool_call>Crop {_b(pad)}</tool_call>\n"*4 + f"</think>\n<answer>{ans}</answer>",
    }
    id_cases = {
        'good': f"<think>\n<tool_call>Identify {_b(pb)}</tool_call>\nThe tool says {name}.\n</think>\n<answer>{name}</answer>",
        'hallucinated': f"<think>\n<tool_response>{name}</tool_response>\n</think>\n<answer>{name}</answer>",
        'call_and_own_response': f"<think>\n<tool_call>Identify {_b(pb)}</tool_call><tool_response>{name}</tool_response>\n</think>\n<answer>{name}</answer>",
        'no_tool': f"<think>\nI know.\n</think>\n<answer>{name}</answer>",
        'wrong_box': f"<think>\n<tool_call>Identify [0, 0, 15, 15]</tool_call>\n</think>\n<answer>{name}</answer>",
        'name_spam': f"<think>\n<tool_call>Identify {_b(pb)}</tool_call>\n</think>\n<answer>{name}, Ada Abe, Zoe Li</answer>",
    }
    sc = {k: score_rollout(simulate_rollout(s, crop.images, reg, max_turns=2), crop) for k, s in crop_cases.items()}
    si = {k: score_rollout(simulate_rollout(s, ident.images, reg, max_turns=2), ident) for k, s in id_cases.items()}
    # every adversarial case strictly below the good trajectory of its task
    for k, d in sc.items():
        if k != 'good': assert d['total'] < sc['good']['total'], (k, d)
    for k, d in si.items():
        if k != 'good': assert d['total'] < si['good']['total'], (k, d)
    # concrete numbers
    assert sc['empty']['total'] == -1.0 and sc['empty']['empty_answer'] == -1.0
    assert sc['unclosed_answer']['empty_answer'] == -1.0 and sc['unclosed_answer']['answer'] == 0.0
    assert si['good'] == {'answer': 1., 'identity': 1., 'crop': 0., 'format': 1., 'self_response': 0., 'empty_answer': 0.,
                          'turn_budget': 0., 'total': pytest.approx(1.7)}
    assert si['hallucinated']['self_response'] == -1.0 and si['hallucinated']['identity'] == 0.0
    assert si['hallucinated']['total'] == pytest.approx(0.2)
    assert si['call_and_own_response']['self_response'] == -1.0 and si['call_and_own_response']['identity'] == 1.0
    assert si['no_tool']['total'] == pytest.approx(1.2) and si['wrong_box']['identity'] == 0.0
    assert si['name_spam']['answer'] == 0.0
    good_iou = sc['good']['crop']
    assert 0.5 < good_iou < 1.0 and sc['good']['total'] == pytest.approx(1.2 + 0.5*good_iou)
    assert sc['no_tool']['total'] == pytest.approx(1.2)
    for k in ('inverted', 'outside'): assert sc[k]['crop'] == 0.0 and sc[k]['format'] == 0.0 and sc[k]['total'] == pytest.approx(1.0)
    assert sc['over_budget']['turn_budget'] == -1.0
    # the ordering a policy should learn: good > right-without-tool > broken tool calls > hallucination > empty
    assert si['good']['total'] > si['no_tool']['total'] > si['hallucinated']['total'] > sc['empty']['total']
    # weights are configurable
    assert score_rollout(simulate_rollout(crop_cases['good'], crop.images, reg), crop, RewardWeights(crop=2.0))['total'] == pytest.approx(1.2 + 2*good_iou)


def test_gated_rewards_need_a_right_answer(data):
    "RewardWeights(gated=True): identity, crop and format pay only with a right answer; penalties still apply."
    _, _, reg, crop, ident = data
    cb, pb, name = crop.boxes[0], ident.boxes[0], ident.names[0]
    pad = [cb[0] - 4, cb[1] - 4, cb[2] + 4, cb[3] + 4]
    gw = RewardWeights(gated=True)
    call = f"<think>\n<tool_call>Crop {_b(pad)}</tool_call>\n</think>\n"
    right, wrong = (simulate_rollout(call + f"<answer>{a}</answer>", crop.images, reg) for a in (crop.answer, crop.answer + '0'))
    assert score_rollout(right, crop, gw)['total'] == pytest.approx(score_rollout(right, crop)['total'])
    assert score_rollout(right, crop)['total'] > 1.0
    assert score_rollout(wrong, crop)['total'] > 0.2 and score_rollout(wrong, crop, gw)['total'] == 0.0
    assert score_rollout(wrong, crop, gw)['crop'] > 0.5          # the components are still reported
    own = simulate_rollout(f"<think>\n<tool_response>{name}</tool_response>\n</think>\n<answer>x</answer>", ident.images, reg)
    assert score_rollout(own, ident, gw)['total'] == -1.0


def test_injected_responses_are_not_model_text(data):
    _, _, reg, _, ident = data
    name = ident.names[0]
    r = simulate_rollout(f"<think>\n<tool_call>Identify {_b(ident.boxes[0])}</tool_call>\n</think>\n<answer>{name}</answer>", ident.images, reg)
    assert [s for s, _ in r.segments] == ['model', 'tool', 'model']
    assert '<tool_response>' not in r.model_text and f'<tool_response>{name}</tool_response>' in r.text
    assert r.calls[0]['result'] == 'text' and r.calls[0]['text'] == name


def test_group_advantages_by_hand():
    a = group_advantages([[1., 0, 0, 0], [0.5, 0.5, 0.5, 0.5]], eps=0)
    assert torch.allclose(a[0], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    assert torch.equal(a[1], torch.zeros(4))
    # [2, 0] : mean 1, unbiased std sqrt(2) -> +-1/sqrt(2)
    assert torch.allclose(group_advantages([2., 0.], G=2, eps=0), torch.tensor([[1/math.sqrt(2), -1/math.sqrt(2)]]))
    assert torch.allclose(group_advantages([[3., 1.]], scale='none'), torch.tensor([[1., -1.]]))
    m = group_advantages([[1., 0, 9, 0]], valid=[[1, 1, 0, 1]], eps=0)
    assert m[0, 2] == 0 and torch.allclose(m[0, [0, 1, 3]], torch.tensor([2, -1, -1])/math.sqrt(3))


def test_loss_normalisations():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.allclose(loss_weights(mask, 'grpo'), torch.tensor([[.25, .25, 0, 0], [.125]*4]))
    assert torch.allclose(loss_weights(mask, 'token'), mask.float()/6)
    assert torch.allclose(loss_weights(mask, 'dr_grpo', max_len=8), mask.float()/16)


@pytest.mark.parametrize('kind', ['crop', 'identify'])
def test_masked_tokens_get_zero_gradient(tiny, data, kind):
    "Gradient of the loss w.r.t. the logits of a real tool rollout is exactly zero wherever the next token is not model-written."
    _, _, reg, crop, ident = data
    task = crop if kind == 'crop' else ident
    cfg = GRPOConfig(model=tiny, output_dir='unused', **FAST)
    policy, adapter, _ = prepare_policy(cfg)
    from vlm_nb.engine import ToolEngine
    inner = _unwrap(policy)
    r = generate_group(ToolEngine(inner.eval(), adapter, tools=reg), task, 1, [7], cfg)[0]
    injected = IMAGE if kind == 'crop' else TOOL_RESPONSE
    assert r.n_executed == 1 and (r.roles == injected).sum() > 0 and (r.roles == TRAINED).sum() > 0
    # full forward over prompt + completion, logits kept for every position
    blocks = [adapter.image_block(im, role=ro) for im, ro in zip(r.images, r.image_roles)]
    ids = torch.tensor([r.ids])
    inner.train()
    out = adapter.forward(inner, ids, attention_mask=torch.ones_like(ids), **adapter.collate_pixels(blocks))
    logits = out.logits; logits.retain_grad()
    logp = token_logprobs(logits, ids)
    mask = torch.as_tensor(r.roles[1:] == TRAINED)[None]
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor([1.0]), mask)
    loss.backward()
    g = logits.grad[0, :-1].abs().sum(-1)
    nxt = torch.as_tensor(r.roles[1:])
    assert (r.roles == CONTEXT).sum() == r.meta['n_forced'] > 0       # the scripted prefix: forced, not sampled
    for role in (PROMPT, injected, CONTEXT):
        sel = nxt == role
        assert sel.any() and g[sel].max().item() == 0.0, role
    assert (g[nxt == TRAINED] > 0).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters() if p.requires_grad)


def _log(path): return [json.loads(l) for l in Path(path).read_text().splitlines()]


def test_killed_run_resumes_to_the_same_numbers(tiny, tmp_path):
    base = dict(model=tiny, steps=3, save_every=1, **FAST)
    full = train_grpo(GRPOConfig(output_dir=str(tmp_path/'a'), **base))
    assert full['steps'] == 3 and full['tool_calls_executed'] >= 6 and full['resumed_from'] is None

    class Killed(Exception): pass
    def kill(step, rec):
        if step == 2: raise Killed()
    with pytest.raises(Killed): train_grpo(GRPOConfig(output_dir=str(tmp_path/'b'), **base), on_step=kill)
    assert len(_log(tmp_path/'b'/'log.jsonl')) == 2
    res = train_grpo(GRPOConfig(output_dir=str(tmp_path/'b'), **base))
    assert res['resumed_from'] == 2 and res['steps'] == 3
    la, lb = _log(tmp_path/'a'/'log.jsonl'), _log(tmp_path/'b'/'log.jsonl')
    keys = ['step', 'loss', 'reward_mean', 'reward/crop', 'reward/identity', 'tool_calls_executed', 'tool_failures', 'completion_tokens', 'tasks']
    assert [{k: r[k] for k in keys} for r in la] == [{k: r[k] for k in keys} for r in lb]
    assert res['reward_first'] == full['reward_first'] and res['reward_last'] == full['reward_last']
    for k in ('steps', 'tool_calls_executed', 'reward_first', 'reward_last'): assert k in res
    assert (tmp_path/'b'/'final'/'adapter_config.json').exists()


def test_variants_full_mode_kl_and_masking(tiny, tmp_path):
    "Full fine-tuning with a KL reference, token-level loss, two passes per batch and over-budget masking all run."
    s = train_grpo(GRPOConfig(output_dir=str(tmp_path/'full'), model=tiny, steps=1, mode='full', beta=0.04, loss_type='token',
                              num_iterations=2, over_budget='mask', max_turns=1, **FAST))
    rec = _log(s['log'])[0]
    assert s['steps'] == 1 and math.isfinite(rec['loss'])
    # LoRA with a KL term: the reference is the base model (adapter disabled), so the KL is exactly 0 before the first
    # update and positive once the adapter has moved (it would stay 0 if the reference were the policy itself)
    s2 = train_grpo(GRPOConfig(output_dir=str(tmp_path/'lora'), model=tiny, steps=2, beta=0.04, loss_type='dr_grpo', warmup_ratio=0.0, **FAST))
    l2 = _log(s2['log'])
    assert all(math.isfinite(r['loss']) for r in l2) and l2[0]['grad_norm'] > 0
    assert l2[0]['kl'] < 1e-7 and l2[1]['kl'] > 1e-6, [r['kl'] for r in l2]


def test_cli(tiny, tmp_path):
    cfg = tmp_path/'grpo.json'
    cfg.write_text(json.dumps({'_comment': 'tiny CPU run', 'model': tiny, 'output_dir': str(tmp_path/'run'), 'steps': 1, **FAST}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out): rc = train_grpo_main([str(cfg), '--json', '--rewards.crop', '1.0'])
    assert rc == 0
    s = json.loads(out.getvalue())
    assert s['steps'] == 1 and s['tool_calls_executed'] >= 2 and {'reward_first', 'reward_last'} <= set(s)
    err = io.StringIO()
    with contextlib.redirect_stderr(err): rc = train_grpo_main([str(cfg), '--loss_type', 'bogus'])
    assert rc == 1 and err.getvalue().startswith('error:') and 'Traceback' not in err.getvalue()
    with contextlib.redirect_stderr(io.StringIO()): assert train_grpo_main([str(tmp_path/'missing.json')]) == 1


# ---------------------------------------------------------------- several processes (torchrun, gloo)
def _grpo_run(tiny, out, steps, nproc, *extra):
    "Run tests/_grpo_dist.py in one process or under torchrun; (summary, [LoRA weights per process])."
    import socket, subprocess, sys
    script = str(Path(__file__).parent/'_grpo_dist.py')
    if nproc == 1: cmd = [sys.executable, script]
    else:
        with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port', str(port), script]
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false', 'OMP_NUM_THREADS': '1'}
    p = subprocess.run(cmd + [tiny, str(out), str(steps), *extra], capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads([l for l in p.stdout.splitlines() if l.startswith('{')][-1])
    return s, [torch.load(out/f'params-{r}.pt', weights_only=True) for r in range(nproc)]

def test_two_processes_take_the_step_one_process_takes(tiny, tmp_path):
    "Fixed rollouts, 3 groups per step split 2 + 1 over two gloo processes: the same parameters as one process, and an exact resume."
    one, (p1,) = _grpo_run(tiny, tmp_path/'one', 1, 1)
    two, (p2a, p2b) = _grpo_run(tiny, tmp_path/'two', 1, 2)
    assert (one['world_size'], two['world_size']) == (1, 2)
    assert any(v.abs().sum() > 0 for k, v in p1.items() if 'lora_B' in k)            # the step changed the (zero-initialised) B
    for k in p1:
        assert torch.equal(p2a[k], p2b[k]), k                                         # both processes hold the same weights ...
        assert torch.allclose(p1[k], p2a[k], rtol=0, atol=1e-5), (k, (p1[k] - p2a[k]).abs().max())   # ... those of one process
    la, lb = _log(one['log']), _log(two['log'])           # (Adam's first step divides by |g|: float summation order shows at 1e-6)
    assert lb[0]['grad_norm'] == pytest.approx(la[0]['grad_norm'], rel=1e-5)         # the summed gradient has the whole batch's scale
    for k in ('reward_mean', 'tool_calls_executed', 'completion_tokens', 'tasks'): assert la[0][k] == lb[0][k], k
    assert lb[0]['loss'] == pytest.approx(la[0]['loss'], rel=1e-5, abs=1e-7) and lb[0]['world_size'] == 2   # ~0 at ratio 1: group advantages sum to 0
    one2, (q1,) = _grpo_run(tiny, tmp_path/'one', 2, 1)                                # one more step, resumed, both ways
    two2, (q2a, _) = _grpo_run(tiny, tmp_path/'two', 2, 2)
    assert (one2['resumed_from'], two2['resumed_from']) == (1, 1)
    for k in q1: assert torch.allclose(q1[k], q2a[k], rtol=0, atol=1e-5), k
    assert _log(two2['log'])[1]['grad_norm'] == pytest.approx(_log(one2['log'])[1]['grad_norm'], rel=1e-5)

@pytest.mark.slow   # DeepSpeed starts slowly (and JIT-builds its CPU comm op on a new machine)
def test_deepspeed_zero2_takes_the_step_one_process_takes(tiny, tmp_path):
    "GRPO under DeepSpeed ZeRO-2 (2 gloo processes, CPU accelerator): the parameters and gradient norm of one plain process, and an exact resume."
    one, (p1,) = _grpo_run(tiny, tmp_path/'one', 1, 1)
    two, (p2a, p2b) = _grpo_run(tiny, tmp_path/'ds', 1, 2, 'zero2')
    assert two['world_size'] == 2 and (tmp_path/'ds'/'checkpoints'/'step-000001'/'deepspeed').is_dir()   # sharded optimizer saved
    for k in p1:
        assert torch.equal(p2a[k], p2b[k]), k
        assert torch.allclose(p1[k], p2a[k], rtol=0, atol=1e-5), (k, (p1[k] - p2a[k]).abs().max())
    la, lb = _log(one['log']), _log(two['log'])
    assert lb[0]['grad_norm'] == pytest.approx(la[0]['grad_norm'], rel=1e-5) and lb[0]['loss'] == pytest.approx(la[0]['loss'], rel=1e-5, abs=1e-7)
    one2, (q1,) = _grpo_run(tiny, tmp_path/'one', 2, 1)
    two2, (q2a, _) = _grpo_run(tiny, tmp_path/'ds', 2, 2, 'zero2')                    # resumed: weights and DeepSpeed's optimizer shards
    assert (one2['resumed_from'], two2['resumed_from']) == (1, 1)
    for k in q1: assert torch.allclose(q1[k], q2a[k], rtol=0, atol=1e-5), k
    assert _log(two2['log'])[1]['grad_norm'] == pytest.approx(_log(one2['log'])[1]['grad_norm'], rel=1e-5)

def test_grpo_refuses_zero3():
    with pytest.raises(ValueError, match='ZeRO stages 0-2'): GRPOConfig(deepspeed='zero3').check()

def test_loss_weights_over_processes():
    "One process's share of the batch, weighted with the whole batch's counts, gives the whole batch's weights."
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]]).bool()
    for lt in ('grpo', 'token', 'dr_grpo'):
        whole = loss_weights(m, lt, 3)
        parts = torch.cat([loss_weights(m[:2], lt, 3, n_rows=3, n_tokens=int(m.sum())), loss_weights(m[2:], lt, 3, n_rows=3, n_tokens=int(m.sum()))])
        assert torch.allclose(whole, parts), lt


# ---------------------------------------------------------------- issue 24: device, batched log-probs, batch scaling, crop matching
def test_device_resolution_picks_cuda_when_present(monkeypatch):
    "With CUDA present, 'auto' is this process's GPU (cuda:LOCAL_RANK) and bf16 where supported; without it, the CPU in float32."
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)
    monkeypatch.setenv('LOCAL_RANK', '1')
    assert resolve_device('auto') == 'cuda:1' and resolve_device(GRPOConfig().device) == 'cuda:1'
    assert resolve_device('cuda') == 'cuda:1' and resolve_device('cpu') == 'cpu' and resolve_device('cuda:0') == 'cuda:0'
    assert resolve_dtype('auto', 'cuda:1') == torch.bfloat16 and resolve_dtype('float32', 'cuda:1') == torch.float32
    from vlm_nb.grpo import dist_backend
    monkeypatch.delenv('VLM_NB_DIST_BACKEND', raising=False)
    assert dist_backend('cuda:1') == 'nccl' and dist_backend('cpu') == 'gloo'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert resolve_device('auto') == 'cpu' and resolve_dtype('auto', 'cpu') == torch.float32
    with pytest.raises(ValueError, match='not available'): resolve_device('cuda')


def test_full_mode_freezes_vision_and_reference_on_policy_device(tiny, tmp_path):
    "Full mode trains the LLM with the vision tower frozen (as SFT), all parameters on the resolved device."
    from vlm_nb.sft import trainable_report
    cfg = GRPOConfig(model=tiny, output_dir=str(tmp_path), mode='full', **FAST)
    policy, ad, _ = prepare_policy(cfg)
    rep = trainable_report(policy, ad.family)
    assert rep['vision'][0] == 0 and rep['llm'][0] == rep['llm'][1] > 0
    assert {str(p.device) for p in policy.parameters()} == {resolve_device('auto')}
    assert next(policy.parameters()).dtype == resolve_dtype('auto', resolve_device('auto'))


def test_lr_schedule():
    f = [lr_factor(s, 10, 0.1, 'cosine') for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and all(a > b for a, b in zip(f[1:], f[2:])) and f[-1] > 0
    assert [lr_factor(s, 3, 0.0, 'constant') for s in range(3)] == [1.0]*3


@pytest.mark.parametrize('family', ['internvl3_5', 'qwen2_5_vl'])
def test_batched_logprobs_equal_one_at_a_time(family, data, tmp_path):
    "Rollouts of two prompts (different lengths), each with a crop image inside, in one padded forward: the log-probs of one at a time (fp32, 1e-5)."
    _, _, reg, crop, ident = data
    from vlm_nb.models import make_tiny
    from vlm_nb.engine import ToolEngine
    d = make_tiny(family, tmp_path/'m', seed=0)
    cfg = GRPOConfig(model=str(d), output_dir=str(tmp_path/'o'), **{**FAST, 'max_new_tokens': 10})
    policy, ad, _ = prepare_policy(cfg)
    inner = _unwrap(policy).eval()
    crops = [t for t in synthetic_tasks(3, kinds=('crop',))[0] if 'Crop' in t.needs]
    tasks = [crops[0], next(t for t in crops if len(t.question) != len(crops[0].question))]
    groups = generate_groups(ToolEngine(inner, ad, tools=reg), tasks, 2, [[1, 2], [3, 4]], cfg)
    rs = [r for g in groups for r in g]
    assert all(r.n_executed >= 1 and 'crop' in r.image_roles for r in rs) and len({r.prompt_len for r in rs}) == 2
    x = rollout_inputs(ad, rs)
    if family.startswith('qwen'): assert x['position_ids'].shape == (3, len(rs), x['input_ids'].shape[1])
    with torch.no_grad():
        one = [rollout_logprobs(inner, ad, r, cfg.temperature) for r in rs]
        lp, m = rollout_logprobs(inner, ad, rs, cfg.temperature, chunk_tokens=7)
        # the full-logits reference for the first rollout
        x0 = rollout_inputs(ad, rs[:1])
        full = token_logprobs(ad.forward(inner, **x0).logits, x0['input_ids'])[:, rs[0].prompt_len - 1:]
    assert torch.allclose(one[0][0][one[0][1]], full[one[0][1]], rtol=0, atol=1e-5)
    for i, (l1, m1) in enumerate(one):
        T = l1.shape[1]
        assert torch.equal(m[i, :T], m1[0]) and not m[i, T:].any() and m1.sum() > 0
        assert torch.allclose(lp[i, :T], l1[0], rtol=0, atol=1e-5), (i, (lp[i, :T] - l1[0]).abs().max())
    # the gradient flows through the batched pass
    policy.train()
    lpg, mg = rollout_logprobs(inner, ad, rs, cfg.temperature)
    (lpg*mg).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters() if p.requires_grad)


def test_logprob_batch_and_checkpointing_give_the_same_step(tiny, tmp_path):
    "One training step with logprob_batch 1 vs 4 (and gradient checkpointing): the same loss and gradient norm."
    base = dict(model=tiny, steps=1, **{**FAST, 'num_generations': 3})
    a = train_grpo(GRPOConfig(output_dir=str(tmp_path/'a'), logprob_batch=1, **base))
    b = train_grpo(GRPOConfig(output_dir=str(tmp_path/'b'), logprob_batch=4, gradient_checkpointing=True, **base))
    la, lb = _log(a['log'])[0], _log(b['log'])[0]
    assert la['grad_norm'] == pytest.approx(lb['grad_norm'], rel=1e-4) and la['loss'] == pytest.approx(lb['loss'], rel=1e-4, abs=1e-7)
    assert la['grad_norm'] > 0


def test_rollouts_back_off_on_oom(tiny, data, tmp_path):
    "An out-of-memory error while decoding halves the rollout batch and retries: the same rollouts."
    _, _, reg, crop, _ = data
    from vlm_nb.engine import ToolEngine
    cfg = GRPOConfig(model=tiny, output_dir=str(tmp_path), **FAST)
    policy, ad, _ = prepare_policy(cfg)
    eng = ToolEngine(_unwrap(policy).eval(), ad, tools=reg)
    ref = generate_groups(eng, [crop, crop], 2, [[1, 2], [3, 4]], cfg)
    def small(reqs, max_batch=None, **kw):
        if (max_batch or len(reqs)) > 1: raise torch.OutOfMemoryError('CUDA out of memory (simulated)')
        return type(eng).run_batch(eng, reqs, max_batch=max_batch, **kw)
    eng.run_batch = small
    bo = {'batch': 4, 'oom_retries': 0}
    got = generate_groups(eng, [crop, crop], 2, [[1, 2], [3, 4]], cfg, backoff=bo)
    assert bo == {'batch': 1, 'oom_retries': 2}
    assert [r.ids for g in got for r in g] == [r.ids for g in ref for r in g]
    def never(reqs, max_batch=None, **kw): raise torch.OutOfMemoryError('CUDA out of memory (simulated)')
    eng.run_batch = never
    with pytest.raises(torch.OutOfMemoryError): generate_groups(eng, [crop], 2, [[1, 2]], cfg, backoff={'batch': 2, 'oom_retries': 0})


def test_batch_scaling_over_two_processes_equals_one():
    "scale_rewards='batch': the std of every process's rewards, so 2 gloo processes give the advantages of 1 (0.343, not 1.5)."
    import socket, subprocess, sys
    script = str(Path(__file__).parent/'_grpo_dist.py')
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    env.pop('VLM_NB_DIST_BACKEND', None)
    def run(nproc, scale):
        if nproc == 1: cmd = [sys.executable, script]
        else:
            with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
            cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port', str(port), script]
        p = subprocess.run(cmd + ['advantages', scale], capture_output=True, text=True, timeout=300, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads([l for l in p.stdout.splitlines() if l.startswith('{')][-1])
    one, two = run(1, 'batch'), run(2, 'batch')
    assert (one['world_size'], two['world_size']) == (1, 2)
    assert torch.allclose(torch.tensor(one['advantages']), torch.tensor(two['advantages']), rtol=0, atol=1e-6)
    assert one['advantages'][0][0] == pytest.approx(0.75/math.sqrt(33.5/7), abs=1e-4)          # 0.343
    local = group_advantages([[1., 0, 0, 0]], scale='batch')                                       # one process's own std
    assert float(local[0, 0]) == pytest.approx(1.5, abs=1e-3)
    assert torch.allclose(torch.tensor(run(2, 'group')['advantages']), group_advantages([[1., 0, 0, 0], [5., 4, 4, 4]]), atol=1e-6)


def _crop_rollout(boxes, failed=()):
    return Rollout([('model', '<answer>x</answer>')], [{'name': 'Crop', 'result': 'error' if i in failed else 'image', 'box': None if i in failed else b}
                                                       for i, b in enumerate(boxes)])

def test_crop_reward_matches_crops_to_boxes_one_to_one(data):
    "Each referenced object cropped once beats one object, one object twice, the whole image, and the right crops plus random ones."
    crop = data[3]
    W, H = crop.images[0].size
    b1, b2 = [10, 10, 60, 60], [100, 80, 150, 140]
    t = GRPOTask('two', crop.images, 'q', 'a', boxes=[b1, b2], needs=('Crop',))
    rng = __import__('random').Random(0)
    def rnd():
        x1, y1 = rng.uniform(0, W - 20), rng.uniform(0, H - 20)
        return [x1, y1, x1 + rng.uniform(10, 60), y1 + rng.uniform(10, 60)]
    each = reward_crop(_crop_rollout([b2, b1]), t)                       # any order
    assert each == pytest.approx(1.0)
    others = {'one object': [b1], 'one object twice': [b1, b1], 'the other twice': [b2, b2], 'whole image': [[0, 0, W, H]],
              'one right + one random': [b1, rnd()], 'both right + random': [b1, b2, rnd()], 'both right + 2 random': [b1, rnd(), b2, rnd()],
              'slightly off both': [[12, 12, 62, 62], [102, 82, 152, 142]]}
    for k, boxes in others.items(): assert reward_crop(_crop_rollout(boxes), t) < each, k
    assert reward_crop(_crop_rollout([b1]), t) == pytest.approx(0.5) and reward_crop(_crop_rollout([b1, b1]), t) == pytest.approx(0.5)
    assert reward_crop(_crop_rollout([b1, b2, b1]), t) == pytest.approx(2/3 - 0.1)
    assert reward_crop(_crop_rollout([b1, b2], failed={1}), t) == pytest.approx(0.5)        # a failed crop is a crop with IoU 0
    assert reward_crop(_crop_rollout([]), t) == 0.0
    # the fallback exact search agrees with scipy's assignment (when scipy is installed)
    import numpy as np
    g = np.random.default_rng(0)
    for shape in [(1, 1), (2, 3), (4, 2), (5, 5)]:
        m = g.random(shape)
        r, c = _exact_assignment(m)
        assert len(r) == min(shape) and len(set(c)) == len(c)
        br, bc = best_assignment(m)
        assert m[r, c].sum() == pytest.approx(m[br, bc].sum())


def test_full_mode_writes_weights_once_and_resumes(tiny, tmp_path):
    "Full mode: a checkpoint's weights are a model folder (not also in state.pt), final/ links the last one's files, and a killed run resumes to the same numbers."
    base = dict(model=tiny, mode='full', steps=2, save_every=1, **FAST)
    a = train_grpo(GRPOConfig(output_dir=str(tmp_path/'a'), **base))
    ck = tmp_path/'a'/'checkpoints'/'step-000002'
    st = torch.load(ck/'state.pt', weights_only=True)
    assert 'trainable' not in st and st['weights'] == 'model'
    files = list((ck/'model').glob('*.safetensors'))
    assert files and all(os.path.samefile(f, tmp_path/'a'/'final'/f.name) for f in files)   # one copy of the bytes on disk
    from vlm_nb.models import load_model
    m, _ = load_model(tmp_path/'a'/'final')                                                  # the final model loads
    class Killed(Exception): pass
    def kill(step, rec):
        if step == 1: raise Killed()
    with pytest.raises(Killed): train_grpo(GRPOConfig(output_dir=str(tmp_path/'b'), **base), on_step=kill)
    b = train_grpo(GRPOConfig(output_dir=str(tmp_path/'b'), **base))
    assert b['resumed_from'] == 1
    keys = ['step', 'loss', 'grad_norm', 'reward_mean', 'completion_tokens', 'lr']
    la, lb = _log(a['log']), _log(b['log'])
    for ra, rb in zip(la, lb):
        for k in keys: assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-9), (ra['step'], k)
    assert len(la) == len(lb) == 2
    ma, _ = load_model(tmp_path/'b'/'final')
    for (n, p), (_, q) in zip(m.named_parameters(), ma.named_parameters()): assert torch.allclose(p, q, atol=1e-6), n
