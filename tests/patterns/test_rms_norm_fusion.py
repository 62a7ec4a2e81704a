"""RMSNorm is found in real HF models whatever their class, fused, and gives eager's numbers."""
import pytest
import torch

import liger_compile
from models import assert_matches_eager, batch, tiny

LAYERS = 2
# norms per model: 2 per layer + the final norm; Qwen3 and OLMo2 add q/k norms per layer
EXPECTED_RMS_NORMS = {"llama": 2 * LAYERS + 1, "qwen3": 4 * LAYERS + 1, "gemma": 2 * LAYERS + 1,
                      "olmo2": 4 * LAYERS + 1}
VARIANT = {"llama": "llama", "qwen3": "llama", "gemma": "gemma", "olmo2": "scale_then_cast"}
# norms whose input is a residual add: pre-norm models' post-attention norms, the later layers' input norms and the
# final norm; OLMo2 normalises branch outputs before its adds, so only its final norm reads an add
RESIDUAL_NORMS = {"llama": 2 * LAYERS, "qwen3": 2 * LAYERS, "gemma": 2 * LAYERS, "olmo2": 1}


@pytest.mark.parametrize("family", list(EXPECTED_RMS_NORMS))
def test_explain_counts_every_norm(family):
    model = tiny(family, layers=LAYERS)
    report = liger_compile.explain(model, **batch())
    assert report.counts["rms_norm"] == EXPECTED_RMS_NORMS[family], str(report)
    assert set(report.counts) >= {"rms_norm", "rotary", "swiglu", "geglu", "linear_cross_entropy"}
    variants = [s.variant for g in report.graphs for s in g.fused if s.pattern == "rms_norm"]
    # every norm fed by a residual add (all but the first layer's input norm and the q/k norms) takes the add along
    assert variants.count(VARIANT[family] + ", + residual") == RESIDUAL_NORMS[family], str(report)
    assert set(variants) == {VARIANT[family], VARIANT[family] + ", + residual"}
    assert not report.near_misses, str(report)  # nothing of any pattern missed in these models
    text = str(report)
    assert "model.layers.0." in text and "modeling_" in text  # where: module path and source line
    assert VARIANT[family] + ", + residual" in text


# The fp32 training step of these very models (same configs and seeds) equals eager's in
# tests/models/test_families.py::test_training_step_matches_eager, with the logits checked too.
def test_training_step_matches_eager_bf16():
    model = tiny("llama").to(torch.bfloat16)
    assert_matches_eager(model, batch(), rtol=2e-2, atol=2e-2)


def test_dynamic_shapes_still_fused():
    model = tiny("llama")
    report = liger_compile.Report()
    compiled = torch.compile(model, backend="liger", dynamic=True, options={"report": report})
    for t in (8, 11, 13):
        out = compiled(**batch(t=t))
        ref = model(**batch(t=t))
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    assert len(report.graphs) == 1, "one dynamic graph serves every length"
    assert report.counts["rms_norm"] == 2 * LAYERS + 1
    variants = [s.variant for g in report.graphs for s in g.fused if s.pattern == "rms_norm"]
    assert variants.count("llama, + residual") == RESIDUAL_NORMS["llama"], str(report)  # the add fused at any length


def test_eval_no_grad_matches_eager():
    model = tiny("gemma").eval()
    inputs = batch()
    with torch.no_grad():
        ref = model(**inputs)
        out = torch.compile(model, backend="liger")(**inputs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)


class NormReturningIntermediate(torch.nn.Module):
    """Llama's RMSNorm, but the normalised fp32 value escapes: fusing would have to drop it."""

    def __init__(self, d=16):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d))

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype), h


def test_escaping_intermediate_blocks_fusion_and_stays_correct():
    module, x = NormReturningIntermediate(), torch.randn(3, 16)
    report = liger_compile.explain(module, x)
    assert report.counts["rms_norm"] == 0
    (miss,) = report.near_misses
    assert "also used" in miss.reason, miss.reason
    torch._dynamo.reset()
    out, h = torch.compile(module, backend="liger")(x)
    ref_out, ref_h = module(x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(h, ref_h)


class NormOverFirstDim(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d))

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(0, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


def test_reduction_over_other_dim_is_a_near_miss_with_reason():
    report = liger_compile.explain(NormOverFirstDim(), torch.randn(16, 16))
    assert report.counts["rms_norm"] == 0
    (miss,) = report.near_misses
    assert "not the last one" in miss.reason
