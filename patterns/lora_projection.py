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

from liger_compile.kernels import lora_linear as _op  # noqa: F401  (defines the op)
from liger_compile.matcher import Match
from liger_compile.pattern import Pattern

from ._lora import adapter_sum, check_projection

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
    return check_projection(m)


PATTERNS = [
    Pattern("lora_projection", "projection with LoRA", lora, fused, check, anchor=adapter_sum),
    Pattern("lora_projection", "projection with LoRA, adapter input cast", lora_cast, fused, check,
            anchor=adapter_sum),
]
