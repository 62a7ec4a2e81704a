"""The gated MLP's `act(gate) * up` (SwiGLU with SiLU, GeGLU with tanh-GELU), fused into ``liger::gated_act``.

`gate` and `up` are whatever feeds the product: the outputs of gate_proj and up_proj (Llama, Gemma...) or the two
halves of a fused gate_up_proj (Phi3); the op reads the halves in place. The activation is recomputed in backward
instead of being saved.
"""
import torch
import torch.nn.functional as F

from liger_compile.kernels import gated_mlp as _op  # noqa: F401  (defines the op)
from liger_compile.matcher import Match
from liger_compile.pattern import Pattern

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def swiglu(gate, up):
    return F.silu(gate) * up


def geglu(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def make_fused(activation: str):
    def fused(gate, up):
        return torch.ops.liger.gated_act(gate, up, activation)

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


PATTERNS = [
    Pattern("swiglu", "silu", swiglu, make_fused("silu"), check, anchor="silu"),
    Pattern("geglu", "gelu_tanh", geglu, make_fused("gelu_tanh"), check, anchor="gelu"),
]
