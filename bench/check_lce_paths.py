"""Quick check of lm_head + cross-entropy's two paths at Llama-3.2-1B's hidden size (2048) and 4096: graph-replay ms
of the op (forward + the backward's scaling) and the memory left allocated after three more calls (should be 0).

    python bench/check_lce_paths.py [--hidden 2048,4096]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import graph_ms  # noqa: E402

from liger_compile.kernels import linear_cross_entropy as lce  # noqa: E402

N, V = 16384, 128256


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", default="2048,4096")
    args = ap.parse_args()
    for h in [int(x) for x in args.hidden.split(",")]:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(N, h, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(V, h, device="cuda", dtype=torch.bfloat16, generator=g) * h ** -0.5
        y = torch.randint(0, V, (N,), device="cuda", generator=g)
        y[::7] = -100
        for path in ("exp_matmul", "row_kernel"):
            def run(path=path):
                loss, gh, gw, _, _ = lce.launch_forward(x, w, None, y, None, -100, 0.0, 0.0, "mean", True, path=path)
                return loss, gh * 1.0, gw * 1.0
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
