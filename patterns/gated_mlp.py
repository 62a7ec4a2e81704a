"""The gated MLP's `act(gate) * up` (SwiGLU with SiLU, GeGLU with tanh-GELU), fused into ``liger::gated_mlp``,
or, when the product goes straight into down_proj, `down_proj(act(gate) * up)` fused into ``liger::gated_down_proj``.

`gate` and `up` are whatever feeds the product: the outputs of gate_proj and up_proj (Llama, Gemma...) or the two
halves of a fused gate_up_proj (Phi3); the op reads the halves in place. The activation is recomputed in backward
instead of being saved, and with down_proj included so is the product (down_proj's weight gradient needs it), which
saves one [tokens, intermediate] activation per layer. The forms with down_proj come first: where the product is
also used elsewhere (a LoRA adapter on down_proj reads it too) they do not match and the plain form still does.

Gated MLPs the kernels do not compute are matched too, to say what differs: the exact (erf) GELU, which the GeGLU
forms take with the approximation as a wildcard and their check refuses, and forms of their own that are never
fused (a squared ReLU gate; a SwiGLU with clamps, a scaled sigmoid and up shifted by one).
"""
import torch
import torch.nn.functional as F

from liger_compile.autocast import autocast_to
from liger_compile.kernels import gated_down_proj as _down_op  # noqa: F401  (defines the op)
from liger_compile.kernels import gated_mlp as _op  # noqa: F401  (defines the op)
from liger_compile.kernels._common import FLOAT_DTYPES
from liger_compile.matcher import Match, op_name
from liger_compile.pattern import Pattern


def swiglu(gate, up):
    return F.silu(gate) * up


# GELU's approximation is a wildcard: the exact (erf) GELU matches too, and the check says why it is not fused
def geglu(gate, up, approximate):
    return F.gelu(gate, approximate=approximate) * up


def swiglu_down(gate, up, weight):
    return F.linear(F.silu(gate) * up, weight)


def geglu_down(gate, up, weight, approximate):
    return F.linear(F.gelu(gate, approximate=approximate) * up, weight)


def make_fused_down(activation: str):
    def fused(gate, up, weight, **_):
        # type_as: a no-op for a weight in the activations' dtype; under autocast, the cast autocast's matmul makes
        return torch.ops.liger.gated_down_proj(gate, up, weight.type_as(gate), activation)

    return fused


def make_fused(activation: str):
    def fused(gate, up, **_):
        return torch.ops.liger.gated_mlp(gate, up, activation)

    return fused


# --- gated MLPs of other activations: matched only to say what differs (the kernels compute SiLU or tanh-GELU) ----
def squared_relu(gate, up):
    """relu(gate)² * up."""
    return torch.square(F.relu(gate)) * up


def clamped_swiglu(gate, up, limit, low, high, alpha, one):
    """A SwiGLU with clamps and a scale: gate clamped from above, up into [low, high], gate * sigmoid(alpha * gate)
    times (up + 1)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=low, max=high)
    return (up + one) * (gate * torch.sigmoid(gate * alpha))


OTHER_ACTIVATIONS = {
    "squared ReLU": "the gate's activation is a squared ReLU, relu(gate)²: the op computes silu(gate) * up or "
                    "gelu_tanh(gate) * up",
    "clamped SwiGLU": "the gate and up are clamped, the gate's activation is gate * sigmoid(alpha * gate) and up "
                      "is shifted by + 1: the op computes silu(gate) * up, with no clamp, scale or shift",
}


def refuse(form: str):
    return lambda m: OTHER_ACTIVATIONS[form]


def _never_fused(*args, **kwargs):
    raise AssertionError("refused by its check")


def check(m: Match) -> str | None:
    if "approximate" in m.bindings and m["approximate"] != "tanh":
        return (f"the activation is the exact GELU (approximate={m['approximate']!r}, with erf): the op computes "
                "the tanh approximation")
    g, u = m.value("gate"), m.value("up")
    if not isinstance(g, torch.Tensor) or not isinstance(u, torch.Tensor):
        return "gate or up is not a tensor"
    if g.shape != u.shape:
        return f"gate {tuple(g.shape)} and up {tuple(u.shape)} differ in shape (broadcasting is left to Inductor)"
    if g.dtype not in FLOAT_DTYPES or u.dtype != g.dtype:
        return f"unsupported dtypes gate={g.dtype}, up={u.dtype}"
    return None


def check_down(m: Match) -> str | None:
    why = check(m)
    if why:
        return why
    w, g = m.value("weight"), m.value("gate")
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[1] != g.shape[-1]:
        return "down_proj's weight is not a [hidden, intermediate] matrix"
    if w.dtype != g.dtype and not autocast_to(m.root, g):
        return f"down_proj weight {w.dtype} and activations {g.dtype} differ in dtype (and no autocast to {g.dtype})"
    return None


_PROJECTIONS = {"linear", "matmul", "mm", "bmm", "addmm", "baddbmm"}
_PASS_THROUGH = {"getitem", "chunk", "split", "narrow", "view", "reshape", "contiguous", "to", "transpose", "clamp"}


def _projected(node, depth: int = 4) -> bool:
    """node is a projection's output, or a slice / view / clamp of one (a fused gate_up half), a sum of two (a
    projection plus an adapter's) or one shifted by a constant, or may be one: a graph input (a site cut by a
    graph split computes its projections in the graph before)."""
    if isinstance(node, torch.fx.Node) and node.op == "placeholder":
        return True
    name = op_name(node) if isinstance(node, torch.fx.Node) else None
    if name in _PROJECTIONS:
        return True
    if name in _PASS_THROUGH and depth and node.args:
        return _projected(node.args[0], depth - 1)
    if name == "add" and depth and len(node.args) == 2:
        a, b = node.args
        if isinstance(b, (int, float)):
            return _projected(a, depth - 1)
        return _projected(a, depth - 1) and _projected(b, depth - 1)
    return False


def _activated(node, activation: str) -> bool:
    """node is `activation` applied to a projection: an op of that name ("silu", "gelu"), relu² ("relu2"), or the
    scaled swish x * sigmoid(alpha * x) ("scaled_swish")."""
    name = op_name(node)
    if not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    if activation == "relu2":
        inner = node.args[0]
        return name == "square" and op_name(inner) == "relu" and bool(inner.args) and _projected(inner.args[0])
    if activation == "scaled_swish":
        if name != "mul" or len(node.args) != 2:
            return False
        for x, s in (node.args, node.args[::-1]):
            if isinstance(s, torch.fx.Node) and op_name(s) == "sigmoid" and s.args and op_name(s.args[0]) == "mul":
                if x in s.args[0].args and _projected(x):
                    return True
        return False
    return name == activation and _projected(node.args[0])


def gated(activation: str):
    """A candidate site for near-miss reports: the activation of a projection multiplied by another projection
    (a gated MLP), or returned by the graph before its product (a site cut by a graph split); not every activation
    (a plain GELU MLP, Mamba's gate on its scan output)."""

    def test(node) -> bool:
        if not _activated(node, activation):
            return False
        return any(u.op == "output" or (op_name(u) == "mul" and any(a is not node and _projected(a) for a in u.args))
                   for u in node.users)

    return test


SILU, GELU = gated("silu"), gated("gelu")
PATTERNS = [
    Pattern("swiglu", "silu, down_proj", swiglu_down, make_fused_down("silu"), check_down, anchor=SILU),
    Pattern("geglu", "gelu_tanh, down_proj", geglu_down, make_fused_down("gelu_tanh"), check_down, anchor=GELU),
    Pattern("swiglu", "silu", swiglu, make_fused("silu"), check, anchor=SILU),
    Pattern("geglu", "gelu_tanh", geglu, make_fused("gelu_tanh"), check, anchor=GELU),
    # near misses only, reported with the SwiGLU sites they resemble
    Pattern("swiglu", "squared ReLU", squared_relu, _never_fused, refuse("squared ReLU"), anchor=gated("relu2")),
    Pattern("swiglu", "clamped SwiGLU", clamped_swiglu, _never_fused, refuse("clamped SwiGLU"),
            anchor=gated("scaled_swish")),
]
