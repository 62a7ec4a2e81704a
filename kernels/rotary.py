"""Rotary position embedding on q and k in one launch: ``liger::rotary`` and ``liger::rotary_backward``.

Math (HF ``apply_rotary_pos_emb``), x in {q, k}, D even, h = D / 2, c = cos, s = sin broadcast over heads:
    rotate_half(x) = cat(-x[..., h:], x[..., :h])
    out            = x * c + rotate_half(x) * s
i.e. per half, with x1 = x[..., :h], x2 = x[..., h:] (same split for c and s):
    out1 = x1 * c1 - x2 * s1
    out2 = x2 * c2 + x1 * s2
Eager rounds each product and the sum to the input dtype; we compute in fp32 and round once.

Backward: the map is linear in x, so dx = dout * c + rotate_half^T(dout * s) with
rotate_half^T(y) = cat(y[..., h:], -y[..., :h]):
    dx1 = d1 * c1 + d2 * s2
    dx2 = d2 * c2 - d1 * s1
which is the forward with (s1, s2) replaced by (-s2, -s1). In HF s1 == s2 (sin = cat(freqs, freqs).sin()),
so this is "the forward with sin negated"; swapping the halves as well keeps it exact for any sin.
No gradient flows to cos/sin (they are functions of the position ids): backward returns None for them.

Layouts (unsqueeze_dim picks where the head axis sits; cos/sin are [B or 1, T, D] in both):
    unsqueeze_dim=1: q [B, Hq, T, D], k [B, Hk, T, D]
    unsqueeze_dim=2: q [B, T, Hq, D], k [B, T, Hk, D]
q/k may have any strides (HF makes them as ``linear(x).view(B, T, H, D).transpose(1, 2)``); the outputs are
contiguous in the same logical shape. A cos/sin batch of 1 is broadcast through a batch stride of 0; a batch
of B gives each row its own positions (packed sequences).

Kernel: one program per (b, t). It loads c and s for that position once, then walks the heads of q and then
of k in [BLOCK_H, BLOCK_HALF] tiles, so every q/k element is read once and written once.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._op import declare, sample


@triton.jit
def _rotate_heads(
    X, Y, x_base, y_base, n_heads, x_head_stride, x_d_stride, y_head_stride,
    c1, c2, s1, s2, half,
    X_UNIT_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # Rotates all n_heads heads at one (b, t): X + x_base is head 0's first element, Y likewise (unit d stride).
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < half
    # The usual unit d stride must be a constexpr: multiplied in as a runtime int (even of value 1) it left
    # the compiler unable to prove contiguity, and the kernel ran ~4x slower on the H200 (no 16-byte loads).
    if X_UNIT_D:
        x_d1 = d
        x_d2 = d + half
    else:
        x_d1 = d.to(tl.int64) * x_d_stride
        x_d2 = (d + half).to(tl.int64) * x_d_stride
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < n_heads)[:, None] & d_mask[None, :]
        heads64 = heads.to(tl.int64)[:, None]
        x_row = X + x_base + heads64 * x_head_stride
        x1 = tl.load(x_row + x_d1[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + x_d2[None, :], mask=mask, other=0.0).to(tl.float32)
        out1 = x1 * c1[None, :] - x2 * s1[None, :]
        out2 = x2 * c2[None, :] + x1 * s2[None, :]
        y_row = Y + y_base + heads64 * y_head_stride
        tl.store(y_row + d[None, :], out1.to(Y.dtype.element_ty), mask=mask)
        tl.store(y_row + half + d[None, :], out2.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, COS, SIN, QO, KO,
    n_t, half, n_q_heads, n_k_heads,
    q_sb, q_st, q_sh, q_sd,
    k_sb, k_st, k_sh, k_sd,
    qo_sb, qo_st, qo_sh,
    ko_sb, ko_st, ko_sh,
    cos_sb, cos_st, cos_sd,
    sin_sb, sin_st, sin_sd,
    BACKWARD: tl.constexpr, Q_UNIT_D: tl.constexpr, K_UNIT_D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # Strides are given per logical axis (b, t, head, d) whatever the layout; outputs have unit d stride.
    # All offsets are int64: b * q_sb alone passes 2^31 for long, wide batches.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_t
    t = pid % n_t
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < half
    d64 = d.to(tl.int64)
    cos_row = COS + b * cos_sb + t * cos_st
    sin_row = SIN + b * sin_sb + t * sin_st
    c1 = tl.load(cos_row + d64 * cos_sd, mask=d_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + (d64 + half) * cos_sd, mask=d_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + d64 * sin_sd, mask=d_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + (d64 + half) * sin_sd, mask=d_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # The transpose of the rotation: same formula with (s1, s2) -> (-s2, -s1) (see the module docstring).
        s1, s2 = -s2, -s1
    _rotate_heads(Q, QO, b * q_sb + t * q_st, b * qo_sb + t * qo_st, n_q_heads, q_sh, q_sd, qo_sh,
                  c1, c2, s1, s2, half, Q_UNIT_D, BLOCK_H, BLOCK_HALF)
    _rotate_heads(K, KO, b * k_sb + t * k_st, b * ko_sb + t * ko_st, n_k_heads, k_sh, k_sd, ko_sh,
                  c1, c2, s1, s2, half, K_UNIT_D, BLOCK_H, BLOCK_HALF)


def kernel_config(head_dim: int, n_heads: int) -> dict:
    """Tile shape: a [BLOCK_H, BLOCK_HALF] tile of each half per loop step, about 2K elements in all (the tile's
    measurements: bench/results/kernel_notes.md)."""
    block_half = triton.next_power_of_2(head_dim // 2)
    block_h = max(1, min(triton.next_power_of_2(n_heads), 1024 // block_half))
    num_warps = max(1, min(8, block_h * block_half // 256))
    return dict(BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps)


def _head_axis(unsqueeze_dim: int) -> int:
    """Where the head axis of q/k sits: cos.unsqueeze(unsqueeze_dim) puts its size-1 axis there."""
    dim = unsqueeze_dim + 4 if unsqueeze_dim < 0 else unsqueeze_dim  # as unsqueeze on a 3-D cos counts it
    if dim not in (1, 2):
        raise ValueError(
            f"rotary: unsqueeze_dim must be 1 or 2 (head axis of [B, H, T, D] / [B, T, H, D]), got {unsqueeze_dim}"
        )
    return dim


def _bthd_strides(x: torch.Tensor, head_axis: int) -> tuple[int, int, int, int]:
    """x's strides in (b, t, head, d) order."""
    sb, s1, s2, sd = x.stride()
    return (sb, s2, s1, sd) if head_axis == 1 else (sb, s1, s2, sd)


def _check(q, k, cos, sin, head_axis):
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.dim() != 3:
        raise ValueError("rotary: q, k must be 4-D and cos, sin 3-D [B or 1, T, D]")
    t_axis = 3 - head_axis
    B, T, D = q.shape[0], q.shape[t_axis], q.shape[3]
    if D % 2:
        raise ValueError(f"rotary: head dim must be even, got {D}")
    if k.shape[0] != B or k.shape[t_axis] != T or k.shape[3] != D:
        raise ValueError(f"rotary: q {tuple(q.shape)} and k {tuple(k.shape)} disagree outside the head axis")
    for name, c in (("cos", cos), ("sin", sin)):
        if c.shape[0] not in (1, B) or c.shape[1] != T or c.shape[2] != D:
            raise ValueError(f"rotary: {name} {tuple(c.shape)} is not [1 or {B}, {T}, {D}]")


def _out_dtype(x, cos, sin) -> torch.dtype:
    # What eager's x * cos + rotate_half(x) * sin promotes to (HF casts cos/sin to x's dtype: then x's).
    return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)


def launch(q, k, cos, sin, unsqueeze_dim, backward=False, config=None):
    """Runs the Triton kernel on any device Triton can reach (CUDA, or CPU under TRITON_INTERPRET=1).

    backward=True applies the transposed rotation (q, k are then the output gradients).
    """
    head_axis = _head_axis(unsqueeze_dim)
    _check(q, k, cos, sin, head_axis)
    B, T, D = q.shape[0], q.shape[3 - head_axis], q.shape[3]
    n_q_heads, n_k_heads = q.shape[head_axis], k.shape[head_axis]
    qo = torch.empty(q.shape, dtype=_out_dtype(q, cos, sin), device=q.device)
    ko = torch.empty(k.shape, dtype=_out_dtype(k, cos, sin), device=k.device)
    if qo.numel() == 0 and ko.numel() == 0:
        return qo, ko
    q_s, k_s = _bthd_strides(q, head_axis), _bthd_strides(k, head_axis)
    qo_s, ko_s = _bthd_strides(qo, head_axis)[:3], _bthd_strides(ko, head_axis)[:3]
    # A batch of 1 broadcasts over b: stride 0 reads row 0 for every b.
    cos_s = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), cos.stride(2))
    sin_s = (sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1), sin.stride(2))
    cfg = dict(config or kernel_config(D, max(n_q_heads, n_k_heads)))
    wrap_triton(_rotary_kernel)[(B * T,)](
        q, k, cos, sin, qo, ko,
        T, D // 2, n_q_heads, n_k_heads,
        *q_s, *k_s, *qo_s, *ko_s, *cos_s, *sin_s,
        BACKWARD=backward, Q_UNIT_D=q_s[3] == 1, K_UNIT_D=k_s[3] == 1, **cfg,
    )
    return qo, ko


def launch_backward(dq_out, dk_out, cos, sin, unsqueeze_dim, config=None):
    """(dq, dk) from the output gradients: the transposed rotation, by the same kernel."""
    return launch(dq_out, dk_out, cos, sin, unsqueeze_dim, backward=True, config=config)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rotate_half_t(y):
    h = y.shape[-1] // 2
    return torch.cat((y[..., h:], -y[..., :h]), dim=-1)


def reference(q, k, cos, sin, unsqueeze_dim, backward=False):
    """Plain torch, used off CUDA: the HF formula in fp32, rounded once (backward: its transpose)."""
    head_axis = _head_axis(unsqueeze_dim)
    _check(q, k, cos, sin, head_axis)
    c = cos.float().unsqueeze(head_axis)
    s = sin.float().unsqueeze(head_axis)
    outs = []
    for x in (q, k):
        xf = x.float()
        y = xf * c + _rotate_half_t(xf * s) if backward else xf * c + _rotate_half(xf) * s
        outs.append(y.to(_out_dtype(x, cos, sin)).contiguous())  # same layout as the kernel's outputs
    return outs[0], outs[1]


def reference_forward(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """liger::rotary: HF apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim) -> (q_embed, k_embed); no gradient to
    cos/sin."""
    return reference(q, k, cos, sin, unsqueeze_dim)


def reference_backward(
    dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """liger::rotary_backward: (dq, dk) from the output gradients, the transposed rotation."""
    return reference(dq_out, dk_out, cos, sin, unsqueeze_dim, backward=True)


def _setup_context(ctx, inputs, output):
    _q, _k, cos, sin, unsqueeze_dim = inputs
    ctx.save_for_backward(cos, sin)
    ctx.unsqueeze_dim = unsqueeze_dim


def _backward(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    dq, dk = torch.ops.liger.rotary_backward(dq_out, dk_out, cos, sin, ctx.unsqueeze_dim)
    return dq, dk, None, None, None


def _examples(device, width):
    # q/k [2, H, 5, 8] (heads on axis 1); the row width does not apply
    q, k = sample(device, 2, 4, 5, 8), sample(device, 2, 2, 5, 8, seed=1)
    return [(q, k, sample(device, 1, 5, 8, seed=2), sample(device, 1, 5, 8, seed=3), 1)]


rotary = declare("rotary", launch, reference_forward, setup_context=_setup_context, backward=_backward,
                 examples=_examples)
rotary_backward = declare("rotary_backward", launch_backward, reference_backward, examples=_examples)
