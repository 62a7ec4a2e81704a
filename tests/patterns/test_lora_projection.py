"""Projections carrying a PEFT LoRA adapter as liger::lora_linear (patterns/lora_projection.py, on by default):
every adapter of q/k/v/o/gate/up fused (down_proj goes with the gated MLP), with and without the base layer's bias,
under bf16 autocast with PEFT's float32 adapters, eager's loss and every gradient; the base weights get none."""
import pytest
import torch
import transformers as T

import liger_compile
from models import assert_matches_eager, batch, loss_and_grads, tiny_model
from test_gated_down_proj_fusion import EVERY_PROJECTION, lora_model

peft = pytest.importorskip("peft")


def sites(report) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in (s for g in report.graphs for s in g.fused):
        out[f"{s.pattern} [{s.variant}]"] = out.get(f"{s.pattern} [{s.variant}]", 0) + 1
    return out


def test_every_adapter_fuses_and_matches_eager():
    model = lora_model(EVERY_PROJECTION)
    report = liger_compile.explain(model, **batch())
    assert report.counts["lora_projection"] == 12 and report.counts["swiglu"] == 2, report  # 6 per layer
    assert sites(report)["swiglu [silu, down_proj with LoRA]"] == 2, report
    assert_matches_eager(model, batch())  # the compiled step runs last: its gradients are on the parameters
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)  # PEFT froze the base weights: none computed for them


def test_base_layer_bias_and_disable(monkeypatch):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0,
                             init_lora_weights=False)
    model = peft.get_peft_model(tiny_model(T.Qwen2Config, T.Qwen2ForCausalLM), config)  # biases on q, k and v
    assert liger_compile.explain(model, **batch()).counts["lora_projection"] == 6
    assert_matches_eager(model, batch())
    monkeypatch.setenv("LIGER_COMPILE_DISABLE", "lora_projection")  # the trainers' way to turn it off
    torch._dynamo.reset()
    assert liger_compile.explain(model, **batch()).counts["lora_projection"] == 0


def test_bf16_model_with_float32_adapters_under_autocast():
    """TRL's LoRA setting: a bf16 model, PEFT's float32 adapters, the Trainer's bf16=True (autocast)."""
    model = lora_model(EVERY_PROJECTION, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = liger_compile.explain(model, **batch())
    assert sites(report).get("lora_projection [projection with LoRA, adapter input cast]") == 12, report
    assert_autocast_step_within_bf16_noise(model)


def assert_autocast_step_within_bf16_noise(model):
    """Under bf16 autocast: our loss near eager's, every gradient in its parameter's dtype (float32 adapters) and
    within 3x what Inductor alone differs from eager, or 2% of the largest gradient."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_loss, eager_grads = loss_and_grads(model, batch())
        torch._dynamo.reset()
        loss, grads = loss_and_grads(model, batch(), torch.compile(model, backend="liger"))
        torch._dynamo.reset()
        _, inductor = loss_and_grads(model, batch(), torch.compile(model))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-2, atol=1e-2)
    assert grads.keys() == eager_grads.keys()
    for name, g in grads.items():
        assert g.dtype == torch.float32, name  # the adapters' gradients reach them in their own dtype
        scale = eager_grads[name].abs().max().item()
        bound = max(3 * (inductor[name] - eager_grads[name]).abs().max().item(), 0.02 * scale) + 1e-6
        assert (g - eager_grads[name]).abs().max().item() <= bound, name


def test_autocast_entered_inside_the_compiled_forward():
    """accelerate's mixed precision (the Trainer's bf16=True) wraps the forward in autocast before compiling it:
    the autocast region is in the graph, not around the compile, and the adapters fuse there too."""
    import functools

    model = lora_model(EVERY_PROJECTION, dtype=torch.bfloat16)

    def forward(**inputs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**inputs)

    report = liger_compile.explain(forward, **batch())
    assert sites(report).get("lora_projection [projection with LoRA, adapter input cast]") == 12, report
    assert sites(report).get("swiglu [silu, down_proj with LoRA, adapter input cast]") == 2, report
    eager_loss, eager_grads = loss_and_grads(model, batch(), forward)
    torch._dynamo.reset()
    ours = torch.compile(forward, backend=functools.partial(liger_compile.liger_backend, options={"inductor": False}))
    loss, grads = loss_and_grads(model, batch(), ours)  # our ops on their torch path, no Inductor
    torch.testing.assert_close(loss, eager_loss, rtol=1e-2, atol=1e-2)
    assert grads.keys() == eager_grads.keys()
    for name, g in grads.items():
        assert g.dtype == torch.float32, name
        # bf16 rounding: Inductor alone differs from eager by up to 3% of the largest gradient here, ours as much
        scale = eager_grads[name].abs().max().item()
        assert (g - eager_grads[name]).abs().max().item() <= 0.05 * scale + 1e-6, name


def test_mixed_dtypes_outside_autocast_are_left_alone_with_a_reason():
    model = lora_model(["q_proj"], dtype=torch.bfloat16)  # float32 adapter on a bf16 layer, no autocast
    report = liger_compile.explain(model, **batch())
    assert report.counts["lora_projection"] == 0
    reasons = [m.reason for m in report.near_misses if m.pattern == "lora_projection"]
    assert reasons and "differ in dtype outside autocast" in reasons[0], report


class AdapterWhoseProductEscapes(torch.nn.Module):
    """A LoRA projection that also returns the adapter's rank-r product: the op would have to hand it out too."""

    def __init__(self):
        super().__init__()
        self.base, self.a, self.b = (torch.nn.Linear(*s, bias=False) for s in ((16, 8), (16, 4), (4, 8)))

    def forward(self, x, escape: bool):
        h = self.a(x)
        y = self.base(x) + self.b(h) * 0.5
        return (y, h) if escape else y


def test_a_product_used_outside_the_site_blocks_the_fusion():
    model, x = AdapterWhoseProductEscapes(), torch.randn(2, 3, 16)
    assert liger_compile.explain(model, x, False).counts["lora_projection"] == 1
    torch._dynamo.reset()
    assert liger_compile.explain(model, x, True).counts["lora_projection"] == 0
