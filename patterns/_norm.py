"""What the two norms' checks share (a module of helpers, not of patterns: discovery skips `_` names): the input,
eps and the dtype the statistics are taken in."""
import torch

from liger_compile.kernels._common import FLOAT_DTYPES
from liger_compile.matcher import Match


def input_reason(m: Match) -> str | None:
    """Why the norm's input `x`, its `eps` and its `in_dtype` cast (where the match binds one) cannot go into the
    fused op, or None. The kernels tile the last dimension at compile time, so it must be static."""
    x = m.value("x")
    if not isinstance(x, torch.Tensor):
        return "input is not a tensor"
    if x.dtype not in FLOAT_DTYPES:
        return f"unsupported input dtype {x.dtype}"
    if x.dim() < 1:
        return "the input is a scalar"
    if not isinstance(x.shape[-1], int):
        return "the normalised dimension is dynamic; the kernel tiles it at compile time"
    if not isinstance(m.value("eps"), (int, float, torch.SymFloat)):
        return f"eps is not a float scalar (got {type(m.value('eps')).__name__})"
    if "in_dtype" in m.bindings and m.dtype("in_dtype") != x.dtype:
        return f"casts to {m.dtype('in_dtype')} instead of the input dtype {x.dtype}"
    return None
