"""What the norms fed by a residual add or a gate share (a module of helpers, not of patterns: discovery skips `_`
names)."""
import torch

from liger_compile.matcher import Match


def operands_reason(a, b, what: str) -> str | None:
    """Why `a` and `b`, the two tensors `what` hands the fused op, cannot go into it, or None: the op takes two
    tensors of one shape, dtype and device."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return f"{what} has a non-tensor operand"
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return (f"{what} has operands that differ ({tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype}): "
                "broadcasting or promotion is left to Inductor")
    return None


def addends_reason(m: Match) -> str | None:
    """Why the add `x + residual` feeding a norm cannot go into the fused op, or None."""
    return operands_reason(m.value("x"), m.value("residual"), "the add feeding the norm")
