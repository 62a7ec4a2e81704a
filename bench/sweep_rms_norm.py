"""Tile sweep of the RMSNorm kernels on one GPU (CUDA-graph replay, so launch overhead is left out).

    python bench/sweep_rms_norm.py [--rows 16384] [--cols 4096]

Prints forward and backward ms per tile shape for x[rows, cols] bf16, next to the byte floor at 4.3 TB/s; the
defaults in kernels/rms_norm.py come from here. Then the backward with the residual sum's gradient added
(liger::add_rms_norm's, one more read) across rows per program and software-pipelining depth (num_stages).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import graph_ms  # noqa: E402

from liger_compile.kernels import rms_norm as K  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=4096)
    args = ap.parse_args(argv)
    n, d = args.rows, args.cols
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(d, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    _, rstd = K.launch_forward(x, w, 1e-5, 0.0, True)
    floor = 2 * n * d * 2 / 4.3e12 * 1e3, 3 * n * d * 2 / 4.3e12 * 1e3
    print(f"x[{n}, {d}] bf16; floors: fwd {floor[0]:.4f} ms, bwd {floor[1]:.4f} ms")
    print("| kernel | ROWS | num_warps | ROWS_PER_PROGRAM | ms |\n|---|---|---|---|---|")
    for rows, warps in itertools.product((1, 2), (4, 8, 16)):
        cfg = dict(ROWS=rows, num_warps=warps)
        ms = graph_ms(lambda: K.launch_forward(x, w, 1e-5, 0.0, True, config=cfg))
        print(f"| fwd | {rows} | {warps} | - | {ms:.4f} |", flush=True)
    for rows, warps, rpp in itertools.product((1, 2), (4, 8, 16), (8, 16, 32, 64)):
        if rpp < rows:
            continue
        cfg = dict(ROWS=rows, num_warps=warps, ROWS_PER_PROGRAM=rpp)
        ms = graph_ms(lambda: K.launch_backward(dy, x, w, rstd, 0.0, True, config=cfg))
        print(f"| bwd | {rows} | {warps} | {rpp} | {ms:.4f} |", flush=True)
    ds = torch.randn_like(x)
    print("\n| kernel | num_warps | ROWS_PER_PROGRAM | num_stages | ms |\n|---|---|---|---|---|")
    for has_ds, warps, rpp, stages in itertools.product((False, True), (8, 16), (32, 64, 128), (1, 2, 3, 4)):
        cfg = dict(ROWS=1, num_warps=warps, ROWS_PER_PROGRAM=rpp, num_stages=stages)
        ms = graph_ms(lambda: K.launch_backward(dy, x, w, rstd, 0.0, True, config=cfg, d_sum=ds if has_ds else None))
        print(f"| bwd{'+ds' if has_ds else ''} | {warps} | {rpp} | {stages} | {ms:.4f} |", flush=True)


if __name__ == "__main__":
    main()
