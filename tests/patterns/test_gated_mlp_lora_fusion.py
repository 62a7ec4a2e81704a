"""A PEFT LoRA adapter on down_proj: the gated MLP still fuses, into liger::gated_down_proj_lora, with eager's loss
and every gradient (adapters and the rest); an adapter in another dtype than the model keeps the plain fusion."""
import pytest
import torch

import liger_compile
from models import assert_matches_eager, batch, tiny

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
