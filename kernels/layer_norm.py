"""LayerNorm as one fused op: ``liger::layer_norm`` and its backward ``liger::layer_norm_backward``.

Math (x: [..., D]; w, b: [D], each optional; statistics and arithmetic in fp32):
    mean = mean(x),  rstd = 1 / sqrt(mean((x - mean)^2) + eps)      saved for backward, fp32 [...]
    n    = (x - mean) * rstd
    y    = (n * w + b).to(x.dtype)          w = 1 without a weight, b = 0 without a bias
Backward, with g = dy * w:
    dx = rstd * (g - mean(g) - n * mean(g * n))
    dw = sum over rows of dy * n,   db = sum over rows of dy

The output is in x's dtype whatever the weight's (F.layer_norm's rule: a bf16 input with fp32 parameters gives a
bf16 output). Backward saves x, w, mean and rstd only.

Forward: one pass, a [ROWS, BLOCK_N] tile per program holding whole rows (the variance is taken about the row's
mean, from registers, not as E[x^2] - mean^2). Backward: each program walks a contiguous block of ROWS_PER_PROGRAM
rows, ROWS at a time, writing dx and one fp32 partial row each of dw and db; the partials are summed afterwards.
The tiles follow liger::rms_norm's (kernels/rms_norm.py), whose row walk this is; they were not measured for this
kernel.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import as_rows
from ._op import declare, sample

MAX_FUSED_COLS = 65536  # one row must fit one program's tile


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, S, W, B, Y, MEAN, RSTD,
    x_row_stride, r_row_stride, y_row_stride, n_rows, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
):
    # X: [n_rows, n_cols] (row stride x_row_stride, unit column stride); W, B: [n_cols] (read only under their
    # flags); Y like X, row stride y_row_stride; MEAN, RSTD: [n_rows] fp32. HAS_RESIDUAL: the input is X + R (R
    # like X, row stride r_row_stride), rounded to X's dtype as eager's add rounds it, and written to S (Y's
    # strides) before it is normalised.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(R + rows64 * r_row_stride + cols[None, :], mask=mask,
                                         other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + rows64 * y_row_stride + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)  # zero past n_cols: the padding adds nothing to the variance
    # Inductor passes Python floats as fp64 scalars: pin eps to fp32 so the row math stays in fp32.
    rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + tl.cast(eps, tl.float32))
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64 * y_row_stride + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, W, MEAN, RSTD, DS, DX, DW_PARTIAL, DB_PARTIAL,
    dy_row_stride, x_row_stride, ds_row_stride, dx_row_stride, n_rows, n_cols,
    HAS_WEIGHT: tl.constexpr, HAS_DS: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
):
    # Program p owns rows [p * ROWS_PER_PROGRAM, (p + 1) * ROWS_PER_PROGRAM), walks them ROWS at a time, and writes
    # its fp32 partial dweight into DW_PARTIAL[p, :] (WEIGHT_GRAD) and partial dbias into DB_PARTIAL[p, :]
    # (BIAS_GRAD); the launcher sums them. DY, X, DX: [n_rows, n_cols], unit column stride; MEAN, RSTD: [n_rows].
    # HAS_DS: X was a residual sum whose own gradient DS (from its other uses) is added into DX in fp32.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_N], 1.0, tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * ROWS_PER_PROGRAM
    row_end = tl.minimum(row_start + ROWS_PER_PROGRAM, n_rows)
    for r in range(row_start, row_end, ROWS):
        rows = r + tl.arange(0, ROWS)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        n = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c_n = tl.sum(g * n, axis=1) / n_cols
        c_1 = tl.sum(g, axis=1) / n_cols
        dx = (g - c_1[:, None] - n * c_n[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows64 * ds_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * dx_row_stride + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if WEIGHT_GRAD:
            dw_acc += tl.sum(dy * n, axis=0)
        if BIAS_GRAD:
            db_acc += tl.sum(dy, axis=0)
    if WEIGHT_GRAD:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=col_mask)
    if BIAS_GRAD:
        tl.store(DB_PARTIAL + pid * n_cols + cols, db_acc, mask=col_mask)


# Tiles, as liger::rms_norm's fixed ones (kernels/rms_norm.py): a wide row (a model's hidden state) one row per
# program step with 8 warps; narrow rows (head dims: Phi's q/k norms) several rows per tile. No autotuning: a fixed
# tile spares a model's first step the kernel compiles and timings.
def _wide(n_cols: int) -> bool:
    return triton.next_power_of_2(n_cols) >= 1024


def fwd_config(n_cols: int) -> dict:
    return dict(ROWS=1, num_warps=8) if _wide(n_cols) else dict(ROWS=16, num_warps=4)


def bwd_config(n_cols: int, n_rows: int) -> dict:
    if _wide(n_cols):
        return dict(ROWS=1, num_warps=8, ROWS_PER_PROGRAM=64 if n_rows >= 16384 else 16)
    return dict(ROWS=16, num_warps=4, ROWS_PER_PROGRAM=256)


def launch_forward(x, weight, bias, eps, config=None, residual=None):
    """Runs the Triton forward on any device Triton can reach (CUDA, or CPU under TRITON_INTERPRET=1) ->
    (y, mean, rstd), and the sum x + residual fourth with a residual (kernels/add_layer_norm.py). `config` fixes
    the tile (ROWS, num_warps); without it, fwd_config()."""
    x2 = as_rows(x)
    r2 = as_rows(residual) if residual is not None else x2
    n_rows, n_cols = x2.shape
    # Outputs are allocated in their final shapes and written through row views: an op's output must not be a
    # view, or autograd forbids modifying it in place (which eager's output allows).
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    y2 = y.view(n_rows, n_cols)
    s = torch.empty_like(y) if residual is not None else None
    cfg = {k: v for k, v in (config or fwd_config(n_cols)).items() if k != "BLOCK_N"}
    wrap_triton(_layer_norm_fwd_kernel)[(triton.cdiv(n_rows, cfg["ROWS"]),)](
        x2, r2, s.view(n_rows, n_cols) if s is not None else y2,  # never read or written without the flag
        weight if weight is not None else x2, bias if bias is not None else x2,  # never read without the flags
        y2, mean.view(n_rows), rstd.view(n_rows), x2.stride(0), r2.stride(0), y2.stride(0), n_rows, n_cols, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_N=triton.next_power_of_2(n_cols), **cfg,
    )
    return (y, mean, rstd) if residual is None else (y, mean, rstd, s)


def launch_backward(dy, x, weight, mean, rstd, weight_grad, bias_dtype, config=None, d_sum=None):
    """-> (dx, dweight, dbias): dweight in weight's dtype when weight_grad, dbias in bias_dtype when it is given;
    each an empty tensor otherwise. d_sum: x was a residual sum with this gradient of its own, added into dx."""
    x2, dy2 = as_rows(x), as_rows(dy)
    ds2 = as_rows(d_sum) if d_sum is not None else dy2
    n_rows, n_cols = x2.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx2 = dx.view(n_rows, n_cols)
    cfg = {k: v for k, v in (config or bwd_config(n_cols, n_rows)).items() if k != "BLOCK_N"}
    programs = triton.cdiv(n_rows, cfg["ROWS_PER_PROGRAM"])
    want_dw, want_db = weight_grad and weight is not None, bias_dtype is not None
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device) if want_dw else None
    db_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device) if want_db else None
    wrap_triton(_layer_norm_bwd_kernel)[(programs,)](
        dy2, x2, weight if weight is not None else x2, mean.reshape(n_rows), rstd.reshape(n_rows), ds2, dx2,
        dw_partial if want_dw else dx2, db_partial if want_db else dx2,  # never written without the flags
        dy2.stride(0), x2.stride(0), ds2.stride(0), dx2.stride(0), n_rows, n_cols,
        HAS_WEIGHT=weight is not None, HAS_DS=d_sum is not None, WEIGHT_GRAD=want_dw, BIAS_GRAD=want_db,
        BLOCK_N=triton.next_power_of_2(n_cols), **cfg,
    )
    dw = dw_partial.sum(0).to(weight.dtype) if want_dw else x.new_empty(0)
    db = db_partial.sum(0).to(bias_dtype) if want_db else x.new_empty(0)
    return dx, dw, db


def reference_forward(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """liger::layer_norm in plain torch (the op off CUDA), the kernel's fp32 math -> (y, mean, rstd); mean and rstd
    are what backward needs."""
    xf = x.float()
    mean = xf.mean(-1)
    xc = xf - mean.unsqueeze(-1)
    rstd = torch.rsqrt(xc.pow(2).mean(-1) + eps)
    y = xc * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), mean, rstd


def reference_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
    weight_grad: bool, bias_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """liger::layer_norm_backward in plain torch -> (dx, dweight, dbias), as launch_backward's."""
    n = (x.float() - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    dyf = dy.float()
    g = dyf * weight.float() if weight is not None else dyf
    dx = (g - g.mean(-1, keepdim=True) - n * (g * n).mean(-1, keepdim=True)) * rstd.unsqueeze(-1)
    cols = x.shape[-1]
    dw = (dyf * n).reshape(-1, cols).sum(0).to(weight.dtype) if weight_grad and weight is not None else x.new_empty(0)
    db = dyf.reshape(-1, cols).sum(0).to(bias_dtype) if bias_dtype is not None else x.new_empty(0)
    return dx.to(x.dtype), dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    weight_grad = weight is not None and ctx.needs_input_grad[1]
    bias_dtype = ctx.bias_dtype if ctx.needs_input_grad[2] else None
    dx, dw, db = torch.ops.liger.layer_norm_backward(dy, x, weight, mean, rstd, weight_grad, bias_dtype)
    return dx, dw if weight_grad else None, db if bias_dtype is not None else None, None


def _forward_examples(device, width):
    x, w, b = sample(device, 17, width), sample(device, width, seed=1), sample(device, width, seed=2)
    return [(x, w, b, 1e-5), (x, None, None, 1e-5)]


def _backward_examples(device, width):
    calls = []
    for x, w, b, eps in _forward_examples(device, width):
        _, mean, rstd = reference_forward(x, w, b, eps)
        bias_dtype = b.dtype if b is not None else None
        calls.append((sample(device, 17, width, seed=3), x, w, mean, rstd, w is not None, bias_dtype))
    return calls


layer_norm = declare("layer_norm", launch_forward, reference_forward, setup_context=_setup_context,
                     backward=_backward, examples=_forward_examples)
layer_norm_backward = declare("layer_norm_backward", launch_backward, reference_backward, examples=_backward_examples)
