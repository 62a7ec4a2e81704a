"""A projection with a LoRA adapter as one op: ``liger::lora_linear``.

PEFT computes ``base(x) + lora_B(lora_A(x)) * scaling`` (dropout 0). Compiled as written, the adapter's output
z = (x A^T) B^T is a [tokens, out] tensor of its own, written once and read again by the add, and in backward the
scaled gradient s * dy is another, and the adapter's input gradient is added to the base's in a pass of its own.
This op adds the adapter's rank-r product into the base output in the matmul's epilogue (cuBLAS addmm with beta 1,
in place), scales in the small [tokens, r] products, and accumulates the adapter's input gradient into the base's
the same way. It keeps x and h = x A^T ([tokens, r]); a frozen base weight (LoRA's case) gets no gradient.

Math (W: [N, K], A: [r, K], B: [N, r], s the scaling, dy: [..., N] the incoming gradient):
    forward:   h = x A^T,   y = x W^T + bias,   y += s * h B^T
    backward:  dh = s * (dy B)                [tokens, r]  (addmm with beta 0 and alpha s: one call)
               dx = dy W + dh A
               dA = dh^T x,   dB = s * (dy^T h),   dW = dy^T x,   dbias = sum of dy over tokens
Plain torch on every device: the matmuls are cuBLAS's (fp32 accumulation); every tensor shares one dtype (the
pattern checks it). Opaque to Inductor (an opaque op, kernels/_op.py): traced into (as a triton_op), its in-place adds become
out-of-place ones, a second [tokens, out] buffer alive beside the first, and on the H200 the traced form took more
GPU time and memory per LoRA SFT step without making the step faster (bench/results/host_overhead_llama-1b.md).
The price is a trip through the dispatcher (and into Python) per call.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import as_rows
from ._uniform_grad import capturing
from ._op import declare, sample


def _check(x, weight, bias, lora_a, lora_b):
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"lora_linear: weight {tuple(weight.shape)} does not take inputs of width {k}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"lora_linear: bias {tuple(bias.shape)} does not fit weight {tuple(weight.shape)}")
    if (lora_a.dim() != 2 or lora_a.shape[1] != k or lora_b.dim() != 2
            or lora_b.shape != (weight.shape[0], lora_a.shape[0])):
        raise ValueError(f"lora_linear: adapter A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} do not fit "
                         f"weight {tuple(weight.shape)}")


def lora_linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                        lora_b: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """liger::lora_linear -> (y, h): y = F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_a), lora_b)
    and h = F.linear(x, lora_a), which the backward reads (no gradient flows through it)."""
    _check(x, weight, bias, lora_a, lora_b)
    h = F.linear(x, lora_a)
    y = F.linear(x, weight, bias)  # F.linear on x itself: an op's outputs must not be views
    as_rows(y).addmm_(as_rows(h), lora_b.t(), alpha=scaling)
    return y, h


def lora_linear_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
    h: torch.Tensor, scaling: float, x_grad: bool, weight_grad: bool, bias_grad: bool, lora_a_grad: bool,
    lora_b_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """liger::lora_linear_backward -> (dx, d_weight, d_bias, d_lora_a, d_lora_b); a gradient not asked for is an
    empty tensor (a frozen base weight and bias, LoRA's case)."""
    dy2, x2 = as_rows(dy), as_rows(x)
    empty = x.new_empty
    zero = _zero(dy)  # addmm with beta 0 ignores it: a scaled product in one call, not a matmul and a multiply
    dh = torch.addmm(zero, dy2, lora_b, beta=0, alpha=scaling) if x_grad or lora_a_grad else None
    dx = empty(0)
    if x_grad:
        dx = torch.matmul(dy, weight)  # x's shape, not a view
        as_rows(dx).addmm_(dh, lora_a)
    return (dx,
            torch.mm(dy2.t(), x2) if weight_grad else empty(0),
            dy2.sum(0) if bias_grad else empty(0),
            torch.mm(dh.t(), x2) if lora_a_grad else empty(0),
            torch.addmm(zero, dy2.t(), as_rows(h), beta=0, alpha=scaling) if lora_b_grad else empty(0))


_zeros: dict = {}


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A 0-dim zero of like's dtype and device, made once: each call of an op on a CUDA tensor costs the host tens
    of microseconds, and the backward runs once per adapter and step. Not kept when made inside a CUDA-graph capture
    (the graph's pool refuses a tensor that outlives it); one made before is only read there."""
    key = (like.device, like.dtype)
    zero = _zeros.get(key)
    if zero is None:
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        if not capturing(like):
            _zeros[key] = zero
    return zero


def _fake(x, weight, bias, lora_a, lora_b, scaling):
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((*x.shape[:-1], lora_a.shape[0]))


def _fake_backward(dy, x, weight, lora_a, lora_b, h, scaling, x_grad, weight_grad, bias_grad, lora_a_grad,
                   lora_b_grad):
    empty = x.new_empty
    return (torch.empty_like(x) if x_grad else empty(0), torch.empty_like(weight) if weight_grad else empty(0),
            empty(weight.shape[0]) if bias_grad else empty(0), torch.empty_like(lora_a) if lora_a_grad else empty(0),
            torch.empty_like(lora_b) if lora_b_grad else empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1])
    ctx.scaling, ctx.has_bias = scaling, bias is not None
    ctx.mark_non_differentiable(output[1])


def _autograd_backward(ctx, dy, _dh):
    x, weight, lora_a, lora_b, h = ctx.saved_tensors
    needs = ctx.needs_input_grad  # x, weight, bias, lora_a, lora_b, scaling
    grads = torch.ops.liger.lora_linear_backward(dy, x, weight, lora_a, lora_b, h, ctx.scaling, needs[0], needs[1],
                                                 ctx.has_bias and needs[2], needs[3], needs[4])
    return (*(g if need else None for g, need in zip(grads, needs[:5])), None)


def _forward_examples(device, width):
    x = sample(device, 2, 3, width)
    return [(x, sample(device, 8, width, seed=1), sample(device, 8, seed=2), sample(device, 4, width, seed=3),
             sample(device, 8, 4, seed=4), 0.5),
            (x, sample(device, 8, width, seed=1), None, sample(device, 4, width, seed=3), sample(device, 8, 4, seed=4),
             2.0)]


def _backward_examples(device, width):
    x, weight, _bias, a, b, scaling = _forward_examples(device, width)[0]
    h = lora_linear_forward(x, weight, None, a, b, scaling)[1]
    dy = sample(device, 2, 3, 8, seed=5)
    return [(dy, x, weight, a, b, h, scaling, True, True, True, True, True),
            (dy, x, weight, a, b, h, scaling, True, False, False, True, True)]


# No Triton kernel: the same torch code on every device (launcher and reference are one function)
lora_linear = declare("lora_linear", lora_linear_forward, lora_linear_forward, triton=False, fake=_fake,
                      setup_context=_setup_context, backward=_autograd_backward, examples=_forward_examples)
lora_linear_backward_op = declare("lora_linear_backward", lora_linear_backward, lora_linear_backward, triton=False,
                                  fake=_fake_backward, examples=_backward_examples)
