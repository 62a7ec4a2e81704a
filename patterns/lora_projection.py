"""A projection carrying a LoRA adapter (PEFT's ``base(x) + lora_B(lora_A(dropout(x))) * scaling``, dropout 0) as
``liger::lora_linear``: the adapter's product is added in the base matmul's epilogue, forward and backward, instead
of in passes of its own over the [tokens, out] output (see kernels/lora_linear.py).

After the gated-MLP patterns, which take a LoRA down_proj together with act(gate) * up (gated_mlp_lora.py), and
before the q/k/v merge, which would take the base projections apart from their adapters. The dtype rules are the
LoRA down_proj's: every weight in the input's dtype, or autocast on to that dtype (PEFT's float32 adapters on a bf16
model under the Trainer's bf16=True; patterns/_lora.py); the op then takes the weights cast as autocast's matmuls
cast them. Tensor subclasses (DTensor shards) never reach the check: the rewrite leaves such sites to Inductor.

On by default; `disable="lora_projection"` (or LIGER_COMPILE_DISABLE) leaves the adapters to Inductor.
"""
import torch
import torch.nn.functional as F

from liger_compile.autocast import autocast_to
from liger_compile.kernels import lora_linear as _op  # noqa: F401  (defines the op)
from liger_compile.matcher import Match, op_name
from liger_compile.pattern import Pattern

from ._lora import check_adapter

PRIORITY = 25


def lora(x, weight, bias, lora_a, lora_b, scaling):
    """The base layer's bias is a wildcard: None where it has none."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a), lora_b) * scaling


def lora_cast(x, weight, bias, lora_a, lora_b, scaling, dtype):
    """The adapter's input cast to the adapter's dtype first (PEFT does so where the two differ)."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x.to(dtype), lora_a), lora_b) * scaling


def fused(x, weight, bias, lora_a, lora_b, scaling, **_):
    # type_as: a no-op where the weights are in the input's dtype; under autocast, the cast its matmuls make
    bias = None if bias is None else bias.type_as(x)
    a, b = lora_a.type_as(x), lora_b.type_as(x)
    return torch.ops.liger.lora_linear(x, weight.type_as(x), bias, a, b, scaling)[0]


def check(m: Match) -> str | None:
    x, w, bias = (m.value(k) for k in ("x", "weight", "bias"))
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        return "the input is not a floating-point tensor of rank 2 or more"
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[1] != x.shape[-1]:
        return f"the base weight is not a matrix taking inputs of width {x.shape[-1]}"
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (w.shape[0],)):
        return "the base layer's bias is not one value per output"
    why = check_adapter(m, x, w)  # which also refuses autocast to another dtype than x's
    if why:
        return why
    for name, t in (("weight", w), ("bias", bias)):
        if t is not None and t.dtype != x.dtype and not autocast_to(m.root, x):
            return (f"the base {name} ({t.dtype}) and the input ({x.dtype}) differ in dtype outside autocast, so "
                    "the matmul mixes dtypes")
    return None


def _adapter_sum(node) -> bool:
    """A candidate site for near-miss reports: an add of a projection and a scaled projection of a projection."""
    if op_name(node) != "add" or len(node.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in node.args):
        return False
    base, scaled = node.args
    return (op_name(base) == "linear" and op_name(scaled) == "mul" and isinstance(scaled.args[0], torch.fx.Node)
            and op_name(scaled.args[0]) == "linear")


PATTERNS = [
    Pattern("lora_projection", "projection with LoRA", lora, fused, check, anchor=_adapter_sum),
    Pattern("lora_projection", "projection with LoRA, adapter input cast", lora_cast, fused, check,
            anchor=_adapter_sum),
]
