"""What both LoRA patterns ask of a PEFT adapter (``lora_b(lora_a(x)) * scaling`` beside a projection of x by
``weight``): two matrices that fit the projection, a constant scaling, and matmuls in one dtype: the adapter in x's
dtype, or autocast on to x's dtype (PEFT's float32 adapters under the Trainer's bf16=True). Autocast to another dtype
than x's would change what the matmuls compute."""
import torch

from liger_compile.autocast import autocast_dtype, autocast_to
from liger_compile.matcher import Match, op_name


def check_adapter(m: Match, x: torch.Tensor, weight: torch.Tensor, suffix: str = "") -> str | None:
    """The wildcards lora_a, lora_b, scaling and dtype, each name followed by suffix (a pattern of several
    adapters numbers them)."""
    a, b = m.value("lora_a" + suffix), m.value("lora_b" + suffix)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in (a, b)):
        return "the adapter's weights are not matrices"
    if a.shape[1] != x.shape[-1] or b.shape != (weight.shape[0], a.shape[0]):
        return (f"the projection {tuple(weight.shape)}, adapter A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                "together")
    if not isinstance(m["scaling" + suffix], (int, float)):
        return "the adapter's scaling is not a constant"
    autocast = autocast_dtype(m.root, x.device.type)
    if autocast not in (None, x.dtype):
        return f"autocast to {autocast} would change the matmuls' dtype"
    dtype = "dtype" + suffix
    if a.dtype != b.dtype or (dtype in m.bindings and m[dtype] != a.dtype):
        return f"the adapter's input and weights differ in dtype ({m.bindings.get(dtype)}, {a.dtype}, {b.dtype})"
    if a.dtype != x.dtype and not autocast_to(m.root, x):
        return (f"the adapter's weights ({a.dtype}) and the projection's input ({x.dtype}) differ in dtype outside "
                "autocast, so its matmuls mix dtypes (PEFT: autocast_adapter_dtype=False keeps the adapter in the "
                "model's dtype)")
    return None


def check_projection(m: Match, suffix: str = "") -> str | None:
    """A projection of x by weight (+ bias) carrying an adapter, each wildcard's name followed by suffix but x's."""
    x, w, bias = m.value("x"), m.value("weight" + suffix), m.value("bias" + suffix)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        return "the input is not a floating-point tensor of rank 2 or more"
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[1] != x.shape[-1]:
        return f"the base weight is not a matrix taking inputs of width {x.shape[-1]}"
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (w.shape[0],)):
        return "the base layer's bias is not one value per output"
    why = check_adapter(m, x, w, suffix)  # which also refuses autocast to another dtype than x's
    if why:
        return why
    for name, t in (("weight", w), ("bias", bias)):
        if t is not None and t.dtype != x.dtype and not autocast_to(m.root, x):
            return (f"the base {name} ({t.dtype}) and the input ({x.dtype}) differ in dtype outside autocast, so "
                    "the matmul mixes dtypes")
    return None


def adapter_sum(node) -> bool:
    """A candidate site for near-miss reports: an add of a projection and a scaled projection of a projection."""
    if op_name(node) != "add" or len(node.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in node.args):
        return False
    base, scaled = node.args
    return (op_name(base) == "linear" and op_name(scaled) == "mul" and isinstance(scaled.args[0], torch.fx.Node)
            and op_name(scaled.args[0]) == "linear")
