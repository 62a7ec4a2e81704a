"""Rotary position embedding: ``liger::rotary`` (q and k in one launch), ``liger::rotary_one`` (one tensor), and
their ``*_backward`` ops.

Math, x in {q, k}, c = cos, s = sin broadcast over heads. The rotated channels of a head (all D of them, or a
slice of R: ``rotary_start``, ``rotary_dim``) form R/2 pairs (a_i, b_i), each rotated by its angle:
    out_a = a * c1 - b * s1
    out_b = b * c2 + a * s2
Channels outside the slice are copied. ``pairs`` says where a pair's two channels sit, in x and in the output:
    "halves"                 a_i = x[i], b_i = x[i + R/2], written back there (HF's rotate_half:
                             x * c + cat(-x[..., h:], x[..., :h]) * s)
    "interleaved"            a_i = x[2i], b_i = x[2i + 1], written back there (GPT-J's rotate_every_two, GLM,
                             Cohere: x * c + stack(-x[..., 1::2], x[..., ::2]).flatten(-2) * s)
    "interleaved_to_halves"  read as "interleaved", written as "halves" (DeepSeek's apply_rotary_pos_emb_interleave:
                             cat(x1 * c - x2 * s, x2 * c + x1 * s) with x1, x2 = x[..., ::2], x[..., 1::2])
cos/sin are [B or 1, T, W] tables. W == R: one entry per channel, laid out as the pairs are ("halves": c1 = cos[i],
c2 = cos[i + R/2]; "interleaved": cos[2i], cos[2i + 1]). W == R/2: one angle per pair, c1 = c2 = cos[i] (what HF
builds with ``cos[..., :R/2].repeat_interleave(2)``, or passes as is). Eager rounds each product and the sum to the
input dtype; we compute in fp32 and round once.

Backward: the map is linear in x, and its transpose is the same rotation with (s1, s2) -> (-s2, -s1), reading the
gradient in the output's layout and writing dx in the input's (exact for any table; in HF s1 == s2, so this is
"the forward with sin negated"). Copied channels pass their gradient through. No gradient flows to cos/sin (they
are functions of the position ids): backward returns None for them.

Layouts (unsqueeze_dim picks where the head axis sits):
    unsqueeze_dim=1: q [B, Hq, T, D], k [B, Hk, T, D]
    unsqueeze_dim=2: q [B, T, Hq, D], k [B, T, Hk, D]
q/k may have any strides (HF makes them as ``linear(x).view(B, T, H, D).transpose(1, 2)``, or slices of a wider
head); the outputs are contiguous in the same logical shape. A cos/sin batch of 1 is broadcast through a batch
stride of 0; a batch of B gives each row its own positions (packed sequences). Tables may have any strides.

Kernel: one program per (b, t). It loads the angles for that position once, then walks the heads of q and then
of k in [BLOCK_H, BLOCK_HALF] tiles of pairs (and [BLOCK_H, BLOCK_PASS] tiles of copied channels), so every q/k
element is read once and written once.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._op import declare, sample

PAIRS = ("halves", "interleaved", "interleaved_to_halves")


@triton.jit
def _rotate_heads(
    X, Y, x_base, y_base, x_pass, y_pass, n_heads, x_head_stride, x_d_stride, y_head_stride,
    c1, c2, s1, s2, n_pairs, n_pass,
    X_UNIT_D: tl.constexpr, IN_INTERLEAVED: tl.constexpr, OUT_INTERLEAVED: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    # Rotates all n_heads heads at one (b, t): X + x_base is head 0's first rotated element, X + x_pass its first
    # copied one; Y likewise (unit d stride).
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < n_pairs
    if IN_INTERLEAVED:
        a_d = 2 * d
        b_d = 2 * d + 1
    else:
        a_d = d
        b_d = d + n_pairs
    # The usual unit d stride must be a constexpr: multiplied in as a runtime int (even of value 1) it left
    # the compiler unable to prove contiguity, and the kernel ran ~4x slower on the H200 (no 16-byte loads).
    if X_UNIT_D:
        x_a = a_d
        x_b = b_d
    else:
        x_a = a_d.to(tl.int64) * x_d_stride
        x_b = b_d.to(tl.int64) * x_d_stride
    if OUT_INTERLEAVED:
        y_a = 2 * d
        y_b = 2 * d + 1
    else:
        y_a = d
        y_b = d + n_pairs
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        h_mask = (heads < n_heads)[:, None]
        mask = h_mask & d_mask[None, :]
        heads64 = heads.to(tl.int64)[:, None]
        x_row = X + x_base + heads64 * x_head_stride
        a = tl.load(x_row + x_a[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(x_row + x_b[None, :], mask=mask, other=0.0).to(tl.float32)
        out_a = a * c1[None, :] - b * s1[None, :]
        out_b = b * c2[None, :] + a * s2[None, :]
        y_row = Y + y_base + heads64 * y_head_stride
        tl.store(y_row + y_a[None, :], out_a.to(Y.dtype.element_ty), mask=mask)
        tl.store(y_row + y_b[None, :], out_b.to(Y.dtype.element_ty), mask=mask)
        if BLOCK_PASS > 0:
            p = tl.arange(0, BLOCK_PASS)
            p_mask = h_mask & (p < n_pass)[None, :]
            if X_UNIT_D:
                x_p = p
            else:
                x_p = p.to(tl.int64) * x_d_stride
            v = tl.load(X + x_pass + heads64 * x_head_stride + x_p[None, :], mask=p_mask, other=0.0)
            tl.store(Y + y_pass + heads64 * y_head_stride + p[None, :], v.to(Y.dtype.element_ty), mask=p_mask)


@triton.jit
def _rotary_kernel(
    Q, K, COS, SIN, QO, KO,
    n_t, n_pairs, n_q_heads, n_k_heads, rot_start, pass_start, n_pass, c_step, c_off,
    q_sb, q_st, q_sh, q_sd,
    k_sb, k_st, k_sh, k_sd,
    qo_sb, qo_st, qo_sh,
    ko_sb, ko_st, ko_sh,
    cos_sb, cos_st, cos_sd,
    sin_sb, sin_st, sin_sd,
    BACKWARD: tl.constexpr, HAS_K: tl.constexpr, Q_UNIT_D: tl.constexpr, K_UNIT_D: tl.constexpr,
    IN_INTERLEAVED: tl.constexpr, OUT_INTERLEAVED: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    # Strides are given per logical axis (b, t, head, d) whatever the layout; outputs have unit d stride.
    # Pair i's angles are table entries i * c_step and i * c_step + c_off (see the module docstring).
    # All offsets are int64: b * q_sb alone passes 2^31 for long, wide batches.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_t
    t = pid % n_t
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < n_pairs
    c_d1 = d.to(tl.int64) * c_step
    c_d2 = c_d1 + c_off
    cos_row = COS + b * cos_sb + t * cos_st
    sin_row = SIN + b * sin_sb + t * sin_st
    c1 = tl.load(cos_row + c_d1 * cos_sd, mask=d_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + c_d2 * cos_sd, mask=d_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + c_d1 * sin_sd, mask=d_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + c_d2 * sin_sd, mask=d_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # The transpose of the rotation: same formula with (s1, s2) -> (-s2, -s1) (see the module docstring).
        s1, s2 = -s2, -s1
    q_row, qo_row = b * q_sb + t * q_st, b * qo_sb + t * qo_st
    _rotate_heads(Q, QO, q_row + rot_start * q_sd, qo_row + rot_start, q_row + pass_start * q_sd, qo_row + pass_start,
                  n_q_heads, q_sh, q_sd, qo_sh, c1, c2, s1, s2, n_pairs, n_pass,
                  Q_UNIT_D, IN_INTERLEAVED, OUT_INTERLEAVED, BLOCK_H, BLOCK_HALF, BLOCK_PASS)
    if HAS_K:
        k_row, ko_row = b * k_sb + t * k_st, b * ko_sb + t * ko_st
        _rotate_heads(K, KO, k_row + rot_start * k_sd, ko_row + rot_start, k_row + pass_start * k_sd,
                      ko_row + pass_start, n_k_heads, k_sh, k_sd, ko_sh, c1, c2, s1, s2, n_pairs, n_pass,
                      K_UNIT_D, IN_INTERLEAVED, OUT_INTERLEAVED, BLOCK_H, BLOCK_HALF, BLOCK_PASS)


def kernel_config(head_dim: int, n_heads: int, n_pass: int = 0) -> dict:
    """Tile shape: a [BLOCK_H, BLOCK_HALF] tile of each half per loop step, about 2K elements in all (the tile's
    measurements: bench/results/kernel_notes.md); copied channels in [BLOCK_H, BLOCK_PASS] tiles."""
    block_half = triton.next_power_of_2(head_dim // 2)
    block_pass = triton.next_power_of_2(n_pass) if n_pass else 0
    block_h = max(1, min(triton.next_power_of_2(n_heads), 1024 // max(block_half, block_pass // 2)))
    num_warps = max(1, min(8, block_h * block_half // 256))
    return dict(BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_PASS=block_pass, num_warps=num_warps)


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


def _layouts(pairs: str, backward: bool) -> tuple[bool, bool]:
    """(input interleaved, output interleaved); the backward reads the output's layout and writes the input's."""
    forward = {"halves": (False, False), "interleaved": (True, True), "interleaved_to_halves": (True, False)}[pairs]
    return forward[::-1] if backward else forward


def _check(q, k, cos, sin, head_axis, pairs, rotary_start, rotary_dim) -> tuple[int, int, bool]:
    """(start, width R of the rotated slice, tables with one angle per pair) after checking every argument."""
    if pairs not in PAIRS:
        raise ValueError(f"rotary: pairs must be one of {PAIRS}, got {pairs!r}")
    if q.dim() != 4 or (k is not None and k.dim() != 4) or cos.dim() != 3 or sin.dim() != 3:
        raise ValueError("rotary: q, k must be 4-D and cos, sin 3-D [B or 1, T, W]")
    t_axis = 3 - head_axis
    B, T, D = q.shape[0], q.shape[t_axis], q.shape[3]
    r = rotary_dim or D
    if r % 2 or not 0 < r <= D or rotary_start not in (0, D - r):
        raise ValueError(f"rotary: rotates channels [{rotary_start}, {rotary_start + r}) of {D}: the width must be "
                         "even and the slice must start or end the head")
    if k is not None and (k.shape[0] != B or k.shape[t_axis] != T or k.shape[3] != D):
        raise ValueError(f"rotary: q {tuple(q.shape)} and k {tuple(k.shape)} disagree outside the head axis")
    W = cos.shape[2]
    for name, c in (("cos", cos), ("sin", sin)):
        if c.shape[0] not in (1, B) or c.shape[1] != T or c.shape[2] not in (r, r // 2) or c.shape[2] != W:
            raise ValueError(f"rotary: {name} {tuple(c.shape)} is not [1 or {B}, {T}, {r} or {r // 2}]")
    shared = W == r // 2
    if pairs == "interleaved_to_halves" and not shared:
        raise ValueError("rotary: pairs='interleaved_to_halves' takes one angle per pair (cos/sin of width R/2)")
    return rotary_start, r, shared


def _out_dtype(x, cos, sin) -> torch.dtype:
    # What eager's x * cos + rotate_half(x) * sin promotes to (HF casts cos/sin to x's dtype: then x's).
    return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)


def launch(q, k, cos, sin, unsqueeze_dim, pairs="halves", rotary_start=0, rotary_dim=0, backward=False,
           config=None):
    """Runs the Triton kernel on any device Triton can reach (CUDA, or CPU under TRITON_INTERPRET=1); k may be None
    (one tensor: the second output is None).

    backward=True applies the transposed rotation (q, k are then the output gradients).
    """
    head_axis = _head_axis(unsqueeze_dim)
    start, r, shared = _check(q, k, cos, sin, head_axis, pairs, rotary_start, rotary_dim)
    B, T, D = q.shape[0], q.shape[3 - head_axis], q.shape[3]
    n_q_heads = q.shape[head_axis]
    n_k_heads = k.shape[head_axis] if k is not None else 0
    qo = torch.empty(q.shape, dtype=_out_dtype(q, cos, sin), device=q.device)
    ko = torch.empty(k.shape, dtype=_out_dtype(k, cos, sin), device=k.device) if k is not None else None
    if qo.numel() == 0 and (ko is None or ko.numel() == 0):
        return qo, ko
    has_k = ko is not None and ko.numel() > 0
    k_, ko_ = (k, ko) if has_k else (q, qo)  # no k: q stands in for the unused pointers and strides
    q_s, k_s = _bthd_strides(q, head_axis), _bthd_strides(k_, head_axis)
    qo_s, ko_s = _bthd_strides(qo, head_axis)[:3], _bthd_strides(ko_, head_axis)[:3]
    # A batch of 1 broadcasts over b: stride 0 reads row 0 for every b.
    cos_s = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), cos.stride(2))
    sin_s = (sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1), sin.stride(2))
    c_step, c_off = (1, 0) if shared else (2, 1) if pairs == "interleaved" else (1, r // 2)
    n_pass = D - r
    pass_start = r if start == 0 else 0
    in_il, out_il = _layouts(pairs, backward)
    cfg = dict(config or kernel_config(r, max(n_q_heads, n_k_heads), n_pass))
    cfg.setdefault("BLOCK_PASS", triton.next_power_of_2(n_pass) if n_pass else 0)
    wrap_triton(_rotary_kernel)[(B * T,)](
        q, k_, cos, sin, qo, ko_,
        T, r // 2, n_q_heads, n_k_heads, start, pass_start, n_pass, c_step, c_off,
        *q_s, *k_s, *qo_s, *ko_s, *cos_s, *sin_s,
        BACKWARD=backward, HAS_K=has_k, Q_UNIT_D=q_s[3] == 1, K_UNIT_D=k_s[3] == 1,
        IN_INTERLEAVED=in_il, OUT_INTERLEAVED=out_il, **cfg,
    )
    return qo, ko


def launch_backward(dq_out, dk_out, cos, sin, unsqueeze_dim, pairs="halves", rotary_start=0, rotary_dim=0,
                    config=None):
    """(dq, dk) from the output gradients: the transposed rotation, by the same kernel."""
    return launch(dq_out, dk_out, cos, sin, unsqueeze_dim, pairs, rotary_start, rotary_dim, backward=True,
                  config=config)


def launch_one(x, cos, sin, unsqueeze_dim, pairs="halves", rotary_start=0, rotary_dim=0):
    return launch(x, None, cos, sin, unsqueeze_dim, pairs, rotary_start, rotary_dim)[0]


def launch_one_backward(dx_out, cos, sin, unsqueeze_dim, pairs="halves", rotary_start=0, rotary_dim=0):
    return launch(dx_out, None, cos, sin, unsqueeze_dim, pairs, rotary_start, rotary_dim, backward=True)[0]


def _split(x, interleaved):
    h = x.shape[-1] // 2
    return (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :h], x[..., h:])


def _join(a, b, interleaved):
    return torch.stack((a, b), dim=-1).flatten(-2) if interleaved else torch.cat((a, b), dim=-1)


def reference(q, k, cos, sin, unsqueeze_dim, pairs="halves", rotary_start=0, rotary_dim=0, backward=False):
    """Plain torch, used off CUDA: the rotation in fp32, rounded once (backward: its transpose); k may be None."""
    head_axis = _head_axis(unsqueeze_dim)
    start, r, shared = _check(q, k, cos, sin, head_axis, pairs, rotary_start, rotary_dim)
    c = cos.float().unsqueeze(head_axis)
    s = sin.float().unsqueeze(head_axis)
    if shared:
        c1 = c2 = c
        s1 = s2 = s
    else:
        (c1, c2), (s1, s2) = _split(c, pairs == "interleaved"), _split(s, pairs == "interleaved")
    if backward:
        s1, s2 = -s2, -s1
    in_il, out_il = _layouts(pairs, backward)
    outs = []
    for x in (q, k):
        if x is None:
            outs.append(None)
            continue
        xf = x.float()
        a, b = _split(xf[..., start:start + r], in_il)
        y = _join(a * c1 - b * s1, b * c2 + a * s2, out_il)
        y = torch.cat((xf[..., :start], y, xf[..., start + r:]), dim=-1)
        outs.append(y.to(_out_dtype(x, cos, sin)).contiguous())  # same layout as the kernel's outputs
    return outs[0], outs[1]


def reference_forward(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int,
    pairs: str = "halves", rotary_start: int = 0, rotary_dim: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """liger::rotary: q and k rotated (pairs: "halves", "interleaved" or "interleaved_to_halves"; channels
    [rotary_start, rotary_start + rotary_dim) rotated, the rest copied; rotary_dim 0: all) -> (q_embed, k_embed);
    no gradient to cos/sin."""
    return reference(q, k, cos, sin, unsqueeze_dim, pairs, rotary_start, rotary_dim)


def reference_backward(
    dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int,
    pairs: str = "halves", rotary_start: int = 0, rotary_dim: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """liger::rotary_backward: (dq, dk) from the output gradients, the transposed rotation."""
    return reference(dq_out, dk_out, cos, sin, unsqueeze_dim, pairs, rotary_start, rotary_dim, backward=True)


def reference_one(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int,
    pairs: str = "halves", rotary_start: int = 0, rotary_dim: int = 0,
) -> torch.Tensor:
    """liger::rotary_one: liger::rotary for one tensor (a model that rotates q and uses it before computing k)."""
    return reference(x, None, cos, sin, unsqueeze_dim, pairs, rotary_start, rotary_dim)[0]


def reference_one_backward(
    dx_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int,
    pairs: str = "halves", rotary_start: int = 0, rotary_dim: int = 0,
) -> torch.Tensor:
    """liger::rotary_one_backward: dx from the output gradient, the transposed rotation."""
    return reference(dx_out, None, cos, sin, unsqueeze_dim, pairs, rotary_start, rotary_dim, backward=True)[0]


def _setup_context(ctx, inputs, output):
    cos, sin = inputs[2:4]
    ctx.save_for_backward(cos, sin)
    ctx.rest = inputs[4:]  # unsqueeze_dim, pairs, rotary_start, rotary_dim


def _backward(ctx, dq_out, dk_out):
    cos, sin = ctx.saved_tensors
    dq, dk = torch.ops.liger.rotary_backward(dq_out, dk_out, cos, sin, *ctx.rest)
    return (dq, dk) + (None,) * 6


def _setup_context_one(ctx, inputs, output):
    cos, sin = inputs[1:3]
    ctx.save_for_backward(cos, sin)
    ctx.rest = inputs[3:]


def _backward_one(ctx, dx_out):
    cos, sin = ctx.saved_tensors
    return (torch.ops.liger.rotary_one_backward(dx_out, cos, sin, *ctx.rest),) + (None,) * 6


def _examples(device, width):
    # q/k [2, H, 5, 8] (heads on axis 1); the row width does not apply. Llama's form, then an interleaved rotation
    # of the first 4 channels with one angle per pair, then DeepSeek's interleaved-to-halves on q/k [2, 5, H, 8].
    q, k = sample(device, 2, 4, 5, 8), sample(device, 2, 2, 5, 8, seed=1)
    table = lambda w, seed: sample(device, 1, 5, w, seed=seed)  # noqa: E731
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    return [(q, k, table(8, 2), table(8, 3), 1),
            (q, k, table(2, 2), table(2, 3), 1, "interleaved", 0, 4),
            (qt, kt, table(4, 2), table(4, 3), 2, "interleaved_to_halves")]


def _examples_one(device, width):
    x = sample(device, 2, 5, 3, 8)
    return [(x, sample(device, 2, 5, 8, seed=1), sample(device, 2, 5, 8, seed=2), 2),
            (x, sample(device, 1, 5, 3, seed=1), sample(device, 1, 5, 3, seed=2), 2, "interleaved", 2, 6)]


rotary = declare("rotary", launch, reference_forward, setup_context=_setup_context, backward=_backward,
                 examples=_examples)
rotary_backward = declare("rotary_backward", launch_backward, reference_backward, examples=_examples)
rotary_one = declare("rotary_one", launch_one, reference_one, setup_context=_setup_context_one,
                     backward=_backward_one, examples=_examples_one)
rotary_one_backward = declare("rotary_one_backward", launch_one_backward, reference_one_backward,
                              examples=_examples_one)
