"""``liger::token_logprobs``: each token's log-probability of its label under ``hidden @ weight.T (+ bias)``, with the
statistics RL and preference trainers log or weight by, never holding the [N, V] logits.

    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1, log_z = torch.ops.liger.token_logprobs(
        hidden [..., H], weight [V, H], bias [V] or None, labels [...], ignore_index, temperature, softcap,
        logit_scale)

The logits are transformed as TRL's fused LM head transforms them: z = logit_scale * logits, then
softcap * tanh(z / softcap) where softcap > 0, then z / temperature. Every output has the labels' shape; rows whose
label is ignore_index get zeros (is_top1 False) and zero gradients. Gradients flow from log_probs and entropy; the
other outputs have none (log_z is returned for the backward).

Per chunk of C tokens (C as lm_head + cross-entropy picks it: one [C, V] buffer of at most 232 MiB):
    forward   logits = h_c @ W^T (+ b) in cuBLAS, then one Triton program per row: online max and sums over V
    backward  the logits again, a Triton program per row overwrites them with d/dlogits, dh_c = dz @ W,
              dW += dz^T @ h_c, db += sum(dz)
That is four matmuls, as many as a gradient needs when its per-token weights are not known in forward (DPO's, KTO's
and GRPO's are not). Where the caller expects gradients (expect_hidden_grad / expect_weight_grad) and an earlier
backward for the same weight received the same gradient on every scored token (SFT's loss), the forward also runs
the backward's row kernel and its two matmuls with that gradient, and the backward rescales what it kept instead of
recomputing: three matmuls (kernels/_uniform_grad.py says when it falls back). Where the weight takes no gradient
(a frozen head: LoRA), the forward keeps d hidden's direction per row instead, for any per-token weights: two
matmuls (kernels/_frozen_head_grad.py). Rows with ignored labels (prompts,
padding) are left out of the matmuls when at least SKIP_FRACTION of them are ignored; counting them costs one host
synchronisation per call, so where that cannot happen (tracing, CUDA-graph capture) every row is scored.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _frozen_head_grad, _uniform_grad
from ._math import expm1 as _expm1
from ._math import log1p as _log1p
from ._math import tanh as _tanh
from ._op import declare, sample
from .linear_cross_entropy._shared import GRAD_WEIGHT_ACC_DTYPE, accumulate_grad_weight, direct_launch, is_eager
from .linear_cross_entropy.row_kernel import chunk_rows, kernel_config

SKIP_FRACTION = 0.125  # ignored rows are gathered out of the matmuls from this share of the batch up


@triton.jit
def _transform(x, scale, cap, inv_t, HAS_SOFTCAP: tl.constexpr):
    z = x * scale
    t = z  # tanh(z / cap) under soft-capping, for the backward's chain rule; unused without it
    if HAS_SOFTCAP:
        t = _tanh(z / cap)
        z = cap * t
    return z * inv_t, t


@triton.jit
def _forward_kernel(LOGITS, LABELS, LOGP, ENTROPY, LOG_SUM_SQ, MEAN, TOP1, LOG_Z,
                    row_stride, n_cols, ignore_index, logit_scale, softcap, inv_temperature,
                    HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    # One program per row of LOGITS [rows, n_cols] (unit column stride). Inductor passes Python floats as fp64:
    # pin them to fp32 so the row math stays in fp32.
    row = tl.program_id(0).to(tl.int64)
    scale = tl.cast(logit_scale, tl.float32)
    cap = tl.cast(softcap, tl.float32)
    inv_t = tl.cast(inv_temperature, tl.float32)
    base = LOGITS + row * row_stride
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    bad = valid & ((label < 0) | (label >= n_cols))
    y = tl.where(valid & ~bad, label, 0)
    z_y, _t_y = _transform(tl.load(base + y).to(tl.float32), scale, cap, inv_t, HAS_SOFTCAP)

    # Running max m (from z_y, so never -inf), and relative to it: S_other = sum_{j != y} e_j, S = sum_j e_j,
    # D = sum_j e_j (z_j - m) (entropy = log S - D / S, with no cancellation between two large terms),
    # Q = sum_j e_j^2; the plain sum of z for the mean, and the largest z left of y for is_top1 (argmax takes
    # the first maximum).
    m = z_y
    s_other = tl.zeros_like(z_y)
    s_all = tl.zeros_like(z_y)
    d = tl.zeros_like(z_y)
    q = tl.zeros_like(z_y)
    z_sum = tl.zeros_like(z_y)
    max_left = tl.zeros_like(z_y) - float("inf")
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z, _t_cols = _transform(tl.load(base + cols, mask=mask, other=0.0).to(tl.float32), scale, cap, inv_t,
                                HAS_SOFTCAP)
        z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        max_left = tl.maximum(max_left, tl.max(tl.where(mask & (cols < y), z, float("-inf")), axis=0))
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        r = tl.exp(m - m_new)
        e = tl.exp(z - m_new)  # 0 for the masked tail
        shifted = tl.where(mask, z - m_new, 0.0)
        d = r * (d + (m - m_new) * s_all) + tl.sum(e * shifted, axis=0)
        s_all = s_all * r + tl.sum(e, axis=0)
        s_other = s_other * r + tl.sum(tl.where(cols == y, 0.0, e), axis=0)
        q = q * r * r + tl.sum(e * e, axis=0)
        m = m_new

    e_y = tl.exp(z_y - m)
    s = s_other + e_y
    log_s = tl.log(s)
    # log p_y = -log(S / e_y) = -log1p(S_other / e_y): exact for confident rows, where z_y - log Z rounds to 0
    log_p = tl.where(e_y >= s_other, -_log1p(s_other / e_y), (z_y - m) - log_s)
    log_p = tl.where(bad, float("nan"), log_p)  # an out-of-range label poisons its row instead of reading garbage
    entropy = log_s - d / s_all
    log_sum_sq = tl.log(q) - 2.0 * tl.log(s_all)
    top1 = (z_y >= m) & (z_y > max_left)
    tl.store(LOGP + row, tl.where(valid, log_p, 0.0))
    tl.store(ENTROPY + row, tl.where(valid, entropy, 0.0))
    tl.store(LOG_SUM_SQ + row, tl.where(valid, log_sum_sq, 0.0))
    tl.store(MEAN + row, tl.where(valid, z_sum / n_cols, 0.0))
    tl.store(TOP1 + row, (valid & top1).to(tl.int8))
    tl.store(LOG_Z + row, tl.where(valid, m + log_s, 0.0))


@triton.jit
def _backward_kernel(LOGITS, LABELS, LOGP, ENTROPY, LOG_Z, GRAD_LOGP, GRAD_ENTROPY,
                     row_stride, n_cols, ignore_index, logit_scale, softcap, inv_temperature,
                     HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    # Overwrites one row of LOGITS with d loss / d logits = (g_lp (1[j = y] - p_j) - g_ent p_j (log p_j + H))
    # times the transform's derivative; 1 - p_y is taken as -expm1(log p_y), exact for confident rows.
    row = tl.program_id(0).to(tl.int64)
    scale = tl.cast(logit_scale, tl.float32)
    cap = tl.cast(softcap, tl.float32)
    inv_t = tl.cast(inv_temperature, tl.float32)
    base = LOGITS + row * row_stride
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    log_z = tl.load(LOG_Z + row)
    entropy = tl.load(ENTROPY + row)
    g_lp = tl.load(GRAD_LOGP + row).to(tl.float32)
    g_ent = tl.load(GRAD_ENTROPY + row).to(tl.float32)
    one_minus_p_y = -_expm1(tl.load(LOGP + row))
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z, t = _transform(tl.load(base + cols, mask=mask, other=0.0).to(tl.float32), scale, cap, inv_t,
                          HAS_SOFTCAP)
        log_p = z - log_z
        p = tl.exp(log_p)
        g = g_lp * tl.where(cols == label, one_minus_p_y, -p) - g_ent * p * (log_p + entropy)
        g = g * inv_t
        if HAS_SOFTCAP:
            g = g * (1.0 - t * t)
        g = tl.where(valid, g * scale, 0.0)
        tl.store(base + cols, g.to(base.dtype.element_ty), mask=mask)


def _torch_transform(logits, logit_scale, softcap, temperature):
    z = logits.float() * logit_scale
    t = None
    if softcap > 0:
        t = torch.tanh(z / softcap)
        z = softcap * t
    return z / temperature, t


def _fold_torch(tile, labels, outs, ignore_index, logit_scale, softcap, temperature):
    """_forward_kernel's results for a whole tile, in torch (off CUDA)."""
    log_probs, entropy, log_sum_sq, mean, top1, log_z = outs
    v = tile.shape[1]
    z, _ = _torch_transform(tile, logit_scale, softcap, temperature)
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= v))
    y = torch.where(valid & ~bad, labels, 0)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    m = z.amax(1)
    e = torch.exp(z - m[:, None])
    is_y = torch.arange(v, device=z.device) == y[:, None]
    s_other = e.masked_fill(is_y, 0.0).sum(1)
    s = e.sum(1)
    e_y = torch.exp(z_y - m)
    log_p = torch.where(e_y >= s_other, -torch.log1p(s_other / e_y), (z_y - m) - torch.log(s))
    log_p = log_p.masked_fill(bad, float("nan"))
    left = torch.arange(v, device=z.device) < y[:, None]
    max_left = z.masked_fill(~left, float("-inf")).amax(1)
    values = {
        log_probs: log_p, entropy: torch.log(s) - (e * (z - m[:, None])).sum(1) / s,
        log_sum_sq: torch.log((e * e).sum(1)) - 2.0 * torch.log(s), mean: z.mean(1), log_z: m + torch.log(s),
    }
    for out, value in values.items():
        out.copy_(torch.where(valid, value, 0.0))
    top1.copy_(valid & (z_y >= m) & (z_y > max_left))


def _grad_torch(tile, labels, log_probs, entropy, log_z, grad_lp, grad_ent, ignore_index, logit_scale, softcap,
                temperature):
    """_backward_kernel for a whole tile, in torch (off CUDA): overwrites tile with d loss / d logits."""
    z, t = _torch_transform(tile, logit_scale, softcap, temperature)
    log_p = z - log_z[:, None]
    p = torch.exp(log_p)
    is_y = torch.arange(tile.shape[1], device=tile.device) == labels[:, None]
    one_minus_p_y = -torch.expm1(log_probs)
    g = grad_lp.float()[:, None] * torch.where(is_y, one_minus_p_y[:, None], -p)
    g = g - grad_ent.float()[:, None] * p * (log_p + entropy[:, None])
    g = g / temperature
    if t is not None:
        g = g * (1.0 - t * t)
    valid = (labels != ignore_index)[:, None]
    tile.copy_(torch.where(valid, g * logit_scale, 0.0))


def _scored_rows(labels: torch.Tensor, ignore_index: int) -> Optional[torch.Tensor]:
    """The indices of the rows to score, or None for all of them (see the module docstring's SKIP_FRACTION)."""
    if not is_eager(labels) or _uniform_grad.capturing(labels):
        return None
    rows = (labels != ignore_index).nonzero().squeeze(1)  # one host synchronisation: nonzero's length
    if rows.numel() > (1.0 - SKIP_FRACTION) * labels.numel():
        return None
    return rows


def _logits(buffer, h_c, weight, bias):
    tile = buffer[: h_c.shape[0]]
    if bias is not None:
        torch.addmm(bias, h_c, weight.t(), out=tile)
    else:
        torch.mm(h_c, weight.t(), out=tile)
    return tile


def _check(hidden, weight, bias, labels, temperature, softcap):
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} disagree "
                         "on the hidden size")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"token_logprobs: hidden ({hidden.dtype}), weight ({weight.dtype}) and bias must share a "
                         "dtype (cast them to the matmul's dtype first)")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"token_logprobs: bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}")
    if labels.numel() * hidden.shape[-1] != hidden.numel():
        raise ValueError(f"token_logprobs: {labels.numel()} labels for hidden {tuple(hidden.shape)}")
    if not temperature > 0 or softcap < 0:
        raise ValueError(f"token_logprobs: temperature must be > 0 and softcap >= 0 (0: none), got {temperature} "
                         f"and {softcap}")


def _forward(hidden, weight, bias, labels, ignore_index, temperature, softcap, logit_scale, expect_hidden_grad,
             expect_weight_grad, use_kernel):
    _check(hidden, weight, bias, labels, temperature, softcap)
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()
    n, v = h.shape[0], weight.shape[0]
    outs = [torch.zeros(n, dtype=torch.float32, device=h.device) for _ in range(4)]
    outs.insert(4, torch.zeros(n, dtype=torch.bool, device=h.device))
    outs.append(torch.zeros(n, dtype=torch.float32, device=h.device))
    rows = _scored_rows(y, ignore_index)
    if rows is not None:
        h, y = h.index_select(0, rows), y.index_select(0, rows)
    scored = outs if rows is None else [o.new_empty(rows.shape) for o in outs]
    expected = (expect_hidden_grad or expect_weight_grad) and is_eager(labels)
    # a frozen head: d hidden's direction per row, whatever the loss (_frozen_head_grad); else SFT's uniform guess
    frozen = expected and not expect_weight_grad and _frozen_head_grad.wanted(weight)
    guessed = 1.0 if frozen else _uniform_grad.guess(weight) if expected else None
    if guessed is not None:
        grads = _Grads(h, weight, bias, rows, n, expect_hidden_grad, expect_weight_grad,
                       expect_weight_grad and bias is not None)
        g_lp, g_ent = torch.full((h.shape[0],), guessed, device=h.device), torch.zeros(h.shape[0], device=h.device)
    size = chunk_rows(max(1, h.shape[0]), v, h.dtype)
    buffer = torch.empty((min(size, h.shape[0]), v), dtype=h.dtype, device=h.device)
    for start in range(0, h.shape[0], size):
        end = min(start + size, h.shape[0])
        tile = _logits(buffer, h[start:end], weight, bias)
        chunk_outs = [o[start:end] for o in scored]
        if use_kernel:
            top1_i8 = chunk_outs[4].view(torch.int8)  # bool and int8 share a byte: the kernel stores 0/1
            direct_launch(_forward_kernel)[(end - start,)](
                tile, y[start:end], *chunk_outs[:4], top1_i8, chunk_outs[5], tile.stride(0), v, ignore_index,
                logit_scale, softcap, 1.0 / temperature, HAS_SOFTCAP=softcap > 0, **kernel_config(v))
        else:
            _fold_torch(tile, y[start:end], chunk_outs, ignore_index, logit_scale, softcap, temperature)
        if guessed is not None:
            grads.add_chunk(tile, start, end, y, (chunk_outs[0], chunk_outs[1], chunk_outs[5], g_lp[start:end],
                                                  g_ent[start:end]), ignore_index, temperature, softcap,
                            logit_scale, use_kernel)
    if rows is not None:
        for out, part in zip(outs, scored):
            out.index_copy_(0, rows, part)
    if frozen:
        _frozen_head_grad.keep(weight, outs[5], grads.finish(hidden, weight, bias)[0])
    elif guessed is not None:
        _uniform_grad.keep(weight, outs[5], guessed, grads.finish(hidden, weight, bias))
    return tuple(o.view(labels.shape) for o in outs)


class _Grads:
    """The three gradients summed over the chunks: the scored rows' d hidden, d weight and d bias."""

    def __init__(self, h, weight, bias, rows, n, hidden_grad, weight_grad, bias_grad):
        self.h, self.weight, self.rows = h, weight, rows
        self.hidden_grad, self.weight_grad, self.bias_grad = hidden_grad, weight_grad, bias_grad
        self.grad_h = torch.zeros((n, h.shape[1]), dtype=h.dtype, device=h.device) if hidden_grad else None
        self.part_h = self.grad_h if rows is None or not hidden_grad else torch.empty_like(h)
        self.grad_w = torch.empty(weight.shape, dtype=GRAD_WEIGHT_ACC_DTYPE.get(weight.dtype, weight.dtype),
                                  device=h.device) if weight_grad else None
        self.grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if bias_grad else None

    def add_chunk(self, dz, start, end, y, args, ignore_index, temperature, softcap, logit_scale, use_kernel):
        """Overwrites the chunk's logits dz with d loss / d logits (args: the chunk's log-probs, entropies, log Z and
        the gradients of the first two) and adds the chunk's part of each gradient."""
        v = self.weight.shape[0]
        if use_kernel:
            direct_launch(_backward_kernel)[(end - start,)](
                dz, y[start:end], *args, dz.stride(0), v, ignore_index, logit_scale, softcap, 1.0 / temperature,
                HAS_SOFTCAP=softcap > 0, **kernel_config(v))
        else:
            _grad_torch(dz, y[start:end], *args, ignore_index, logit_scale, softcap, temperature)
        if self.hidden_grad:
            torch.mm(dz, self.weight, out=self.part_h[start:end])
        if self.weight_grad:
            accumulate_grad_weight(self.grad_w, dz.t(), self.h[start:end], first=start == 0)
        if self.bias_grad:
            self.grad_b += dz.sum(0, dtype=torch.float32)

    def finish(self, hidden, weight, bias):
        """(d hidden in hidden's shape, d weight, d bias) in the inputs' dtypes, None where not asked for."""
        if self.rows is not None and self.hidden_grad:
            self.grad_h.index_copy_(0, self.rows, self.part_h)
        if self.weight_grad and self.h.shape[0] == 0:
            self.grad_w.zero_()  # no chunk wrote it
        return (self.grad_h.view(hidden.shape) if self.hidden_grad else None,
                self.grad_w.to(weight.dtype) if self.weight_grad else None,
                self.grad_b.to(bias.dtype) if self.bias_grad else None)


def _backward(grad_log_probs, grad_entropy, hidden, weight, bias, labels, log_probs, entropy, log_z, ignore_index,
              temperature, softcap, logit_scale, hidden_grad, weight_grad, bias_grad, use_kernel):
    kept = None
    if is_eager(labels) and hidden_grad and not weight_grad and not bias_grad:
        dh = _frozen_head_grad.hidden_gradient(grad_log_probs, grad_entropy, weight, labels, log_z, ignore_index)
        kept = None if dh is None else (dh, None, None)
    if kept is None and is_eager(labels):
        kept = _uniform_grad.kept_gradients(grad_log_probs, grad_entropy, weight, labels, log_z, ignore_index,
                                            (hidden_grad, weight_grad, bias_grad))
    if kept is None:
        h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()
        saved = [t.reshape(-1) for t in (log_probs, entropy, log_z, grad_log_probs, grad_entropy)]
        rows = _scored_rows(y, ignore_index)
        if rows is not None:
            h, y = h.index_select(0, rows), y.index_select(0, rows)
            saved = [t.index_select(0, rows) for t in saved]
        saved = [t.float().contiguous() for t in saved]
        grads = _Grads(h, weight, bias, rows, labels.numel(), hidden_grad, weight_grad, bias_grad)
        v = weight.shape[0]
        size = chunk_rows(max(1, h.shape[0]), v, h.dtype)
        buffer = torch.empty((min(size, h.shape[0]), v), dtype=h.dtype, device=h.device)
        for start in range(0, h.shape[0], size):
            end = min(start + size, h.shape[0])
            dz = _logits(buffer, h[start:end], weight, bias)
            grads.add_chunk(dz, start, end, y, [t[start:end] for t in saved], ignore_index, temperature, softcap,
                            logit_scale, use_kernel)
        kept = grads.finish(hidden, weight, bias)
    return tuple(g if need and g is not None else hidden.new_empty(0)  # empties apart: outputs may not alias
                 for g, need in zip(kept, (hidden_grad, weight_grad, bias_grad)))


def launch(hidden, weight, bias, labels, ignore_index=-100, temperature=1.0, softcap=0.0, logit_scale=1.0,
           expect_hidden_grad=False, expect_weight_grad=False):
    """The op with the Triton row kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    return _forward(hidden, weight, bias, labels, ignore_index, temperature, softcap, logit_scale, expect_hidden_grad,
                    expect_weight_grad, use_kernel=True)


def reference(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    ignore_index: int = -100, temperature: float = 1.0, softcap: float = 0.0, logit_scale: float = 1.0,
    expect_hidden_grad: bool = False, expect_weight_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """liger::token_logprobs off CUDA: the same chunks, the row kernel's math in torch. Returns (log_probs,
    entropy, log_sum_sq_probs, mean_logits, is_top1, log_z), fp32 (is_top1 bool), each of the labels' shape.
    expect_*_grad: the caller will differentiate with respect to hidden / weight (and bias), so the forward may
    compute those gradients when it can tell them in advance (the module docstring)."""
    return _forward(hidden, weight, bias, labels, ignore_index, temperature, softcap, logit_scale, expect_hidden_grad,
                    expect_weight_grad, use_kernel=False)


def launch_backward(grad_log_probs, grad_entropy, hidden, weight, bias, labels, log_probs, entropy, log_z,
                    ignore_index, temperature, softcap, logit_scale, hidden_grad, weight_grad, bias_grad):
    return _backward(grad_log_probs, grad_entropy, hidden, weight, bias, labels, log_probs, entropy, log_z,
                     ignore_index, temperature, softcap, logit_scale, hidden_grad, weight_grad, bias_grad, True)


def reference_backward(
    grad_log_probs: torch.Tensor, grad_entropy: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
    bias: Optional[torch.Tensor], labels: torch.Tensor, log_probs: torch.Tensor, entropy: torch.Tensor,
    log_z: torch.Tensor, ignore_index: int, temperature: float, softcap: float, logit_scale: float,
    hidden_grad: bool, weight_grad: bool, bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight, grad_bias), each an empty tensor where not asked for."""
    return _backward(grad_log_probs, grad_entropy, hidden, weight, bias, labels, log_probs, entropy, log_z,
                     ignore_index, temperature, softcap, logit_scale, hidden_grad, weight_grad, bias_grad, False)


def _fake(hidden, weight, bias, labels, ignore_index=-100, temperature=1.0, softcap=0.0, logit_scale=1.0,
          expect_hidden_grad=False, expect_weight_grad=False):
    values = [labels.new_empty(labels.shape, dtype=torch.float32) for _ in range(4)]
    return (*values, labels.new_empty(labels.shape, dtype=torch.bool),
            labels.new_empty(labels.shape, dtype=torch.float32))


def _fake_backward(grad_log_probs, grad_entropy, hidden, weight, bias, labels, log_probs, entropy, log_z,
                   ignore_index, temperature, softcap, logit_scale, hidden_grad, weight_grad, bias_grad):
    return (torch.empty_like(hidden) if hidden_grad else hidden.new_empty(0),
            torch.empty_like(weight) if weight_grad else hidden.new_empty(0),
            torch.empty_like(bias) if bias_grad else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, temperature, softcap, logit_scale, *_expected = inputs
    log_probs, entropy, log_sum_sq, mean, top1, log_z = output
    ctx.save_for_backward(hidden, weight, bias, labels, log_probs, entropy, log_z)
    ctx.settings = (ignore_index, temperature, softcap, logit_scale)
    ctx.mark_non_differentiable(log_sum_sq, mean, top1, log_z)


def _autograd_backward(ctx, grad_log_probs, grad_entropy, *_no_grad):
    hidden, weight, bias, labels, log_probs, entropy, log_z = ctx.saved_tensors
    needs = ctx.needs_input_grad
    # autograd hands zeros for an output nobody differentiated (entropy logged for metrics only)
    grad_log_probs = torch.zeros_like(log_probs) if grad_log_probs is None else grad_log_probs
    grad_entropy = torch.zeros_like(entropy) if grad_entropy is None else grad_entropy
    dh, dw, db = torch.ops.liger.token_logprobs_backward(
        grad_log_probs, grad_entropy, hidden, weight, bias, labels, log_probs, entropy, log_z, *ctx.settings,
        needs[0], needs[1], bias is not None and needs[2])
    return (dh if needs[0] else None, dw if needs[1] else None, db if bias is not None and needs[2] else None,
            None, None, None, None, None, None, None)


def _examples(device, width):
    # width is the vocabulary (the row kernels' tile width depends on it); one ignored row, one soft-capped call
    labels = torch.tensor([1, -100, 2, 0, 3]).to(device)
    h, w = sample(device, 5, 16), sample(device, width, 16, seed=1)
    return [(h, w, None, labels, -100, 1.0, 0.0, 1.0), (h, w, sample(device, width, seed=2), labels, -100, 0.7,
                                                        30.0, 0.5)]


def _backward_examples(device, width):
    calls = []
    for h, w, b, labels, ignore, temperature, softcap, scale in _examples(device, width):
        lp, ent, _lsq, _mean, _top1, lz = reference(h, w, b, labels, ignore, temperature, softcap, scale)
        calls.append((sample(device, 5, seed=3), sample(device, 5, seed=4), h, w, b, labels, lp, ent, lz, ignore,
                      temperature, softcap, scale, True, True, b is not None))
    return calls


token_logprobs = declare("token_logprobs", launch, reference, triton=False, fake=_fake,
                         setup_context=_setup_context, backward=_autograd_backward, examples=_examples)
token_logprobs_backward = declare("token_logprobs_backward", launch_backward, reference_backward, triton=False,
                                  fake=_fake_backward, examples=_backward_examples)
