"""Model coverage: every supported family, its exact fusions, and a training step equal to eager.

One table: adding a family is one line. Each row gives transformers' own config and model classes, the config
overrides that make the tiny model exercise what is special about the family, and the expected number of fused
sites of every pattern for a model of L decoder layers. `explain` must report exactly those counts, and a
training step (fp32) under backend="liger" must give eager's loss, logits and every parameter gradient.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch
import transformers as T

import liger_compile
from models import assert_matches_eager, batch, loss_and_grads, tiny_model

L = 2  # decoder layers
SEQ = 8  # tokens per row; the sliding windows below are shorter, so they really cut the causal mask
WINDOW = 4
TOL = dict(rtol=1e-5, atol=1e-5)
PATTERNS = ("rms_norm", "rotary", "swiglu", "geglu", "linear_cross_entropy", "causal_mask")


def counts(L: int, norms: int, mlp: str, causal: int) -> dict[str, int]:
    """For L layers: `norms` RMSNorms per layer plus the final one, rotary and the gated MLP once per layer, one
    fused loss, and `causal` attention calls whose mask is plain causal (rewritten to is_causal SDPA)."""
    return {"rms_norm": norms * L + 1, "rotary": L, "swiglu": L if mlp == "swiglu" else 0,
            "geglu": L if mlp == "geglu" else 0, "linear_cross_entropy": 1, "causal_mask": causal}


class Family(NamedTuple):
    config: type
    model: type
    overrides: dict
    expected: Callable[[int], dict[str, int]]  # L layers -> fused sites per pattern
    norm: str = "llama"  # the rms_norm variant every norm of the family matches
    loss: str = "fp32"  # the linear_cross_entropy variant (without the ", logits lazy" suffix)
    # plain-causal attention calls when the model runs SDPA although `expected` assumes HF's eager attention
    causal_if_sdpa: Callable[[int], int] | None = None

    def expected_for(self, model, layers: int) -> dict[str, int]:
        want = self.expected(layers)
        if self.causal_if_sdpa is not None and uses_sdpa(model):
            want["causal_mask"] = self.causal_if_sdpa(layers)
        return want


NO_SPECIAL_TOKENS = {"pad_token_id": None, "eos_token_id": None, "bos_token_id": None}
# Granite scales embeddings, residual branches, attention scores and logits; none of them is 1 here, so a fusion
# that dropped one would show in the numbers.
GRANITE = {"embedding_multiplier": 6.0, "residual_multiplier": 0.5, "attention_multiplier": 0.3,
           "logits_scaling": 4.0}

FAMILIES = {
    "llama": Family(T.LlamaConfig, T.LlamaForCausalLM, {}, lambda L: counts(L, 2, "swiglu", causal=L)),
    # every Mistral layer attends through a sliding window (4 < 8 tokens): banded masks, not causal ones
    "mistral": Family(T.MistralConfig, T.MistralForCausalLM, {"sliding_window": WINDOW},
                      lambda L: counts(L, 2, "swiglu", causal=0)),
    "qwen2": Family(T.Qwen2Config, T.Qwen2ForCausalLM, {}, lambda L: counts(L, 2, "swiglu", causal=L)),
    # + q_norm, k_norm over head_dim
    "qwen3": Family(T.Qwen3Config, T.Qwen3ForCausalLM, {}, lambda L: counts(L, 4, "swiglu", causal=L)),
    "gemma": Family(T.GemmaConfig, T.GemmaForCausalLM, {}, lambda L: counts(L, 2, "geglu", causal=L), norm="gemma"),
    # four norms per layer (pre/post attention, pre/post MLP); soft-capped logits; the soft-capped attention
    # scores run HF's eager attention in transformers 5.24 (no SDPA call to rewrite); 5.17 runs SDPA on CUDA, where
    # the full-attention half of the layers (they alternate with sliding ones) has a plain causal mask
    "gemma2": Family(T.Gemma2Config, T.Gemma2ForCausalLM, {"sliding_window": WINDOW, "final_logit_softcapping": 30.0},
                     lambda L: counts(L, 4, "geglu", causal=0), norm="gemma", loss="softcap, fp32",
                     causal_if_sdpa=lambda L: L // 2),
    # four norms + q_norm, k_norm per layer; with sliding_window_pattern=2 layers alternate sliding / full: only
    # the full-attention layers' masks are plain causal (the sliding ones are banded: a near miss, checked below;
    # with a window longer than the sequence they would be causal too, and fused, which is also right)
    "gemma3": Family(T.Gemma3TextConfig, T.Gemma3ForCausalLM, {"sliding_window": WINDOW, "sliding_window_pattern": 2},
                     lambda L: counts(L, 6, "geglu", causal=L // 2), norm="gemma"),
    # fused qkv_proj and gate_up_proj: the gated MLP reads the two halves of one projection
    "phi3": Family(T.Phi3Config, T.Phi3ForCausalLM, {**NO_SPECIAL_TOKENS, "pad_token_id": 0},
                   lambda L: counts(L, 2, "swiglu", causal=L)),
    "granite": Family(T.GraniteConfig, T.GraniteForCausalLM, GRANITE, lambda L: counts(L, 2, "swiglu", causal=L),
                      loss="/ scale, fp32"),
    # + q_norm, k_norm over the full projection width (heads * head_dim); norms scale before casting back
    "olmo2": Family(T.Olmo2Config, T.Olmo2ForCausalLM, NO_SPECIAL_TOKENS, lambda L: counts(L, 4, "swiglu", causal=L),
                    norm="scale_then_cast"),
}


# Families some of whose sites no pattern covers yet, so their counts are not pinned in FAMILIES: (config class,
# model class, overrides). `explain` and a training step with our ops run eagerly must still work and equal eager.
UNPINNED = {
    # MoE layers add the routed experts' output into the shared expert's down_proj output in place; rotary in
    # complex numbers, weightless q/k L2 norms
    "llama4_text": (T.Llama4TextConfig, T.Llama4ForCausalLM, {"intermediate_size_mlp": 64, "num_local_experts": 2}),
}


def tiny(name: str, layers: int = L, seed: int = 0):
    config, model, overrides = (FAMILIES[name][:3] if name in FAMILIES else UNPINNED[name])
    return tiny_model(config, model, layers=layers, seed=seed, **overrides)


def uses_sdpa(model) -> bool:
    return model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_explain_counts_exactly(name):
    fam = FAMILIES[name]
    model = tiny(name)
    report = liger_compile.explain(model, **batch(t=SEQ))
    assert not report.fallbacks, str(report)
    assert {p: report.counts[p] for p in PATTERNS} == fam.expected_for(model, L), str(report)
    sites = [s for g in report.graphs for s in g.fused]
    # the norms fed by a residual add take it along ("<form>, + residual"), the final norm at least
    norms = [s.variant for s in sites if s.pattern == "rms_norm"]
    assert {v.removesuffix(", + residual") for v in norms} == {fam.norm}, str(report)
    assert fam.norm + ", + residual" in norms, str(report)
    assert [s.variant for s in sites if s.pattern == "linear_cross_entropy"] == [fam.loss + ", logits lazy"]
    # The only sites left alone are attention calls whose mask is not plain causal (sliding windows): the
    # check evaluates the mask while compiling and finds the band. Each SDPA call is either rewritten or one
    # of these near misses; nothing else is missed.
    sdpa_calls = L if uses_sdpa(model) else 0
    misses = [m for m in report.near_misses if m.pattern == "causal_mask"]
    assert all("not plain causal" in m.reason for m in misses), str(report)
    assert len(misses) + report.counts["causal_mask"] == sdpa_calls, str(report)
    # the banded masks are not causal within segments either: no variable-length attention for them
    others = [m for m in report.near_misses if m.pattern != "causal_mask"]
    assert [m.where for m in others] == [m.where for m in misses] and report.counts["varlen_attention"] == 0
    assert all(m.pattern == "varlen_attention" and "not causal within segments" in m.reason for m in others)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_training_step_matches_eager(name):
    """fp32: loss, logits (lazy, read after the step) and every parameter gradient within rtol/atol 1e-5."""
    model = tiny(name)
    inputs = batch(t=SEQ)
    ref_loss, ref_grads = loss_and_grads(model, inputs)
    ref_logits = model(**inputs).logits.detach()
    report = liger_compile.Report()
    compiled = torch.compile(model, backend="liger", options={"report": report})
    outputs = []

    def run(**kw):
        outputs.append(compiled(**kw))
        return outputs[-1]

    loss, grads = loss_and_grads(model, inputs, run=run)
    assert report.counts["linear_cross_entropy"] == 1 and not report.fallbacks, str(report)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(outputs[0].logits * 1, ref_logits, **TOL)  # materialises the lazy logits
    assert grads.keys() == ref_grads.keys()
    for param in ref_grads:
        torch.testing.assert_close(grads[param], ref_grads[param], **TOL, msg=lambda m: f"{param}: {m}")


@pytest.mark.parametrize("name", [*FAMILIES, *UNPINNED])
def test_explain_and_uncompiled_training_match_eager(name):
    """`explain` and options={"inductor": False} run the rewritten graph eagerly: our ops with their autograd
    formulas, where the model may modify their outputs in place (autograd forbids that on an op's view outputs).
    The step's loss and every gradient equal eager's. (`explain` of the pinned families: test_explain_counts_exactly.)"""
    model, inputs = tiny(name), batch(t=SEQ)
    if name in UNPINNED:
        report = liger_compile.explain(model, **inputs)
        assert not report.fallbacks and report.counts["rms_norm"] > 0, str(report)
        torch._dynamo.reset()
    assert_matches_eager(model, inputs, **TOL, options={"inductor": False})


class ScaledHead(torch.nn.Module):
    """An LM head with a bias whose logits are divided before the loss, as Granite's are (by a constant), or by
    a tensor (`divisor` given): the latter is not a constant the fused op can fold into its input. `multiply`:
    multiplied instead, as Cohere's are (by `logit_scale`); `softcap`: then soft-capped, as Gemma2's are."""

    def __init__(self, hidden=32, vocab=128, divisor=None, multiply=False, softcap=None):
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=True)
        self.divisor, self.multiply, self.softcap = divisor, multiply, softcap

    def forward(self, hidden, labels):
        logits = self.lm_head(hidden)
        if self.multiply:
            logits = logits * 0.0625
        else:
            logits = logits / (4.0 if self.divisor is None else self.divisor)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))
        return loss, logits


@pytest.mark.parametrize("multiply, softcap, variant", [(False, None, "/ scale, fp32"), (True, None, "* scale, fp32"),
                                                         (True, 2.0, "* scale, softcap, fp32"),
                                                         (False, 2.0, "/ scale, softcap, fp32")])
def test_scaled_logits_with_bias_and_kept_logits_match_eager(multiply, softcap, variant):
    torch.manual_seed(0)
    head, hidden, labels = (ScaledHead(multiply=multiply, softcap=softcap), torch.randn(2, 8, 32, requires_grad=True),
                            torch.randint(0, 128, (2, 8)))
    ref_loss, ref_logits = head(hidden, labels)
    ref_loss.backward()
    ref_grads = [t.grad.clone() for t in (hidden, *head.parameters())]
    for t in (hidden, *head.parameters()):
        t.grad = None
    report = liger_compile.Report()
    loss, logits = torch.compile(head, backend="liger", options={"report": report, "skip_logits": False})(hidden,
                                                                                                       labels)
    loss.backward()
    (site,) = [s for g in report.graphs for s in g.fused]
    assert site.variant == f"{variant}, logits kept", str(report)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(logits, ref_logits.detach(), **TOL)
    for got, ref in zip([t.grad for t in (hidden, *head.parameters())], ref_grads):
        torch.testing.assert_close(got, ref, **TOL)

    report = liger_compile.explain(ScaledHead(divisor=torch.tensor(4.0)), hidden, labels)
    assert report.counts["linear_cross_entropy"] == 0
    (miss,) = report.near_misses
    assert "not by a nonzero constant" in miss.reason, str(report)
