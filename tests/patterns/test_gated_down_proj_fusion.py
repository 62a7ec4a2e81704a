"""The gated MLP fused with its down_proj: under bf16 autocast on a float32 model (the Trainer's bf16=True), and with
a PEFT LoRA adapter on down_proj (liger::gated_down_proj_lora), with eager's loss and every gradient; an adapter whose
matmuls would mix dtypes keeps the plain act(gate) * up fusion."""
import pytest
import torch

import liger_compile
from models import assert_matches_eager, batch, loss_and_grads, tiny

peft = pytest.importorskip("peft")
EVERY_PROJECTION = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(targets, dtype=torch.float32, family="llama", **kw):
    model = tiny(family).to(dtype)
    # init_lora_weights=False: B is random, not zero, so the adapters' gradients are not trivially zero
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(model, config, **kw)


@pytest.mark.parametrize("family", ["llama", "gemma"])  # SwiGLU and GeGLU
def test_down_proj_adapter_fuses_and_matches_eager(family):
    model = lora_model(EVERY_PROJECTION, family=family)
    report = liger_compile.explain(model, **batch())
    name = "swiglu" if family == "llama" else "geglu"
    assert report.counts[name] == 2, report
    assert sum("down_proj with LoRA" in line for line in str(report).splitlines()) == 2, report
    assert_matches_eager(model, batch())


def lora_sites(model) -> tuple[int, int]:
    """(gated MLPs fused with their down_proj adapter, fused as act(gate) * up alone)."""
    lines = str(liger_compile.explain(model, **batch())).splitlines()
    return sum("down_proj with LoRA" in line for line in lines), sum("[silu] " in line for line in lines)


def test_adapter_in_another_dtype_than_the_model_keeps_the_plain_fusion():
    model = lora_model(["down_proj"], dtype=torch.bfloat16)  # PEFT's default: adapters upcast to float32
    assert model.base_model.model.model.layers[0].mlp.down_proj.lora_A["default"].weight.dtype == torch.float32
    assert lora_sites(model) == (0, 2)  # the adapter's matmuls in float32 are not the op's: act(gate) * up only
    same_dtype = lora_model(["down_proj"], dtype=torch.bfloat16, autocast_adapter_dtype=False)
    assert lora_sites(same_dtype) == (2, 0)


def test_float32_model_and_adapters_under_bf16_autocast_fuse_and_match_eager():
    """The Trainer's bf16=True on a float32 model: autocast runs down_proj's and the adapter's matmuls in bf16; the
    op takes the weights cast as autocast casts them, and its gradients reach the float32 parameters."""
    model = lora_model(["down_proj"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lora_sites(model) == (2, 0)
        eager_loss, eager_grads = loss_and_grads(model, batch())
        torch._dynamo.reset()
        loss, grads = loss_and_grads(model, batch(), torch.compile(model, backend="liger"))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-3, atol=1e-3)
    assert grads.keys() == eager_grads.keys() and any("lora_A" in n for n in grads)
    for name, g in grads.items():
        assert g.dtype == torch.float32, name
        # bf16 rounding: up to 1% of the largest gradient, as much as Inductor alone (without the fusion) differs
        scale = eager_grads[name].abs().max().item()
        torch.testing.assert_close(g, eager_grads[name], rtol=0, atol=0.03 * scale + 1e-6, msg=name)


def test_float32_model_under_bf16_autocast_fuses_down_proj():
    model = tiny("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lines = str(liger_compile.explain(model, **batch())).splitlines()
        assert sum("[silu, down_proj]" in line for line in lines) == 2, lines
        eager_loss, eager_grads = loss_and_grads(model, batch())
        torch._dynamo.reset()
        loss, grads = loss_and_grads(model, batch(), torch.compile(model, backend="liger"))
        torch._dynamo.reset()
        _, inductor = loss_and_grads(model, batch(), torch.compile(model))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-3, atol=1e-3)
    for name, g in grads.items():
        # bf16 rounding, bounded by 3x what Inductor alone differs from eager (and 1% of the largest gradient)
        scale = eager_grads[name].abs().max().item()
        bound = max(3 * (inductor[name] - eager_grads[name]).abs().max().item(), 0.01 * scale) + 1e-6
        assert g.dtype == torch.float32 and (g - eager_grads[name]).abs().max().item() <= bound, name
