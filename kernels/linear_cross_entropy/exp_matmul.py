"""The logits matmul of lm_head + cross-entropy with the softmax's exponentials in its epilogue (bf16, Triton).

For one chunk of tokens h [C, H] against the head W [V, H], labels y [C] and a per-row reference ref [C] (fp32),
each [BM, BN] tile of z = h @ W^T is finished in registers and written once:
    z    = h @ W^T                             the fp32 products (eager rounds its logits to bf16 first; skipping that
                                               rounding keeps z closer to the exact value and the epilogue shorter)
    zc   = c * tanh(z / c)                     only with softcap c > 0
    P_ij = exp(zc_ij - ref_i) * (1 - t_ij^2)   (the factor only with softcap: d zc / d z)
    P_ij = 0                                   at the label's column and past V
plus, per (column tile, row), the partial sum of exp(zc - ref) over the kept columns (fp32, [n_col_tiles, C]: each
tile stores its rows' sums as one contiguous run), and the max of zc - ref of every row where exp overflowed past
exp(SAFE_EXP) (fp32, [C], by atomic max; ROW_MAX must start at -inf; other rows may keep -inf or a partial max).

Why: softmax(zc)_j = exp(zc_j - ref) / S with S = sum_j exp(zc_j - ref), so d loss / d z for row i is P_i times one
number per row, r_i = (1 / D) / S_i, once the row is complete, plus the label's own term. A per-row factor passes
through the backward's matmuls (dh = diag(r) (P @ W), dW = P^T (diag(r) h)), so nothing has to read the chunk's
[C, V] logits again: the separate row pass over them (two reads and a write) disappears. row_combine.py sums the
partials, writes the loss, r and the label's entry.

The caller passes ref = the label's (soft-capped) logit, computed apart by a dot product, and ref = +inf on rows
that take no part (ignored labels, bad labels): their P rows come out 0 with no per-element test. In a language model
the label's logit is never far below the row's max; a row where zc - ref passes SAFE_EXP somewhere is computed again
with its true max as ref, by a second launch of this kernel that does nothing unless a flag on the device says so
(no host synchronisation).

The epilogue is not overlapped with the next tile's products, so it does per element only what every tile needs:
exp, the sum, the bf16 store (what that costs against a plain logits matmul: bench/results/lce_notes.md).
The row max is taken only in a tile whose partial sums show an overflow (a sum is at least each of its terms), the
label's column is masked only in a tile that holds some row's label (about one in four of 128 x 256 tiles at
V = 128256).

TMA tensor descriptors feed the matmul (Hopper and later). UPCAST_DOT is for Triton's interpreter (CPU tests): it
multiplies in fp32 (the interpreter's bf16 arithmetic is not usable) and rounds P to bf16 by hand (its cast truncates).
"""
import math

import triton
import triton.language as tl

from .._math import round_to_bf16, tanh

# exp(x) of the kept columns must stay finite, and far enough below fp32's 3.4e38 that a row of them times W (|W|
# ~ 1) summed over V = 128256 columns in the backward's fp32 matmul stays finite too: e^64 * 2^17 ~ 8e32.
SAFE_EXP = 64.0
_OVERFLOW_SUM = tl.constexpr(math.exp(SAFE_EXP))
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _finish_tile(acc, off_n, label, ref2, rows, row_ok, ROW_MAX, cap, n_cols,
                 HAS_SOFTCAP: tl.constexpr, IS_RERUN: tl.constexpr, BN: tl.constexpr):
    # acc: [BM, BN] fp32 products for columns off_n .. off_n + BN; returns (P tile in fp32, partial sums)
    cols = off_n + tl.arange(0, BN)
    z = acc
    if HAS_SOFTCAP:
        t = tanh(z / cap)
        z = cap * t
    # x = (zc - ref) in base 2, one fused multiply-add per element (ref2 = ref * log2(e), -inf where ref = +inf)
    x = z * _LOG2E - ref2[:, None]
    if off_n + BN > n_cols:  # only the last column tile reaches past V
        x = tl.where((cols < n_cols)[None, :], x, float("-inf"))
    if tl.max(((label >= off_n) & (label < off_n + BN)).to(tl.int32), axis=0) != 0:
        x = tl.where(cols[None, :] == label[:, None], float("-inf"), x)
    e = tl.math.exp2(x)
    part_sum = tl.sum(e, axis=1)
    if not IS_RERUN:  # (the rerun's reference is each such row's max already)
        if tl.max(part_sum, axis=0) > _OVERFLOW_SUM:  # some exp(zc - ref) > exp(SAFE_EXP), or inf
            tl.atomic_max(ROW_MAX + rows, tl.max(x, axis=1) / _LOG2E, mask=row_ok)
    if HAS_SOFTCAP:
        e = e * (1.0 - t * t)
    return e, part_sum


@triton.jit
def exp_matmul_kernel(
    h_desc, w_desc, p_desc, REF, LABELS, PART_SUM, ROW_MAX, RERUN,
    n_rows, n_cols, k_dim, n_col_tiles, softcap,
    HAS_SOFTCAP: tl.constexpr, IS_RERUN: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    SUBTILE: tl.constexpr, PLAIN: tl.constexpr,
):
    # h_desc: [C, H] blocks [BM, BK]; w_desc: [V, H] blocks [BN, BK]; p_desc: [C, V] blocks [BM, BN // SUBTILE]
    # (bf16); REF, ROW_MAX: [C] fp32; LABELS: [C] int64; PART_SUM: [n_col_tiles, C] fp32; RERUN: [1] int32.
    # Tiles are walked with a grid-stride loop (the grid may be smaller than the tile count: a persistent grid).
    # SUBTILE 2 finishes the tile in two column halves (fewer live registers, half the store buffer).
    # PLAIN writes bf16(h @ W^T) and nothing else: a bench-only yardstick for the matmul itself.
    n_row_tiles = tl.cdiv(n_rows, BM)
    n_tiles = n_row_tiles * n_col_tiles
    if IS_RERUN:
        n_tiles = tl.where(tl.load(RERUN) != 0, n_tiles, 0)  # the rerun launch: nothing to do unless flagged
    cap = tl.cast(softcap, tl.float32)  # Inductor-style fp64 scalars pinned to fp32
    for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), warp_specialize=WARP_SPECIALIZE):
        # the row tiles of one column tile are neighbours in the walk, so each W tile leaves DRAM once
        off_m = (tile % n_row_tiles) * BM
        pid_n = tile // n_row_tiles
        off_n = pid_n * BN
        # the epilogue's row data, loaded before the products so that their latency hides behind them
        rows = off_m + tl.arange(0, BM)
        row_ok = rows < n_rows
        label = tl.load(LABELS + rows, mask=row_ok, other=-1).to(tl.int32)
        ref2 = tl.load(REF + rows, mask=row_ok, other=float("inf")) * _LOG2E
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, k_dim, BK):
            a = h_desc.load([off_m, k])
            b = w_desc.load([off_n, k])
            if UPCAST_DOT:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32).T, acc)
            else:
                acc = tl.dot(a, b.T, acc)

        if PLAIN:
            p_desc.store([off_m, off_n], acc.to(tl.bfloat16))
        else:
            if SUBTILE == 2:
                halves = tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1))
                acc0, acc1 = tl.split(halves)
                e0, s0 = _finish_tile(acc0, off_n, label, ref2, rows, row_ok, ROW_MAX, cap, n_cols, HAS_SOFTCAP,
                                      IS_RERUN, BN // 2)
                p_desc.store([off_m, off_n], round_to_bf16(e0, UPCAST_DOT).to(tl.bfloat16))
                e1, s1 = _finish_tile(acc1, off_n + BN // 2, label, ref2, rows, row_ok, ROW_MAX, cap, n_cols,
                                      HAS_SOFTCAP, IS_RERUN, BN // 2)
                p_desc.store([off_m, off_n + BN // 2], round_to_bf16(e1, UPCAST_DOT).to(tl.bfloat16))
                part_sum = s0 + s1
            else:
                e, part_sum = _finish_tile(acc, off_n, label, ref2, rows, row_ok, ROW_MAX, cap, n_cols, HAS_SOFTCAP,
                                           IS_RERUN, BN)
                p_desc.store([off_m, off_n], round_to_bf16(e, UPCAST_DOT).to(tl.bfloat16))
            tl.store(PART_SUM + pid_n.to(tl.int64) * n_rows + rows, part_sum, mask=row_ok)


def config(device_type: str) -> dict:
    """Tile settings. CUDA: 128 x 256 tiles, 64-deep K steps, 8 warps, 3 stages, finished in two column halves, a
    persistent warp-specialised grid of one program per SM (PROGRAMS_PER_SM sets more). Chosen from the candidates
    bench/bench_lce_exp_matmul.py times (figures in bench/results/lce_exp_matmul.md)."""
    if device_type != "cuda":
        return dict(BM=16, BN=32, BK=16, num_warps=4, num_stages=1, WARP_SPECIALIZE=False, PERSISTENT=False,
                    SUBTILE=2)
    return dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=3, WARP_SPECIALIZE=True, PERSISTENT=True,
                SUBTILE=2)
