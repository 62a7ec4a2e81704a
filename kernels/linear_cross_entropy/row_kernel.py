"""lm_head + cross-entropy's row-kernel path (every case the exp-epilogue path does not take). Per chunk of C tokens:
    1. logits = h_c @ W^T (+ b)                cuBLAS, input dtype
    2. one Triton program per row: an online max / sum-of-exp over BLOCK_V-wide tiles, the row's loss, then a
       second pass that overwrites the row's logits with dz, in place (input dtype)
    3. dh_c = dz @ W, dW += dz^T @ h_c, db += sum(dz)    cuBLAS; dh_c lands straight in its slice of the output
The 1/D factor is read by the kernel from a device tensor, so nothing on the way synchronises with the host.
``chunk_rows`` sets C; off CUDA the op runs ``reference_chunk``, the kernel's math in torch, in its place.

Precision of confident rows: when p_y -> 1, computing p_y - 1 and lse - z_y directly cancels to 0 in fp32, although
the true values (about -sum_{j != y} p_j) are far above bf16's smallest number. The kernel therefore keeps the
sum of exp over the classes other than the label apart from the label's own term:
    S_other = sum_{j != y} exp(z_j - m),  e_y = exp(z_y - m),  S = S_other + e_y
    p_y - 1 = -S_other / S,    nll = log1p(S_other / e_y) when e_y >= S_other (else log(S) + m - z_y)
"""
import math

import torch
import triton
import triton.language as tl

from .._math import log1p as _log1p
from .._math import tanh as _tanh
from ._shared import GRAD_WEIGHT_ACC_DTYPE, accumulate_grad_weight, direct_launch, sm_count

# One chunk's logits (C x V in the input dtype) stay under this many bytes, and the tokens are split into equal
# chunks (no small last chunk, whose matmuls run below speed). 232 MiB is 948 rows of Llama-3's 128256-word
# vocabulary in bf16, so 16384 tokens go in 18 chunks of 912 rows; the op's whole working memory (this one buffer,
# reused by every chunk) stays under 0.25 GiB. Chosen against smaller budgets by bench/bench_lce.py (figures in
# bench/results/lce_notes.md).
LOGITS_CHUNK_BYTES = 232 * 2**20
CHUNK_ROW_MULTIPLE = 16  # chunk rows rounded up to this, for the matmuls' tiles

MAX_BLOCK_V = 4096


@triton.jit
def _lce_chunk_kernel(
    LOGITS, LABELS, LOSSES, INV_DENOM,
    logits_row_stride, n_rows, n_cols, ignore_index, label_smoothing, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # LOGITS: [rows, n_cols] (unit column stride), overwritten with d loss / d logits; LABELS: [rows] int64;
    # LOSSES: [rows] fp32, the unscaled per-row loss; INV_DENOM: [1] fp32, the reduction's 1/D.
    # Program p takes rows p, p + G, p + 2G, ... (G programs). The default is G = rows, one row per program. A
    # smaller G (fewer rows in flight, so that pass 2 might re-read its row from L2) is a launch option the bench
    # sweeps; on the H200 it was slower (bench/results/lce_sweep.md).
    # Inductor passes Python floats as fp64 scalars: pin them to fp32 so the row math stays in fp32.
    cap = tl.cast(softcap, tl.float32)
    eps = tl.cast(label_smoothing, tl.float32)
    scale_all = tl.load(INV_DENOM).to(tl.float32)
    for row in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        _lce_row(LOGITS + tl.cast(row, tl.int64) * logits_row_stride, LABELS + row, LOSSES + row, scale_all,
                 n_cols, ignore_index, eps, cap, HAS_SOFTCAP, HAS_SMOOTHING, BLOCK_V)


@triton.jit
def _lce_row(base, LABEL, LOSS, scale_all, n_cols, ignore_index, eps, cap,
             HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr):
    # One row: base points at its n_cols logits (overwritten with dz), LABEL at its label, LOSS at its loss.
    label = tl.load(LABEL)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < n_cols)
    bad = valid & ((label < 0) | (label >= n_cols))
    y = tl.where(in_range, label, 0)  # any column is safe to read; bad and ignored rows are masked at the end

    z_y = tl.load(base + y).to(tl.float32)
    if HAS_SOFTCAP:
        z_y = cap * _tanh(z_y / cap)

    # Pass 1: running max m, S_other = sum_{j != y} exp(z_j - m) and, for label smoothing, sum_j z_j.
    # m starts at z_y (finite), so the rescale exp(m - m_new) never sees -inf - -inf.
    m = z_y
    s_other = tl.zeros_like(z_y)
    sum_z = tl.zeros_like(z_y)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = cap * _tanh(z / cap)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        e = tl.where(cols == y, 0.0, tl.exp(z - m_new))  # exp(-inf) = 0 for the masked tail
        s_other = s_other * tl.exp(m - m_new) + tl.sum(e, axis=0)
        if HAS_SMOOTHING:
            sum_z += tl.sum(tl.where(mask, z, 0.0), axis=0)
        m = m_new

    e_y = tl.exp(z_y - m)
    s = s_other + e_y
    log_s = tl.log(s)
    # nll = log(S / e_y) = log1p(S_other / e_y): exact for confident rows, where lse - z_y would round to 0.
    nll = tl.where(e_y >= s_other, _log1p(s_other / e_y), log_s + (m - z_y))
    loss = nll
    if HAS_SMOOTHING:
        loss = (1.0 - eps) * nll + eps * (m + log_s - sum_z / n_cols)
    loss = tl.where(valid, loss, 0.0)
    loss = tl.where(bad, float("nan"), loss)  # an out-of-range label poisons the loss instead of reading garbage
    tl.store(LOSS, loss)

    # Pass 2: dz_j = p_j - eps / V, and p_y - 1 + eps for the label, taken as -S_other / S + eps (no cancellation).
    inv_s = 1.0 / s
    g_y = eps - s_other * inv_s
    scale = tl.where(bad, float("nan"), scale_all)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            t = _tanh(z / cap)
            z = cap * t
        g = tl.where(cols == y, g_y, tl.exp(z - m) * inv_s)
        if HAS_SMOOTHING:
            g = g - eps / n_cols
        if HAS_SOFTCAP:
            g = g * (1.0 - t * t)  # d (c tanh(x / c)) / dx
        # Ignored rows get exact zeros, whatever the scale (1/0 = inf when every label is ignored).
        g = tl.where(valid, g * scale, 0.0)
        tl.store(base + cols, g.to(base.dtype.element_ty), mask=mask)


def kernel_config(v: int) -> dict:
    """Tile width and warps for the per-row kernel: 8 consecutive elements per thread (16-byte bf16 loads), chosen
    by bench/bench_lce.py's sweep (figures in bench/results/lce_notes.md)."""
    block_v = min(MAX_BLOCK_V, max(128, triton.next_power_of_2(v)))
    num_warps = max(1, min(8, block_v // 512))
    return dict(BLOCK_V=block_v, num_warps=num_warps)


def chunk_rows(n: int, v: int, dtype: torch.dtype) -> int:
    """Rows per chunk: n split into the fewest equal chunks whose [C, V] logits fit LOGITS_CHUNK_BYTES, C rounded up
    to CHUNK_ROW_MULTIPLE while that still fits (at least 1, at most n)."""
    budget = max(1, LOGITS_CHUNK_BYTES // (v * dtype.itemsize))
    rows = triton.cdiv(n, triton.cdiv(n, budget))
    rounded = triton.cdiv(rows, CHUNK_ROW_MULTIPLE) * CHUNK_ROW_MULTIPLE
    return max(1, min(n, rounded if rounded <= budget else rows))


def launch_chunk_kernel(logits, labels, losses, inv_denom, ignore_index, label_smoothing, softcap, config=None):
    """Runs the per-row Triton kernel on any device Triton can reach (CUDA, or CPU under TRITON_INTERPRET=1).

    Overwrites logits [C, V] with d loss / d logits and writes the unscaled per-row losses into losses [C] (fp32).
    """
    assert logits.stride(1) == 1, "the kernel reads rows with unit column stride"
    n_rows, n_cols = logits.shape
    cfg = dict(config or kernel_config(n_cols))
    # PROGRAMS: how many programs share the rows (default one per row); PROGRAMS_PER_SM: as many per SM (CUDA)
    programs = cfg.pop("PROGRAMS", None) or n_rows
    per_sm = cfg.pop("PROGRAMS_PER_SM", None)
    if per_sm and logits.device.type == "cuda":
        programs = per_sm * sm_count(logits.device)
    programs = max(1, min(n_rows, programs))
    direct_launch(_lce_chunk_kernel)[(programs,)](
        logits, labels, losses, inv_denom,
        logits.stride(0), n_rows, n_cols, ignore_index, label_smoothing, softcap,
        HAS_SOFTCAP=softcap > 0, HAS_SMOOTHING=label_smoothing > 0, **cfg,
    )


def reference_chunk(logits, labels, losses, inv_denom, ignore_index, label_smoothing, softcap, config=None):
    """Plain torch, used off CUDA: the kernel's math, same arguments, same in-place results."""
    v = logits.shape[1]
    z = logits.float()
    if softcap > 0:
        t = torch.tanh(z / softcap)
        z = softcap * t
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < v)
    bad = valid & ~in_range
    y = torch.where(in_range, labels, 0)
    is_y = torch.arange(v, device=logits.device) == y[:, None]
    z_y = z.gather(1, y[:, None]).squeeze(1)
    m = z.amax(1)
    e = torch.exp(z - m[:, None])
    s_other = e.masked_fill(is_y, 0.0).sum(1)
    e_y = torch.exp(z_y - m)
    s = s_other + e_y
    nll = torch.where(e_y >= s_other, torch.log1p(s_other / e_y), torch.log(s) + (m - z_y))
    loss = nll
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * nll + label_smoothing * (m + torch.log(s) - z.mean(1))
    loss = torch.where(valid, loss, 0.0).masked_fill(bad, math.nan)
    losses.copy_(loss)

    g = torch.where(is_y, (label_smoothing - s_other / s)[:, None], e / s[:, None])
    if label_smoothing > 0:
        g = g - label_smoothing / v
    if softcap > 0:
        g = g * (1.0 - t * t)
    scale = inv_denom.float().expand(labels.shape).masked_fill(bad, math.nan)
    g = torch.where(valid[:, None], g * scale[:, None], 0.0)
    logits.copy_(g)


def forward(h, weight, bias, y, inv_denom, ignore_index, label_smoothing, softcap, use_kernel, config=None,
            keep_logits=False):
    """The chunk loop over h [N, H] (N >= 1) and labels y [N] -> (per-row losses [N] fp32, grad_h [N, H], grad_w in
    its accumulation dtype, grad_b fp32 or None, kept logits or an empty tensor), all for grad_output = 1.
    use_kernel False runs reference_chunk in the kernel's place."""
    n, v = h.shape[0], weight.shape[0]
    device = h.device
    grad_h = torch.empty(h.shape, dtype=h.dtype, device=device)
    grad_w = torch.empty(weight.shape, dtype=GRAD_WEIGHT_ACC_DTYPE.get(weight.dtype, weight.dtype), device=device)
    grad_b = torch.zeros(v, dtype=torch.float32, device=device) if bias is not None else None
    losses = torch.empty(n, dtype=torch.float32, device=device)
    # keep_logits: the logits the model returns (soft-capped if it soft-caps), written chunk by chunk in the input
    # dtype before the kernel turns the chunk into gradients; no fp32 [N, V] copy
    kept = torch.empty((n, v), dtype=h.dtype, device=device) if keep_logits else h.new_empty(0)
    chunk_fn = launch_chunk_kernel if use_kernel else reference_chunk

    rows = chunk_rows(n, v, h.dtype)
    buffer = torch.empty((rows, v), dtype=h.dtype, device=device)  # one chunk's logits, reused by every chunk
    for start in range(0, n, rows):
        end = min(start + rows, n)
        h_c = h[start:end]
        logits = buffer[: end - start]
        if bias is not None:
            torch.addmm(bias, h_c, weight.t(), out=logits)
        else:
            torch.mm(h_c, weight.t(), out=logits)
        if keep_logits:
            kept[start:end] = logits if softcap <= 0 else (softcap * torch.tanh(logits.float() / softcap))
        chunk_fn(logits, y[start:end], losses[start:end], inv_denom, ignore_index, label_smoothing, softcap,
                 config=config)
        dz = logits  # now d loss / d logits
        torch.mm(dz, weight, out=grad_h[start:end])
        accumulate_grad_weight(grad_w, dz.t(), h_c, first=start == 0)
        if grad_b is not None:
            grad_b += dz.sum(0, dtype=torch.float32)
    return losses, grad_h, grad_w, grad_b, kept
