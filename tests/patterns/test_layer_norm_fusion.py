"""LayerNorm is found in real HF models (GPT-NeoX, Phi with q/k norms) and in HF's hand-written LayerNorm modules
(Cohere's mean/variance form, OLMo's upcast form), fused at every call, and gives eager's numbers; the sites it must
not take are near misses with their reason, and still correct."""
import pytest
import torch
import transformers as T
from transformers.models.cohere.modeling_cohere import CohereLayerNorm
from transformers.models.olmo.modeling_olmo import OlmoLayerNorm

import liger_compile
from models import assert_matches_eager, batch

L = 2
TOL = dict(rtol=1e-5, atol=1e-5)
SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
             use_cache=False)


def gpt_neox():
    torch.manual_seed(0)
    return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**SMALL))


def phi():
    torch.manual_seed(0)
    return T.PhiForCausalLM(T.PhiConfig(**SMALL, qk_layernorm=True))  # + LayerNorms over the head dimension


# model -> LayerNorm calls per forward with L layers: GPT-NeoX input and post-attention norms per layer plus the
# final one; Phi one input norm and the q/k norms per layer, plus the final one
MODELS = {"gpt_neox": (gpt_neox, 2 * L + 1), "phi": (phi, 3 * L + 1)}


def layer_norm_calls(model, inputs) -> int:
    """How many times an eager forward calls an nn.LayerNorm module."""
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules()
             if isinstance(m, torch.nn.LayerNorm)]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    return len(calls)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_layer_norm_fused_and_training_step_matches_eager(name):
    make, expected = MODELS[name]
    model, inputs = make(), batch()
    assert layer_norm_calls(model, inputs) == expected
    report = liger_compile.Report()
    assert_matches_eager(model, inputs, **TOL, options={"report": report})
    assert not report.fallbacks, str(report)
    assert report.counts["layer_norm"] == expected, str(report)
    variants = [s.variant for g in report.graphs for s in g.fused if s.pattern == "layer_norm"]
    # the first norm of every layer after the first, and the final norm, read the previous block's residual sum
    assert variants.count("functional, + residual") == L and set(variants) == {"functional", "functional, + residual"}
    assert not [m for m in report.near_misses if m.pattern == "layer_norm"], str(report)


class Block(torch.nn.Module):
    """A projection, then a norm module; the output is squared so that the norm's gradient is not uniform."""

    def __init__(self, norm, d=32):
        super().__init__()
        self.proj = torch.nn.Linear(d, d)
        self.norm = norm

    def forward(self, x):
        return self.norm(self.proj(x)).square().sum(-1)


# The module-level tests run the rewritten graph without Inductor (options inductor=False: our op with its autograd
# formula, the rest as the graph has it); the model tests above go through Inductor.
EAGER_REWRITE = {"inductor": False}


def module_parity(module, x, variant, fused=1):
    """`fused` sites of `variant`; output and every gradient (input's included) equal eager's. -> the report"""
    torch.manual_seed(1)
    for p in module.parameters():  # not the ones and zeros they start as
        p.data.normal_(0.5, 0.5)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = module(x_ref)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    report = liger_compile.Report()
    out = torch.compile(module, backend="liger", options={"report": report, **EAGER_REWRITE})(x_ours)
    out.sum().backward()
    assert [s.variant for g in report.graphs for s in g.fused if s.pattern == "layer_norm"] == [variant] * fused, \
        str(report)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL)
    for n, p in module.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], **TOL, msg=lambda m: f"{n}: {m}")
    return report


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"elementwise_affine": False}],
                         ids=["weight+bias", "no bias (OLMo-style configs)", "no weight, no bias"])
def test_nn_layer_norm_with_and_without_parameters(kwargs):
    module_parity(Block(torch.nn.LayerNorm(32, eps=1e-6, **kwargs)), torch.randn(2, 5, 32), "functional")


def test_cohere_mean_variance_form():
    module_parity(Block(CohereLayerNorm(32, eps=1e-5)), torch.randn(2, 5, 32), "mean_variance")


def test_olmo_upcast_form_bf16():
    """OLMo's weightless LayerNorm of the input cast to fp32, cast back: one op on the bf16 input."""
    module = Block(OlmoLayerNorm(32)).to(torch.bfloat16)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    report = liger_compile.Report()
    out = torch.compile(module, backend="liger", options={"report": report, **EAGER_REWRITE})(x)
    assert [s.variant for g in report.graphs for s in g.fused] == ["upcast"], str(report)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, module(x), rtol=2e-2, atol=2e-2)


class UpcastKept(torch.nn.Module):
    """OLMo's form whose fp32 upcast is also returned: the upcast form cannot take it, the plain call still fuses."""

    def forward(self, x):
        h = x.to(torch.float32)
        return torch.nn.functional.layer_norm(h, (x.shape[-1],), None, None, 1e-5).to(x.dtype), h


def test_escaping_upcast_leaves_the_plain_call_fused():
    x = torch.randn(3, 16)
    report = liger_compile.explain(UpcastKept(), x)
    assert [s.variant for g in report.graphs for s in g.fused] == ["functional"], str(report)
    torch._dynamo.reset()
    for got, want in zip(torch.compile(UpcastKept(), backend="liger", options=EAGER_REWRITE)(x), UpcastKept()(x)):
        torch.testing.assert_close(got, want)


class Norm(torch.nn.Module):
    def __init__(self, shape=(16,), transpose=False):
        super().__init__()
        self.norm, self.transpose = torch.nn.LayerNorm(shape), transpose

    def forward(self, x):
        return self.norm(x.transpose(-1, -2) if self.transpose else x)


@pytest.mark.parametrize("module, x, reason", [
    (Norm((4, 16)), torch.randn(3, 4, 16), "not the last dimension alone"),
    (Norm(transpose=True), torch.randn(3, 16, 5), "stride 5"),  # normalises x.transpose(-1, -2)
    (Norm().double(), torch.randn(3, 16, dtype=torch.float64), "unsupported input dtype torch.float64"),
], ids=["two normalised dims", "transposed input", "float64"])
def test_refused_sites_are_near_misses_with_reason_and_correct(module, x, reason):
    report = liger_compile.explain(module, x)
    assert report.counts["layer_norm"] == 0, str(report)
    (miss,) = report.near_misses
    assert miss.pattern == "layer_norm" and reason in miss.reason, str(report)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(module, backend="liger", options=EAGER_REWRITE)(x), module(x))


def test_cohere_qk_norm_weight_per_head_is_left_alone_and_correct():
    """Cohere's q/k norms carry a [heads, head_dim] weight: not the op's [H] weight, so not fused."""
    module, x = CohereLayerNorm((4, 8)), torch.randn(2, 3, 4, 8)
    with torch.no_grad():
        module.weight.normal_()
    report = liger_compile.explain(module, x)
    assert report.counts["layer_norm"] == 0, str(report)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(module, backend="liger", options=EAGER_REWRITE)(x), module(x))


def test_dynamic_shapes_still_fused():
    module = Block(torch.nn.LayerNorm(32))
    report = liger_compile.Report()
    compiled = torch.compile(module, backend="liger", dynamic=True, options={"report": report})
    for t in (5, 7, 9):
        x = torch.randn(2, t, 32)
        torch.testing.assert_close(compiled(x), module(x), **TOL)
    assert len(report.graphs) == 1 and report.counts["layer_norm"] == 1, str(report)


def gpt2():
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=32, n_layer=L, n_head=4, n_positions=64,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False))


def opt():
    torch.manual_seed(0)
    return T.OPTForCausalLM(T.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=L,
                                        num_attention_heads=4, word_embed_proj_dim=32, dropout=0.0, use_cache=False))


# model -> (LayerNorm sites, those fed by a residual add): GPT-2's ln_2 of each layer, the next layer's ln_1 and the
# final ln_f read a sum; in OPT only the first layer's norm does (the embeddings' add), the others reach their add
# through a reshape and stay the plain form
RESIDUAL_MODELS = {"gpt2": (gpt2, 2 * L + 1, 2 * L), "opt": (opt, 2 * L + 1, 1)}


@pytest.mark.parametrize("name", list(RESIDUAL_MODELS))
def test_norms_fed_by_a_residual_add_take_the_add_along(name):
    make, total, with_add = RESIDUAL_MODELS[name]
    model, inputs = make(), batch()
    report = liger_compile.Report()
    assert_matches_eager(model, inputs, **TOL, options={"report": report, **EAGER_REWRITE})
    variants = [s.variant for g in report.graphs for s in g.fused if s.pattern == "layer_norm"]
    assert len(variants) == total and variants.count("functional, + residual") == with_add, str(report)
