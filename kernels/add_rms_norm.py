"""The residual add feeding an RMSNorm, as one op: ``liger::add_rms_norm`` and ``liger::add_rms_norm_backward``.

A decoder layer writes ``h = residual + branch_out`` and then ``norm(h)``, and keeps ``h``: it is the next residual.
Fused, one pass reads the two addends and writes both the sum and the normalised value, instead of writing the sum
and reading it back; backward adds the sum's own gradient (from its later uses) into the norm's input gradient in
the same pass.

Math (x, residual: [..., D] same dtype, w: [D]):
    s    = x + residual                 rounded to the input dtype, as eager's add rounds it
    y, rstd = rms_norm(s)               exactly liger::rms_norm's forward (kernels/rms_norm.py), on the rounded s
Backward, given dy and ds (the gradient of s from its other uses; None when it has none):
    dx = d_residual = rms_norm's input gradient (fp32) + ds,  rounded once to the input dtype
    dw = sum over rows of dy * n'     (as rms_norm's)
The row math is kernels/rms_norm.py's (`normalise`; backward is its kernel given ds): y and dw equal rms_norm's.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import rms_norm as R
from ._common import use_triton
from .rms_norm import normalise


@triton.jit
def _add_rms_norm_fwd_kernel(
    X, RES, S, W, Y, RSTD,
    x_row_stride, res_row_stride, s_row_stride, y_row_stride, n_rows, n_cols, eps,
    OFFSET: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    # X, RES: [n_rows, n_cols] (own row strides, unit column stride); S like X in X's dtype; W: [n_cols];
    # Y: [n_rows, n_cols]; RSTD: [n_rows] fp32
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.load(RES + rows64 * res_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(S.dtype.element_ty)  # one rounding, as eager's add
    tl.store(S + rows64 * s_row_stride + cols[None, :], s, mask=mask)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + OFFSET
    n, rstd = normalise(s.to(tl.float32), n_cols, eps)
    if CAST_BEFORE_WEIGHT:
        n = n.to(S.dtype.element_ty).to(tl.float32)
    y = n * w[None, :]
    tl.store(Y + rows64 * y_row_stride + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


# Tiles: rms_norm's (same rows, same passes, one more read and write per element): a fixed one for hidden-size
# rows, autotuned among the same list for narrow rows on CUDA. Backward is rms_norm's kernel, given d_sum.
_fwd_tuned = triton.autotune(R._configs(R.FWD_NARROW), key=["n_cols"])(_add_rms_norm_fwd_kernel)


def _check(x, residual):
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} {x.dtype} and residual {tuple(residual.shape)} "
                         f"{residual.dtype} must have one shape and dtype (broadcasting is left to Inductor)")


def launch_forward(x, residual, weight, eps, offset, cast_before_weight, config=None):
    """Triton forward on any device Triton can reach (CUDA, or CPU under TRITON_INTERPRET=1) -> (s, y, rstd).
    `config` fixes the tile shape; without it CUDA autotunes narrow rows and everything else takes rms_norm's."""
    x2, r2 = R._as_rows(x), R._as_rows(residual)
    n_rows, n_cols = x2.shape
    s = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    y = torch.empty((n_rows, n_cols), dtype=R.out_dtype(x, weight, cast_before_weight), device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    args = (x2, r2, s, weight, y, rstd, x2.stride(0), r2.stride(0), s.stride(0), y.stride(0), n_rows, n_cols, eps)
    consts = dict(OFFSET=float(offset), CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK_N=triton.next_power_of_2(n_cols))
    if config is None and x.device.type == "cuda" and not R._wide(n_cols):
        wrap_triton(_fwd_tuned)[lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),)](*args, **consts)
    else:
        cfg = {k: v for k, v in (config or R.fwd_config(n_cols)).items() if k != "BLOCK_N"}
        wrap_triton(_add_rms_norm_fwd_kernel)[(triton.cdiv(n_rows, cfg["ROWS"]),)](*args, **consts, **cfg)
    return s.view(x.shape), y.view(x.shape), rstd.view(x.shape[:-1])


def launch_backward(dy, d_sum, s, weight, rstd, offset, cast_before_weight, config=None):
    """-> (dx, dweight); dx is the gradient of both addends. d_sum may be None (the sum has no other use)."""
    return R.launch_backward(dy, s, weight, rstd, offset, cast_before_weight, config=config, d_sum=d_sum)


def reference_forward(x, residual, weight, eps, offset, cast_before_weight):
    """Plain torch, used off CUDA: eager's add, then rms_norm's torch path."""
    s = x + residual
    y, rstd = R.reference_forward(s, weight, eps, offset, cast_before_weight)
    return s, y, rstd


def reference_backward(dy, d_sum, s, weight, rstd, offset, cast_before_weight):
    dx, dw = R.reference_backward(dy, s, weight, rstd, offset, cast_before_weight)
    return (dx if d_sum is None else dx + d_sum), dw  # as eager accumulates the sum's two gradients


@triton_op("liger::add_rms_norm", mutates_args=())
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
    cast_before_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (x + residual, rms_norm(x + residual), rstd); offset and cast_before_weight as liger::rms_norm's."""
    _check(x, residual)
    if use_triton(x):
        return launch_forward(x, residual, weight, eps, offset, cast_before_weight)
    return reference_forward(x, residual, weight, eps, offset, cast_before_weight)


@triton_op("liger::add_rms_norm_backward", mutates_args=())
def add_rms_norm_backward(
    dy: torch.Tensor, d_sum: Optional[torch.Tensor], s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    offset: float, cast_before_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(s):
        return launch_backward(dy, d_sum, s, weight, rstd, offset, cast_before_weight)
    return reference_backward(dy, d_sum, s, weight, rstd, offset, cast_before_weight)


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
        dy = torch.zeros(s.shape, dtype=R.out_dtype(s, weight, ctx.cast_before_weight), device=s.device)
    dx, dw = torch.ops.liger.add_rms_norm_backward(dy, d_sum, s, weight, rstd, ctx.offset, ctx.cast_before_weight)
    need = ctx.needs_input_grad
    return (dx if need[0] else None), (dx if need[1] else None), (dw if need[2] else None), None, None, None


add_rms_norm.register_autograd(_backward, setup_context=_setup_context)
