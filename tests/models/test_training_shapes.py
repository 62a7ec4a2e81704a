"""Real training inputs: lengths that change every step, padding, packed sequences, activation checkpointing,
and evaluation between training steps. Loss and gradients equal eager's (fp32, rtol/atol 1e-5) in every case,
and the report says which fusions apply.

Each test takes its precision as `p` (default FP32: fp32 on CPU, every result equal to eager's).
tests/models/test_gpu_training_shapes.py runs the same bodies in bf16 on CUDA, with the same routing assertions (fusion
counts, near misses, recompile counts) and its own accuracy check against a float64 reference."""
from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch
from torch._dynamo.utils import counters

import liger_compile
from liger_compile import facts
from liger_compile.lazy import LazyTensor
from models import batch, loss_and_grads, tiny

TOL = dict(rtol=1e-5, atol=1e-5)
VOCAB = 128

# steps(model, run) -> {label: (loss, {name: tensor})}: runs one scenario through `run` (the model itself or a
# compiled model), reading gradients off `model`; loss_and_grads returns exactly one such (loss, grads) pair.
Steps = Callable[..., dict]


class Compiled(NamedTuple):
    report: liger_compile.Report
    graphs: int  # graphs Dynamo compiled for backend="liger"
    inductor_graphs: int | None  # the same for backend="inductor", where it was run


def fused(report) -> dict:
    """The report's nonzero counts (a new pattern's zero must not change what these tests expect)."""
    return {name: n for name, n in report.counts.items() if n}


def compile_and_run(model, steps: Steps, backend: str, **compile_kwargs):
    """steps under a fresh torch.compile(model, backend=...); its results and the number of graphs compiled."""
    torch._dynamo.reset()
    counters.clear()
    results = steps(model, torch.compile(model, backend=backend, **compile_kwargs))
    return results, counters["stats"]["unique_graphs"]


def assert_same(got, ref, label=""):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    torch.testing.assert_close(loss, ref_loss, **TOL, msg=lambda m: f"{label} loss: {m}")
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=lambda m: f"{label} {name}: {m}")


class Precision:
    """fp32 on CPU: backend="liger" gives eager's results. The runs under backend="liger" come last, so a
    scenario that keeps its outputs finds liger's at the end."""
    device, dtype, hidden = "cpu", torch.float32, 32

    def model(self, family: str, layers: int):
        return tiny(family, layers=layers, hidden=self.hidden).to(self.device, self.dtype)

    def to(self, inputs: dict) -> dict:
        return {k: v.to(self.device) for k, v in inputs.items()}

    def check(self, model, steps: Steps, count_inductor: bool = False) -> Compiled:
        ref = steps(model, model)
        inductor_graphs = compile_and_run(model, steps, "inductor")[1] if count_inductor else None
        report = liger_compile.Report()
        got, graphs = compile_and_run(model, steps, "liger", options={"report": report})
        assert got.keys() == ref.keys()
        for label in ref:
            assert_same(got[label], ref[label], label)
        return Compiled(report, graphs, inductor_graphs)


FP32 = Precision()


def training_step(inputs) -> Steps:
    return lambda model, run: {"training step": loss_and_grads(model, inputs, run=run)}


# --- sequence length changing every step ----------------------------------------------------------------------
LENGTHS = (8, 11, 13, 16, 9)


def test_changing_lengths_stay_fused_without_extra_recompiles(p=FP32):
    """One training step per length with the default automatic dynamic shapes: the first length compiles a
    static graph, the second a graph with a symbolic length that serves every later one."""
    model = p.model("llama", layers=1)
    outs = []

    def steps(model, run):
        def keep(**kw):
            outs.append(run(**kw))
            return outs[-1]

        results = {f"length {t}": loss_and_grads(model, p.to(batch(t=t, seed=t)), run=keep) for t in LENGTHS}
        results["last logits"] = (outs[-1].loss.detach(), {"logits": outs[-1].logits * 1})
        return results

    ours = p.check(model, steps, count_inductor=True)
    # One static graph, then symbolic-length graphs: no more than Inductor compiles, fewer than one per length (on
    # CPU two for both; on CUDA transformers' mask code adds a guard on SDPA's masked path, where Inductor compiles a
    # third graph and we, whose symbolic graphs run the variable-length op instead, do not).
    assert ours.graphs <= ours.inductor_graphs < len(LENGTHS), ours
    if p.device == "cpu":
        assert ours.graphs == ours.inductor_graphs == 2, ours
    report = ours.report
    assert len(report.graphs) == ours.graphs and not report.fallbacks, str(report)
    static, *dynamic = report.graphs
    expected = {"rms_norm": 3, "rotary": 1, "swiglu": 1, "linear_cross_entropy": 1}
    assert static.counts == {**expected, "causal_mask": 1}, str(report)
    # The symbolic-length graphs keep every fusion but the causal-mask rewrite: that one is proved by evaluating
    # the mask while compiling, which needs a concrete length. Their attention runs the variable-length op
    # instead, which reads the mask's segments (one per row here) when the graph runs.
    for graph in dynamic:
        assert graph.counts == {**expected, "varlen_attention": 1} and not graph.near_misses, str(report)
    # the last (symbolic-length) step's logits are lazy, with that step's shape (their values: checked above)
    logits = outs[-1].logits
    assert isinstance(logits, LazyTensor) and logits.shape == (2, LENGTHS[-1], VOCAB)


# --- padding --------------------------------------------------------------------------------------------------
def test_right_padding_with_masked_labels_matches_eager(p=FP32):
    model = p.model("llama", layers=2)
    ids = batch(b=3, t=8)["input_ids"]
    lengths = torch.tensor([8, 5, 3])
    attention_mask = (torch.arange(8) < lengths[:, None]).long()
    ids = ids.masked_fill(attention_mask == 0, 0)  # pad token 0
    labels = ids.masked_fill(attention_mask == 0, -100)
    inputs = p.to({"input_ids": ids, "attention_mask": attention_mask, "labels": labels})
    assumed = facts.stats["assumed"]
    report = p.check(model, training_step(inputs)).report
    # the graph is compiled assuming every real token sees exactly the tokens before it, tested on the mask built
    # from this batch's attention_mask: right padding passes, so the attention is is_causal SDPA
    assert fused(report) == {"rms_norm": 5, "rotary": 2, "swiglu": 2, "linear_cross_entropy": 1, "causal_mask": 2}, \
        str(report)
    assert all("a causal mask for its real tokens at run time" in s.variant for g in report.graphs for s in g.fused
               if s.pattern == "causal_mask"), str(report)
    assert facts.stats["assumed"] - assumed == 1 and not report.near_misses, str(report)


# --- packed sequences -----------------------------------------------------------------------------------------
def packed_inputs():
    """Two rows of 16 tokens, each packing several documents: position ids restart at every document, and the
    first token of each document has no label (nothing before it in its document to predict it from)."""
    docs = [[5, 7, 4], [9, 7]]
    ids = batch(b=2, t=16, seed=3)["input_ids"]
    position_ids = torch.tensor([[p for n in row for p in range(n)] for row in docs])
    labels = ids.masked_fill(position_ids == 0, -100)
    return {"input_ids": ids, "position_ids": position_ids, "labels": labels}


def test_packed_sequences_match_eager_with_attention_per_document(p=FP32):
    model = p.model("qwen3", layers=2)
    inputs = p.to(packed_inputs())
    unpacked = {k: v for k, v in inputs.items() if k != "position_ids"}
    with torch.no_grad():  # the documents really are kept apart
        assert not torch.allclose(model(**inputs).loss, model(**unpacked).loss)
    fallback = facts.stats["fallback"]
    report = p.check(model, training_step(inputs)).report
    counts = report.counts
    assert counts["rotary"] == 2 and counts["rms_norm"] == 9 and counts["linear_cross_entropy"] == 1, str(report)
    # transformers builds a block-diagonal mask from the position ids: causal only for positions 0..T-1 in every
    # row, which the graph assumes and tests; these packed rows run its second version: causal attention within
    # each document (the variable-length op), no dense mask
    assert counts["causal_mask"] == 2 and counts["varlen_attention"] == 2, str(report)
    assert facts.stats["fallback"] - fallback == 1 and not report.near_misses, str(report)


# --- activation checkpointing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_matches_eager(use_reentrant, p=FP32):
    """HF checkpoints each decoder layer; Dynamo traces it as a checkpointed body (a nested graph) whichever
    use_reentrant is asked for. The rewrite fuses inside the bodies too: norms, rotary, gated MLP all fuse, and
    the causal mask, which enters each body as an input, is followed back to where the enclosing graph builds it
    from shapes alone, so the attention in each body becomes causal SDPA as well."""
    model = p.model("llama", layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.train()
    report = p.check(model, training_step(p.to(batch()))).report
    assert not report.fallbacks, str(report)
    assert fused(report) == {"rms_norm": 5, "rotary": 2, "swiglu": 2, "linear_cross_entropy": 1, "causal_mask": 2}, \
        str(report)
    in_bodies = [s for g in report.graphs for s in g.fused if "[in " in s.where]
    assert len(in_bodies) == 2 * 2 + 2 + 2 + 2  # per layer: two norms, rotary, gated MLP, attention
    assert not report.near_misses, str(report)


def test_checkpointed_body_with_a_padding_mask(p=FP32):
    """The same followed-back mask, but built from a user padding mask: fused assuming the mask is all ones, and
    this left-padded batch runs the version with the variable-length op inside the checkpointed body."""
    model = p.model("llama", layers=1)
    model.gradient_checkpointing_enable()
    model.train()
    mask = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
    inputs = p.to({**batch(), "attention_mask": mask, "labels": batch()["labels"].masked_fill(mask == 0, -100)})
    fallback = facts.stats["fallback"]
    report = p.check(model, training_step(inputs)).report
    assert report.counts["causal_mask"] == 1 and facts.stats["fallback"] - fallback == 1, str(report)
    assert report.counts["varlen_attention"] == 1 and not report.near_misses, str(report)


# --- evaluation between training steps ------------------------------------------------------------------------
def test_eval_with_grad_disabled_gives_real_logits_between_training_steps(p=FP32):
    model = p.model("llama", layers=1)
    inputs = p.to(batch())

    def steps(model, run):
        results = {"training step": loss_and_grads(model, inputs, run=run)}
        model.eval()
        with torch.no_grad():
            out, out_no_labels = run(**inputs), run(input_ids=inputs["input_ids"])
        for o in (out, out_no_labels):
            assert type(o.logits) is torch.Tensor, type(o.logits)  # real logits, not a LazyTensor
        results["evaluation"] = (out.loss, {"logits": out.logits, "logits without labels": out_no_labels.logits})
        model.train()  # back to training: the training graph is reused and still right
        results["training again"] = loss_and_grads(model, inputs, run=run)
        return results

    report = p.check(model, steps).report
    # without gradients the logits are part of the result: the loss is left unfused, as eager computes it
    (eval_graph,) = [g for g in report.graphs[1:] if any(m.pattern == "linear_cross_entropy" for m in g.near_misses)]
    assert eval_graph.counts.get("linear_cross_entropy", 0) == 0
    assert any("evaluation" in m.reason for m in eval_graph.near_misses), str(report)
