"""Sweeps the RMSNorm kernels' tile shapes on the GPU at the benchmark shape and a head-dim shape; prints the best.

    python bench/tune_rms_norm.py
"""
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import median_ms  # noqa: E402

from liger_compile.kernels import rms_norm as K  # noqa: E402


def sweep(n, d):
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(d, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    block = 1 << (d - 1).bit_length()
    fwd = []
    for rows, warps in itertools.product((1, 2, 4, 8), (4, 8, 16)):
        if rows * block > 65536 or rows * block < 32 * warps:
            continue
        cfg = dict(BLOCK_N=block, ROWS=rows, num_warps=warps)
        fwd.append((median_ms(lambda: K.launch_forward(x, w, 1e-5, 0.0, True, cfg)), cfg))
    fwd.sort(key=lambda t: t[0])
    _, rstd = K.launch_forward(x, w, 1e-5, 0.0, True)
    bwd = []
    for rows, warps, pps in itertools.product((1, 2), (4, 8, 16), (2, 4, 8)):
        if rows * block > 32768 or rows * block < 32 * warps:
            continue
        cfg = dict(BLOCK_N=block, ROWS=rows, num_warps=warps, programs_per_sm=pps)
        bwd.append((median_ms(lambda: K.launch_backward(dy, x, w, rstd, 0.0, True, cfg)), cfg))
    bwd.sort(key=lambda t: t[0])
    print(f"[{n}, {d}] default fwd {fwd_default(x, w):.4f} ms, bwd {bwd_default(dy, x, w, rstd):.4f} ms")
    for t, c in fwd[:4]:
        print(f"  fwd {t:.4f} ms {c}")
    for t, c in bwd[:4]:
        print(f"  bwd {t:.4f} ms {c}")


def fwd_default(x, w):
    return median_ms(lambda: K.launch_forward(x, w, 1e-5, 0.0, True))


def bwd_default(dy, x, w, rstd):
    return median_ms(lambda: K.launch_backward(dy, x, w, rstd, 0.0, True))


if __name__ == "__main__":
    sweep(16384, 4096)
    sweep(4 * 4096 * 8, 128)
