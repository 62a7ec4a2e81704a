"""TRL's fused LM head, compiled (liger_compile/trl_support.py), scoring only the labelled rows.

Under torch.compile TRL's head scores every position: it clamps the labels to 0 (``labels.clamp(min=0)``), has
``liger::token_logprobs`` score all rows, then zeroes the outputs where ``labels == -100``. Prompt and padding rows
(half a DPO or GRPO batch) would go through the four vocabulary-wide matmuls for nothing. Where every output of the
op is zeroed that way, the op is handed the unclamped labels instead: it leaves ignored rows out of its matmuls
(kernels/token_logprobs.py) and returns zeros there, which the masking keeps. Values and gradients are the same.
"""
import operator

import torch

from liger_compile.kernels import token_logprobs as _op  # noqa: F401  (defines the op)
from liger_compile.matcher import Match, op_name
from liger_compile.pattern import Pattern


def search(hidden, weight, bias, labels, ignore_index, temperature, softcap, scale, hidden_grad, weight_grad):
    return torch.ops.liger.token_logprobs(hidden, weight, bias, labels.clamp(min=0).reshape(-1), ignore_index,
                                          temperature, softcap, scale, hidden_grad, weight_grad)


def replace(hidden, weight, bias, labels, ignore_index, temperature, softcap, scale, hidden_grad, weight_grad):
    return torch.ops.liger.token_logprobs(hidden, weight, bias, labels.reshape(-1), ignore_index, temperature,
                                          softcap, scale, hidden_grad, weight_grad)


def _zeroes_ignored(node, labels, ignore_index) -> bool:
    """node is `x.view(...).masked_fill(~(labels != ignore_index), 0)` of an op output x, used for nothing else."""
    users = list(node.users)
    if len(users) != 1 or op_name(users[0]) not in ("view", "reshape"):
        return False
    fills = list(users[0].users)
    if len(fills) != 1 or op_name(fills[0]) != "masked_fill" or len(fills[0].args) < 3 or fills[0].args[2] != 0:
        return False
    inverted = fills[0].args[1]
    if op_name(inverted) != "invert":
        return False
    ne = inverted.args[0]
    return op_name(ne) == "ne" and ne.args[0] is labels and ne.args[1] == ignore_index


def check(m: Match) -> str | None:
    labels, ignore_index = m["labels"], m["ignore_index"]
    if not isinstance(ignore_index, int) or not isinstance(labels, torch.fx.Node):
        return f"ignore_index {ignore_index!r} is not a constant or the labels are not a graph value"
    for user in m.root.users:
        if user.target is not operator.getitem:
            return "the op's outputs are used as a tuple"
        if not _zeroes_ignored(user, labels, ignore_index):
            return (f"output {user.args[1]} of the op is used where the clamped labels' rows are not zeroed, so "
                    "every row must be scored")
    return None


PATTERNS = [Pattern("trl_labelled_rows", "clamped labels", search, replace, check, anchor="token_logprobs")]
