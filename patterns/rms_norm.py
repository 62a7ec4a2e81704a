"""RMSNorm, in the forms Hugging Face models write it, fused into ``liger::rms_norm``.

Matched by the math, not by module class: any model whose norm is written in one of these forms is fused,
including norms over the head dimension of a 4-D tensor (Qwen3's q_norm/k_norm).

A norm whose input is a residual add (`h = residual + branch_out; norm(h)`, where `h` is also the next residual)
is fused together with the add into ``liger::add_rms_norm``, which returns the sum too: the add's other users read
it from there. Reported as the same "rms_norm" site, variant "<form>, + residual". Norms fed by anything else
(the first layer's input, q/k norms) stay the plain op.
"""
import torch

from liger_compile.kernels import add_rms_norm as _add_op  # noqa: F401  (defines torch.ops.liger.add_rms_norm)
from liger_compile.kernels import rms_norm as _op  # noqa: F401  (defines torch.ops.liger.rms_norm)
from liger_compile.kernels._common import FLOAT_DTYPES
from liger_compile.kernels.rms_norm import MAX_FUSED_COLS
from liger_compile.matcher import Match
from liger_compile.pattern import Pattern


# --- the forms, as the models write them -------------------------------------------------------------------
def llama(x, weight, eps, dim, in_dtype):
    """Llama, Mistral, Qwen2/3, Granite...: normalise in fp32, cast back, then scale."""
    h = x.to(torch.float32)
    variance = h.pow(2).mean(dim, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(in_dtype)


def scale_then_cast(x, weight, eps, dim, in_dtype):
    """OLMo2: scale in fp32, then cast back."""
    h = x.to(torch.float32)
    variance = h.pow(2).mean(dim, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return (weight * h).to(in_dtype)


def gemma(x, weight, eps, dim, offset):
    """Gemma 1/2/3: everything in fp32 with a (1 + weight) scale, cast at the end."""
    h = x.float()
    out = h * torch.rsqrt(h.pow(2).mean(dim, keepdim=True) + eps)
    out = out * (offset + weight.float())
    return out.type_as(x)


# The same forms fed by a residual add whose sum is kept: the sum is a second output of the pattern, so its other
# users (the next residual add) may read it.
def llama_residual(x, residual, weight, eps, dim, in_dtype):
    s = x + residual
    return llama(s, weight, eps, dim, in_dtype), s


def scale_then_cast_residual(x, residual, weight, eps, dim, in_dtype):
    s = x + residual
    return scale_then_cast(s, weight, eps, dim, in_dtype), s


def gemma_residual(x, residual, weight, eps, dim, offset):
    s = x + residual
    return gemma(s, weight, eps, dim, offset), s


# --- what they become --------------------------------------------------------------------------------------
def _scalar(v):
    """A constant becomes a Python float; a symbolic one (dynamic=True makes module floats graph inputs) stays."""
    return float(v) if isinstance(v, (int, float)) else v


def fused_llama(x, weight, eps, dim, in_dtype):
    return torch.ops.liger.rms_norm(x, weight, _scalar(eps), 0.0, True)[0]


def fused_scale_then_cast(x, weight, eps, dim, in_dtype):
    return torch.ops.liger.rms_norm(x, weight, _scalar(eps), 0.0, False)[0]


def fused_gemma(x, weight, eps, dim, offset):
    return torch.ops.liger.rms_norm(x, weight, _scalar(eps), float(offset), False)[0]


def fused_residual(cast_before_weight: bool):
    """The replacement of a `*_residual` form: (normalised, sum), as the search function returns them."""

    def fused(x, residual, weight, eps, offset=0.0, **_):
        out = torch.ops.liger.add_rms_norm(x, residual, weight, _scalar(eps), float(offset), cast_before_weight)
        return out[1], out[0]

    return fused


# --- when it is safe ---------------------------------------------------------------------------------------
def check(m: Match) -> str | None:
    x, w = m.value("x"), m.value("weight")
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        return "input or weight is not a tensor"
    if x.dtype not in FLOAT_DTYPES or w.dtype not in FLOAT_DTYPES:
        return f"unsupported dtypes x={x.dtype}, weight={w.dtype}"
    if x.dim() < 1 or w.dim() != 1:
        return f"weight must be 1-D over the last axis (got weight shape {tuple(w.shape)})"
    cols = x.shape[-1]
    if not isinstance(cols, int):
        return "the normalised dimension is dynamic; the kernel tiles it at compile time"
    if w.shape[0] != cols:
        return f"weight has {w.shape[0]} entries for a last dimension of {cols}"
    if m["dim"] not in (-1, x.dim() - 1):
        return f"reduces over dim {m['dim']}, not the last one"
    if not isinstance(m.value("eps"), (int, float, torch.SymFloat)):
        return f"eps is not a float scalar (got {type(m.value('eps')).__name__})"
    if "in_dtype" in m.bindings and m.dtype("in_dtype") != x.dtype:
        return f"casts to {m.dtype('in_dtype')} instead of the input dtype {x.dtype}"
    if "offset" in m.bindings and not isinstance(m["offset"], (int, float)):
        return "the weight offset is not a constant"
    if cols > MAX_FUSED_COLS:
        return f"last dimension {cols} exceeds the one-pass kernel's {MAX_FUSED_COLS}"
    if x.device != w.device:
        return "input and weight are on different devices"
    return None


def check_residual(m: Match) -> str | None:
    x, r = m.value("x"), m.value("residual")
    if not isinstance(x, torch.Tensor) or not isinstance(r, torch.Tensor):
        return "the add feeding the norm has a non-tensor operand"
    if x.shape != r.shape or x.dtype != r.dtype or x.device != r.device:
        return (f"the addends differ ({tuple(x.shape)} {x.dtype} and {tuple(r.shape)} {r.dtype}): broadcasting or "
                "promotion is left to Inductor")
    return check(m)


# Most specific first: the residual forms take the add with them (tried before the plain forms, which then fuse
# every norm not fed by an add); Gemma's `offset + weight` would otherwise be taken as the weight of scale_then_cast.
PATTERNS = [
    Pattern("rms_norm", "gemma, + residual", gemma_residual, fused_residual(False), check_residual, anchor="rsqrt"),
    Pattern("rms_norm", "scale_then_cast, + residual", scale_then_cast_residual, fused_residual(False),
            check_residual, anchor="rsqrt"),
    Pattern("rms_norm", "llama, + residual", llama_residual, fused_residual(True), check_residual, anchor="rsqrt"),
    Pattern("rms_norm", "gemma", gemma, fused_gemma, check, anchor="rsqrt"),
    Pattern("rms_norm", "scale_then_cast", scale_then_cast, fused_scale_then_cast, check, anchor="rsqrt"),
    Pattern("rms_norm", "llama", llama, fused_llama, check, anchor="rsqrt"),
]
