"""bf16 on CUDA: PEFT LoRA models (adapters on every projection) under backend="liger", held to the accuracy bar of
test_gpu_families (K x bf16's own error against a float64 run of the same weights, + floor): the gated MLP fused
with its LoRA down_proj (liger::gated_down_proj_lora), the other adapters as they are or, enabled, as
liger::lora_linear, loss and every adapter gradient.
"""
from __future__ import annotations

import copy

import pytest
import torch

import liger_compile
from models import loss_and_grads
from test_gpu_families import DEVICE, DTYPE, accuracy, compiled_step, inputs, tiny

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []
EVERY_PROJECTION = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(name: str):
    # B random (init_lora_weights=False) so that no adapter gradient is trivially zero; adapters in the model's
    # dtype (PEFT would upcast them to float32, which keeps the plain act(gate) * up fusion instead)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=EVERY_PROJECTION, lora_dropout=0.0,
                             init_lora_weights=False)
    return peft.get_peft_model(tiny(name), config, autocast_adapter_dtype=False)


@pytest.mark.parametrize("disable", ["lora_projection", ""])  # the other adapters as they are / as liger::lora_linear
@pytest.mark.parametrize("name", ["llama", "gemma"])  # SwiGLU and GeGLU
def test_lora_training_step_bf16_as_accurate_as_inductor(name, disable, monkeypatch):
    monkeypatch.setenv("LIGER_COMPILE_DISABLE", disable)
    model, x = lora(name), inputs()
    report = liger_compile.explain(model, **x)
    down_lora = sum("down_proj with LoRA" in line for line in str(report).splitlines())
    assert down_lora == 2 and not report.fallbacks, str(report)
    assert report.counts["lora_projection"] == (0 if disable else 12), str(report)
    ref = loss_and_grads(copy.deepcopy(model).double(), x)
    eager = loss_and_grads(model, x)
    inductor = compiled_step(model, x, "inductor")
    liger = compiled_step(model, x, "liger")
    assert liger[1].keys() == ref[1].keys() and all("lora_" in n for n in ref[1]), sorted(ref[1])
    assert ref[1]["base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight"].dtype == torch.float64

    bad, summary = accuracy(liger, eager, inductor, ref)
    print(f"{name} LoRA ({DTYPE}, disabled: {disable or 'nothing'}): {summary}")
    assert not bad, "\n".join(bad)
