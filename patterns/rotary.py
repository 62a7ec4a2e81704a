"""Rotary position embedding as HF's `apply_rotary_pos_emb` writes it, q and k fused into one ``liger::rotary``.

Matched: rotate_half as `cat(-x[..., half:], x[..., :half])`, cos/sin unsqueezed on the head axis (1 for
[B, H, T, D] tensors, 2 for [B, T, H, D]) and shared by q and k. Partial rotary (only the first rotary_dim
channels) and interleaved (GPT-J style) rotation are written differently and are left to Inductor.
"""
import torch

from liger_compile.kernels import rotary as _op  # noqa: F401  (defines the op)
from liger_compile.kernels._common import FLOAT_DTYPES
from liger_compile.matcher import Match, example_value, op_name
from liger_compile.pattern import Pattern


def rotate_half(x, half):
    x1 = x[..., :half]
    x2 = x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim, half):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q, half) * sin)
    k_embed = (k * cos) + (rotate_half(k, half) * sin)
    return q_embed, k_embed


def fused(q, k, cos, sin, unsqueeze_dim, half):
    out = torch.ops.liger.rotary(q, k, cos, sin, int(unsqueeze_dim))
    return out[0], out[1]


def check(m: Match) -> str | None:
    q, k, cos, sin = (m.value(n) for n in ("q", "k", "cos", "sin"))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, cos, sin)):
        return "q, k, cos or sin is not a tensor"
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return f"expects 4-D q/k and 3-D cos/sin, got q {tuple(q.shape)}, cos {tuple(cos.shape)}"
    d = q.shape[-1]
    if not isinstance(d, int) or k.shape[-1] != d or cos.shape[-1] != d or m["half"] * 2 != d:
        return f"rotates {m['half']} of {d} channels (partial rotary) or q/k/cos widths differ"
    udim = m["unsqueeze_dim"]
    if udim not in (1, 2):
        return f"cos/sin unsqueezed at dim {udim}"
    seq_axis = 2 if udim == 1 else 1
    if q.shape[seq_axis] != cos.shape[1] or k.shape[seq_axis] != cos.shape[1]:
        return "cos/sin do not cover q/k's sequence axis"
    # cos/sin may be wider than q/k (fp32 tables under bf16 autocast): the op promotes as eager does
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype or cos.dtype not in FLOAT_DTYPES or sin.dtype != cos.dtype:
        return f"dtypes differ or are unsupported: q {q.dtype}, k {k.dtype}, cos {cos.dtype}"
    if cos.shape[0] not in (1, q.shape[0]):
        return "cos/sin batch is neither 1 nor q's batch"
    return None


def negated_slice(node) -> bool:
    """A candidate rotary site: the negation of a slice of a tensor (rotate_half's `-x[..., half:]`), not any
    negation (a loss's `-log_probs.sum()`)."""
    if op_name(node) != "neg" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    return op_name(node.args[0]) in ("getitem", "narrow", "slice", "chunk")


PATTERNS = [Pattern("rotary", "rotate_half", apply_rotary_pos_emb, fused, check, anchor=negated_slice)]
__all__ = ["PATTERNS", "example_value"]
