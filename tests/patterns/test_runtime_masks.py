"""Masks built from the batch's own tensors: the trainers' collators always pass a 2D `attention_mask` or
`position_ids`. Under torch.compile HF builds an explicit [B, 1, T, T] mask from them; the graph is compiled assuming
that every real token sees exactly the tokens before it (unpadded and right-padded batches: then SDPA runs
`is_causal`), builds and tests the mask at every call, and runs its second version, compiled once on first need, for
any other batch (left padding, packed documents), where the attention is the variable-length op.

fp32: every step's loss and every gradient equal eager's (on CPU to rounding; on a GPU, where the causal and the
masked attention are different kernels, within 1e-4). Labels are -100 at padding, as every collator makes them.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import liger_compile
import liger_compile.backend as backend_module
from liger_compile import facts
from models import DEVICE, batch, tiny
from test_graph_breaks import compare as assert_step_matches_eager

B, T = 2, 8


def with_mask(mask: torch.Tensor, seed: int = 1) -> dict:
    inputs = batch(b=B, t=T, seed=seed)
    return {**inputs, "attention_mask": mask, "labels": inputs["labels"].masked_fill(mask == 0, -100)}


def right_padded(lengths=(8, 5)) -> torch.Tensor:
    return (torch.arange(T) < torch.tensor(lengths)[:, None]).long()


def left_padded(lengths=(6, 8)) -> torch.Tensor:
    return (torch.arange(T) >= T - torch.tensor(lengths)[:, None]).long()


@pytest.mark.parametrize("given", ["attention_mask", "position_ids", "both"])
def test_plain_batches_run_causal_attention(given, second_versions):
    """An all-ones mask and/or positions 0..T-1: fused (report), the call takes the causal version (Inductor)."""
    model = tiny("llama", layers=2).to(DEVICE)
    inputs = batch(b=B, t=T)
    if given in ("attention_mask", "both"):
        inputs["attention_mask"] = torch.ones(B, T, dtype=torch.long)
    if given in ("position_ids", "both"):
        inputs["position_ids"] = torch.arange(T).expand(B, T)
    report = liger_compile.Report()
    compiled = torch.compile(model, backend="liger", options={"report": report})
    before = facts.stats["assumed"]
    assert_step_matches_eager(model, compiled, inputs)
    sites = [s for g in report.graphs for s in g.fused if s.pattern == "causal_mask"]
    assert len(sites) == 2 and all("at run time" in s.variant for s in sites), str(report)
    assert not report.near_misses, str(report)
    assert facts.stats["assumed"] - before == 1 and second_versions == []


def test_padded_and_unpadded_batches_alternate_exactly_without_recompiling(second_versions):
    """20 steps: unpadded, right-padded, left-padded, right-padded again, ...; each equals eager; the graph is
    traced once by Dynamo, its second version built once (for the left-padded batches)."""
    model = tiny("llama", layers=2).to(DEVICE)
    compiled = torch.compile(model, backend="liger", options={"inductor": False})
    masks = [torch.ones(B, T, dtype=torch.long), right_padded(), left_padded(), right_padded((3, 8))]
    counters.clear()
    assumed, fallback = facts.stats["assumed"], facts.stats["fallback"]
    for step in range(20):
        assert_step_matches_eager(model, compiled, with_mask(masks[step % len(masks)], seed=step))
    assert counters["stats"]["unique_graphs"] == 1 and len(second_versions) == 1
    assert facts.stats["assumed"] - assumed == 15 and facts.stats["fallback"] - fallback == 5




def test_layers_sharing_a_mask_share_its_test(monkeypatch):
    """Gradient-checkpointed layers each get the mask as an input of their body: one test of it per call, not one
    per layer."""
    seen = []
    original = facts.dispatching

    def recording(assumed, assumptions, make_fallback):
        seen.append(list(assumptions))
        return original(assumed, assumptions, make_fallback)

    monkeypatch.setattr(backend_module.facts, "dispatching", recording)
    model = tiny("llama", layers=2).to(DEVICE)
    model.gradient_checkpointing_enable()
    model.train()
    report = liger_compile.Report()
    compiled = torch.compile(model, backend="liger", options={"report": report, "inductor": False})
    assert_step_matches_eager(model, compiled, with_mask(torch.ones(B, T, dtype=torch.long)))
    assert report.counts["causal_mask"] == 2, str(report)
    assert [len(a) for a in seen] == [1], seen
