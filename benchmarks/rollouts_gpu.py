"""Batched vs one-by-one tool-using rollouts on an InternVL3.5-1B-sized random model on one GPU (the GPU figure of
`vlm-nb bench rollouts`): 64 GRPO-like trajectories (8 prompts x 8), each calling Crop or Identify at its own step.

    python benchmarks/rollouts_gpu.py [--size 1b|small|tiny] [--n 64] [--prompts 8] [--max-new-tokens 64] [--dtype bf16|fp32]
                                      [--repeats 1] [--out /tmp/vlm_nb_rollouts_1b]
Prints one JSON object (see `vlm_nb.batch.bench_rollouts`). Random weights, so the model's own tokens are noise; the
figure is throughput. `identical` compares every token of the two arms: exact in fp32; in bf16 a different batch shape
may flip a near-tied greedy pick."""
import argparse, json, time
from pathlib import Path
import torch

def checkpoint(out:Path, size:str, dtype=None)->Path:
    "Write (once) a random InternVL3.5 checkpoint of `size` shapes (weights in `dtype`, default float32) with the project's tokenizer and processor files."
    import transformers as T
    from vlm_nb.models import build_tokenizer_dir, _processor_files
    from vlm_nb.sft_bench import internvl_1b_config
    if (out/'config.json').exists(): return out
    build_tokenizer_dir('internvl3_5', out)
    tok = T.AutoTokenizer.from_pretrained(str(out))
    torch.manual_seed(0)
    model = T.InternVLForConditionalGeneration(internvl_1b_config(tok, size))
    if dtype is not None: model = model.to(dtype)
    model.save_pretrained(str(out)); _processor_files('internvl3_5', out, tok)
    return out

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', default='1b', choices=['1b', 'small', 'tiny'])
    p.add_argument('--n', type=int, default=64); p.add_argument('--prompts', type=int, default=8)
    p.add_argument('--max-new-tokens', type=int, default=64); p.add_argument('--repeats', type=int, default=1)
    p.add_argument('--dtype', default='bf16', choices=['bf16', 'fp32'])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--out', default='/tmp/vlm_nb_rollouts_{size}')
    a = p.parse_args()
    from vlm_nb.batch import bench_rollouts
    t0 = time.perf_counter()
    ck = checkpoint(Path(a.out.format(size=a.size)), a.size)
    r = bench_rollouts(json=False, n=a.n, max_new_tokens=a.max_new_tokens, prompts=a.prompts, repeats=a.repeats, checkpoint=ck,
                       device=a.device, dtype=torch.bfloat16 if a.dtype == 'bf16' else torch.float32)
    r |= {'size': a.size, 'dtype': a.dtype, 'gpu': torch.cuda.get_device_name() if a.device.startswith('cuda') else None,
          'wall_s': round(time.perf_counter() - t0, 1)}
    print(json.dumps(r), flush=True)
