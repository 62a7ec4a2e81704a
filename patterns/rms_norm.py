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
from liger_compile.matcher import Match, op_name
from liger_compile.patterns._centred import centred
from liger_compile.patterns._norm import input_reason
from liger_compile.patterns._residual import addends_reason
from liger_compile.pattern import Pattern


# --- the forms, as the models write them -------------------------------------------------------------------
# Each form is written over `inverse_rms(h, dim, eps)`, the row's 1 / sqrt(mean(h^2) + eps): models spell the
# square `h.pow(2)` or `h.square()`, and the inverse square root `torch.rsqrt(v)` or `torch.pow(v, -0.5)` (Gemma 3n
# and Gemma 4, for JAX parity); every spelling of every form is a variant (_variants below).
SQUARES = {"pow(2)": lambda h: h.pow(2), "square": lambda h: h.square()}
INVERSE_SQRTS = {"rsqrt": torch.rsqrt, "pow(-0.5)": lambda v: torch.pow(v, -0.5)}


def forms(inverse_rms):
    """The forms, as search functions over one spelling of inverse_rms: {name: search}."""

    def llama(x, weight, eps, dim, in_dtype):
        """Llama, Mistral, Qwen2/3, Granite...: normalise in fp32, cast back, then scale."""
        h = x.to(torch.float32)
        h = h * inverse_rms(h, dim, eps)
        return weight * h.to(in_dtype)

    def scale_then_cast(x, weight, eps, dim, in_dtype):
        """OLMo2, DeepSeek-V4, Gemma 3n / Gemma 4 (weight.float() binds as the weight): scale in fp32, cast back."""
        h = x.to(torch.float32)
        h = h * inverse_rms(h, dim, eps)
        return (weight * h).to(in_dtype)

    def gemma(x, weight, eps, dim, offset):
        """Gemma 1/2/3: everything in fp32 with a (1 + weight) scale, cast at the end."""
        h = x.float()
        out = h * inverse_rms(h, dim, eps)
        out = out * (offset + weight.float())
        return out.type_as(x)

    def weightless(x, eps, dim, in_dtype):
        """Nanochat, HRM, Falcon-Mamba, Inkling2, Gemma 3n's v_norm (with_scale=False): no weight at all."""
        h = x.to(torch.float32)
        h = h * inverse_rms(h, dim, eps)
        return h.to(in_dtype)

    def rstd_in_input_dtype(x, eps, dim, in_dtype):
        """DeepSeek-V4's unweighted norm: the inverse RMS (of x in fp32) cast to x's dtype, then x scaled by it."""
        return x * inverse_rms(x.to(torch.float32), dim, eps).to(in_dtype)

    return {"gemma": gemma, "scale_then_cast": scale_then_cast, "llama": llama, "weightless": weightless,
            "rstd_in_input_dtype": rstd_in_input_dtype}


def residual_forms(plain):
    """The forms fed by a residual add whose sum is kept: the sum is a second output of the pattern, so its other
    users (the next residual add) may read it. (rstd_in_input_dtype has none: liger::add_rms_norm does not round the
    inverse RMS.)"""
    llama, scale_then_cast, gemma, weightless = (plain[k] for k in ("llama", "scale_then_cast", "gemma", "weightless"))

    def llama_residual(x, residual, weight, eps, dim, in_dtype):
        s = x + residual
        return llama(s, weight, eps, dim, in_dtype), s

    def scale_then_cast_residual(x, residual, weight, eps, dim, in_dtype):
        s = x + residual
        return scale_then_cast(s, weight, eps, dim, in_dtype), s

    def gemma_residual(x, residual, weight, eps, dim, offset):
        s = x + residual
        return gemma(s, weight, eps, dim, offset), s

    def weightless_residual(x, residual, eps, dim, in_dtype):
        s = x + residual
        return weightless(s, eps, dim, in_dtype), s

    return {"gemma": gemma_residual, "scale_then_cast": scale_then_cast_residual, "llama": llama_residual,
            "weightless": weightless_residual}


def functional(x, normalized_shape, weight, eps):
    """torch.rms_norm, as Dynamo records nn.RMSNorm and F.rms_norm (DiffLlama's groupnorm): fp32 math, the weight
    (None: no scale) applied in fp32, cast once at the end; eps None is the fp32 machine epsilon."""
    return torch.rms_norm(x, normalized_shape, weight, eps)


def functional_residual(x, residual, normalized_shape, weight, eps):
    s = x + residual
    return functional(s, normalized_shape, weight, eps), s


# --- what they become --------------------------------------------------------------------------------------
def _scalar(v):
    """A constant becomes a Python float; a symbolic one (dynamic=True makes module floats graph inputs) stays."""
    return float(v) if isinstance(v, (int, float)) else v


# (cast_before_weight, rstd_in_input_dtype) per form: the kernel's casting mode (a form without a weight passes None)
MODES = {"gemma": (False, False), "scale_then_cast": (False, False), "llama": (True, False),
         "weightless": (False, False), "rstd_in_input_dtype": (False, True)}


def fused(form: str):
    cast_before_weight, rstd_in_input_dtype = MODES[form]

    def replace(x, eps, weight=None, offset=0.0, **_):
        return torch.ops.liger.rms_norm(x, weight, _scalar(eps), float(offset), cast_before_weight,
                                        rstd_in_input_dtype)[0]

    return replace


def _functional_eps(eps):
    # what aten's rms_norm adds when given None: the epsilon of its math dtype, fp32 for fp32/bf16/fp16 inputs
    return torch.finfo(torch.float32).eps if eps is None else _scalar(eps)


def fused_functional(x, normalized_shape, weight, eps):
    return torch.ops.liger.rms_norm(x, weight, _functional_eps(eps), 0.0, False)[0]


def fused_functional_residual(x, residual, normalized_shape, weight, eps):
    out = torch.ops.liger.add_rms_norm(x, residual, weight, _functional_eps(eps), 0.0, False)
    return out[1], out[0]


def fused_residual(form: str):
    """The replacement of a residual form: (normalised, sum), as the search function returns them."""
    cast_before_weight, _ = MODES[form]

    def replace(x, residual, eps, weight=None, offset=0.0, **_):
        out = torch.ops.liger.add_rms_norm(x, residual, weight, _scalar(eps), float(offset), cast_before_weight)
        return out[1], out[0]

    return replace


# --- when it is safe ---------------------------------------------------------------------------------------
def check(m: Match) -> str | None:
    why = input_reason(m)
    if why:
        return why
    x = m.value("x")
    cols = x.shape[-1]
    if "weight" in m.bindings:
        objection = _check_weight(x, m.value("weight"))
        if objection:
            return objection
    if m["dim"] not in (-1, x.dim() - 1):
        return f"reduces over dim {m['dim']}, not the last one"
    if "offset" in m.bindings and not isinstance(m["offset"], (int, float)):
        return "the weight offset is not a constant"
    if cols > MAX_FUSED_COLS:
        return f"last dimension {cols} exceeds the one-pass kernel's {MAX_FUSED_COLS}"
    return None


def _check_weight(x: torch.Tensor, w) -> str | None:
    if not isinstance(w, torch.Tensor):
        return "weight is not a tensor"
    if w.dtype not in FLOAT_DTYPES:
        return f"unsupported weight dtype {w.dtype}"
    if w.dim() != 1:
        return f"weight must be 1-D over the last axis (got weight shape {tuple(w.shape)})"
    if w.shape[0] != x.shape[-1]:
        return f"weight has {w.shape[0]} entries for a last dimension of {x.shape[-1]}"
    if x.device != w.device:
        return "input and weight are on different devices"
    return None


def check_functional(m: Match) -> str | None:
    x, shape, w = m.value("x"), m["normalized_shape"], m.value("weight")
    if not isinstance(x, torch.Tensor):
        return "input is not a tensor"
    if x.dtype not in FLOAT_DTYPES:
        return f"unsupported input dtype {x.dtype}"
    if not isinstance(shape, (tuple, list)) or len(shape) != 1:
        return f"normalises over the last {len(shape) if isinstance(shape, (tuple, list)) else '?'} dimensions, " \
               "not the last one alone"
    cols = x.shape[-1] if x.dim() else None
    if not isinstance(cols, int):
        return "the normalised dimension is dynamic; the kernel tiles it at compile time"
    if shape[0] != cols:
        return f"normalized_shape {tuple(shape)} is not the last dimension {cols}"
    eps = m.value("eps")
    if eps is not None and not isinstance(eps, (int, float, torch.SymFloat)):
        return f"eps is not a float scalar (got {type(eps).__name__})"
    if w is not None:
        objection = _check_weight(x, w)
        if objection:
            return objection
    if cols > MAX_FUSED_COLS:
        return f"last dimension {cols} exceeds the one-pass kernel's {MAX_FUSED_COLS}"
    return None


def check_residual(m: Match) -> str | None:
    return addends_reason(m) or check(m)


def check_functional_residual(m: Match) -> str | None:
    return addends_reason(m) or check_functional(m)


def marks_site(node) -> bool:
    """What marks a candidate site in near-miss reports: an rsqrt, a power -0.5, or torch.rms_norm; not an inverse
    square root multiplied into a centred value (a LayerNorm's, reported by that pattern)."""
    name = op_name(node)
    if name == "rms_norm":
        return True
    if name == "rsqrt":
        return not centred(node)
    if name != "pow" or len(node.args) < 2 and "exponent" not in node.kwargs:
        return False
    exponent = node.args[1] if len(node.args) >= 2 else node.kwargs["exponent"]
    return isinstance(exponent, (int, float)) and exponent == -0.5 and not centred(node)


def inverse_rms_only_form(inverse_rms):
    def inverse_rms_only(x, eps, dim, in_dtype):
        """HY-V4's unweighted norm: only the inverse RMS, which the caller multiplies into another value."""
        return inverse_rms(x.to(torch.float32), dim, eps).to(in_dtype)

    return inverse_rms_only


def refuse_inverse_rms_only(m: Match) -> str:
    # tried after every real form, so it explains only sites none of them matched
    return ("only the inverse RMS is computed here, and it scales another value (e.g. a projection of the input), "
            "not the input: there is no normalised row for the kernel to write")


def l2_norm(x, eps, dim):
    """Qwen3-Next's, OLMo-Hybrid's l2norm (as FLA writes it): x scaled by the rsqrt of its sum of squares."""
    return x * torch.rsqrt((x * x).sum(dim, keepdim=True) + eps)


def refuse_l2_norm(m: Match) -> str:
    return ("an L2 norm: the squares are summed, not averaged (x / ||x||, where RMSNorm divides by the root of "
            "their mean); not fused")


def _never_fused(*args, **kwargs):
    raise AssertionError("refused by its check")


def spellings():
    """[(variant suffix, inverse_rms)] for every spelling of the inverse RMS; the common one (pow(2), rsqrt) has
    the empty suffix, so its forms keep their bare names."""
    found = []
    for square_name, square in SQUARES.items():
        for inverse_name, inverse in INVERSE_SQRTS.items():
            def inverse_rms(h, dim, eps, square=square, inverse=inverse):
                return inverse(square(h).mean(dim, keepdim=True) + eps)

            qualifiers = [q for q, default in ((square_name, "pow(2)"), (inverse_name, "rsqrt")) if q != default]
            found.append(("".join(f", {q}" for q in qualifiers), inverse_rms))
    return found


def _variants():
    """Every form in every spelling, residual forms first (they take the add with them; the plain forms then fuse
    every norm not fed by an add); within each, Gemma's `offset + weight` before scale_then_cast, which would take it
    as its weight, and the weightless form last (its root is any cast of a normalised value). torch.rms_norm shares
    no op with the hand-written forms: only its own residual form must precede it."""
    patterns = [Pattern("rms_norm", "functional, + residual", functional_residual, fused_functional_residual,
                        check_functional_residual, anchor=marks_site),
                Pattern("rms_norm", "functional", functional, fused_functional, check_functional, anchor=marks_site)]
    spelt = [(suffix, forms(inverse_rms)) for suffix, inverse_rms in spellings()]
    for residual in (True, False):
        for name in MODES:
            for suffix, plain in spelt:
                fed_by_add = residual_forms(plain)
                if residual and name in fed_by_add:
                    patterns.append(Pattern("rms_norm", f"{name}{suffix}, + residual", fed_by_add[name],
                                            fused_residual(name), check_residual, anchor=marks_site))
                elif not residual:
                    patterns.append(Pattern("rms_norm", f"{name}{suffix}", plain[name], fused(name), check,
                                            anchor=marks_site))
    patterns += [Pattern("rms_norm", f"inverse RMS alone{suffix}", inverse_rms_only_form(inverse_rms), _never_fused,
                         refuse_inverse_rms_only, anchor=marks_site) for suffix, inverse_rms in spellings()]
    patterns.append(Pattern("rms_norm", "L2 norm", l2_norm, _never_fused, refuse_l2_norm, anchor=marks_site))
    return patterns


PATTERNS = _variants()
