"""C = diag(r) (A @ B) in bf16, one rounding (Triton): lm_head + cross-entropy's dh = diag(r) (P @ W).

A: [M, K] bf16, B: [K, N] bf16 (both row-major), r: [M] fp32, C: [M, N] bf16. The row factor r (row_combine.py)
turns the chunk's P = exp(zc - ref) into d loss / d z; applying it to the fp32 accumulator before the one rounding
to bf16 gives the same rounding as eager's dz @ W, with no fp32 [M, N] copy (the op's memory stays under 0.25 GiB).
For dh, M is a chunk of tokens (1024), N the hidden size, K the vocabulary (128256): few output tiles, each with a long
K loop, so the grid is one program per tile. UPCAST_DOT: see exp_matmul.py (Triton's interpreter).
"""
import triton
import triton.language as tl

from .._math import round_to_bf16


@triton.jit
def row_scaled_matmul_kernel(
    a_desc, b_desc, c_desc, ROW_SCALE, n_rows, k_dim,
    UPCAST_DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    # a_desc: [M, K] blocks [BM, BK]; b_desc: [K, N] blocks [BK, BN]; c_desc: [M, N] blocks [BM, BN]; ROW_SCALE: [M]
    n_row_tiles = tl.cdiv(n_rows, BM)
    off_m = (tl.program_id(0) % n_row_tiles) * BM
    off_n = (tl.program_id(0) // n_row_tiles) * BN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, k_dim, BK):
        a = a_desc.load([off_m, k])
        b = b_desc.load([k, off_n])
        if UPCAST_DOT:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            acc = tl.dot(a, b, acc)
    rows = off_m + tl.arange(0, BM)
    r = tl.load(ROW_SCALE + rows, mask=rows < n_rows, other=0.0)
    c_desc.store([off_m, off_n], round_to_bf16(acc * r[:, None], UPCAST_DOT).to(tl.bfloat16))


def config(device_type: str, m: int = 0, n: int = 0, sms: int = 1) -> dict:
    """Tile settings for an [m, n] output on sms multiprocessors. CUDA: 128 x 256 tiles, 64-deep K steps, 8 warps,
    4 stages (as fast as cuBLAS's product without the row factor: bench/results/lce_notes.md). One program per tile
    and no split of K: where 128 x 256 tiles would leave more than a tenth of the multiprocessors idle (a hidden size
    of 2048: 64 tiles for 132), 128 x 128 tiles (twice as many) are used."""
    if device_type != "cuda":
        return dict(BM=16, BN=32, BK=16, num_warps=4, num_stages=1)
    if triton.cdiv(m, 128) * triton.cdiv(n, 256) < 0.9 * sms:
        return dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=4)
    return dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=4)
