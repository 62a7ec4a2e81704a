"""Finishes lm_head + cross-entropy's rows after exp_matmul.py: loss, gradient factor, label entry (Triton).

Per row i (see exp_matmul.py for P, ref and the partials; zc_y is the label's soft-capped logit, which the
caller computed for ref):
    S_other = sum of the partial sums,    x_y = zc_y - ref,    e_y = exp(x_y),    S = S_other + e_y
    loss_i  = log1p(S_other / e_y) if e_y >= S_other else log(S) - x_y       (= lse - zc_y, exact when confident)
    r_i     = (1 / D) / S                    so that d loss / d z_ij = r_i * P_ij for every column j
    P[i, y] = -S_other * (1 - t_y^2)         the label's entry: (p_y - 1) / r_i without the cancellation of p_y - 1
    hs_i    = bf16(r_i * h_i)                the dW matmul's right operand, dW += P^T hs
Ignored rows: loss 0, r 0. A label outside [0, V) that is not ignore_index: loss and r NaN (never a silent number).
The first launch also checks that every exp(zc - ref) was safe (ROW_MAX <= SAFE_EXP: the matmul records the max of
every row that passes it); for a row where one was not, it stores ref + max as the row's new reference and raises
the rerun flag, and the matmul and this kernel run again (their second launches do nothing when the flag is down).
"""
import triton
import triton.language as tl

from .._math import log1p, round_to_bf16


@triton.jit
def row_combine_kernel(
    P, p_row_stride, REF, LABELS, PART_SUM, ROW_MAX, Z_LABEL, LOSSES, ROW_SCALE, INV_DENOM, RERUN, H, H_SCALED,
    h_row_stride, n_rows, n_cols, n_col_tiles, k_dim, ignore_index, softcap, safe_exp,
    HAS_SOFTCAP: tl.constexpr, IS_RERUN: tl.constexpr, ROUND_BY_HAND: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # ROUND_BY_HAND: for Triton's interpreter, see round_to_bf16. P: [C, V] bf16 (row stride p_row_stride);
    # REF, ROW_MAX, Z_LABEL (zc_y), LOSSES, ROW_SCALE: [C] fp32; LABELS: [C] int64; PART_SUM: [n_col_tiles, C] fp32;
    # INV_DENOM: [1] fp32 (1/D); RERUN: [1] int32; H: [C, K] bf16 (row stride h_row_stride) and H_SCALED: [C, K]
    # contiguous bf16, which gets diag(r) H for the dW matmul.
    live = n_rows
    if IS_RERUN:
        live = tl.where(tl.load(RERUN) != 0, n_rows, 0)
    cap = tl.cast(softcap, tl.float32)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < live
    # a fixed order, so that the loss is the same bits on every run; summed across the loop first and across the
    # block once at the end (a reduction inside this loop, over a block laid out along the rows, trips an assertion
    # in Triton 3.6-3.8's TritonGPUOptimizeThreadLocality pass)
    sums = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
    for start in range(0, n_col_tiles, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        m = row_ok[:, None] & (t < n_col_tiles)[None, :]
        sums += tl.load(PART_SUM + t.to(tl.int64)[None, :] * n_rows + rows[:, None], mask=m, other=0.0)
    s_other = tl.sum(sums, axis=1)

    label = tl.load(LABELS + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (label != ignore_index)
    in_range = (label >= 0) & (label < n_cols)
    good = valid & in_range
    bad = valid & ~in_range
    ref = tl.load(REF + rows, mask=row_ok, other=0.0)
    z_y = tl.load(Z_LABEL + rows, mask=good, other=0.0)
    x_y = tl.where(good, z_y - ref, 0.0)
    if not IS_RERUN:
        top = tl.maximum(tl.load(ROW_MAX + rows, mask=good, other=0.0), x_y)
        unsafe = good & (top > tl.cast(safe_exp, tl.float32))
        tl.store(REF + rows, ref + top, mask=unsafe)
        tl.store(RERUN + tl.zeros_like(rows), tl.full((BLOCK_R,), 1, tl.int32), mask=unsafe)

    e_y = tl.exp(x_y)
    s = s_other + e_y
    nll = tl.where(e_y >= s_other, log1p(s_other / e_y), tl.log(s) - x_y)
    loss = tl.where(good, nll, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(LOSSES + rows, loss, mask=row_ok)
    r = tl.where(good, tl.load(INV_DENOM).to(tl.float32) / s, 0.0)
    r = tl.where(bad, float("nan"), r)
    tl.store(ROW_SCALE + rows, r, mask=row_ok)
    g_y = -s_other
    if HAS_SOFTCAP:
        t_y = z_y / cap
        g_y = g_y * (1.0 - t_y * t_y)
    y = tl.where(good, label, 0)
    tl.store(P + rows.to(tl.int64) * p_row_stride + y, round_to_bf16(g_y, ROUND_BY_HAND).to(tl.bfloat16), mask=good)
    for start in range(0, k_dim, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        m = row_ok[:, None] & (k < k_dim)[None, :]
        h = tl.load(H + rows.to(tl.int64)[:, None] * h_row_stride + k[None, :], mask=m, other=0.0).to(tl.float32)
        hs = round_to_bf16(h * r[:, None], ROUND_BY_HAND)
        tl.store(H_SCALED + rows.to(tl.int64)[:, None] * k_dim + k[None, :], hs.to(tl.bfloat16), mask=m)
