"""What the norms fed by a residual add share (a module of helpers, not of patterns: discovery skips `_` names)."""
import torch

from liger_compile.matcher import Match


def addends_reason(m: Match) -> str | None:
    """Why the add `x + residual` feeding a norm cannot go into the fused op, or None: the op takes two tensors of
    one shape, dtype and device."""
    x, r = m.value("x"), m.value("residual")
    if not isinstance(x, torch.Tensor) or not isinstance(r, torch.Tensor):
        return "the add feeding the norm has a non-tensor operand"
    if x.shape != r.shape or x.dtype != r.dtype or x.device != r.device:
        return (f"the addends differ ({tuple(x.shape)} {x.dtype} and {tuple(r.shape)} {r.dtype}): broadcasting or "
                "promotion is left to Inductor")
    return None
