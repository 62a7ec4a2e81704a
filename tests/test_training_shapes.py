"""Real training inputs: lengths that change every step, padding, packed sequences, activation checkpointing,
and evaluation between training steps. Loss and gradients equal eager's (fp32, rtol/atol 1e-5) in every case,
and the report says which fusions apply."""
import pytest
import torch
from torch._dynamo.utils import counters

import liger_compile
from liger_compile.lazy import LazyTensor
from models import batch, loss_and_grads, tiny

TOL = dict(rtol=1e-5, atol=1e-5)
VOCAB = 128


def assert_same(got, ref):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=lambda m: f"{name}: {m}")


def compiled_with_report(model, **options):
    report = liger_compile.Report()
    return torch.compile(model, backend="liger", options={"report": report, **options}), report


# --- sequence length changing every step ----------------------------------------------------------------------
LENGTHS = (8, 11, 13, 16, 9)


def run_lengths(model, backend, **compile_kwargs):
    """One training step per length with the default automatic dynamic shapes: the first length compiles a
    static graph, the second a graph with a symbolic length that serves every later one. Returns the number of
    graphs Dynamo compiled and the last step's output."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend, **compile_kwargs)
    out = None
    for t in LENGTHS:
        inputs = batch(t=t, seed=t)
        ref = loss_and_grads(model, inputs)

        def run(**kw):
            nonlocal out
            out = compiled(**kw)
            return out

        assert_same(loss_and_grads(model, inputs, run=run), ref)
    return counters["stats"]["unique_graphs"], out


def test_changing_lengths_stay_fused_without_extra_recompiles():
    model = tiny("llama", layers=1)
    report = liger_compile.Report()
    ours, out = run_lengths(model, "liger", options={"report": report})
    inductor, _ = run_lengths(model, "inductor")
    assert ours == inductor == 2, (ours, inductor)  # one static graph, one dynamic graph for all later lengths
    assert len(report.graphs) == 2 and not report.fallbacks, str(report)
    static, dynamic = report.graphs
    expected = {"rms_norm": 3, "rotary": 1, "swiglu": 1, "linear_cross_entropy": 1}
    assert static.counts == {**expected, "causal_mask": 1}, str(report)
    # The symbolic-length graph keeps every fusion but the causal-mask rewrite: that one is proved by evaluating
    # the mask while compiling, which needs a concrete length; the masked SDPA stays (a near miss, never wrong).
    assert dynamic.counts == expected, str(report)
    (miss,) = dynamic.near_misses
    assert miss.pattern == "causal_mask" and "dynamic shapes" in miss.reason, str(report)
    # the lazy logits of the last (symbolic-length) step have that step's shape and eager's values
    assert isinstance(out.logits, LazyTensor) and out.logits.shape == (2, LENGTHS[-1], VOCAB)
    ref_logits = model(**batch(t=LENGTHS[-1], seed=LENGTHS[-1])).logits.detach()
    torch.testing.assert_close(out.logits * 1, ref_logits, **TOL)


# --- padding --------------------------------------------------------------------------------------------------
def test_right_padding_with_masked_labels_matches_eager():
    model = tiny("llama", layers=2)
    ids = batch(b=3, t=8)["input_ids"]
    lengths = torch.tensor([8, 5, 3])
    attention_mask = (torch.arange(8) < lengths[:, None]).long()
    ids = ids.masked_fill(attention_mask == 0, 0)  # pad token 0
    labels = ids.masked_fill(attention_mask == 0, -100)
    inputs = {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}
    ref = loss_and_grads(model, inputs)
    compiled, report = compiled_with_report(model)
    assert_same(loss_and_grads(model, inputs, run=compiled), ref)
    assert report.counts == {"rms_norm": 5, "rotary": 2, "swiglu": 2, "geglu": 0, "linear_cross_entropy": 1,
                             "causal_mask": 0}, str(report)
    # the padding mask is a runtime input: the masked SDPA is left as it is
    misses = report.near_misses
    assert len(misses) == 2, str(report)
    assert all("depends on the graph input" in m.reason and "attention_mask" in m.reason for m in misses), str(report)


# --- packed sequences -----------------------------------------------------------------------------------------
def packed_inputs():
    """Two rows of 16 tokens, each packing several documents: position ids restart at every document, and the
    first token of each document has no label (nothing before it in its document to predict it from)."""
    docs = [[5, 7, 4], [9, 7]]
    ids = batch(b=2, t=16, seed=3)["input_ids"]
    position_ids = torch.tensor([[p for n in row for p in range(n)] for row in docs])
    labels = ids.masked_fill(position_ids == 0, -100)
    return {"input_ids": ids, "position_ids": position_ids, "labels": labels}


def test_packed_sequences_match_eager_with_rotary_fused_and_mask_left_alone():
    model = tiny("qwen3", layers=2)
    inputs = packed_inputs()
    ref = loss_and_grads(model, inputs)
    unpacked = {k: v for k, v in inputs.items() if k != "position_ids"}
    assert not torch.allclose(ref[0], model(**unpacked).loss)  # the documents really are kept apart
    compiled, report = compiled_with_report(model)
    assert_same(loss_and_grads(model, inputs, run=compiled), ref)
    counts = report.counts
    assert counts["rotary"] == 2 and counts["rms_norm"] == 9 and counts["linear_cross_entropy"] == 1, str(report)
    # transformers builds a block-diagonal mask from the position ids: it depends on a runtime input, not causal
    assert counts["causal_mask"] == 0, str(report)
    misses = [m for m in report.near_misses if m.pattern == "causal_mask"]
    assert len(misses) == 2 and all("depends on the graph input" in m.reason for m in misses), str(report)


# --- activation checkpointing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_matches_eager(use_reentrant):
    """HF checkpoints each decoder layer; Dynamo traces it as a checkpointed body (a nested graph) whichever
    use_reentrant is asked for. The rewrite fuses inside the bodies too: norms, rotary, gated MLP all fuse, and
    the causal mask, which enters each body as an input, is followed back to where the enclosing graph builds it
    from shapes alone, so the attention in each body becomes causal SDPA as well."""
    model = tiny("llama", layers=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.train()
    inputs = batch()
    ref = loss_and_grads(model, inputs)
    compiled, report = compiled_with_report(model)
    assert_same(loss_and_grads(model, inputs, run=compiled), ref)
    assert not report.fallbacks, str(report)
    assert report.counts == {"rms_norm": 5, "rotary": 2, "swiglu": 2, "geglu": 0, "linear_cross_entropy": 1,
                             "causal_mask": 2}, str(report)
    in_bodies = [s for g in report.graphs for s in g.fused if "[in " in s.where]
    assert len(in_bodies) == 2 * 2 + 2 + 2 + 2  # per layer: two norms, rotary, gated MLP, attention
    assert not report.near_misses, str(report)


def test_checkpointed_body_with_a_padding_mask_keeps_it():
    """The same followed-back mask, but built from a user padding mask: a runtime input, so it stays."""
    model = tiny("llama", layers=1)
    model.gradient_checkpointing_enable()
    model.train()
    inputs = {**batch(), "attention_mask": torch.tensor([[1] * 8, [0, 0] + [1] * 6])}
    ref = loss_and_grads(model, inputs)
    compiled, report = compiled_with_report(model)
    assert_same(loss_and_grads(model, inputs, run=compiled), ref)
    assert report.counts["causal_mask"] == 0
    assert any("depends on the graph input" in m.reason for m in report.near_misses), str(report)


# --- evaluation between training steps ------------------------------------------------------------------------
def test_eval_with_grad_disabled_gives_real_logits_between_training_steps():
    model = tiny("llama", layers=1)
    compiled, report = compiled_with_report(model)
    inputs = batch()
    assert_same(loss_and_grads(model, inputs, run=compiled), loss_and_grads(model, inputs))

    model.eval()
    with torch.no_grad():
        out, ref = compiled(**inputs), model(**inputs)
        out_no_labels = compiled(input_ids=inputs["input_ids"])
    for o in (out, out_no_labels):
        assert type(o.logits) is torch.Tensor, type(o.logits)  # real logits, not a LazyTensor
        torch.testing.assert_close(o.logits, ref.logits, **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    # without gradients the logits are part of the result: the loss is left unfused, as eager computes it
    (eval_graph,) = [g for g in report.graphs[1:] if any(m.pattern == "linear_cross_entropy" for m in g.near_misses)]
    assert eval_graph.counts.get("linear_cross_entropy", 0) == 0
    assert any("evaluation" in m.reason for m in eval_graph.near_misses), str(report)

    model.train()  # back to training: the training graph is reused and still right
    assert_same(loss_and_grads(model, inputs, run=compiled), loss_and_grads(model, inputs))
