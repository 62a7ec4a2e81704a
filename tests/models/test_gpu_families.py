"""bf16 on CUDA: the families table (tests/models/test_families.py) and the convergence run (tests/models/test_convergence.py)
in the dtype people train in.

The CPU suite checks both in fp32 with fixed tolerances. In bf16 there is no fixed right answer, so each test
measures how far bf16 itself is from exact on the same model and holds backend="liger" to that:

* families: `explain` reports exactly the CPU counts and variants; a training step's loss and every gradient,
  compared with the same bf16 weights in float64 (the reference), may be off by at most
  K x max(eager's error, Inductor's error, |Inductor - eager|) + floor, with K = 2 and floors 1e-4 for the loss
  (absolute; its bf16 errors are ~1e-5..1e-4 at a loss of ~4.9) and 1e-3 for a gradient (relative norm). Inductor
  is the bar: it changes bf16 rounding too (fused elementwise in fp32), and so do our fused ops (fp32 math inside,
  logits never rounded to bf16). On CPU in bf16 the worst gradient of every family came out at 0.43-0.52 of its
  bound, i.e. as accurate as Inductor.
* convergence: 32 AdamW steps (lr 1e-3, bf16 parameters and optimizer state) under eager, Inductor and
  backend="liger"; the liger run's loss curve and final parameters may differ from Inductor's by at most
  max(C x eager's own difference from Inductor, floor), C = 2, floors 1e-3 (loss) and 2e-3 (parameters). The
  maxima over all steps or all parameter entries are what is compared: both runs drift from Inductor by rounding
  noise of the same kind, and a max over noise varies from run to run, hence the 2 (on CPU in bf16: parameters
  4.1e-3..7.0e-3 for liger vs Inductor against 5.4e-3..6.8e-3 for eager vs Inductor; losses 6e-4 against 1e-3..4e-3).

Tiny models (2 layers, hidden 64, head_dim 16, intermediate 128: multiples of 16 for bf16 tensor cores; vocabulary
128, batch 2 x 32 tokens, the convergence test's token stream), every family built from test_families.FAMILIES
(its config overrides and expected counts). The shapes are the same in both tests, so the convergence run's
compiles of llama, qwen3 and gemma2 may come from Inductor's cache.

Marked `gpu` (skipped without CUDA). To check the logic without a GPU: LIGER_TEST_DEVICE=cpu runs the same tests
on CPU (unmarked; LIGER_TEST_DTYPE=float32 for fp32), slowly.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import liger_compile
from models import batch, loss_and_grads, tiny_model
from test_convergence import BATCH, LR, SEQ, STEPS, VOCAB, token_stream
from test_families import FAMILIES, L, PATTERNS, uses_sdpa

DEVICE = os.environ.get("LIGER_TEST_DEVICE", "cuda")
DTYPE = getattr(torch, os.environ.get("LIGER_TEST_DTYPE", "bfloat16"))
pytestmark = [pytest.mark.gpu] if DEVICE == "cuda" else []

K, LOSS_ABS, GRAD_REL = 2.0, 1e-4, 1e-3  # training step: liger's error <= K x bf16's own error + floor
C, LOSS_FLOOR, PARAM_FLOOR = 2.0, 1e-3, 2e-3  # convergence: liger-vs-inductor <= max(C x eager-vs-inductor, floor)


def tiny(name: str, seed: int = 0):
    """The family's tiny model (test_families' config overrides) at tensor-core-friendly sizes (hidden 64: head_dim
    16, intermediate 128), in DTYPE."""
    fam = FAMILIES[name]
    return tiny_model(fam.config, fam.model, layers=L, vocab=VOCAB, hidden=64, seed=seed,
                      **fam.overrides).to(DEVICE, DTYPE)


def inputs():
    return {k: v.to(DEVICE) for k, v in batch(vocab=VOCAB, b=BATCH, t=SEQ).items()}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_explain_counts_bf16(name):
    """Exactly the CPU fp32 counts and variants (sliding windows of 4 < 32 tokens still cut the mask)."""
    fam = FAMILIES[name]
    model = tiny(name)
    report = liger_compile.explain(model, **inputs())
    assert not report.fallbacks, str(report)
    assert {p: report.counts[p] for p in PATTERNS} == fam.expected_for(model, L), str(report)
    sites = [s for g in report.graphs for s in g.fused]
    norms = [s.variant for s in sites if s.pattern == "rms_norm"]  # "<form>" or "<form>, + residual"
    assert {v.removesuffix(", + residual") for v in norms} == {fam.norm}, str(report)
    assert fam.norm + ", + residual" in norms, str(report)
    assert [s.variant for s in sites if s.pattern == "linear_cross_entropy"] == [fam.loss + ", logits lazy"]
    misses = [m for m in report.near_misses if m.pattern == "causal_mask"]
    assert all("not plain causal" in m.reason for m in misses), str(report)
    assert len(misses) + report.counts["causal_mask"] == (L if uses_sdpa(model) else 0), str(report)
    # the banded masks are not causal within segments either: no variable-length attention for them
    others = [m for m in report.near_misses if m.pattern != "causal_mask"]
    assert [m.where for m in others] == [m.where for m in misses] and report.counts["varlen_attention"] == 0


def errors(loss, grads, ref_loss, ref_grads) -> dict[str, float]:
    """|loss - ref| and, per parameter, |grad - ref| / |ref| (Frobenius norms, computed in float64)."""
    out = {"loss": abs(loss.double() - ref_loss.double()).item()}
    for name, ref in ref_grads.items():
        ref = ref.double()
        out[name] = ((grads[name].double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return out


def accuracy(liger, eager, inductor, ref) -> tuple[list[str], str]:
    """Holds liger's errors against the float64 reference to K x max(eager's error, Inductor's error,
    |Inductor - eager|) + floor. Each run is (loss, grads) as loss_and_grads returns them. Returns a line for each
    quantity over its bound (a NaN is) and a summary: the worst error / bound and the loss errors."""
    e_eager, e_ind, e_lig = (errors(*run, *ref) for run in (eager, inductor, liger))
    d_ind = errors(*inductor, *eager)  # Inductor vs eager, relative to eager's values
    bound = {q: K * max(e_eager[q], e_ind[q], d_ind[q]) + (LOSS_ABS if q == "loss" else GRAD_REL) for q in e_lig}
    worst = max(e_lig, key=lambda q: e_lig[q] / bound[q])
    summary = (f"worst liger error / bound {e_lig[worst] / bound[worst]:.2f} ({worst}); loss error liger "
               f"{e_lig['loss']:.2e}, eager {e_eager['loss']:.2e}, inductor {e_ind['loss']:.2e}")
    bad = [f"{q}: liger {e_lig[q]:.2e} > {bound[q]:.2e} (eager {e_eager[q]:.2e}, inductor {e_ind[q]:.2e}, "
           f"inductor-eager {d_ind[q]:.2e})" for q in e_lig if not e_lig[q] <= bound[q]]  # `not <=`: NaN fails
    return bad, summary


def compiled_step(model, x, backend, **kw):
    torch._dynamo.reset()
    return loss_and_grads(model, x, run=torch.compile(model, backend=backend, **kw))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_training_step_bf16_as_accurate_as_inductor(name):
    model, x = tiny(name), inputs()
    ref = loss_and_grads(copy.deepcopy(model).double(), x)  # the same bf16 weights, float64 math
    eager = loss_and_grads(model, x)
    inductor = compiled_step(model, x, "inductor")
    report = liger_compile.Report()
    liger = compiled_step(model, x, "liger", options={"report": report})
    assert report.counts["linear_cross_entropy"] == 1 and not report.fallbacks, str(report)
    assert liger[1].keys() == ref[1].keys()

    bad, summary = accuracy(liger, eager, inductor, ref)
    print(f"{name}: {summary}")
    assert not bad, "\n".join(bad)


def train(name: str, backend: str, **compile_kwargs):
    torch._dynamo.reset()
    model = tiny(name)
    run = model if backend == "eager" else torch.compile(model, backend=backend, **compile_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for ids in token_stream().to(DEVICE):
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
    return torch.stack(losses), {n: p.detach().float() for n, p in model.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in b)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_liger_follows_inductor_for_32_adamw_steps_bf16(family):
    assert STEPS >= 32
    report = liger_compile.Report()
    losses, params = train(family, "liger", options={"report": report})
    assert len(report.graphs) == 1 and not report.fallbacks, str(report)
    fused = ("rms_norm", "rotary", "swiglu", "geglu", "linear_cross_entropy")  # the counts no attention backend moves
    want = FAMILIES[family].expected(L)
    assert {p: report.counts[p] for p in fused} == {p: want[p] for p in fused}, str(report)
    ind_losses, ind_params = train(family, "inductor")
    eager_losses, eager_params = train(family, "eager")

    loss_diff, loss_noise = (losses - ind_losses).abs().max().item(), (eager_losses - ind_losses).abs().max().item()
    param_diff, param_noise = max_diff(params, ind_params), max_diff(eager_params, ind_params)
    print(f"{family}: loss |liger-inductor| {loss_diff:.2e}, |eager-inductor| {loss_noise:.2e}; "
          f"params {param_diff:.2e}, {param_noise:.2e}")
    assert loss_diff <= max(C * loss_noise, LOSS_FLOOR), (losses, ind_losses, eager_losses)
    assert param_diff <= max(C * param_noise, PARAM_FLOOR), (param_diff, param_noise)
    assert losses[-4:].mean() < losses[:4].mean() - 0.15, losses  # it does learn the stream
