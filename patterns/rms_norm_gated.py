"""Gated RMSNorms, fused into ``liger::gated_rms_norm``; reported as "rms_norm" sites.

Gate before the norm, variant "gated" (Mamba2, Bamba, Zamba2, NemotronH, GraniteMoeHybrid):

    h = x.float() * silu(gate.float());  normalised over groups (a view to [..., groups, group_size] and back);
    weight * h.to(x.dtype)

fused when there is one group (the kernel normalises whole rows, and the weight spans the row); more groups are a
near miss naming the group size. Gate after the norm, variant "gated after, <act>" (Kimi-Linear and Bailing-Hybrid
with sigmoid, LaraMini with silu): everything in fp32, cast once at the end,

    (weight.float() * (x.float() * rstd) * act(gate.float())).to(x.dtype)
"""
import torch

from liger_compile.kernels import rms_norm as _op  # noqa: F401  (defines torch.ops.liger.gated_rms_norm)
from liger_compile.matcher import Match
from liger_compile.pattern import Pattern
from liger_compile.patterns._residual import operands_reason
from liger_compile.patterns.rms_norm import _scalar, check, marks_site, spellings

# before gated_mlp (default 10): its `x * silu(gate)` would take the gate's product out of the norm
PRIORITY = 9


def gated_form(inverse_rms):
    def gated(x, gate, weight, eps, dim, in_dtype, grouped, flat):
        h = x.to(torch.float32)
        h = h * torch.nn.functional.silu(gate.to(torch.float32))
        g = h.view(grouped)
        g = g * inverse_rms(g, dim, eps)
        return weight * g.view(flat).to(in_dtype)

    return gated


ACTIVATIONS = {"sigmoid": torch.sigmoid, "silu": torch.nn.functional.silu}


def gated_after_form(inverse_rms, act):
    def gated_after(x, gate, weight, eps, dim, in_dtype):
        h = x.to(torch.float32)
        h = h * inverse_rms(h, dim, eps)
        h = weight.to(torch.float32) * h
        h = h * act(gate.to(torch.float32))
        return h.to(in_dtype)

    return gated_after


def fused_gated(x, gate, weight, eps, **_):
    return torch.ops.liger.gated_rms_norm(x, gate, weight, _scalar(eps), "silu", False)[0]


def fused_gated_after(activation: str):
    def replace(x, gate, weight, eps, **_):
        return torch.ops.liger.gated_rms_norm(x, gate, weight, _scalar(eps), activation, True)[0]

    return replace


def _check_gate(m: Match) -> str | None:
    return operands_reason(m.value("x"), m.value("gate"), "the gated norm")


def check_gated_after(m: Match) -> str | None:
    return _check_gate(m) or check(m)


def check_gated(m: Match) -> str | None:
    objection = _check_gate(m)
    if objection:
        return objection
    x = m.value("x")
    grouped, flat = m["grouped"], m["flat"]
    if not isinstance(grouped, (tuple, list)) or not isinstance(flat, (tuple, list)) or len(flat) != x.dim():
        return "the group views are not shapes over the input's dimensions"
    if grouped[-1] != x.shape[-1]:
        return (f"normalises in groups of {grouped[-1]} channels of {x.shape[-1]} (n_groups > 1): the kernel "
                "normalises whole rows")
    if "weight" not in m.bindings:
        return "no weight"
    return check(m)


PATTERNS = [Pattern("rms_norm", f"gated{suffix}", gated_form(inverse_rms), fused_gated, check_gated,
                    anchor=marks_site) for suffix, inverse_rms in spellings()]
PATTERNS += [Pattern("rms_norm", f"gated after, {name}{suffix}", gated_after_form(inverse_rms, act),
                     fused_gated_after(name), check_gated_after, anchor=marks_site)
             for name, act in ACTIVATIONS.items() for suffix, inverse_rms in spellings()]
