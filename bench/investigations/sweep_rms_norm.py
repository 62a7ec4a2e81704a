"""Tile sweep of the RMSNorm kernels on one GPU (CUDA-graph replay, so launch overhead is left out).

    python bench/sweep_rms_norm.py [--rows 16384] [--cols 4096,2048]

For x[rows, cols] bf16 and each width: forward ms per tile (rows per program step, warps); backward ms, without and
with the residual sum's gradient (liger::add_rms_norm's backward, one more read), per rows per step, warps, rows per
program (including two programs per SM) and with or without loading the next step's rows ahead (PREFETCH); each
next to its byte floor at 4.3 TB/s. (num_stages 1-3 were swept too: no effect on these loops.) The wide-row tiles in kernels/rms_norm.py come from here.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/: common.py and results/
sys.path.insert(0, BENCH)
from common import graph_ms  # noqa: E402

from liger_compile.kernels import rms_norm as K  # noqa: E402


def sweep(n: int, d: int):
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(d, device="cuda", dtype=torch.bfloat16)
    dy, ds = torch.randn_like(x), torch.randn_like(x)
    _, rstd = K.launch_forward(x, w, 1e-5, 0.0, True)
    mb = n * d * 2 / 4.3e12 * 1e3  # ms to move one [n, d] bf16 tensor
    print(f"\nx[{n}, {d}] bf16; floors: fwd {2 * mb:.4f} ms, bwd {3 * mb:.4f} ms, bwd+ds {4 * mb:.4f} ms")
    print("| kernel | cols | ROWS | num_warps | ROWS_PER_PROGRAM | PREFETCH | ms |\n|---|---|---|---|---|---|---|")
    for rows, warps in itertools.product((1, 2, 4), (4, 8, 16)):
        cfg = dict(ROWS=rows, num_warps=warps)
        ms = graph_ms(lambda: K.launch_forward(x, w, 1e-5, 0.0, True, config=cfg))
        print(f"| fwd | {d} | {rows} | {warps} | - | - | {ms:.4f} |", flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rpps = sorted({16, 32, 64, triton.cdiv(n, 2 * sms)})
    configs = list(itertools.product((1, 2), (8, 16), rpps, (False, True)))
    for has_ds in (False, True):
        for rows, warps, rpp, prefetch in configs:
            cfg = dict(ROWS=rows, num_warps=warps, ROWS_PER_PROGRAM=rpp, PREFETCH=prefetch)
            ms = graph_ms(lambda: K.launch_backward(dy, x, w, rstd, 0.0, True, config=cfg,
                                                    d_sum=ds if has_ds else None))
            print(f"| bwd{'+ds' if has_ds else ''} | {d} | {rows} | {warps} | {rpp} | {'prefetch' if prefetch else '-'} "
                  f"| {ms:.4f} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", default="4096,2048")
    args = ap.parse_args(argv)
    for d in (int(c) for c in args.cols.split(",")):
        sweep(args.rows, d)


if __name__ == "__main__":
    main()
