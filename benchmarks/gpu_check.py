"""One-command GPU check (<= 5 minutes on one H100): an InternVL3.5-1B-sized random model in bf16 on cuda.

    python benchmarks/gpu_check.py [--tiny] [--steps 6] [--grpo-steps 2] [--prompts 4] [--generations 8] [--max-new-tokens 64]
                                   [--mode full|lora] [--out /tmp/vlm_nb_gpu_check]
Prints one JSON object:
- "sft": training tokens/s, MFU and peak memory of the 1B-sized model, padded and packed (`vlm_nb.sft_bench.gpu_train_bench`);
- "grpo": 2 GRPO steps (`vlm_nb.grpo.train_grpo`, synthetic scenes, a scripted first Crop call, KL to the reference):
  rollout tokens/s, peak memory, the device of every parameter, of the reference model, of the log-probs and of the
  logits the engine samples from;
- "vocab": the tokenizer's size (151,678 ids with the real Qwen3 tokenizer from ../shared).
`--tiny` runs the same on toy shapes (on the CPU when there is no GPU), to check the script itself.
Random weights: the model's own tokens are noise; the figures are throughput, memory and placement."""
import argparse, contextlib, json, os, sys, tempfile, time
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollouts_gpu import checkpoint as _checkpoint

def checkpoint(out: Path, size: str) -> Path:
    "Write (once) a random InternVL3.5 checkpoint of `size` shapes (bf16 for '1b') with the project's tokenizer and processor files."
    return _checkpoint(out, size, torch.bfloat16 if size == '1b' else None)

def _devices(model) -> dict:
    "{device: number of parameters} of `model`."
    out = {}
    for p in model.parameters(): out[str(p.device)] = out.get(str(p.device), 0) + 1
    return out

def sft_part(size: str, steps: int, batch_size: int, seq_len: int) -> dict:
    from vlm_nb.sft_bench import gpu_train_bench
    try: return gpu_train_bench(size, steps=steps, batch_size=batch_size, seq_len=seq_len, zero2=False, attn='sdpa', packing=True)
    except Exception as e: return {'not_run': f'{type(e).__name__}: {e}'}

def grpo_part(ck: Path, out: Path, steps: int, prompts: int, generations: int, max_new_tokens: int, mode: str) -> dict:
    "GRPO steps with the placement of the policy, the reference, the log-probs and the sampled logits recorded."
    import vlm_nb.grpo as g, vlm_nb.engine as E
    seen = {'policy': None, 'reference': {}, 'logprobs': {}, 'sampled_logits': {}}
    prep, rlp = g.prepare_policy, g.rollout_logprobs
    def prepare(cfg, model=None, adapter=None):
        r = prep(cfg, model, adapter); seen['policy'] = r[0]; return r
    def logprobs(model, adapter, rollouts, *a, **k):
        lp, m = rlp(model, adapter, rollouts, *a, **k)
        inner = g._unwrap(seen['policy'])
        if model is not inner: seen['reference'].update(_devices(model))          # full mode: the frozen copy
        elif not torch.is_grad_enabled() and getattr(seen['policy'], 'peft_config', None): seen['reference']['policy with the adapter disabled'] = 1
        seen['logprobs'][str(lp.device)] = seen['logprobs'].get(str(lp.device), 0) + 1
        return lp, m
    rec_call = g.TokenRecorder.__call__
    def record(self, context, logits):
        seen['sampled_logits'][str(logits.device)] = seen['sampled_logits'].get(str(logits.device), 0) + 1
        return rec_call(self, context, logits)
    g.prepare_policy, g.rollout_logprobs, g.TokenRecorder.__call__ = prepare, logprobs, record
    try:
        cfg = g.GRPOConfig(model=str(ck), data='synthetic', synthetic_images=4, output_dir=str(out), mode=mode, beta=0.04,
                           steps=steps, prompts_per_step=prompts, num_generations=generations, max_new_tokens=max_new_tokens,
                           scripted='call', lr=1e-6, adapter={'max_tiles': 1}, save_every=10**6, resume=False)
        if torch.cuda.is_available(): torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        s = g.train_grpo(cfg)
        wall = time.perf_counter() - t0
    finally: g.prepare_policy, g.rollout_logprobs, g.TokenRecorder.__call__ = prep, rlp, rec_call
    log = [json.loads(l) for l in Path(s['log']).read_text().splitlines() if l.strip()]
    n_roll = prompts*generations
    pol = seen['policy']
    return {'mode': mode, 'steps': s['steps'], 'rollouts_per_step': n_roll, 'dtype': str(next(pol.parameters()).dtype),
            'rollout_tokens_per_s': [round(r['completion_tokens']*n_roll/max(r['gen_s'], 1e-9), 1) for r in log],
            'step_s': [r['step_s'] for r in log], 'gen_s': [r['gen_s'] for r in log], 'completion_tokens': [r['completion_tokens'] for r in log],
            'tool_calls_executed': s['tool_calls_executed'], 'kl': [r['kl'] for r in log], 'loss': [r['loss'] for r in log],
            'rollout_batch': [r.get('rollout_batch') for r in log], 'oom_retries': sum(r.get('oom_retries', 0) for r in log),
            'peak_memory_gib': round(torch.cuda.max_memory_allocated()/2**30, 2) if torch.cuda.is_available() else None,
            'parameter_devices': _devices(pol), 'reference_devices': seen['reference'], 'logprob_devices': seen['logprobs'],
            'sampled_logits_devices': seen['sampled_logits'], 'wall_s': round(wall, 1)}

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--tiny', action='store_true', help='toy shapes (runs on the CPU in a minute or two)')
    p.add_argument('--steps', type=int, default=None, help='timed SFT steps per arm (default 6; 2 with --tiny)')
    p.add_argument('--grpo-steps', type=int, default=2); p.add_argument('--prompts', type=int, default=None)
    p.add_argument('--generations', type=int, default=None); p.add_argument('--max-new-tokens', type=int, default=None)
    p.add_argument('--mode', default='full', choices=['full', 'lora'], help="GRPO mode (full: the reference is a frozen copy)")
    p.add_argument('--skip-sft', action='store_true'); p.add_argument('--skip-grpo', action='store_true')
    p.add_argument('--out', default=None, help='work folder (default: a temporary one)')
    a = p.parse_args()
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    size = 'tiny' if a.tiny else '1b'
    t0 = time.perf_counter()
    from vlm_nb.models import load_tokenizer, find_shared
    tok = load_tokenizer('internvl3_5')
    res = {'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', 'size': size,
           'vocab': len(tok), 'real_vocab': find_shared() is not None, 'torch': torch.__version__}
    work = Path(a.out or tempfile.mkdtemp(prefix='vlm_nb_gpu_check_'))
    if not a.skip_sft:
        res['sft'] = sft_part(size, a.steps or (2 if a.tiny else 6), 2 if a.tiny else 4, 512 if a.tiny else 2048)
        if torch.cuda.is_available(): torch.cuda.empty_cache()
        print(json.dumps({'partial': 'sft', **res['sft']}), file=sys.stderr, flush=True)
    if not a.skip_grpo:
        ck = checkpoint(work/f'ckpt_{size}', size)
        try: res['grpo'] = grpo_part(ck, work/'grpo', a.grpo_steps, a.prompts or (2 if a.tiny else 4), a.generations or (2 if a.tiny else 8),
                                     a.max_new_tokens or (8 if a.tiny else 64), a.mode)
        except Exception as e: res['grpo'] = {'not_run': f'{type(e).__name__}: {e}'}
    res['wall_s'] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res), flush=True)
