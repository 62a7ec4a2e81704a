"""Quick check of lm_head + cross-entropy's two paths at hidden sizes 896 (Qwen2-0.5B), 1536 (Qwen2-1.5B), 2048
(Llama-3.2-1B) and 4096 (Llama-3-8B), V = 128256, 16384 tokens: graph-replay ms
of the op (forward + the backward's scaling) and the memory left allocated after three more calls (should be 0).

    python bench/check_lce_paths.py [--hidden 896,1536,2048,4096]
"""
import argparse
import os
import sys

import torch

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/: common.py and results/
sys.path.insert(0, BENCH)
from bench_lce import inputs, op_call  # noqa: E402
from common import graph_ms  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", default="896,1536,2048,4096")
    args = ap.parse_args()
    for h in [int(x) for x in args.hidden.split(",")]:
        x, w, y = inputs(h)
        for path in ("exp_matmul", "row_kernel"):
            run = op_call(x, w, y, path=path)
            run()
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            for _ in range(3):
                run()
            torch.cuda.synchronize()
            kept = (torch.cuda.memory_allocated() - before) / 2**20
            ms = graph_ms(run, replays=5)
            print(f"| H {h} | {path} | {ms:.2f} ms | left allocated after 3 calls: {kept:.1f} MiB |", flush=True)


if __name__ == "__main__":
    main()
