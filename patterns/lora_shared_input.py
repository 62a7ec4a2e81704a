"""Projections of one input that each carry a LoRA adapter (q, k and v; gate and up), frozen base layers, as one
``liger::lora_linear_group3`` / ``group2`` call (kernels/lora_linear_group.py): one product with the adapters' A
matrices stacked, one input gradient accumulated in place, fewer CUDA calls and dispatcher trips than a
``liger::lora_linear`` per projection.

Tried before lora_projection (which takes each projection alone), after the gated-MLP patterns (a LoRA down_proj
joins act(gate) * up there; gate and up stay this pattern's). Each projection must pass lora_projection's checks;
besides, the base weights and biases must be frozen (the op computes no gradient for them) and the adapters share
one dtype and device (their A matrices are concatenated). Off unless the `enable` option (or LIGER_COMPILE_ENABLE)
names `lora_shared_input`: not yet measured in a training step on a GPU.
"""
import torch

from liger_compile.kernels import lora_linear_group as _op  # noqa: F401  (defines the ops)
from liger_compile.matcher import Match
from liger_compile.pattern import Pattern

from ._lora import adapter_sum, check_projection
from .lora_projection import lora as _projection, lora_cast as _projection_cast  # one adapter projection

ON_BY_DEFAULT = False
PRIORITY = 24


def three(x, weight0, bias0, lora_a0, lora_b0, scaling0, weight1, bias1, lora_a1, lora_b1, scaling1,
          weight2, bias2, lora_a2, lora_b2, scaling2):
    return (_projection(x, weight0, bias0, lora_a0, lora_b0, scaling0),
            _projection(x, weight1, bias1, lora_a1, lora_b1, scaling1),
            _projection(x, weight2, bias2, lora_a2, lora_b2, scaling2))


def three_cast(x, weight0, bias0, lora_a0, lora_b0, scaling0, dtype0, weight1, bias1, lora_a1, lora_b1, scaling1,
               dtype1, weight2, bias2, lora_a2, lora_b2, scaling2, dtype2):
    return (_projection_cast(x, weight0, bias0, lora_a0, lora_b0, scaling0, dtype0),
            _projection_cast(x, weight1, bias1, lora_a1, lora_b1, scaling1, dtype1),
            _projection_cast(x, weight2, bias2, lora_a2, lora_b2, scaling2, dtype2))


def two(x, weight0, bias0, lora_a0, lora_b0, scaling0, weight1, bias1, lora_a1, lora_b1, scaling1):
    return (_projection(x, weight0, bias0, lora_a0, lora_b0, scaling0),
            _projection(x, weight1, bias1, lora_a1, lora_b1, scaling1))


def two_cast(x, weight0, bias0, lora_a0, lora_b0, scaling0, dtype0, weight1, bias1, lora_a1, lora_b1, scaling1,
             dtype1):
    return (_projection_cast(x, weight0, bias0, lora_a0, lora_b0, scaling0, dtype0),
            _projection_cast(x, weight1, bias1, lora_a1, lora_b1, scaling1, dtype1))


def make_fused(n: int):
    def fused(x, **w):
        # type_as: a no-op where the weights are in the input's dtype; under autocast, the cast its matmuls make
        cast = [{k: w[f"{k}{i}"] if w[f"{k}{i}"] is None else w[f"{k}{i}"].type_as(x)
                 for k in ("weight", "bias", "lora_a", "lora_b")} for i in range(n)]
        lora_a = torch.cat([c["lora_a"] for c in cast])
        outs = getattr(torch.ops.liger, f"lora_linear_group{n}")(
            x, *(c["weight"] for c in cast), *(c["bias"] for c in cast), lora_a, *(c["lora_b"] for c in cast),
            *(w[f"scaling{i}"] for i in range(n)))
        return tuple(outs[i] for i in range(n))

    return fused


def make_check(n: int):
    def check(m: Match) -> str | None:
        for i in range(n):
            why = check_projection(m, str(i))
            if why:
                return f"projection {i}: {why}"
        frozen = [m.value(f"{k}{i}") for k in ("weight", "bias") for i in range(n)]
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in frozen):
            return "a base weight or bias is trained (the grouped op computes gradients for the adapters only)"
        adapters = [m.value(f"{k}{i}") for k in ("lora_a", "lora_b") for i in range(n)]
        if len({(t.dtype, t.device) for t in adapters}) > 1:
            return "the adapters differ in dtype or device (their A matrices are concatenated)"
        return None

    return check


PATTERNS = [
    Pattern("lora_shared_input", "q, k, v with LoRA", three, make_fused(3), make_check(3), anchor=adapter_sum),
    Pattern("lora_shared_input", "q, k, v with LoRA, adapter input cast", three_cast, make_fused(3), make_check(3),
            anchor=adapter_sum),
    Pattern("lora_shared_input", "gate, up with LoRA", two, make_fused(2), make_check(2), anchor=adapter_sum),
    Pattern("lora_shared_input", "gate, up with LoRA, adapter input cast", two_cast, make_fused(2), make_check(2),
            anchor=adapter_sum),
]
