"""What tells the two norms' sites apart in near-miss reports (a module of helpers, not of patterns: discovery
skips `_` names): a LayerNorm written by hand multiplies its inverse square root into a centred value; an RMSNorm
never centres."""
from torch.fx import Node

from liger_compile.matcher import op_name


def centred(node: Node) -> bool:
    """`node` is multiplied into a centred value, `(x - mean) * node`."""
    return any(op_name(u) == "mul" and any(isinstance(a, Node) and op_name(a) == "sub" and any(
        isinstance(b, Node) and op_name(b) == "mean" for b in a.args) for a in u.args) for u in node.users)
