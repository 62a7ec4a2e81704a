"""What both LoRA patterns ask of a PEFT adapter (``lora_b(lora_a(x)) * scaling`` beside a projection of x by
``weight``): two matrices that fit the projection, a constant scaling, and matmuls in one dtype: the adapter in x's
dtype, or autocast on to x's dtype (PEFT's float32 adapters under the Trainer's bf16=True). Autocast to another dtype
than x's would change what the matmuls compute."""
import torch

from liger_compile.autocast import autocast_dtype, autocast_to
from liger_compile.matcher import Match


def check_adapter(m: Match, x: torch.Tensor, weight: torch.Tensor) -> str | None:
    a, b = m.value("lora_a"), m.value("lora_b")
    if not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in (a, b)):
        return "the adapter's weights are not matrices"
    if a.shape[1] != x.shape[-1] or b.shape != (weight.shape[0], a.shape[0]):
        return (f"the projection {tuple(weight.shape)}, adapter A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                "together")
    if not isinstance(m["scaling"], (int, float)):
        return "the adapter's scaling is not a constant"
    autocast = autocast_dtype(m.root, x.device.type)
    if autocast not in (None, x.dtype):
        return f"autocast to {autocast} would change the matmuls' dtype"
    if a.dtype != b.dtype or ("dtype" in m.bindings and m["dtype"] != a.dtype):
        return f"the adapter's input and weights differ in dtype ({m.bindings.get('dtype')}, {a.dtype}, {b.dtype})"
    if a.dtype != x.dtype and not autocast_to(m.root, x):
        return (f"the adapter's weights ({a.dtype}) and the projection's input ({x.dtype}) differ in dtype outside "
                "autocast, so its matmuls mix dtypes (PEFT: autocast_adapter_dtype=False keeps the adapter in the "
                "model's dtype)")
    return None
