"""A gated MLP whose down_proj carries a LoRA adapter (PEFT's ``base(y) + lora_B(lora_A(dropout(y))) * scaling``,
dropout 0), fused into ``liger::gated_down_proj_lora``: the product y = act(gate) * up is written again in backward
instead of being kept for the adapter's gradient.

Tried before the plain gated-MLP forms (gated_mlp.py), which would otherwise take act(gate) * up alone and keep y.
The matmuls must run in one dtype: every weight in the activations' dtype, or autocast on to that dtype (PEFT's
float32 adapters, and float32 weights, under the Trainer's bf16=True: the op takes the weights cast as autocast
casts them). Float32 adapters on a bf16 model outside autocast (PEFT's default without mixed precision) mix
dtypes in their matmuls: that site keeps the plain act(gate) * up fusion.
"""
import torch
import torch.nn.functional as F

from liger_compile.kernels import gated_down_proj_lora as _op  # noqa: F401  (defines the op)
from liger_compile.matcher import Match
from liger_compile.pattern import Pattern

from ._lora import check_adapter
from .gated_mlp import GELU, SILU, check_down

PRIORITY = 8  # before gated_mlp


def swiglu_down_lora(gate, up, weight, lora_a, lora_b, scaling):
    y = F.silu(gate) * up
    return F.linear(y, weight) + F.linear(F.linear(y, lora_a), lora_b) * scaling


def geglu_down_lora(gate, up, weight, lora_a, lora_b, scaling, approximate):
    y = F.gelu(gate, approximate=approximate) * up
    return F.linear(y, weight) + F.linear(F.linear(y, lora_a), lora_b) * scaling


def swiglu_down_lora_cast(gate, up, weight, lora_a, lora_b, scaling, dtype):
    """The adapter's input cast to the adapter's dtype first (PEFT does so where the two differ)."""
    y = F.silu(gate) * up
    return F.linear(y, weight) + F.linear(F.linear(y.to(dtype), lora_a), lora_b) * scaling


def make_fused(activation: str):
    def fused(gate, up, weight, lora_a, lora_b, scaling, **_):
        # type_as: a no-op where the weights are in the activations' dtype; under autocast, the cast autocast's
        # matmuls make (the check allows no other difference)
        weights = (t.type_as(gate) for t in (weight, lora_a, lora_b))
        return torch.ops.liger.gated_down_proj_lora(gate, up, *weights, scaling, activation)[0]

    return fused


def check_lora(m: Match) -> str | None:
    # gate, up and down_proj's weight as the plain form checks them (autocast allowed), then the adapter
    return check_down(m) or check_adapter(m, m.value("gate"), m.value("weight"))


PATTERNS = [
    Pattern("swiglu", "silu, down_proj with LoRA", swiglu_down_lora, make_fused("silu"), check_lora, anchor=SILU),
    Pattern("swiglu", "silu, down_proj with LoRA, adapter input cast", swiglu_down_lora_cast, make_fused("silu"),
            check_lora, anchor=SILU),
    Pattern("geglu", "gelu_tanh, down_proj with LoRA", geglu_down_lora, make_fused("gelu_tanh"), check_lora,
            anchor=GELU),
]
