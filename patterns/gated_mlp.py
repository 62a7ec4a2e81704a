"""The gated MLP's `act(gate) * up` (SwiGLU with SiLU, GeGLU with tanh-GELU), fused into ``liger::gated_mlp``,
or, when the product goes straight into down_proj, `down_proj(act(gate) * up)` fused into ``liger::gated_down_proj``.

`gate` and `up` are whatever feeds the product: the outputs of gate_proj and up_proj (Llama, Gemma...) or the two
halves of a fused gate_up_proj (Phi3); the op reads the halves in place. The activation is recomputed in backward
instead of being saved, and with down_proj included so is the product (down_proj's weight gradient needs it), which
saves one [tokens, intermediate] activation per layer. The forms with down_proj come first: where the product is
also used elsewhere (a LoRA adapter on down_proj reads it too) they do not match and the plain form still does.
"""
import torch
import torch.nn.functional as F

from liger_compile.kernels import gated_down_proj as _down_op  # noqa: F401  (defines the op)
from liger_compile.kernels import gated_mlp as _op  # noqa: F401  (defines the op)
from liger_compile.kernels._common import FLOAT_DTYPES
from liger_compile.matcher import Match, op_name
from liger_compile.pattern import Pattern


def swiglu(gate, up):
    return F.silu(gate) * up


def geglu(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def swiglu_down(gate, up, weight):
    return F.linear(F.silu(gate) * up, weight)


def geglu_down(gate, up, weight):
    return F.linear(F.gelu(gate, approximate="tanh") * up, weight)


def make_fused_down(activation: str):
    def fused(gate, up, weight):
        return torch.ops.liger.gated_down_proj(gate, up, weight, activation)

    return fused


def make_fused(activation: str):
    def fused(gate, up):
        return torch.ops.liger.gated_mlp(gate, up, activation)

    return fused


def check(m: Match) -> str | None:
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
    if w.dtype != g.dtype:
        return f"down_proj weight {w.dtype} and activations {g.dtype} differ in dtype"
    return None


_PROJECTIONS = {"linear", "matmul", "mm", "bmm", "addmm", "baddbmm"}
_PASS_THROUGH = {"getitem", "chunk", "split", "narrow", "view", "reshape", "contiguous", "to", "transpose"}


def _projected(node, depth: int = 4) -> bool:
    """node is a projection's output, or a slice / view of one (a fused gate_up half), or may be one: a graph
    input (a site cut by a graph split computes its projections in the graph before)."""
    if isinstance(node, torch.fx.Node) and node.op == "placeholder":
        return True
    name = op_name(node) if isinstance(node, torch.fx.Node) else None
    if name in _PROJECTIONS:
        return True
    if name in _PASS_THROUGH and depth and node.args:
        return _projected(node.args[0], depth - 1)
    return False


def gated(activation: str):
    """A candidate site for near-miss reports: the activation of a projection multiplied by another projection
    (a gated MLP), or returned by the graph before its product (a site cut by a graph split); not every activation
    (a plain GELU MLP, Mamba's gate on its scan output)."""

    def test(node) -> bool:
        if op_name(node) != activation or not node.args or not _projected(node.args[0]):
            return False
        return any(u.op == "output" or (op_name(u) == "mul" and any(a is not node and _projected(a) for a in u.args))
                   for u in node.users)

    return test


PATTERNS = [
    Pattern("swiglu", "silu, down_proj", swiglu_down, make_fused_down("silu"), check_down, anchor=gated("silu")),
    Pattern("geglu", "gelu_tanh, down_proj", geglu_down, make_fused_down("gelu_tanh"), check_down,
            anchor=gated("gelu")),
    Pattern("swiglu", "silu", swiglu, make_fused("silu"), check, anchor=gated("silu")),
    Pattern("geglu", "gelu_tanh", geglu, make_fused("gelu_tanh"), check, anchor=gated("gelu")),
]
