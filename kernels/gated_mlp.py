"""Gated MLP activation as one fused op: ``liger::gated_mlp`` and its backward ``liger::gated_mlp_backward``.

Math (g = gate, u = up, elementwise, all arithmetic in fp32, rounded once on store):
    silu:      a(g) = g * sigmoid(g)                               a'(g) = s * (1 + g * (1 - s)),  s = sigmoid(g)
    gelu_tanh: a(g) = 0.5 * g * (1 + tanh(z)) = g * sigmoid(2z),   z = sqrt(2/pi) * (g + 0.044715 * g^3)
               a'(g) = p + g * p * (1 - p) * 2 * sqrt(2/pi) * (1 + 3 * 0.044715 * g^2),   p = sigmoid(2z)
    y = a(g) * u
Backward (a(g) is recomputed from g, never saved):
    du = dy * a(g)
    dg = dy * u * a'(g)
Eager rounds a(g) to the input dtype before the multiply; we round once.

Kernels: when gate, up (and dy) are contiguous, a 1-D streaming kernel over the flattened elements
(BLOCK elements per program, 16-byte accesses). When gate and up are strided row views, e.g. the two halves
of Phi3's fused ``gate_up_proj`` output (``gate, up = gate_up.chunk(2, dim=-1)``), a 2-D [ROWS, BLOCK_C]
kernel with one row stride per tensor and unit column stride. Outputs are always contiguous.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import as_rows
from ._op import declare, sample

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
_SQRT_2_OVER_PI = 0.7978845608028654
_GELU_C = 0.044715


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    # g: fp32 -> (a(g), a'(g)). The forward kernels drop a'(g) unused and the compiler removes its math.
    # tanh(z) is written through sigmoid(2z): no libdevice, so it runs the same on CUDA and in the interpreter.
    if ACT == 0:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    else:
        g2 = g * g
        p = tl.sigmoid(2.0 * 0.7978845608028654 * g * (1.0 + 0.044715 * g2))  # sqrt(2/pi), GELU cubic coeff
        a = g * p
        da = p + g * p * (1.0 - p) * (2.0 * 0.7978845608028654) * (1.0 + 3.0 * 0.044715 * g2)
    return a, da


@triton.jit
def _gated_fwd_1d_kernel(G, U, Y, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    # Flat contiguous elements; the int64 start keeps pid * BLOCK safe past 2^31 while the lanes stay int32.
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = offs < n - start
    g = tl.load(G + start + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + start + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT)
    tl.store(Y + start + offs, (a * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_1d_kernel(DY, G, U, DG, DU, Y, n, ACT: tl.constexpr, BLOCK: tl.constexpr, STORE_Y: tl.constexpr):
    # STORE_Y also writes the forward's y = a(g) * u again (for a caller that did not keep it).
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = offs < n - start
    dy = tl.load(DY + start + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + start + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + start + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    tl.store(DU + start + offs, (dy * a).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + start + offs, (dy * u * da).to(DG.dtype.element_ty), mask=mask)
    if STORE_Y:
        tl.store(Y + start + offs, (a * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _tile(pid, n_rows, n_cols, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    # Program -> [ROWS, BLOCK_C] tile. Rows and column blocks share grid axis 0: axis 1 is capped at 65535.
    n_col_blocks = tl.cdiv(n_cols, BLOCK_C)
    rows = (pid // n_col_blocks) * ROWS + tl.arange(0, ROWS)
    cols = (pid % n_col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return rows.to(tl.int64)[:, None], cols[None, :], mask


@triton.jit
def _gated_fwd_2d_kernel(
    G, U, Y, g_row_stride, u_row_stride, n_rows, n_cols,
    ACT: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Y is contiguous [n_rows, n_cols]; G and U have unit column stride and their own row strides.
    rows, cols, mask = _tile(tl.program_id(0), n_rows, n_cols, ROWS, BLOCK_C)
    g = tl.load(G + rows * g_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * u_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT)
    tl.store(Y + rows * n_cols + cols, (a * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_2d_kernel(
    DY, G, U, DG, DU, Y, dy_row_stride, g_row_stride, u_row_stride, n_rows, n_cols,
    ACT: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, STORE_Y: tl.constexpr,
):
    rows, cols, mask = _tile(tl.program_id(0), n_rows, n_cols, ROWS, BLOCK_C)
    dy = tl.load(DY + rows * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows * g_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * u_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    tl.store(DU + rows * n_cols + cols, (dy * a).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + rows * n_cols + cols, (dy * u * da).to(DG.dtype.element_ty), mask=mask)
    if STORE_Y:
        tl.store(Y + rows * n_cols + cols, (a * u).to(Y.dtype.element_ty), mask=mask)


def config_1d() -> dict:
    """4096 elements over 256 threads: 16 per thread, i.e. two 16-byte accesses per tensor in bf16 (the tile's
    measurements: bench/results/kernel_notes.md)."""
    return dict(BLOCK=4096, num_warps=8)


def config_2d(n_cols: int) -> dict:
    """About 4096 elements per tile, whole rows when they are short."""
    block_c = min(4096, triton.next_power_of_2(n_cols))
    rows = max(1, min(64, 4096 // block_c))
    return dict(ROWS=rows, BLOCK_C=block_c, num_warps=8)


def _act_id(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"gated_mlp: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def _row_stride(t2: torch.Tensor) -> int:
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


def _check(gate, other, name="up"):
    if gate.shape != other.shape:
        raise ValueError(f"gated_mlp: gate {tuple(gate.shape)} and {name} {tuple(other.shape)} differ")


def launch_forward(gate, up, activation, config=None):
    """Runs the Triton forward on any device Triton can reach (CUDA, or CPU under TRITON_INTERPRET=1)."""
    _check(gate, up)
    act = _act_id(activation)
    y = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if y.numel() == 0:
        return y
    if gate.is_contiguous() and up.is_contiguous():
        n = y.numel()
        cfg = dict(config or config_1d())
        wrap_triton(_gated_fwd_1d_kernel)[(triton.cdiv(n, cfg["BLOCK"]),)](gate, up, y, n, ACT=act, **cfg)
        return y
    g2, u2 = as_rows(gate), as_rows(up)
    n_rows, n_cols = g2.shape
    cfg = dict(config or config_2d(n_cols))
    grid = (triton.cdiv(n_rows, cfg["ROWS"]) * triton.cdiv(n_cols, cfg["BLOCK_C"]),)
    wrap_triton(_gated_fwd_2d_kernel)[grid](
        g2, u2, y, _row_stride(g2), _row_stride(u2), n_rows, n_cols, ACT=act, **cfg,
    )
    return y


def launch_backward(dy, gate, up, activation, config=None, recompute_y=False, dy_is_scratch=False):
    """(d_gate, d_up), and with recompute_y also y = act(gate) * up again, from the same pass: (dg, du, y).
    dy_is_scratch: dy is the caller's own temporary, so y may be written over it (each element of dy is read
    before its y is stored), one [tokens, intermediate] buffer less at the backward's peak."""
    _check(gate, up)
    _check(gate, dy, "dy")
    act = _act_id(activation)
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    y_dtype = torch.promote_types(gate.dtype, up.dtype)
    if not recompute_y:
        y = dg  # the kernel never writes through it
    elif dy_is_scratch and dy.dtype == y_dtype and dy.is_contiguous():
        y = dy
    else:
        y = torch.empty(gate.shape, dtype=y_dtype, device=gate.device)
    outs = (dg, du, y) if recompute_y else (dg, du)
    if dg.numel() == 0:
        return outs
    if dy.is_contiguous() and gate.is_contiguous() and up.is_contiguous():
        n = dg.numel()
        cfg = dict(config or config_1d())
        wrap_triton(_gated_bwd_1d_kernel)[(triton.cdiv(n, cfg["BLOCK"]),)](
            dy, gate, up, dg, du, y, n, ACT=act, STORE_Y=recompute_y, **cfg)
        return outs
    dy2, g2, u2 = as_rows(dy), as_rows(gate), as_rows(up)
    n_rows, n_cols = g2.shape
    cfg = dict(config or config_2d(n_cols))
    grid = (triton.cdiv(n_rows, cfg["ROWS"]) * triton.cdiv(n_cols, cfg["BLOCK_C"]),)
    wrap_triton(_gated_bwd_2d_kernel)[grid](
        dy2, g2, u2, dg, du, y, _row_stride(dy2), _row_stride(g2), _row_stride(u2), n_rows, n_cols, ACT=act,
        STORE_Y=recompute_y, **cfg,
    )
    return outs


def _act_and_grad_torch(g: torch.Tensor, activation: str, with_grad: bool):
    """fp32 torch twin of _act_and_grad."""
    if activation == "silu":
        s = torch.sigmoid(g)
        return g * s, (s * (1 + g * (1 - s)) if with_grad else None)
    g2 = g * g
    p = torch.sigmoid(2 * _SQRT_2_OVER_PI * g * (1 + _GELU_C * g2))
    da = p + g * p * (1 - p) * (2 * _SQRT_2_OVER_PI) * (1 + 3 * _GELU_C * g2) if with_grad else None
    return g * p, da


def reference_forward(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """liger::gated_mlp in plain torch (the op off CUDA), the kernel's fp32 math rounded once: act(gate) * up,
    activation in {"silu", "gelu_tanh"}."""
    _check(gate, up)
    _act_id(activation)
    a, _ = _act_and_grad_torch(gate.float(), activation, False)
    return (a * up.float()).to(torch.promote_types(gate.dtype, up.dtype)).contiguous()


def reference_backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """liger::gated_mlp_backward in plain torch -> (d_gate, d_up); recomputes act(gate) rather than reading a saved
    copy."""
    _check(gate, up)
    _act_id(activation)
    a, da = _act_and_grad_torch(gate.float(), activation, True)
    dyf = dy.float()
    return (dyf * up.float() * da).to(gate.dtype).contiguous(), (dyf * a).to(up.dtype).contiguous()


def _setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dg, du = torch.ops.liger.gated_mlp_backward(dy, gate, up, ctx.activation)
    return dg, du, None


def _forward_examples(device, width):
    # contiguous gate and up (the 1-D kernels), and the two halves of a fused gate_up projection (the 2-D kernels)
    halves = sample(device, 6, 2 * width, seed=1).chunk(2, dim=-1)
    return [(sample(device, 6, width), sample(device, 6, width, seed=2), "silu"), (*halves, "gelu_tanh")]


def _backward_examples(device, width):
    return [(sample(device, *gate.shape, seed=3), gate, up, activation)
            for gate, up, activation in _forward_examples(device, width)]


gated_mlp = declare("gated_mlp", launch_forward, reference_forward, setup_context=_setup_context, backward=_backward,
                    examples=_forward_examples)
gated_mlp_backward = declare("gated_mlp_backward", launch_backward, reference_backward, examples=_backward_examples)
