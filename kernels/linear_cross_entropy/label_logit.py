"""The label's logit per row, for lm_head + cross-entropy's exp-epilogue path (Triton, one program per row).

    zc_y = softcap(h_i . W[y_i])          fp32 dot product (unrounded, like the matmul's logits)
    ref  = zc_y on rows that take part, +inf on ignored rows and labels outside [0, V)
    row max = -inf                        (exp_matmul.py takes an atomic max into it)
One launch reads a row of h and a row of W per token (16 MiB for 1024 x 4096 bf16): it replaces a gather of W's rows
into a [C, H] buffer, a batched dot product and three small fills.
"""
import triton
import triton.language as tl

from .._math import tanh


@triton.jit
def label_logit_kernel(
    H, W, LABELS, Z_LABEL, REF, ROW_MAX, h_row_stride, n_cols, k_dim, ignore_index, softcap,
    HAS_SOFTCAP: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # H: [C, K] (row stride h_row_stride), W: [V, K] contiguous; LABELS: [C] int64; Z_LABEL, REF, ROW_MAX: [C] fp32
    row = tl.program_id(0)
    label = tl.load(LABELS + row)
    good = (label != ignore_index) & (label >= 0) & (label < n_cols)
    y = tl.where(good, label, 0)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for start in range(0, k_dim, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        m = k < k_dim
        h = tl.load(H + row.to(tl.int64) * h_row_stride + k, mask=m, other=0.0).to(tl.float32)
        w = tl.load(W + y * k_dim + k, mask=m, other=0.0).to(tl.float32)
        acc += h * w
    z = tl.sum(acc, axis=0)
    if HAS_SOFTCAP:
        cap = tl.cast(softcap, tl.float32)
        z = cap * tanh(z / cap)
    tl.store(Z_LABEL + row, z)
    tl.store(REF + row, tl.where(good, z, float("inf")))
    tl.store(ROW_MAX + row, float("-inf"))
