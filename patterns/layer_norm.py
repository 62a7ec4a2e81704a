"""LayerNorm over the last dimension, in the forms Hugging Face models write it, fused into ``liger::layer_norm``.

Matched by the math, not by module class:
- `functional`: what Dynamo records for an `nn.LayerNorm` module (GPT-NeoX, Phi and its q/k norms, StableLM and
  its per-head norms, OPT; with `bias=False` the bias is None, with `elementwise_affine=False` both are): a
  `F.layer_norm(x, (H,), weight, bias, eps)` call;
- `upcast`: the same call on `x.to(torch.float32)`, cast back to x's dtype (OLMo's weightless LayerNorm). The op
  reads x as it is and writes the result in its dtype, computing in fp32 in between, as eager does;
- `mean_variance`: the hand-written form of Cohere and Cohere2 (weight only, in fp32, cast back at the end);
- `mean_var`: the same with `var(unbiased=False)` and no weight, over the head dimension of a 4-D tensor (the
  model scales the merged heads after it).
Weight and bias may each be absent; a weight of another shape than [H] (Cohere's q/k norms: [heads, head_dim]) is
refused, and so is a normalised shape of more than the last dimension.

A `functional` norm whose input is a residual add (`h = residual + out; norm(h)`, `h` kept as the next residual:
GPT-2, OPT, BLOOM, StarCoder2) becomes ``liger::add_layer_norm``, which takes the add along; reported as the same
"layer_norm" site, variant "functional, + residual".
"""
import torch
import torch.nn.functional as F

from liger_compile.kernels import add_layer_norm as _add_op  # noqa: F401  (defines torch.ops.liger.add_layer_norm)
from liger_compile.kernels import layer_norm as _op  # noqa: F401  (defines torch.ops.liger.layer_norm)
from liger_compile.kernels._common import FLOAT_DTYPES
from liger_compile.kernels.layer_norm import MAX_FUSED_COLS
from liger_compile.matcher import Match, example_value, op_name
from liger_compile.patterns._centred import centred
from liger_compile.patterns._norm import input_reason
from liger_compile.patterns._residual import addends_reason
from liger_compile.pattern import Pattern


# --- the forms, as the models write them -------------------------------------------------------------------
def functional(x, normalized_shape, weight, bias, eps):
    """nn.LayerNorm, as Dynamo records the module's forward."""
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def upcast(x, normalized_shape, weight, bias, eps, in_dtype):
    """OLMo: the LayerNorm of the input cast to fp32, cast back."""
    return F.layer_norm(x.to(torch.float32), normalized_shape, weight, bias, eps).to(in_dtype)


def mean_variance(x, weight, eps, dim, in_dtype):
    """Cohere, Cohere2: mean and variance by hand in fp32, an fp32 scale, cast at the end."""
    h = x.to(torch.float32)
    mean = h.mean(dim, keepdim=True)
    variance = (h - mean).pow(2).mean(dim, keepdim=True)
    h = (h - mean) * torch.rsqrt(variance + eps)
    h = weight.to(torch.float32) * h
    return h.to(in_dtype)


def mean_var(x, eps, dim, in_dtype, unbiased):
    """Mean and variance by hand in fp32 with `var` (its `unbiased` read by the check), no weight (a weight over
    another shape may follow: the op writes the normalised row, the model's scale stays), cast at the end."""
    h = x.to(torch.float32)
    y = (h - h.mean(dim, keepdim=True)) * torch.rsqrt(h.var(dim, keepdim=True, unbiased=unbiased) + eps)
    return y.to(in_dtype)


def functional_residual(x, residual, normalized_shape, weight, bias, eps):
    """The residual add feeding nn.LayerNorm; the sum is a second output (its other users, the next residual add,
    read it)."""
    s = x + residual
    return F.layer_norm(s, normalized_shape, weight, bias, eps), s


# --- what they become --------------------------------------------------------------------------------------
def _scalar(v):
    """A constant becomes a Python float; a symbolic one (dynamic=True makes module floats graph inputs) stays."""
    return float(v) if isinstance(v, (int, float)) else v


def fused(x, eps, weight=None, bias=None, **_):
    """Every form's replacement; what the op does not take (the normalised shape, dim, in_dtype) the check has read.
    The hand-written forms have no bias, `mean_var` no weight either."""
    return torch.ops.liger.layer_norm(x, weight, bias, _scalar(eps))[0]


def fused_residual(x, residual, weight, eps, bias=None, **_):
    """(normalised, sum), as functional_residual returns them."""
    out = torch.ops.liger.add_layer_norm(x, residual, weight, bias, _scalar(eps))
    return out[1], out[0]


# --- when it is safe ---------------------------------------------------------------------------------------
def _parameter(m: Match, name: str, cols: int, x: torch.Tensor) -> str | None:
    """Why the weight or bias (absent, or a [cols] float tensor on x's device) cannot be passed to the op."""
    upcast_by_the_model = "dim" in m.bindings  # mean_variance multiplies by weight.to(torch.float32)
    if name not in m.bindings or m[name] is None:
        return None
    p = m.value(name)
    if not isinstance(p, torch.Tensor):
        return f"the {name} is not a tensor (got {type(p).__name__})"
    if p.dim() != 1 or p.shape[0] != cols:
        return f"{name} shape {tuple(p.shape)}: the op takes a [{cols}] {name} over the last dimension"
    # F.layer_norm's own rule: parameters in x's dtype, or fp32 ones for a bf16/fp16 input (output in x's dtype);
    # the hand-written form upcasts its weight, so any float weight is exact there, as in the op
    if p.dtype not in FLOAT_DTYPES or (p.dtype not in (x.dtype, torch.float32) and not upcast_by_the_model):
        return f"unsupported dtypes x={x.dtype}, {name}={p.dtype}"
    if p.device != x.device:
        return f"input and {name} are on different devices"
    return None


def check(m: Match) -> str | None:
    why = input_reason(m)
    if why:
        return why
    x = m.value("x")
    cols = x.shape[-1]
    if "normalized_shape" in m.bindings:
        shape = m.value("normalized_shape")
        if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 1 or shape[0] != cols:
            return (f"normalises over shape {shape!r}, not the last dimension alone ({cols}); the kernel normalises "
                    "the last dimension only")
    if "dim" in m.bindings and m["dim"] not in (-1, x.dim() - 1):
        return f"reduces over dim {m['dim']}, not the last one"
    if m.bindings.get("unbiased", False) is not False:
        return f"the variance is unbiased={m['unbiased']!r} (divides by n - 1): LayerNorm's divides by n"
    for name in ("weight", "bias"):
        why = _parameter(m, name, cols, x)
        if why:
            return why
    root = example_value(m.root)
    if isinstance(root, torch.Tensor) and root.dtype != x.dtype:
        # CUDA autocast runs layer_norm in fp32 for a bf16/fp16 input; the op writes x's dtype
        return f"the graph's layer_norm returns {root.dtype} for a {x.dtype} input (autocast); the op returns {x.dtype}"
    stride = x.stride(-1)
    if cols > 1 and isinstance(stride, int) and stride != 1:
        return f"the last dimension has stride {stride}: the kernel reads unit-stride rows (a copy would be needed)"
    if cols > MAX_FUSED_COLS:
        return f"last dimension {cols} exceeds the one-pass kernel's {MAX_FUSED_COLS}"
    return None


def check_residual(m: Match) -> str | None:
    return addends_reason(m) or check(m)


def centred_rsqrt(node) -> bool:
    """What marks a hand-written LayerNorm in near-miss reports: an inverse square root multiplied into a centred
    value, `(x - mean) * rsqrt(...)`."""
    return op_name(node) == "rsqrt" and centred(node)


# The residual form first (it takes the add along; the plain forms then fuse every norm not fed by one), then the
# upcast form: it takes OLMo's casts along, which `functional` would leave around the call. Near misses are anchored
# on the F.layer_norm call and on a hand-written form's centred inverse square root.
PATTERNS = [
    Pattern("layer_norm", "functional, + residual", functional_residual, fused_residual, check_residual,
            anchor="layer_norm"),
    Pattern("layer_norm", "upcast", upcast, fused, check, anchor="layer_norm"),
    Pattern("layer_norm", "mean_variance", mean_variance, fused, check, anchor=centred_rsqrt),
    Pattern("layer_norm", "mean_var", mean_var, fused, check, anchor=centred_rsqrt),
    Pattern("layer_norm", "functional", functional, fused, check, anchor="layer_norm"),
]
