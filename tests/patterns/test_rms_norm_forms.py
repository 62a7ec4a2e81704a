"""The other spellings of RMSNorm (a weightless norm, `square()`, `pow(v, -0.5)`, torch.rms_norm), read from transformers' own norm
modules: each is fused, plain and with the residual add before it, and the step gives eager's loss and gradients."""
import pytest
import torch
from transformers.models.deepseek_v4 import modeling_deepseek_v4
from transformers.models.falcon_mamba import modeling_falcon_mamba
from transformers.models.gemma3n import modeling_gemma3n
from transformers.models.hy_v4 import modeling_hy_v4
from transformers.models.inkling2 import modeling_inkling2
from transformers.models.kimi_linear import modeling_kimi_linear
from transformers.models.lara_mini import modeling_lara_mini
from transformers.models.mamba2 import modeling_mamba2
from transformers.models.nanochat import modeling_nanochat

import liger_compile
import model_sweep

D = 16
NO_INDUCTOR = {"inductor": False}  # our ops run eagerly: the rewrite is what is tested, in a fraction of the time

# name -> (the model's norm module, the variant it is fused as, and fed by the residual add: None where the add
# stays apart)
NORMS = {
    "nanochat": (lambda: modeling_nanochat.NanoChatRMSNorm(eps=1e-6), "weightless"),
    "falcon_mamba": (lambda: modeling_falcon_mamba.FalconMambaWeightlessRMSNorm(D), "weightless"),
    "inkling2 unweighted": (lambda: modeling_inkling2.Inkling2UnweightedRMSNorm(), "weightless, square"),
    "gemma3n": (lambda: modeling_gemma3n.Gemma3nRMSNorm(D), "scale_then_cast, pow(-0.5)"),
    "gemma3n with_scale=False": (lambda: modeling_gemma3n.Gemma3nRMSNorm(D, with_scale=False),
                                 "weightless, pow(-0.5)"),
    # torch.rms_norm as nn.RMSNorm records it (DiffLlama's groupnorm: no weight, eps None)
    "nn.RMSNorm": (lambda: torch.nn.RMSNorm(D, eps=1e-5), "functional"),
    "nn.RMSNorm without affine": (lambda: torch.nn.RMSNorm(D, elementwise_affine=False), "functional"),
    # x scaled by its inverse RMS rounded to x's dtype: liger::add_rms_norm has no such mode
    "deepseek_v4 unweighted": (lambda: modeling_deepseek_v4.DeepseekV4UnweightedRMSNorm(),
                               "rstd_in_input_dtype, square", None),
}


class Block(torch.nn.Module):
    """A pre-norm block: the first norm reads the input, the second the residual sum, which is used again after."""

    def __init__(self, make_norm):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.outer = make_norm(), make_norm()
        self.proj = torch.nn.Linear(D, D)
        for norm in (self.inner, self.outer):
            if getattr(norm, "weight", None) is not None and norm.weight.requires_grad:
                torch.nn.init.normal_(norm.weight, 1.0, 0.3)

    def forward(self, x):
        h = x + self.proj(self.inner(x))
        return (self.outer(h) * h).square().mean()


def _step(module, x, run=None):
    module.zero_grad(set_to_none=True)
    loss = (module if run is None else run)(x)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


def assert_step_matches_eager(module, x, rtol=1e-5, atol=1e-5):
    """The loss and every parameter gradient of the rewritten module (our ops run eagerly) equal eager's."""
    ref_loss, ref_grads = _step(module, x)
    loss, grads = _step(module, x, torch.compile(module, backend="liger", options=NO_INDUCTOR))
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", list(NORMS))
def test_form_is_fused_and_matches_eager(name):
    make_norm, variant, *fed_by_add = NORMS[name]
    fed_by_add = fed_by_add[0] if fed_by_add else f"{variant}, + residual"
    module, x = Block(make_norm), torch.randn(2, 5, D, requires_grad=False)
    report = liger_compile.explain(module, x)
    variants = sorted(s.variant for g in report.graphs for s in g.fused if s.pattern == "rms_norm")
    assert variants == sorted([variant, fed_by_add or variant]), str(report)
    assert not [m for m in report.near_misses if m.pattern == "rms_norm"], str(report)
    torch._dynamo.reset()
    assert_step_matches_eager(module, x)


@pytest.mark.parametrize("name", ["nanochat", "nn.RMSNorm", "nn.RMSNorm without affine", "deepseek_v4 unweighted"])
def test_form_in_bf16_matches_eager(name):
    module = Block(NORMS[name][0]).to(torch.bfloat16)
    x = torch.randn(2, 5, D).to(torch.bfloat16)
    assert_step_matches_eager(module, x, rtol=2e-2, atol=2e-2)


def test_nanochat_has_every_norm_fused():
    """The real model (the sweep's tiny config): every RMSNorm it runs is fused, the step equals eager's."""
    r = model_sweep.run_type("nanochat", diagnose=False)
    assert r["status"] == "ok", r
    assert r["fused"]["rms_norm"] == r["model"]["rms_norm"] > 0, r


class PowNormOverFirstDim(torch.nn.Module):
    def forward(self, x):
        h = x.float()
        return (h * torch.pow(h.pow(2).mean(0, keepdim=True) + 1e-6, -0.5)).type_as(x)


def test_power_form_near_miss_names_what_differs():
    """A site spelled with pow(v, -0.5) is reported like an rsqrt one when it cannot be fused."""
    report = liger_compile.explain(PowNormOverFirstDim(), torch.randn(4, D))
    assert report.counts["rms_norm"] == 0
    (miss,) = report.near_misses
    assert "not the last one" in miss.reason and "pow(-0.5)" in miss.reason, miss.reason


# the gated norms: (module, variant)
GATED = {
    "mamba2": (lambda: modeling_mamba2.MambaRMSNormGated(D, D), "gated"),
    "kimi_linear": (lambda: modeling_kimi_linear.KimiLinearRMSNormGated(D), "gated after, sigmoid"),
    "lara_mini": (lambda: modeling_lara_mini.LaraMiniRMSNormGated(D), "gated after, silu"),
}


class GatedBlock(torch.nn.Module):
    """A mixer's end: the gated norm of its output, then out_proj."""

    def __init__(self, make_norm=GATED["mamba2"][0]):
        super().__init__()
        torch.manual_seed(0)
        self.in_proj = torch.nn.Linear(D, 2 * D)
        self.norm = make_norm()
        torch.nn.init.normal_(self.norm.weight, 1.0, 0.3)
        self.out_proj = torch.nn.Linear(D, D)

    def forward(self, x):
        h, gate = self.in_proj(x).chunk(2, dim=-1)
        return self.out_proj(self.norm(h, gate)).square().mean()


@pytest.mark.parametrize("name", list(GATED))
def test_gated_norm_is_fused_and_matches_eager(name):
    make_norm, variant = GATED[name]
    module, x = GatedBlock(make_norm), torch.randn(2, 5, D)
    report = liger_compile.explain(module, x)
    assert [s.variant for g in report.graphs for s in g.fused if s.pattern == "rms_norm"] == [variant], str(report)
    assert report.counts["swiglu"] == 0  # the gate's product with silu(z) stays inside the norm
    torch._dynamo.reset()
    assert_step_matches_eager(module, x)


def test_mamba2_gated_norm_in_groups_is_a_near_miss():
    module = GatedBlock(lambda: modeling_mamba2.MambaRMSNormGated(D, D // 4))
    report = liger_compile.explain(module, torch.randn(2, 5, D))
    assert report.counts["rms_norm"] == 0
    (miss,) = [m for m in report.near_misses if m.pattern == "rms_norm"]
    assert "groups of 4 channels" in miss.reason, miss.reason


class InverseRmsScalesProjection(torch.nn.Module):
    """HY-V4's hyper-connection mix: linear(x) * inverse_rms(x), the norm's output never formed."""

    def __init__(self):
        super().__init__()
        self.norm = modeling_hy_v4.HYV4UnweightedRMSNorm()
        self.fn = torch.nn.Parameter(torch.randn(4, D))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.fn) * self.norm(x)


def test_inverse_rms_alone_is_a_near_miss_with_reason():
    report = liger_compile.explain(InverseRmsScalesProjection(), torch.randn(2, 5, D))
    assert report.counts["rms_norm"] == 0
    (miss,) = [m for m in report.near_misses if m.pattern == "rms_norm"]
    assert "only the inverse RMS" in miss.reason, miss.reason
