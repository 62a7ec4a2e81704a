"""The residual add feeding a LayerNorm, as one op: ``liger::add_layer_norm`` and ``liger::add_layer_norm_backward``.

GPT-2, OPT, BLOOM, StarCoder2 and other pre-norm LayerNorm decoders write ``h = residual + branch_out`` and then
``norm(h)``, keeping ``h`` as the next residual. Fused, one pass reads both addends and writes the sum and the
normalised value, instead of an add that writes the sum and a norm that reads it back; backward adds the sum's own
gradient (from its later uses) into the norm's input gradient in the same pass.

Math (x, residual: [..., D], one dtype; w, b: [D], each optional):
    s = x + residual                     rounded to the input dtype, as eager's add rounds it
    y, mean, rstd = layer_norm(s)        exactly liger::layer_norm's forward (kernels/layer_norm.py), on that s
Backward, given dy and ds (the gradient of s from its other uses; None when it has none):
    dx = d_residual = layer_norm's input gradient (fp32) + ds,  rounded once to the input dtype
    dw, db as layer_norm's
Both passes are kernels/layer_norm.py's kernels under a flag (forward HAS_RESIDUAL, backward HAS_DS).
"""
from typing import Optional

import torch

from . import layer_norm
from ._op import declare, sample


def _check(x, residual):
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"add_layer_norm: x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} "
                         f"{residual.dtype} must have one shape and dtype (broadcasting is left to Inductor)")


def launch_forward(x, residual, weight, bias, eps, config=None):
    """Triton forward on any device Triton can reach (CUDA, or CPU under TRITON_INTERPRET=1) -> (s, y, mean,
    rstd)."""
    _check(x, residual)
    y, mean, rstd, s = layer_norm.launch_forward(x, weight, bias, eps, config=config, residual=residual)
    return s, y, mean, rstd


def launch_backward(dy, d_sum, s, weight, mean, rstd, weight_grad, bias_dtype, config=None):
    """-> (dx, dweight, dbias); dx is the gradient of both addends. d_sum may be None (the sum has no other use)."""
    return layer_norm.launch_backward(dy, s, weight, mean, rstd, weight_grad, bias_dtype, config=config, d_sum=d_sum)


def reference_forward(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """liger::add_layer_norm in plain torch (the op off CUDA): eager's add, then layer_norm's torch path. Returns
    (x + residual, layer_norm(x + residual), mean, rstd)."""
    _check(x, residual)
    s = x + residual
    y, mean, rstd = layer_norm.reference_forward(s, weight, bias, eps)
    return s, y, mean, rstd


def reference_backward(
    dy: torch.Tensor, d_sum: Optional[torch.Tensor], s: torch.Tensor, weight: Optional[torch.Tensor],
    mean: torch.Tensor, rstd: torch.Tensor, weight_grad: bool, bias_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """liger::add_layer_norm_backward in plain torch -> (dx, dweight, dbias); dx is the gradient of both addends,
    the sum's own gradient added in fp32 before the one rounding (as the kernel does)."""
    n = (s.float() - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    dyf = dy.float()
    g = dyf * weight.float() if weight is not None else dyf
    dx = (g - g.mean(-1, keepdim=True) - n * (g * n).mean(-1, keepdim=True)) * rstd.unsqueeze(-1)
    if d_sum is not None:
        dx = dx + d_sum.float()
    _dx, dw, db = layer_norm.reference_backward(dy, s, weight, mean, rstd, weight_grad, bias_dtype)
    return dx.to(s.dtype), dw, db


def _setup_context(ctx, inputs, output):
    _x, _residual, weight, bias, _eps = inputs
    s, _y, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)  # s is kept anyway: it is the next residual
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.set_materialize_grads(False)  # a sum with no other use has no gradient: no zeros to read


def _backward(ctx, d_sum, dy, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    if dy is None and d_sum is None:
        return None, None, None, None, None
    if dy is None:  # the normalised value is unused: rare enough to spend a zeros tensor on
        dy = torch.zeros_like(s)
    need = ctx.needs_input_grad
    weight_grad = weight is not None and need[2]
    bias_dtype = ctx.bias_dtype if need[3] else None
    dx, dw, db = torch.ops.liger.add_layer_norm_backward(dy, d_sum, s, weight, mean, rstd, weight_grad, bias_dtype)
    return (dx if need[0] else None), (dx if need[1] else None), (dw if weight_grad else None), \
        (db if bias_dtype is not None else None), None


def _forward_examples(device, width):
    x, residual = sample(device, 17, width), sample(device, 17, width, seed=1)
    w, b = sample(device, width, seed=2), sample(device, width, seed=3)
    return [(x, residual, w, b, 1e-5), (x, residual, None, None, 1e-5)]


def _backward_examples(device, width):
    calls = []
    for x, residual, w, b, eps in _forward_examples(device, width):
        s, _y, mean, rstd = reference_forward(x, residual, w, b, eps)
        dy, d_sum = sample(device, 17, width, seed=4), sample(device, 17, width, seed=5)
        bias_dtype = b.dtype if b is not None else None
        calls += [(dy, d_sum, s, w, mean, rstd, w is not None, bias_dtype), (dy, None, s, w, mean, rstd, False, None)]
    return calls


add_layer_norm = declare("add_layer_norm", launch_forward, reference_forward, setup_context=_setup_context,
                         backward=_backward, examples=_forward_examples)
add_layer_norm_backward = declare("add_layer_norm_backward", launch_backward, reference_backward,
                                  examples=_backward_examples)
