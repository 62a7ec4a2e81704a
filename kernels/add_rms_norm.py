"""The residual add feeding an RMSNorm, as one op: ``liger::add_rms_norm`` and ``liger::add_rms_norm_backward``.

A decoder layer writes ``h = residual + branch_out`` and then ``norm(h)``, and keeps ``h``: it is the next residual.
Fused, one pass reads the two addends and writes both the sum and the normalised value, instead of writing the sum
and reading it back; backward adds the sum's own gradient (from its later uses) into the norm's input gradient in
the same pass.

Math (x, residual: [..., D] same dtype, w: [D] or None, as liger::rms_norm's):
    s    = x + residual                 rounded to the input dtype, as eager's add rounds it
    y, rstd = rms_norm(s)               exactly liger::rms_norm's forward (kernels/rms_norm.py), on the rounded s
Backward, given dy and ds (the gradient of s from its other uses; None when it has none):
    dx = d_residual = rms_norm's input gradient (fp32) + ds,  rounded once to the input dtype
    dw = sum over rows of dy * n'     (as rms_norm's)
Both passes are kernels/rms_norm.py's kernels under a flag (forward HAS_RESIDUAL, backward HAS_DS), with its tiles
(one more read and write per element each way): y and dw equal rms_norm's on the rounded sum.
"""
from typing import Optional

import torch

from . import rms_norm
from ._op import declare, sample


def _check(x, residual):
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} "
                         f"{residual.dtype} must have one shape and dtype (broadcasting is left to Inductor)")


def launch_forward(x, residual, weight, eps, offset, cast_before_weight, config=None):
    """Triton forward on any device Triton can reach (CUDA, or CPU under TRITON_INTERPRET=1) -> (s, y, rstd)."""
    _check(x, residual)
    y, rstd, s = rms_norm.launch_forward(x, weight, eps, offset, cast_before_weight, config=config, residual=residual)
    return s, y, rstd


def launch_backward(dy, d_sum, s, weight, rstd, offset, cast_before_weight, config=None):
    """-> (dx, dweight); dx is the gradient of both addends. d_sum may be None (the sum has no other use)."""
    return rms_norm.launch_backward(dy, s, weight, rstd, offset, cast_before_weight, config=config, d_sum=d_sum)


def reference_forward(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float,
    cast_before_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """liger::add_rms_norm in plain torch (the op off CUDA): eager's add, then rms_norm's torch path. Returns
    (x + residual, rms_norm(x + residual), rstd); weight (None: no scale), offset and cast_before_weight as
    liger::rms_norm's."""
    _check(x, residual)
    s = x + residual
    y, rstd = rms_norm.reference_forward(s, weight, eps, offset, cast_before_weight)
    return s, y, rstd


def reference_backward(
    dy: torch.Tensor, d_sum: Optional[torch.Tensor], s: torch.Tensor, weight: Optional[torch.Tensor],
    rstd: torch.Tensor,
    offset: float, cast_before_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """liger::add_rms_norm_backward in plain torch -> (dx, dweight); dx is the gradient of both addends."""
    dx, dw = rms_norm.reference_backward(dy, s, weight, rstd, offset, cast_before_weight)
    return (dx if d_sum is None else dx + d_sum), dw  # as eager accumulates the sum's two gradients


def _setup_context(ctx, inputs, output):
    _x, _residual, weight, _eps, offset, cast_before_weight = inputs
    s, _y, rstd = output
    ctx.save_for_backward(s, weight, rstd)  # s is kept anyway: it is the next residual
    ctx.offset, ctx.cast_before_weight = offset, cast_before_weight
    ctx.set_materialize_grads(False)  # a sum with no other use has no gradient: no zeros to read


def _backward(ctx, d_sum, dy, _drstd):
    s, weight, rstd = ctx.saved_tensors
    if dy is None and d_sum is None:
        return None, None, None, None, None, None
    if dy is None:  # the normalised value is unused: rare enough to spend a zeros tensor on
        dy = torch.zeros(s.shape, dtype=rms_norm.out_dtype(s, weight, ctx.cast_before_weight), device=s.device)
    dx, dw = torch.ops.liger.add_rms_norm_backward(dy, d_sum, s, weight, rstd, ctx.offset, ctx.cast_before_weight)
    need = ctx.needs_input_grad
    dw = dw if need[2] and weight is not None else None
    return (dx if need[0] else None), (dx if need[1] else None), dw, None, None, None


def _forward_examples(device, width):
    x, residual, w = sample(device, 17, width), sample(device, 17, width, seed=1), sample(device, width, seed=2)
    return [(x, residual, w, 1e-6, 0.0, True), (x, residual, None, 1e-6, 0.0, False)]


def _backward_examples(device, width):
    (x, residual, w, eps, offset, cast_before_weight), weightless = _forward_examples(device, width)
    s, _y, rstd = reference_forward(x, residual, w, eps, offset, cast_before_weight)
    dy, d_sum = sample(device, 17, width, seed=3), sample(device, 17, width, seed=4)
    return [(dy, d_sum, s, w, rstd, offset, cast_before_weight), (dy, None, s, w, rstd, offset, cast_before_weight),
            (dy, d_sum, s, None, rstd, *weightless[4:])]


add_rms_norm = declare("add_rms_norm", launch_forward, reference_forward, setup_context=_setup_context,
                       backward=_backward, examples=_forward_examples)
add_rms_norm_backward = declare("add_rms_norm_backward", launch_backward, reference_backward,
                                examples=_backward_examples)
