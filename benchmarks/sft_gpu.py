"""Training throughput and MFU of an InternVL3.5-1B-sized random model in bf16 on one GPU: padded vs packed rows under
flash_attention_2 / flex_attention, peak memory, plus a DeepSpeed ZeRO-2 run.

    python benchmarks/sft_gpu.py [--attn flash_attention_2|flex_attention|sdpa] [--steps 10] [--batch-size 4] [--seq-len 2048]
                                 [--no-zero2] [--no-packing] [--gradient-checkpointing]
Prints one JSON object per attention implementation tried (see `vlm_nb.sft_bench.gpu_train_bench`); an implementation that
cannot be loaded here (e.g. flash-attn not installed) is reported as not run, and the next one is tried."""
import argparse, json, sys
from vlm_nb.sft_bench import gpu_train_bench

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', default='1b', choices=['1b', 'small', 'tiny'])
    p.add_argument('--attn', default='flash_attention_2,flex_attention', help='comma-separated attention implementations to try')
    p.add_argument('--steps', type=int, default=10); p.add_argument('--batch-size', type=int, default=4)
    p.add_argument('--seq-len', type=int, default=2048); p.add_argument('--no-zero2', action='store_true')
    p.add_argument('--no-packing', action='store_true'); p.add_argument('--gradient-checkpointing', action='store_true')
    a = p.parse_args()
    for attn in a.attn.split(','):
        try: r = gpu_train_bench(a.size, a.steps, a.batch_size, a.seq_len, not a.no_zero2, a.gradient_checkpointing, attn, not a.no_packing)
        except (RuntimeError, ImportError, ValueError) as e: r = {'attn': attn, 'not_run': f'{type(e).__name__}: {e}'}
        print(json.dumps(r), flush=True)
