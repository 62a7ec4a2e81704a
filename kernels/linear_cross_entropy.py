"""LM head + cross-entropy as one op: ``liger::linear_cross_entropy``; the [N, V] logits never exist in full.

Math (h: [N, H] tokens, W: [V, H], b: [V] optional, y: [N] labels, all row math in fp32):
    z     = h @ W^T + b                     in the input dtype, like F.linear, then read as fp32
    z     = c * tanh(z / c)                 only with softcap c > 0 (Gemma2)
    lse   = log(sum_j exp(z_j))
    nll   = lse - z_y
    loss_row = (1 - eps) * nll + eps * (lse - mean_j z_j)       label smoothing eps; torch's formula
    loss  = sum over rows with y != ignore_index of loss_row, divided by
            D = number of such rows ("mean"), 1 ("sum"), or num_items (HF Trainer's num_items_in_batch; "sum")
Gradient of the loss with respect to z (p = softmax(z)):
    dz_j  = (p_j - (1 - eps) * [j == y] - eps / V) / D          times (1 - tanh^2) = 1 - (z_j / c)^2 with softcap
    dh    = dz @ W,   dW = dz^T @ h,   db = sum over rows of dz

The forward pass computes the gradients too (the loss is a scalar, so its gradient needs nothing but the loss's own
inputs), so backward only scales them by grad_output. Tokens go in chunks whose [C, V] working buffer fits a fixed
budget, by one of two paths (``launch_forward``):

exp_matmul (bf16 on Hopper, no bias, no smoothing: the common training case; ``exp_matmul_applies``): our own logits
matmul finishes each tile in registers as P = exp(zc - ref) with ref the label's logit, so the chunk's logits are
written once and never read back by a row pass; a per-row factor r = (1/D) / sum(exp(zc - ref)) then turns P into
dz inside the backward's matmuls (dh = diag(r) (P @ W) in our matmul's epilogue, dW += P^T diag(r) h by cuBLAS).
See _forward_exp_matmul and kernels/lce_*.py. H200, 16384 x 4096 tokens, V = 128256: 78.6 ms against 85.4 for the
row-kernel path and 78.1-78.3 for the three plain matmuls, in one run (bench/results/lce_exp_matmul.md).

row_kernel (every other case; ``chunk_rows`` sets C). Per chunk:
    1. logits = h_c @ W^T (+ b)                cuBLAS, input dtype
    2. one Triton program per row: an online max / sum-of-exp over BLOCK_V-wide tiles, the row's loss, then a
       second pass that overwrites the row's logits with dz, in place (input dtype)
    3. dh_c = dz @ W, dW += dz^T @ h_c, db += sum(dz)    cuBLAS; dh_c lands straight in its slice of the output
The 1/D factor is read by the kernel from a device tensor, so nothing on the way synchronises with the host.

Precision of confident rows: when p_y -> 1, computing p_y - 1 and lse - z_y directly cancels to 0 in fp32, although
the true values (about -sum_{j != y} p_j) are far above bf16's smallest number. The kernel therefore keeps the
sum of exp over the classes other than the label apart from the label's own term:
    S_other = sum_{j != y} exp(z_j - m),  e_y = exp(z_y - m),  S = S_other + e_y
    p_y - 1 = -S_other / S,    nll = log1p(S_other / e_y) when e_y >= S_other (else log(S) + m - z_y)
"""
import functools
import math
import os
import warnings
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import custom_op
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import lce_exp_matmul, lce_label_logit, lce_row_combine, lce_row_scaled_matmul
from ._common import use_triton
from ._math import log1p as _log1p
from ._math import tanh as _tanh

# One chunk's logits (C x V in the input dtype) stay under this many bytes, and the tokens are split into equal
# chunks (no small last chunk, whose matmuls run below speed). 232 MiB is 948 rows of Llama-3's 128256-word
# vocabulary in bf16, so 16384 tokens go in 18 chunks of 912 rows; the op's whole working memory (this one buffer,
# reused by every chunk) stays under 0.25 GiB. H200, 16384 x 4096 tokens by CUDA-graph replay (bench/bench_lce.py):
# 912 rows per chunk 86.4 ms, 768 rows (the previous 192 MiB budget, 21 chunks and a 256-row tail) 90.0 ms, in one run.
LOGITS_CHUNK_BYTES = 232 * 2**20
CHUNK_ROW_MULTIPLE = 16  # chunk rows rounded up to this, for the matmuls' tiles

# grad_weight is accumulated over the chunks with addmm_(beta=1) into a tensor of this dtype (keyed by the weight's
# dtype; a dtype not listed accumulates in itself). fp32 weights accumulate in fp32. bf16/fp16 weights accumulate in
# their own dtype: cuBLAS computes each chunk's product in fp32 and rounds once when adding it to the accumulator, so
# the cost is one rounding per chunk (16 chunks for N=16384 on Llama-3) against the single rounding of eager's one
# big matmul, and the saving is V*H*2 bytes (1 GiB for Llama-3 8B's lm_head) plus a cast at the end. Mapping bf16 to
# torch.float32 here gives the fp32 accumulator at the price of fp32 matmuls for dW.
GRAD_WEIGHT_ACC_DTYPE = {torch.float32: torch.float32, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}

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


def accumulate_grad_weight(grad_w, a, b, first):
    """grad_w += a @ b (cast to grad_w's dtype); the first chunk writes its product instead, which spares a fill
    of the whole [V, H] accumulator with zeros and one read of it (0.3 + 0.1 ms for Llama-3-8B's lm_head on an H200)."""
    if a.dtype != grad_w.dtype:
        a, b = a.to(grad_w.dtype), b.to(grad_w.dtype)
    if first:
        torch.mm(a, b, out=grad_w)
    else:
        grad_w.addmm_(a, b)


def direct_launch(kernel):
    """The kernel itself, to be launched as kernel[grid](...). This op is a custom_op, opaque to torch.compile, so its
    launches are never traced and need no torch.library.wrap_triton; and wrap_triton called outside tracing still
    files every call's non-tensor arguments in torch's kernel side table, for the life of the process: TMA
    descriptors among them would keep the tensors they point at (a chunk buffer, the hidden states) alive, step
    after step. (tests/test_kernel_launch_args.py swaps this function to check the launches' arguments.)"""
    return kernel


def kernel_config(v: int) -> dict:
    """Tile width and warps for the per-row kernel: 8 consecutive elements per thread (16-byte bf16 loads).
    H200, one chunk of [768, 128256] bf16 by CUDA-graph replay (bench/bench_lce.py): 4096-wide tiles with 8 warps
    0.209 ms, 8192 with 16 warps 0.225 ms; fewer programs walking several rows each were no faster (floor 0.137)."""
    block_v = min(MAX_BLOCK_V, max(128, triton.next_power_of_2(v)))
    num_warps = max(1, min(8, block_v // 512))
    return dict(BLOCK_V=block_v, num_warps=num_warps)


@functools.lru_cache(None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


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
        programs = per_sm * _sm_count(logits.device)
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


def _is_eager(t: torch.Tensor) -> bool:
    """True for a real tensor outside any tracing (compile, fake, functional or proxy modes): safe to read values."""
    return not torch.compiler.is_compiling() and type(t) is torch.Tensor and _get_current_dispatch_mode() is None


def check_inputs(hidden, weight, bias, labels, num_items, ignore_index, reduction):
    """Raises ValueError on bad arguments. Label values are checked where that is free (CPU tensors, outside
    tracing); on a GPU a label outside the vocabulary makes the loss NaN instead (never a silent number), since
    checking would synchronise with the host every step."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if num_items is not None and reduction != "sum":
        raise ValueError("linear_cross_entropy: num_items divides a 'sum' reduction; got reduction='mean'")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "disagree on the hidden size")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"linear_cross_entropy: bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}")
    if labels.numel() * hidden.shape[-1] != hidden.numel():
        raise ValueError(f"linear_cross_entropy: {labels.numel()} labels for hidden {tuple(hidden.shape)}")
    if _is_eager(labels) and labels.device.type == "cpu":  # on a GPU the check would cost a host sync
        v = weight.shape[0]
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
        if bool(bad.any()):
            first = bad.reshape(-1).nonzero()[0, 0]
            raise ValueError(
                f"linear_cross_entropy: label {int(labels.reshape(-1)[first])} at position {int(first)} is outside "
                f"the vocabulary [0, {v}) and is not ignore_index ({ignore_index})"
            )


def _denominator(labels, num_items, ignore_index, reduction, device) -> torch.Tensor:
    """D of the docstring as a 0-dim fp32 tensor on the device, computed there (no host round trip)."""
    if num_items is not None:
        return num_items.to(device=device, dtype=torch.float32)
    if reduction == "mean":
        return (labels != ignore_index).sum().to(torch.float32)  # 0 -> loss 0/0 = nan, as torch
    return torch.ones((), dtype=torch.float32, device=device)


def launch_forward(hidden, weight, bias, labels, num_items, ignore_index, label_smoothing, softcap, reduction,
                   use_kernel, config=None, keep_logits=False, path=None, matmul_config=None):
    """The chunked algorithm. path: "exp_matmul" (our matmul with the softmax in its epilogue, see
    exp_matmul_applies), "row_kernel" (cuBLAS logits and a Triton pass over each row; use_kernel False runs
    reference_chunk instead), or None: the first of them that applies. config: the row kernel's settings,
    matmul_config: lce_exp_matmul's (lce_exp_matmul.config by default). Returns (loss, grad_hidden, grad_weight,
    grad_bias or an empty tensor, kept logits or an empty tensor) for grad_output = 1."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).long()
    n, v = h.shape[0], weight.shape[0]
    device = h.device
    denom = _denominator(y, num_items, ignore_index, reduction, device)
    inv_denom = (1.0 / denom).reshape(1)
    if n == 0:  # no tokens, nothing to chunk: torch's value (nan for "mean", 0 for "sum") and zero gradients
        grad_b = torch.zeros_like(bias) if bias is not None else h.new_empty(0)
        kept = h.new_empty((0, v)) if keep_logits else h.new_empty(0)
        return (h.new_zeros((), dtype=torch.float32) / denom, torch.zeros_like(hidden), torch.zeros_like(weight),
                grad_b, kept)
    may_fall_back = path is None and not FORCED_PATH  # a build failure of the default path is not the caller's
    if path is None:
        path = _default_path(h, weight, bias, label_smoothing, keep_logits, use_kernel)
    elif path == "exp_matmul" and not exp_matmul_exact(h, weight, bias, label_smoothing, keep_logits):
        raise ValueError("linear_cross_entropy: the exp_matmul path takes bf16 inputs without bias, label smoothing "
                         "or kept logits")
    if path == "exp_matmul":
        try:
            losses, grad_h, grad_w = _forward_exp_matmul(h, weight, y, inv_denom, ignore_index, softcap,
                                                         matmul_config)
            _EXP_MATMUL_BUILDS[device] = True
            loss = losses.sum() / denom
            return loss, grad_h.view(hidden.shape), grad_w.to(weight.dtype), h.new_empty(0), h.new_empty(0)
        except Exception as e:  # noqa: BLE001
            if not may_fall_back or _EXP_MATMUL_BUILDS.get(device):
                raise  # asked for by name, or it ran here before: a real error, not a build failure
            # a Triton or driver that cannot build the kernel (shared memory, an older TMA API): the other path
            warnings.warn(f"liger_compile: lm_head + cross-entropy's exp-epilogue matmul did not build on {device} "
                          f"({type(e).__name__}: {str(e)[:200]}); using cuBLAS logits and the per-row kernel")
            _EXP_MATMUL_BUILDS[device] = False

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

    loss = losses.sum() / denom
    grad_b = grad_b.to(bias.dtype) if bias is not None else h.new_empty(0)
    return loss, grad_h.view(hidden.shape), grad_w.to(weight.dtype), grad_b, kept


# LIGER_COMPILE_LCE_PATH=row_kernel pins the row-kernel path, =exp_matmul the exp path wherever it is exact and
# runs (any hidden size), for comparisons and diagnosis
FORCED_PATH = os.environ.get("LIGER_COMPILE_LCE_PATH") or None
if FORCED_PATH not in (None, "row_kernel", "exp_matmul"):
    raise ValueError(f"LIGER_COMPILE_LCE_PATH must be row_kernel or exp_matmul, not {FORCED_PATH!r}")

# The exp path is the default from this hidden size up: measured faster than the row-kernel path at hidden 1536,
# 2048 and 4096 and slower at 896, where our dh matmul has too few output tiles (bench/check_lce_paths.py; figures in
# bench/results/logs/check_lce_paths_*.log and the README).
EXP_MATMUL_MIN_HIDDEN = 1536

# device -> True once the exp-epilogue path ran there, False once it failed to build there (row-kernel path after)
_EXP_MATMUL_BUILDS: dict = {}


def exp_matmul_exact(h, weight, bias, label_smoothing, keep_logits) -> bool:
    """Whether the exp-epilogue path computes this call's result (else it would be wrong, not just slow):
    - bf16 hidden and weight: exp(z - ref) needs fp32's exponent range, which bf16 has and fp16 (max 65504) has
      not; fp32 inputs would need a tf32 or fp32 matmul of their own;
    - no bias (no HF causal LM has an lm_head bias), no label smoothing: both add terms that are not one factor
      per row (db needs sum_i r_i P_ij; smoothing adds eps / V to every column, times 1 - t^2 with softcap);
    - logits not kept: the epilogue writes exp(z - ref), not z."""
    return (h.dtype == weight.dtype == torch.bfloat16 and bias is None and label_smoothing == 0
            and not keep_logits)


def exp_matmul_runs(h, weight) -> bool:
    """Whether the exp-epilogue kernels can run on these tensors: CUDA with TMA (compute capability 9.0+; the
    matmuls are fed by tensor descriptors), hidden size a multiple of 8, unit column strides and 16-byte aligned
    starts (what TMA reads)."""
    return (h.device.type == "cuda" and torch.cuda.get_device_capability(h.device) >= (9, 0)
            and h.shape[-1] % 8 == 0 and h.stride(-1) == 1 and h.stride(0) % 8 == 0 and weight.is_contiguous()
            and h.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0)


def exp_matmul_applies(h, weight, bias, label_smoothing, keep_logits) -> bool:
    """Where the op takes the exp-epilogue path by default: where it is exact, where it runs, and from a hidden
    size of EXP_MATMUL_MIN_HIDDEN up (where it was measured faster; see there). Everything else: the row kernel."""
    return (exp_matmul_exact(h, weight, bias, label_smoothing, keep_logits) and exp_matmul_runs(h, weight)
            and h.shape[-1] >= EXP_MATMUL_MIN_HIDDEN)


def _default_path(h, weight, bias, label_smoothing, keep_logits, use_kernel) -> str:
    """The path when the caller names none: LIGER_COMPILE_LCE_PATH's pin if set (exp_matmul only where it is exact
    and runs), else exp_matmul where exp_matmul_applies and it has not failed to build on this device."""
    if FORCED_PATH == "row_kernel" or not use_kernel:
        return "row_kernel"
    if FORCED_PATH == "exp_matmul":
        exp = exp_matmul_exact(h, weight, bias, label_smoothing, keep_logits) and exp_matmul_runs(h, weight)
    else:
        exp = exp_matmul_applies(h, weight, bias, label_smoothing, keep_logits) \
            and _EXP_MATMUL_BUILDS.get(h.device) is not False
    return "exp_matmul" if exp else "row_kernel"


# The exp-epilogue path's whole working memory (one chunk's P, its partial sums and a few vectors of chunk length)
# stays under this: 0.25 GiB less 1 MiB. With Llama-3's 128256-word vocabulary that is 1024 rows per chunk, so
# 16384 tokens go in 16 chunks (the row-kernel path has its own budget, LOGITS_CHUNK_BYTES: 18 chunks of 912).
EXP_MATMUL_WORKSPACE_BYTES = 255 * 2**20


def exp_matmul_chunks(n: int, v: int, block_rows: int, n_col_tiles: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk: whole blocks of block_rows rows (the matmul's row tile, so no tile runs part
    empty) spread evenly over the fewest chunks whose working memory fits EXP_MATMUL_WORKSPACE_BYTES (at least one
    block per chunk)."""
    per_row = triton.cdiv(v, 8) * 8 * 2 + n_col_tiles * 4 + 6 * 4  # P row (bf16, padded), partial sums, vectors
    budget_blocks = max(1, EXP_MATMUL_WORKSPACE_BYTES // per_row // block_rows)
    blocks = triton.cdiv(n, block_rows)
    n_chunks = triton.cdiv(blocks, budget_blocks)
    per, extra = divmod(blocks, n_chunks)
    bounds, start = [], 0
    for i in range(n_chunks):
        end = min(n, start + (per + (i < extra)) * block_rows)
        bounds.append((start, end))
        start = end
    return bounds


def _forward_exp_matmul(h, weight, y, inv_denom, ignore_index, softcap, config=None):
    """Per chunk of C tokens (grad_h's [C, H] slice serves as scratch until the chunk's dh lands in it):
      1. lce_label_logit: zc_y, the label's soft-capped logit (fp32, like the matmul's logits); ref = zc_y, or +inf
         on rows that take no part;
      2. lce_exp_matmul: P = exp(zc - ref) (label column 0), partial sums, row max;
      3. lce_row_combine: loss, row factor r, P's label entry, diag(r) h_c (bf16, into the scratch); 2 and 3 run
         again only if a row overflowed (a flag on the device);
      4. dW += P^T (diag(r) h_c) by cuBLAS;
      5. dh_c = diag(r) (P @ W) by lce_row_scaled_matmul, into grad_h's slice."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n, k_dim = h.shape
    v = weight.shape[0]
    device = h.device
    cfg = dict(config or lce_exp_matmul.config(device.type))
    bm, bn, bk = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BK")
    persistent = cfg.pop("PERSISTENT", False)
    programs_per_sm = cfg.pop("PROGRAMS_PER_SM", 1)
    subtile = cfg.pop("SUBTILE", 1)
    n_col_tiles = triton.cdiv(v, bn)
    chunks = exp_matmul_chunks(n, v, bm, n_col_tiles)
    rows = max(end - start for start, end in chunks)
    sms = _sm_count(device) if device.type == "cuda" else 1
    dh_cfg = dict(lce_row_scaled_matmul.config(device.type, rows, k_dim, sms))
    dh_bm, dh_bn, dh_bk = dh_cfg.pop("BM"), dh_cfg.pop("BN"), dh_cfg.pop("BK")

    grad_h = torch.empty(h.shape, dtype=h.dtype, device=device)  # contiguous: its slices are the combine's scratch
    grad_w = torch.empty_like(weight)  # bf16 (see GRAD_WEIGHT_ACC_DTYPE); the first chunk writes it whole
    losses = torch.empty(n, dtype=torch.float32, device=device)
    v_pad = triton.cdiv(v, 8) * 8  # 16-byte row stride for TMA
    buffer = torch.empty((rows, v_pad), dtype=h.dtype, device=device)
    part_sum = torch.empty((n_col_tiles, rows), dtype=torch.float32, device=device)
    row_max = torch.empty(rows, dtype=torch.float32, device=device)
    ref = torch.empty(rows, dtype=torch.float32, device=device)
    z_label = torch.empty(rows, dtype=torch.float32, device=device)
    row_scale = torch.empty(rows, dtype=torch.float32, device=device)
    rerun = torch.zeros(len(chunks), dtype=torch.int32, device=device)
    w_desc = TensorDescriptor.from_tensor(weight, [bn, bk])
    w_kn_desc = TensorDescriptor.from_tensor(weight, [dh_bk, dh_bn])
    upcast = device.type != "cuda"
    block_r, block_t = 8, 128

    for i, (start, end) in enumerate(chunks):
        c = end - start
        h_c, y_c = h[start:end], y[start:end]
        p = buffer[:c, :v]
        scratch = grad_h[start:end]
        direct_launch(lce_label_logit.label_logit_kernel)[(c,)](
            h_c, weight, y_c, z_label, ref, row_max, h_c.stride(0), v, k_dim, ignore_index, softcap,
            HAS_SOFTCAP=softcap > 0, BLOCK_K=min(1024, triton.next_power_of_2(k_dim)),
            num_warps=4)
        tiles = triton.cdiv(c, bm) * n_col_tiles
        grid = (min(tiles, programs_per_sm * sms) if persistent and device.type == "cuda" else tiles,)
        descs = (TensorDescriptor.from_tensor(h_c, [bm, bk]), w_desc,
                 TensorDescriptor.from_tensor(p, [bm, bn // subtile]))
        flag = rerun[i:i + 1]
        for is_rerun in (False, True):
            direct_launch(lce_exp_matmul.exp_matmul_kernel)[grid](
                *descs, ref, y_c, part_sum, row_max, flag, c, v, k_dim, n_col_tiles, softcap,
                HAS_SOFTCAP=softcap > 0, IS_RERUN=is_rerun, UPCAST_DOT=upcast, BM=bm, BN=bn, BK=bk,
                SUBTILE=subtile, PLAIN=False, **cfg)
            direct_launch(lce_row_combine.row_combine_kernel)[(triton.cdiv(c, block_r),)](
                p, v_pad, ref, y_c, part_sum, row_max, z_label, losses[start:end], row_scale, inv_denom, flag,
                h_c, scratch, h_c.stride(0), c, v, n_col_tiles, k_dim, ignore_index, softcap,
                lce_exp_matmul.SAFE_EXP, HAS_SOFTCAP=softcap > 0, IS_RERUN=is_rerun, ROUND_BY_HAND=upcast,
                BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_K=min(512, triton.next_power_of_2(k_dim)), num_warps=4)
        accumulate_grad_weight(grad_w, p.t(), scratch, first=i == 0)
        direct_launch(lce_row_scaled_matmul.row_scaled_matmul_kernel)[
            (triton.cdiv(c, dh_bm) * triton.cdiv(k_dim, dh_bn),)](
            TensorDescriptor.from_tensor(p, [dh_bm, dh_bk]), w_kn_desc,
            TensorDescriptor.from_tensor(scratch, [dh_bm, dh_bn]), row_scale, c, v,
            UPCAST_DOT=upcast, BM=dh_bm, BN=dh_bn, BK=dh_bk, **dh_cfg)
    return losses, grad_h, grad_w


# A custom op rather than a triton_op: the work is three cuBLAS matmuls per chunk writing into slices of
# preallocated buffers and accumulating in place. Traced by Inductor, those in-place writes would be functionalised
# into copies of [N, H] and [V, H] buffers per chunk; run as one opaque call, the memory is exactly what is written
# here (a chunk of logits plus the gradients). Nothing in it synchronises with the host, so it also runs inside
# CUDA graphs.
@custom_op("liger::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    num_items: Optional[torch.Tensor], ignore_index: int, label_smoothing: float, softcap: float, reduction: str,
    keep_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, grad_hidden, grad_weight, grad_bias, logits): the fp32 scalar loss, the gradients for
    grad_output = 1 that backward scales (grad_bias is empty without a bias), and with keep_logits the [N, V]
    logits in the input dtype (else empty). Callers use [0] (and [4])."""
    check_inputs(hidden, weight, bias, labels, num_items, ignore_index, reduction)
    return launch_forward(hidden, weight, bias, labels, num_items, ignore_index, label_smoothing, softcap, reduction,
                          use_kernel=use_triton(hidden), keep_logits=keep_logits)


@linear_cross_entropy.register_fake
def _fake(hidden, weight, bias, labels, num_items, ignore_index, label_smoothing, softcap, reduction,
          keep_logits=False):
    n = hidden.numel() // hidden.shape[-1]
    loss = hidden.new_empty((), dtype=torch.float32)
    grad_b = hidden.new_empty(bias.shape if bias is not None else (0,), dtype=bias.dtype if bias is not None
                              else hidden.dtype)
    kept = hidden.new_empty((n, weight.shape[0]) if keep_logits else (0,))
    return loss, torch.empty_like(hidden), torch.empty_like(weight), grad_b, kept


def _setup_context(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.save_for_backward(*output[1:4])
    ctx.mark_non_differentiable(*output[1:])


def _scaled(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """grad * grad_loss (a 0-dim fp32 tensor: the product keeps grad's dtype). Run eagerly, the saved gradient is
    scaled in place, which spares a copy as large as the weight (1 GiB for Llama-3-8B's lm_head); a second backward
    through the same graph then fails autograd's saved-tensor version check instead of reading scaled values. Traced
    (torch.compile), it stays out of place: Inductor fuses the product into whatever consumes it."""
    return grad.mul_(grad_loss) if _is_eager(grad) else grad * grad_loss


def _backward(ctx, grad_loss, *_grad_saved):
    grad_h, grad_w, grad_b = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dh = _scaled(grad_h, grad_loss) if needs[0] else None
    dw = _scaled(grad_w, grad_loss) if needs[1] else None
    db = _scaled(grad_b, grad_loss) if ctx.has_bias and needs[2] else None
    return dh, dw, db, None, None, None, None, None, None, None


linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)
