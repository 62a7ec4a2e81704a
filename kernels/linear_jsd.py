"""``liger::linear_jsd``: the generalised Jensen-Shannon divergence between a student's and a teacher's next-token
distributions, from their last hidden states and lm_head weights, never holding either [N, V] logits.

    loss_sum, grad_hidden, grad_weight = torch.ops.liger.linear_jsd(
        student_hidden [..., H], student_weight [V, H], teacher_hidden [..., H'], teacher_weight [V, H'], labels [...],
        ignore_index, beta, temperature, weight_grad)

With p = softmax(student logits / T), q = softmax(teacher logits / T) and m = (1 - beta) p + beta q, each row's
divergence is beta KL(q || m) + (1 - beta) KL(p || m); at beta = 0 it is KL(q || p), at beta = 1 KL(p || q), as TRL's
GKD trainer defines them. loss_sum adds the rows whose label is not ignore_index (fp32); the caller divides by its
count. The student's gradients are computed in forward (the loss is one number, so backward only scales them);
the teacher gets none.

Per chunk of C tokens: both logits tiles by cuBLAS, then one Triton program per row: an online max and sum of exp
for both distributions, a pass for the row's divergence and the sum the gradient needs, and a pass that overwrites
the student's tile with d loss / d logits; then dh_c = dz @ W_s and dW_s += dz^T @ h_c. Four matmuls, as eager's
forward and backward; the [C, V] tiles are the only vocabulary-sized memory, the two of them under 232 MiB.
"""
import math

import torch
import triton
import triton.language as tl

from ._op import declare, sample
from .linear_cross_entropy._shared import GRAD_WEIGHT_ACC_DTYPE, accumulate_grad_weight, direct_launch
from .linear_cross_entropy.row_kernel import chunk_rows, kernel_config


@triton.jit
def _row_kernel(STUDENT, TEACHER, LABELS, LOSSES, row_stride_s, row_stride_t, n_cols, ignore_index, beta,
                inv_temperature, MODE: tl.constexpr, BLOCK_V: tl.constexpr):
    # MODE 0: beta = 0 (KL(q || p)), 1: beta = 1 (KL(p || q)), 2: anything between. STUDENT's row is overwritten
    # with d loss / d logits (beta's log terms pinned to fp32 first: Inductor passes Python floats as fp64).
    row = tl.program_id(0).to(tl.int64)
    s_base = STUDENT + row * row_stride_s
    t_base = TEACHER + row * row_stride_t
    inv_t = tl.cast(inv_temperature, tl.float32)
    b = tl.cast(beta, tl.float32)
    valid = tl.load(LABELS + row) != ignore_index
    zero = tl.sum(tl.zeros((1,), tl.float32), axis=0)
    m_s, m_t = zero - float("inf"), zero - float("inf")
    sum_s, sum_t = zero, zero
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        zs = tl.load(s_base + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        zt = tl.load(t_base + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        new_s, new_t = tl.maximum(m_s, tl.max(zs, axis=0)), tl.maximum(m_t, tl.max(zt, axis=0))
        sum_s = sum_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(zs - new_s), axis=0)
        sum_t = sum_t * tl.exp(m_t - new_t) + tl.sum(tl.exp(zt - new_t), axis=0)
        m_s, m_t = new_s, new_t
    lse_s, lse_t = m_s + tl.log(sum_s), m_t + tl.log(sum_t)
    log_1mb = tl.log(1.0 - b)
    log_b = tl.log(b)

    # the row's divergence, and kl = the gradient's row term (KL(p || m), or KL(p || q) at beta = 1)
    loss = zero
    kl = zero
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        lp = tl.load(s_base + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_s
        lq = tl.load(t_base + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_t
        p, q = tl.exp(lp), tl.exp(lq)
        if MODE == 0:
            term = q * (lq - lp)
        elif MODE == 1:
            term = p * (lp - lq)
            kl += tl.sum(tl.where(mask, term, 0.0), axis=0)
        else:
            a, c = lp + log_1mb, lq + log_b
            top = tl.maximum(a, c)
            lm = top + tl.log(tl.exp(a - top) + tl.exp(c - top))  # log m
            kl_p = p * (lp - lm)
            term = b * q * (lq - lm) + (1.0 - b) * kl_p
            kl += tl.sum(tl.where(mask, kl_p, 0.0), axis=0)
        loss += tl.sum(tl.where(mask, term, 0.0), axis=0)
    tl.store(LOSSES + row, tl.where(valid, loss, 0.0))

    # d loss / d z_j: (p_j - q_j) at beta = 0; p_j (lp_j - lq_j - kl) at beta = 1; (1 - beta) p_j (lp_j - lm_j - kl)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        lp = tl.load(s_base + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_s
        lq = tl.load(t_base + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_t
        p = tl.exp(lp)
        if MODE == 0:
            g = p - tl.exp(lq)
        elif MODE == 1:
            g = p * (lp - lq - kl)
        else:
            a, c = lp + log_1mb, lq + log_b
            top = tl.maximum(a, c)
            lm = top + tl.log(tl.exp(a - top) + tl.exp(c - top))
            g = (1.0 - b) * p * (lp - lm - kl)
        g = tl.where(valid, g * inv_t, 0.0)
        tl.store(s_base + cols, g.to(s_base.dtype.element_ty), mask=mask)


def _mode(beta: float) -> int:
    return 0 if beta == 0 else 1 if beta == 1 else 2


def _rows_torch(student, teacher, labels, losses, ignore_index, beta, temperature):
    """_row_kernel for a whole chunk, in torch (off CUDA): same outputs, student tile overwritten."""
    lp = torch.log_softmax(student.float() / temperature, -1)
    lq = torch.log_softmax(teacher.float() / temperature, -1)
    p, q = lp.exp(), lq.exp()
    mode = _mode(beta)
    if mode == 0:
        loss, g = (q * (lq - lp)).sum(-1), p - q
    elif mode == 1:
        loss = (p * (lp - lq)).sum(-1)
        g = p * (lp - lq - loss[:, None])
    else:
        lm = torch.logaddexp(lp + math.log(1 - beta), lq + math.log(beta))
        kl_p = p * (lp - lm)
        loss = (beta * q * (lq - lm) + (1 - beta) * kl_p).sum(-1)
        g = (1 - beta) * p * (lp - lm - kl_p.sum(-1, keepdim=True))
    valid = labels != ignore_index
    losses.copy_(torch.where(valid, loss, 0.0))
    student.copy_(torch.where(valid[:, None], g / temperature, 0.0))


def _check(h_s, w_s, h_t, w_t, labels, beta, temperature):
    if h_s.shape[-1] != w_s.shape[1] or h_t.shape[-1] != w_t.shape[1]:
        raise ValueError(f"linear_jsd: hidden states {tuple(h_s.shape)} / {tuple(h_t.shape)} do not fit weights "
                         f"{tuple(w_s.shape)} / {tuple(w_t.shape)}")
    if w_s.shape[0] != w_t.shape[0]:
        raise ValueError(f"linear_jsd: student and teacher vocabularies differ ({w_s.shape[0]} and {w_t.shape[0]})")
    if h_s.dtype != w_s.dtype or h_t.dtype != w_t.dtype:
        raise ValueError("linear_jsd: each model's hidden states and lm_head weight must share a dtype")
    n = labels.numel()
    if n * h_s.shape[-1] != h_s.numel() or n * h_t.shape[-1] != h_t.numel():
        raise ValueError(f"linear_jsd: {n} labels for hidden states {tuple(h_s.shape)} and {tuple(h_t.shape)}")
    if not 0 <= beta <= 1 or not temperature > 0:
        raise ValueError(f"linear_jsd: beta must be in [0, 1] and temperature > 0, got {beta} and {temperature}")


def _forward(h_s, w_s, h_t, w_t, labels, ignore_index, beta, temperature, weight_grad, use_kernel):
    _check(h_s, w_s, h_t, w_t, labels, beta, temperature)
    hs, ht, y = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1]), labels.reshape(-1)
    n, v = hs.shape[0], w_s.shape[0]
    grad_h = torch.empty(hs.shape, dtype=hs.dtype, device=hs.device)
    grad_w = torch.zeros(w_s.shape, dtype=GRAD_WEIGHT_ACC_DTYPE.get(w_s.dtype, w_s.dtype), device=hs.device) \
        if weight_grad else hs.new_empty(0)
    losses = torch.zeros(n, dtype=torch.float32, device=hs.device)
    size = chunk_rows(max(1, n), 2 * v, hs.dtype)  # both tiles within the one-tile budget
    s_buf = torch.empty((min(size, n), v), dtype=hs.dtype, device=hs.device)
    t_buf = torch.empty((min(size, n), v), dtype=ht.dtype, device=hs.device)
    for start in range(0, n, size):
        end = min(start + size, n)
        zs, zt = s_buf[: end - start], t_buf[: end - start]
        torch.mm(hs[start:end], w_s.t(), out=zs)
        torch.mm(ht[start:end], w_t.t(), out=zt)
        if use_kernel:
            direct_launch(_row_kernel)[(end - start,)](
                zs, zt, y[start:end], losses[start:end], zs.stride(0), zt.stride(0), v, ignore_index, beta,
                1.0 / temperature, MODE=_mode(beta), **kernel_config(v))
        else:
            _rows_torch(zs, zt, y[start:end], losses[start:end], ignore_index, beta, temperature)
        torch.mm(zs, w_s, out=grad_h[start:end])
        if weight_grad:
            accumulate_grad_weight(grad_w, zs.t(), hs[start:end], first=start == 0)
    grad_w = grad_w.to(w_s.dtype) if weight_grad else grad_w
    return losses.sum(), grad_h.view(h_s.shape), grad_w


def launch(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, ignore_index=-100, beta=0.5,
           temperature=1.0, weight_grad=True):
    """The op with the Triton row kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    return _forward(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, ignore_index, beta,
                    temperature, weight_grad, use_kernel=True)


def reference(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, beta: float = 0.5,
    temperature: float = 1.0, weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """liger::linear_jsd off CUDA: the same chunks with the row kernel's math in torch. Returns (the fp32 summed
    divergence, grad of the student's hidden states and of its lm_head weight (empty without weight_grad)) for
    grad_output = 1; backward scales them."""
    return _forward(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, ignore_index, beta,
                    temperature, weight_grad, use_kernel=False)


def _fake(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, ignore_index=-100, beta=0.5,
          temperature=1.0, weight_grad=True):
    return (student_hidden.new_empty((), dtype=torch.float32), torch.empty_like(student_hidden),
            torch.empty_like(student_weight) if weight_grad else student_hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    ctx.weight_grad = inputs[8]
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, *_grad_saved):
    grad_h, grad_w = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dh = grad_h * grad_loss if needs[0] else None
    dw = grad_w * grad_loss if needs[1] and ctx.weight_grad else None
    return dh, dw, None, None, None, None, None, None, None


def _examples(device, width):
    labels = torch.tensor([1, -100, 2, 0, 3]).to(device)
    h_s, w_s = sample(device, 5, 16), sample(device, width, 16, seed=1)
    h_t, w_t = sample(device, 5, 8, seed=2), sample(device, width, 8, seed=3)
    return [(h_s, w_s, h_t, w_t, labels, -100, beta, 0.8, True) for beta in (0.0, 0.5, 1.0)]


linear_jsd = declare("linear_jsd", launch, reference, triton=False, fake=_fake, setup_context=_setup_context,
                     backward=_backward, examples=_examples)
