"""RMSNorm as one fused op: ``liger::rms_norm`` and its backward ``liger::rms_norm_backward``.

Math (x: [..., D], w: [D], all arithmetic in fp32):
    rstd = 1 / sqrt(mean(x^2) + eps)          saved for backward, fp32 [...]
    n    = x * rstd
    cast_before_weight=True  (Llama/Mistral/Qwen): y = (w + offset) * n.to(x.dtype)   -> dtype promote(x, w)
    cast_before_weight=False (Gemma, OLMo2):      y = (n * (w + offset)).to(x.dtype)
    weight None (Nanochat, Gemma 3n's v_norm):    y = n.to(x.dtype)   (no scale; no dweight)
    rstd_in_input_dtype (DeepSeek-V4's unweighted norm): n = x * rstd.to(x.dtype), the inverse RMS rounded first
liger::gated_rms_norm, gate before the norm (Mamba2): the row normalised is h = x * silu(gate) (fp32), then the Llama
form; gate after the norm (Kimi-Linear, Bailing-Hybrid, LaraMini): y = (n * w * act(gate)).to(x.dtype), fp32 throughout.
Backward, with g = dy * (w + offset):
    dx = rstd * (g - n * mean(g * n))         (+ g * (rstd' - rstd), rstd' the rounded rstd, when it is rounded)
    dw = sum over rows of dy * n'    (n' = n rounded to x.dtype in the Llama form, as eager does)

Forward: one pass, a [ROWS, BLOCK_N] tile per program. Backward: each program walks a contiguous block of
ROWS_PER_PROGRAM rows, writing dx and one fp32 partial dw row; the partials are summed afterwards. Wide rows take
a tile measured on the H200; narrow ones (head dims) are autotuned on CUDA.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import as_rows
from ._op import declare, sample

MAX_FUSED_COLS = 65536  # one row must fit one program's tile


# Row math shared with liger::add_rms_norm (kernels/add_rms_norm.py). Tiles are [ROWS, BLOCK_N] fp32, zero past
# n_cols (masked loads), so the padding adds nothing to the sums.
@triton.jit
def normalise(x, n_cols, eps):
    """-> (n = x * rstd, rstd), rstd = 1 / sqrt(mean(x^2) + eps) per row, fp32."""
    # Inductor passes Python floats as fp64 scalars: pin eps to fp32 so the row math stays in fp32.
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / n_cols + tl.cast(eps, tl.float32))
    return x * rstd[:, None], rstd


@triton.jit
def normalise_backward(x, dy, w, rstd, n_cols):
    """-> (dx, n): the gradient of y = n * w (n = x * rstd) with respect to x, given dy; w is the scale
    (weight + offset) as a [BLOCK_N] row. dx = rstd * (g - n * mean(g * n)) with g = dy * w, fp32."""
    n = x * rstd[:, None]
    g = dy * w[None, :]
    c = tl.sum(g * n, axis=1) / n_cols
    return (g - n * c[:, None]) * rstd[:, None], n


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD, RES, S,
    x_row_stride, y_row_stride, res_row_stride, s_row_stride, n_rows, n_cols, eps,
    OFFSET: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, ROUND_RSTD: tl.constexpr, GATE: tl.constexpr,
):
    # X: [n_rows, n_cols] (row stride x_row_stride, unit column stride); W: [n_cols]; Y like X; RSTD: [n_rows] fp32.
    # With HAS_RESIDUAL (liger::add_rms_norm), the row normalised is X + RES (RES like X), rounded once to X's dtype
    # as eager's add rounds it, and also stored into S (like X): the next residual. Without HAS_WEIGHT, W is never
    # read and the scale is 1. With ROUND_RSTD the row is scaled by rstd rounded to X's dtype (RSTD keeps fp32).
    # With GATE (liger::gated_rms_norm) RES holds the gate z instead: GATE_BEFORE_SILU normalises x * silu(z);
    # GATE_AFTER_SIGMOID / GATE_AFTER_SILU multiply the scaled row by sigmoid(z) / silu(z) before the cast.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(RES + rows64 * res_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)
        tl.store(S + rows64 * s_row_stride + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    if GATE == 1:
        z = tl.load(RES + rows64 * res_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = x * (z * tl.sigmoid(z))
    n, rstd = normalise(x, n_cols, eps)
    if ROUND_RSTD:
        n = x * rstd.to(X.dtype.element_ty).to(tl.float32)[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + OFFSET
        if CAST_BEFORE_WEIGHT:
            n = n.to(X.dtype.element_ty).to(tl.float32)
        y = n * w[None, :]
    else:
        y = n
    if GATE >= 2:
        z = tl.load(RES + rows64 * res_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if GATE == 2:
            y = y * tl.sigmoid(z)
        else:
            y = y * (z * tl.sigmoid(z))
    tl.store(Y + rows64 * y_row_stride + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _bwd_loads(X, DY, DS, r, row_end, cols, col_mask, x_row_stride, dy_row_stride, ds_row_stride,
               ROWS: tl.constexpr, HAS_DS: tl.constexpr):
    # Rows [r, r + ROWS) of x, dy (and of DS: a gradient, or the gate) as loaded (input dtype), zero past row_end.
    rows = r + tl.arange(0, ROWS)
    mask = (rows < row_end)[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * x_row_stride + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + rows64 * dy_row_stride + cols[None, :], mask=mask, other=0.0)
    ds = dy
    if HAS_DS:
        ds = tl.load(DS + rows64 * ds_row_stride + cols[None, :], mask=mask, other=0.0)
    return x, dy, ds


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL, DS, DG,
    dy_row_stride, x_row_stride, dx_row_stride, ds_row_stride, dg_row_stride, n_rows, n_cols,
    OFFSET: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr, HAS_DS: tl.constexpr, PREFETCH: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    ROUND_RSTD: tl.constexpr, GATE: tl.constexpr,
):
    # Program p owns rows [p * ROWS_PER_PROGRAM, (p + 1) * ROWS_PER_PROGRAM), walks them ROWS at a time, and writes
    # its fp32 partial dweight into DW_PARTIAL[p, :] (summed by the launcher). With HAS_DS, DS is a gradient that
    # reached the norm's input by another path (liger::add_rms_norm: the residual sum's later uses), added into dx.
    # With PREFETCH the next step's rows are loaded before this step's math, so each program has two steps' loads
    # in flight (a whole row per step takes most of a program's registers, which caps the programs per SM).
    # Without HAS_WEIGHT the scale is 1, W is never read and no partial dweight is written. With ROUND_RSTD (the
    # forward scaled x by rstd rounded to X's dtype) the direct term of dx takes the rounded rstd too. With GATE,
    # DS holds the gate z (read through the same prefetched loads) and its gradient is stored into DG. Before the
    # norm: h = x * silu(z) is recomputed, its gradient dh gives dx = dh * silu(z) and dz = dh * x * silu'(z). After
    # it: dz = dy * (n * w) * act'(z), and the norm's gradient is taken of dy * act(z).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + OFFSET
    else:
        w = tl.full([BLOCK_N], 1.0, tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * ROWS_PER_PROGRAM
    row_end = tl.minimum(row_start + ROWS_PER_PROGRAM, n_rows)
    if PREFETCH:
        x_next, dy_next, ds_next = _bwd_loads(X, DY, DS, row_start, row_end, cols, col_mask, x_row_stride,
                                              dy_row_stride, ds_row_stride, ROWS, HAS_DS or GATE != 0)
    for r in range(row_start, row_end, ROWS):
        if PREFETCH:
            x, dy, ds = x_next, dy_next, ds_next
            x_next, dy_next, ds_next = _bwd_loads(X, DY, DS, r + ROWS, row_end, cols, col_mask, x_row_stride,
                                                  dy_row_stride, ds_row_stride, ROWS, HAS_DS or GATE != 0)
        else:
            x, dy, ds = _bwd_loads(X, DY, DS, r, row_end, cols, col_mask, x_row_stride, dy_row_stride,
                                   ds_row_stride, ROWS, HAS_DS or GATE != 0)
        rows = r + tl.arange(0, ROWS)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        x = x.to(tl.float32)
        dy = dy.to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        rows64 = rows.to(tl.int64)[:, None]
        if GATE == 1:
            z = ds.to(tl.float32)
            sig = tl.sigmoid(z)
            act = z * sig
            dh, n = normalise_backward(x * act, dy, w, rstd, n_cols)
            dz = dh * x * (sig + act * (1.0 - sig))
            tl.store(DG + rows64 * dg_row_stride + cols[None, :], dz.to(DG.dtype.element_ty), mask=mask)
            dx = dh * act
        else:
            if GATE >= 2:
                z = ds.to(tl.float32)
                sig = tl.sigmoid(z)
                if GATE == 2:
                    act = sig
                    d_act = sig * (1.0 - sig)
                else:
                    act = z * sig
                    d_act = sig + act * (1.0 - sig)
                dz = dy * (x * rstd[:, None] * w[None, :]) * d_act
                tl.store(DG + rows64 * dg_row_stride + cols[None, :], dz.to(DG.dtype.element_ty), mask=mask)
                dy = dy * act  # dweight below reads the gated dy too
            dx, n = normalise_backward(x, dy, w, rstd, n_cols)
        if ROUND_RSTD:
            rounded = rstd.to(X.dtype.element_ty).to(tl.float32)
            dx += dy * w[None, :] * (rounded - rstd)[:, None]
            n = x * rounded[:, None]
        if HAS_DS:
            dx += ds.to(tl.float32)
        tl.store(DX + rows64 * dx_row_stride + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            if CAST_BEFORE_WEIGHT:
                n = n.to(X.dtype.element_ty).to(tl.float32)
            dw_acc += tl.sum(dy * n, axis=0)
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=col_mask)


# Tile shapes. A wide row (a model's hidden state) takes the first entry of its list: the H200 sweep
# (bench/sweep_rms_norm.py, bench/results/sweep_rms_norm.log) found it best or within 2% of the best, and a fixed
# tile spares every model's first step the autotuning (a dozen kernel compiles and timings). A narrow row (a head
# dimension: Qwen3/OLMo2 q/k norms) is autotuned among its list on CUDA. The interpreter takes the first entries.
def _wide(n_cols: int) -> bool:
    return triton.next_power_of_2(n_cols) >= 1024


FWD_WIDE = [dict(ROWS=1, num_warps=8)]
FWD_NARROW = [dict(ROWS=r, num_warps=w) for r, w in ((16, 4), (8, 4), (32, 4), (16, 8), (32, 8), (64, 8))]
# Every config of a row width walks the same rows per program, so every config writes every row of the partial
# dweight buffer (autotuning runs several configs on one buffer: a config writing fewer rows would leave stale ones).
# Wide rows: the next step's rows loaded ahead (PREFETCH), 8 warps, 64 rows per program once there are many rows.
# H200, CUDA-graph replay (bench/sweep_rms_norm.py, bench/results/sweep_rms_norm.log), x[16384, D] bf16, ms:
#                        D=4096 bwd   D=4096 bwd+ds   D=2048 bwd   D=2048 bwd+ds
#   no prefetch (before)   0.134         0.193           0.098        0.127
#   prefetch, 1 row/step   0.119         0.173           0.081        0.088
#   prefetch, 2 rows/step  0.127         0.149           0.069        0.083
# so one row per step for a plain norm of 4096+ columns, two otherwise (bwd+ds: liger::add_rms_norm's backward).
BWD_WIDE = [dict(ROWS=2, num_warps=8, PREFETCH=True)]
BWD_NARROW = [dict(ROWS=r, num_warps=w, PREFETCH=False) for r, w in ((16, 4), (32, 4), (8, 2), (32, 8), (64, 8))]
ROWS_PER_PROGRAM = {True: 16, False: 256}
MANY_ROWS, ROWS_PER_PROGRAM_MANY = 16384, 64  # chosen by measurement: bench/results/kernel_notes.md


def rows_per_program(n_rows: int, wide: bool) -> int:
    return ROWS_PER_PROGRAM_MANY if wide and n_rows >= MANY_ROWS else ROWS_PER_PROGRAM[wide]


def _configs(entries):
    return [triton.Config({k: v for k, v in e.items() if k != "num_warps"}, num_warps=e["num_warps"]) for e in entries]


_fwd_tuned = {False: triton.autotune(_configs(FWD_NARROW),
                                     key=["n_cols", "HAS_RESIDUAL", "HAS_WEIGHT", "ROUND_RSTD", "GATE"])(
    _rms_norm_fwd_kernel)}
_bwd_tuned = {False: triton.autotune(_configs(BWD_NARROW), key=["n_cols", "HAS_WEIGHT", "ROUND_RSTD", "GATE"])(
    _rms_norm_bwd_kernel)}


def fwd_config(n_cols: int) -> dict:
    return dict((FWD_WIDE if _wide(n_cols) else FWD_NARROW)[0])


def bwd_config(n_cols: int, has_ds: bool = False) -> dict:
    cfg = dict((BWD_WIDE if _wide(n_cols) else BWD_NARROW)[0])
    if _wide(n_cols) and n_cols >= 4096 and not has_ds:
        cfg["ROWS"] = 1
    return cfg


def out_dtype(x: torch.Tensor, weight: Optional[torch.Tensor], cast_before_weight: bool) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype) if cast_before_weight and weight is not None else x.dtype


# liger::gated_rms_norm's forms (the kernels' GATE): (activation, gate applied after the norm) -> mode
GATE_BEFORE_SILU, GATE_AFTER_SIGMOID, GATE_AFTER_SILU = 1, 2, 3
GATE_FORMS = {("silu", False): GATE_BEFORE_SILU, ("sigmoid", True): GATE_AFTER_SIGMOID, ("silu", True): GATE_AFTER_SILU}


def launch_forward(x, weight, eps, offset, cast_before_weight, rstd_in_input_dtype=False, config=None, residual=None,
                   gate=None, gate_form=GATE_BEFORE_SILU):
    """Runs the Triton forward on any device Triton can reach (CUDA, or CPU under TRITON_INTERPRET=1) -> (y, rstd),
    or with `residual` -> (y, rstd, x + residual) (liger::add_rms_norm); with `gate`, gated as `gate_form` says
    (liger::gated_rms_norm). `config` fixes the tile shape; without it CUDA autotunes narrow rows and
    everything else takes fwd_config()."""
    x2 = as_rows(x)
    n_rows, n_cols = x2.shape
    # Outputs are allocated in their final shapes and written through row views: an op's output must not be a
    # view, or autograd forbids modifying it in place (which eager's output allows).
    y = torch.empty(x.shape, dtype=out_dtype(x, weight, cast_before_weight), device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    second = residual if residual is not None else gate
    r2 = as_rows(second) if second is not None else x2  # never read without HAS_RESIDUAL or GATE
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else x
    y2, s2 = y.view(n_rows, n_cols), s.view(n_rows, n_cols) if residual is not None else x2
    args = (x2, weight if weight is not None else x2, y2, rstd.view(n_rows), r2, s2, x2.stride(0), y2.stride(0),
            r2.stride(0), s2.stride(0), n_rows, n_cols, eps)
    consts = dict(OFFSET=float(offset), CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK_N=triton.next_power_of_2(n_cols),
                  HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, ROUND_RSTD=rstd_in_input_dtype,
                  GATE=gate_form if gate is not None else 0)
    if config is None and x.device.type == "cuda" and not _wide(n_cols):
        wrap_triton(_fwd_tuned[False])[lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),)](*args, **consts)
    else:
        cfg = dict(config or fwd_config(n_cols))
        cfg.pop("BLOCK_N", None)
        wrap_triton(_rms_norm_fwd_kernel)[(triton.cdiv(n_rows, cfg["ROWS"]),)](*args, **consts, **cfg)
    return (y, rstd) if residual is None else (y, rstd, s)


def launch_backward(dy, x, weight, rstd, offset, cast_before_weight, rstd_in_input_dtype=False, config=None,
                    d_sum=None, gate=None, gate_form=GATE_BEFORE_SILU):
    """-> (dx, dweight), or with `gate` (liger::gated_rms_norm) -> (dx, dweight, dgate). d_sum, when given, is
    another gradient of x, added into dx in the same pass. Without a weight, dweight is an empty tensor (an op's
    outputs cannot be None)."""
    x2, dy2 = as_rows(x), as_rows(dy)
    third = d_sum if d_sum is not None else gate
    ds2 = as_rows(third) if third is not None else dy2  # never read without HAS_DS or GATE
    n_rows, n_cols = x2.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=x.device) if gate is not None else None
    dg2 = dgate.view(n_rows, n_cols) if gate is not None else dx.view(n_rows, n_cols)  # written only with GATE
    wide = _wide(n_cols)
    rpp = (config or {}).get("ROWS_PER_PROGRAM", rows_per_program(n_rows, wide))
    n_programs = triton.cdiv(n_rows, rpp)
    has_weight = weight is not None
    dw_partial = torch.empty((n_programs, n_cols) if has_weight else (0,), dtype=torch.float32, device=x.device)
    consts = dict(OFFSET=float(offset), CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK_N=triton.next_power_of_2(n_cols),
                  ROWS_PER_PROGRAM=rpp, HAS_DS=d_sum is not None, HAS_WEIGHT=has_weight,
                  ROUND_RSTD=rstd_in_input_dtype, GATE=gate_form if gate is not None else 0)
    if config is None and x.device.type == "cuda" and not wide:
        kernel, cfg = _bwd_tuned[False], {}  # its configs carry ROWS, PREFETCH and num_warps
    else:
        kernel = _rms_norm_bwd_kernel
        cfg = {k: v for k, v in (config or bwd_config(n_cols, d_sum is not None)).items()
               if k not in ("BLOCK_N", "ROWS_PER_PROGRAM")}
        cfg.setdefault("PREFETCH", False)  # every constexpr is passed: Inductor's kernel wrapper ignores defaults
    wrap_triton(kernel)[(n_programs,)](
        dy2, x2, weight if has_weight else x2, rstd, dx, dw_partial, ds2, dg2, dy2.stride(0), x2.stride(0), n_cols,
        ds2.stride(0), dg2.stride(0), n_rows, n_cols, **consts, **cfg,
    )
    dw = dw_partial.sum(0).to(weight.dtype) if has_weight else dw_partial
    return (dx, dw) if gate is None else (dx, dw, dgate)


def reference_forward(
    x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float, cast_before_weight: bool,
    rstd_in_input_dtype: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """liger::rms_norm in plain torch (the op off CUDA), the kernel's fp32 math -> (y, rstd); rstd is what backward
    needs."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    n = xf * (rstd.to(x.dtype).float() if rstd_in_input_dtype else rstd).unsqueeze(-1)
    if weight is None:
        return n.to(x.dtype), rstd
    w = weight + offset if offset else weight
    if cast_before_weight:
        y = w * n.to(x.dtype)
    else:
        y = (n * w.float()).to(x.dtype)
    return y.to(out_dtype(x, weight, cast_before_weight)), rstd


def reference_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor, offset: float,
    cast_before_weight: bool, rstd_in_input_dtype: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """liger::rms_norm_backward in plain torch -> (dx, dweight); without a weight, dweight is empty."""
    xf = x.float()
    n = xf * rstd.unsqueeze(-1)
    g = dy.float() * (weight.float() + offset) if weight is not None else dy.float()
    dx = (g - n * (g * n).mean(-1, keepdim=True)) * rstd.unsqueeze(-1)
    if rstd_in_input_dtype:
        rounded = rstd.to(x.dtype).float()
        dx = dx + g * (rounded - rstd).unsqueeze(-1)
        n = xf * rounded.unsqueeze(-1)
    if weight is None:
        return dx.to(x.dtype), x.new_empty((0,), dtype=torch.float32)
    if cast_before_weight:
        n = n.to(x.dtype).float()
    dw = (dy.float() * n).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


def _setup_context(ctx, inputs, output):
    x, weight, _eps, offset, cast_before_weight, rstd_in_input_dtype = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.offset, ctx.cast_before_weight, ctx.rstd_in_input_dtype = offset, cast_before_weight, rstd_in_input_dtype


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.liger.rms_norm_backward(dy, x, weight, rstd, ctx.offset, ctx.cast_before_weight,
                                               ctx.rstd_in_input_dtype)
    return dx, (dw if weight is not None else None), None, None, None, None


def _forward_examples(device, width):
    x = sample(device, 17, width)
    return [(x, sample(device, width, seed=1), 1e-6, 0.0, True, False), (x, None, 1e-6, 0.0, False, False),
            (x.to(torch.bfloat16), None, 1e-6, 0.0, False, True)]


def _backward_examples(device, width):
    dy = sample(device, 17, width, seed=2)
    return [(dy.to(x.dtype), x, w, reference_forward(x, w, eps, offset, cast_before, rounded)[1], offset, cast_before,
             rounded) for x, w, eps, offset, cast_before, rounded in _forward_examples(device, width)]


rms_norm = declare("rms_norm", launch_forward, reference_forward, setup_context=_setup_context, backward=_backward,
                   examples=_forward_examples)
rms_norm_backward = declare("rms_norm_backward", launch_backward, reference_backward, examples=_backward_examples)


# --- liger::gated_rms_norm: an RMSNorm with a gate, before it (Mamba2) or after it (Kimi-Linear, Bailing-Hybrid) ---
def gated_launch_forward(x, gate, weight, eps, activation="silu", after=False, config=None):
    """Triton forward (CUDA, or CPU under TRITON_INTERPRET=1) -> (y, rstd); rstd is that of the row normalised."""
    return launch_forward(x, weight, eps, 0.0, not after, config=config, gate=gate,
                          gate_form=GATE_FORMS[activation, after])


def gated_launch_backward(dy, x, gate, weight, rstd, activation="silu", after=False, config=None):
    """-> (dx, dgate, dweight)."""
    dx, dw, dgate = launch_backward(dy, x, weight, rstd, 0.0, not after, config=config, gate=gate,
                                    gate_form=GATE_FORMS[activation, after])
    return dx, dgate, dw


def _activation(z: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (act(z), act'(z)) in fp32."""
    sig = torch.sigmoid(z)
    if activation == "sigmoid":
        return sig, sig * (1 - sig)
    act = z * sig
    return act, sig + act * (1 - sig)


def gated_reference_forward(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, activation: str = "silu",
    after: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """liger::gated_rms_norm in plain torch (the op off CUDA) -> (y, rstd). Gate before the norm (Mamba2, silu):
    the Llama form on h = x * silu(gate) in fp32. After it: (n * w * act(gate)).to(x.dtype), all in fp32."""
    if (activation, after) not in GATE_FORMS:
        raise ValueError(f"gated_rms_norm: no {activation} gate {'after' if after else 'before'} the norm")
    act = _activation(gate.float(), activation)[0]
    h = x.float() if after else x.float() * act
    rstd = torch.rsqrt(h.pow(2).mean(-1) + eps)
    n = h * rstd.unsqueeze(-1)
    if after:
        return (n * weight.float() * act).to(x.dtype), rstd
    return weight * n.to(x.dtype), rstd


def gated_reference_backward(
    dy: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    activation: str = "silu", after: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """liger::gated_rms_norm_backward in plain torch -> (dx, dgate, dweight)."""
    act, d_act = _activation(gate.float(), activation)
    dyf = dy.float()
    if after:
        n = x.float() * rstd.unsqueeze(-1)
        dz = dyf * n * weight.float() * d_act
        dyf = dyf * act
        n_w = n  # dweight reads the fp32 normalised row
    else:
        n = x.float() * act * rstd.unsqueeze(-1)  # the normalised h
        n_w = n.to(x.dtype).float()
    g = dyf * weight.float()
    dh = (g - n * (g * n).mean(-1, keepdim=True)) * rstd.unsqueeze(-1)
    dw = (dyf * n_w).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    if after:
        return dh.to(x.dtype), dz.to(gate.dtype), dw
    dz = dh * x.float() * d_act
    return (dh * act).to(x.dtype), dz.to(gate.dtype), dw


def _gated_setup_context(ctx, inputs, output):
    x, gate, weight, _eps, activation, after = inputs
    ctx.save_for_backward(x, gate, weight, output[1])
    ctx.activation, ctx.after = activation, after


def _gated_backward(ctx, dy, _drstd):
    x, gate, weight, rstd = ctx.saved_tensors
    dx, dgate, dw = torch.ops.liger.gated_rms_norm_backward(dy, x, gate, weight, rstd, ctx.activation, ctx.after)
    return dx, dgate, dw, None, None, None


def _gated_forward_examples(device, width):
    x, gate, w = sample(device, 17, width), sample(device, 17, width, seed=3), sample(device, width, seed=1)
    return [(x, gate, w, 1e-6, activation, after) for activation, after in GATE_FORMS]


def _gated_backward_examples(device, width):
    dy = sample(device, 17, width, seed=2)
    return [(dy, x, gate, w, gated_reference_forward(x, gate, w, eps, activation, after)[1], activation, after)
            for x, gate, w, eps, activation, after in _gated_forward_examples(device, width)]


gated_rms_norm = declare("gated_rms_norm", gated_launch_forward, gated_reference_forward,
                         setup_context=_gated_setup_context, backward=_gated_backward,
                         examples=_gated_forward_examples)
gated_rms_norm_backward = declare("gated_rms_norm_backward", gated_launch_backward, gated_reference_backward,
                                  examples=_gated_backward_examples)
