"""Training throughput and MFU of an InternVL3.5-1B-sized random model in bf16 on one GPU, plus a DeepSpeed ZeRO-2 run.

    python benchmarks/sft_gpu.py [--steps 10] [--batch-size 4] [--seq-len 2048] [--no-zero2] [--gradient-checkpointing]
Prints one JSON object (see `vlm_nb.sft.gpu_train_bench`)."""
import argparse, json, sys
from vlm_nb.sft import gpu_train_bench

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', default='1b', choices=['1b', 'tiny'])
    p.add_argument('--steps', type=int, default=10); p.add_argument('--batch-size', type=int, default=4)
    p.add_argument('--seq-len', type=int, default=2048); p.add_argument('--no-zero2', action='store_true')
    p.add_argument('--gradient-checkpointing', action='store_true')
    a = p.parse_args()
    print(json.dumps(gpu_train_bench(a.size, a.steps, a.batch_size, a.seq_len, not a.no_zero2, a.gradient_checkpointing)))
