"""Fusions across graph breaks: the causal mask built in one graph and used by the layers' graphs.

FSDP2 (and any `torch.compiler.disable`d hook) puts each decoder layer in a graph of its own, so the mask the model
builds reaches the layer as an input. The model's graph checks the mask when it runs; the layer's graph uses
`is_causal` when it was given that checked mask and its masked version for any other (liger_compile/facts.py).
"""
import gc

import pytest
import torch

import liger_compile
from liger_compile import facts
from models import DEVICE, assert_step_matches_eager, batch, tiny

# On a GPU machine the same tests run on CUDA (the run-time check synchronises with the GPU; the second version of a
# graph is compiled for CUDA inputs); the tolerance then allows for TF32-free but differently ordered reductions.


def test_a_fact_belongs_to_one_tensor_at_one_version():
    t, other = torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    facts.mark(t, "causal_mask")
    assert facts.holds(t, "causal_mask")
    assert not facts.holds(other, "causal_mask")  # equal values, another tensor: not checked
    assert not facts.holds(t, "another_fact")
    assert not facts.holds(t[:2], "causal_mask")  # a view is another tensor
    t[0] = False  # written in place after the check
    assert not facts.holds(t, "causal_mask")
    key = (id(other), "causal_mask")
    facts.mark(other, "causal_mask")
    del other
    gc.collect()
    assert key not in facts._known  # no entry outlives its tensor


def test_only_views_that_change_nothing_lead_back_to_the_graph_input():
    """The layer's mask counts as the checked graph input only through full slices and expands to its own shape: an
    index tensor keeps the shape but reorders the values, so a mask taken that way is not the checked one."""
    from liger_compile.patterns.causal_mask import _graph_input_behind

    def f(mask, perm):
        return mask[:, :, perm], mask[..., :], mask[:, :, :, :].expand(2, 1, 4, 4), mask[:, :, 1:]

    gm = torch.fx.symbolic_trace(f)

    class Recording(torch.fx.Interpreter):  # example values, as Dynamo's graphs carry them
        def run_node(self, n):
            n.meta["val"] = super().run_node(n)
            return n.meta["val"]

    Recording(gm).run(torch.ones(2, 1, 4, 4, dtype=torch.bool), torch.tensor([3, 2, 1, 0]))
    (outputs,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
    found = [_graph_input_behind(o) for o in outputs]
    assert [n.name if n is not None else None for n in found] == [None, "mask", "mask", None]


def layers_in_graphs_of_their_own(model):
    """What FSDP2's per-layer hooks do to Dynamo: a graph break before every decoder layer (on DEVICE)."""
    model = model.to(DEVICE)

    @torch.compiler.disable
    def hook(module, args, kwargs):
        return None

    for layer in model.model.layers:
        layer.register_forward_pre_hook(hook, with_kwargs=True)
    return model


def compare(model, compiled, inputs):
    tol = dict(rtol=1e-5, atol=1e-6) if DEVICE == "cpu" else dict(rtol=1e-4, atol=1e-5)
    assert_step_matches_eager(model, compiled, {k: v.to(DEVICE) for k, v in inputs.items()}, **tol)


@pytest.mark.parametrize("inductor", [False, True])
def test_mask_from_an_earlier_graph_is_used_as_causal(inductor, second_versions):
    model = layers_in_graphs_of_their_own(tiny("llama", layers=2))
    report = liger_compile.Report()
    compiled = torch.compile(model, backend="liger", options={"report": report, "inductor": inductor})
    before = facts.stats["assumed"]
    compare(model, compiled, batch())
    # the layers' graph fused the masked attention assuming the checked mask, and every layer call ran that version
    assert report.counts["causal_mask"] == 1, str(report)
    (site,) = [s for g in report.graphs for s in g.fused if s.pattern == "causal_mask"]
    assert "at run time" in site.variant
    assert any("run-time check" in str(g) for g in report.graphs), str(report)
    assert facts.stats["assumed"] - before == 2  # two layers, one graph
    assert second_versions == []


def test_other_masks_run_the_version_without_the_assumption(second_versions):
    """A padding mask is not causal: the layers' graph is compiled once more without the assumption, and runs that
    version for it; the causal batch after it runs the fused version again. Every step equals eager."""
    model = layers_in_graphs_of_their_own(tiny("llama", layers=2))
    report = liger_compile.Report()
    compiled = torch.compile(model, backend="liger", options={"report": report})
    plain = batch()
    padding = torch.ones_like(plain["input_ids"])
    padding[0, :3] = 0
    padded = {**plain, "attention_mask": padding, "labels": plain["labels"].masked_fill(padding == 0, -100)}
    compare(model, compiled, plain)
    assumed = facts.stats["assumed"]
    compare(model, compiled, padded)
    assert len(second_versions) == 1
    assert facts.stats["assumed"] == assumed  # neither layer took the causal version
    compare(model, compiled, plain)
    assert facts.stats["assumed"] == assumed + 2 and len(second_versions) == 1
    # that second version runs the padded mask through the variable-length op (a mask of any form is safe there),
    # in the dtypes FlashAttention takes (on CPU any: the op's plain-torch path)
    sites = [s for g in report.graphs for s in g.fused if s.pattern == "varlen_attention"]
    assert len(sites) == (1 if DEVICE == "cpu" else 0), str(report)
    assert all("for inputs the assumptions do not hold for" in s.variant for s in sites), str(report)


def test_disabling_the_pattern_disables_the_check():
    model = layers_in_graphs_of_their_own(tiny("llama", layers=2))
    report = liger_compile.Report()
    compiled = torch.compile(model, backend="liger", options={"report": report, "disable": ["causal_mask"],
                                                             "inductor": False})
    compare(model, compiled, batch())
    assert report.counts["causal_mask"] == 0
    assert not any("run-time check" in str(g) for g in report.graphs), str(report)


def checkpointed(use_reentrant):
    model = layers_in_graphs_of_their_own(tiny("llama", layers=2))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.train()
    return model


def dynamo_gives_a_graph_with_attention(model) -> bool:
    """Whether Dynamo hands any backend a graph (or a checkpoint body inside one) that calls SDPA for this model."""
    found = []

    def record(gm, example_inputs):
        found.extend(n for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
                     if "scaled_dot_product_attention" in str(n.target))
        return gm.forward

    torch.compile(model, backend=record)(**{k: v.to(DEVICE) for k, v in batch().items()}).loss.backward()
    return bool(found)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_layers_in_graphs_of_their_own(use_reentrant, second_versions):
    """FSDP2 with activation checkpointing: each layer's graph runs its body under a checkpoint, and the mask reaches
    the body through the layer graph's input; the assumption is about that input."""
    if not dynamo_gives_a_graph_with_attention(checkpointed(use_reentrant)):
        # transformers 5.17 (the H200 image): the graph break in the checkpointed layer's __call__ is one Dynamo
        # cannot resume from, so the layer runs eagerly whatever the backend; 5.24 (CI) gives the layer's graph
        pytest.skip("Dynamo runs this transformers version's checkpointed layers eagerly: no graph to fuse")
    model = checkpointed(use_reentrant)
    report = liger_compile.Report()
    compiled = torch.compile(model, backend="liger", options={"report": report, "inductor": False})
    before = facts.stats["assumed"]
    compare(model, compiled, batch())
    assert report.counts["causal_mask"] == 1, str(report)
    assert facts.stats["assumed"] - before == 2 and second_versions == [], str(report)


def test_a_failing_run_time_check_proves_nothing(monkeypatch, second_versions):
    """A check that raises when the graph runs leaves the mask unrecorded: the layers run their masked version."""
    from liger_compile.pattern import all_output_checks

    (check,) = [c for c in all_output_checks() if c.fact == "causal_mask"]

    def broken(mask):
        raise RuntimeError("cannot read this mask")

    monkeypatch.setattr(check, "holds", broken)
    model = layers_in_graphs_of_their_own(tiny("llama", layers=2))
    compiled = torch.compile(model, backend="liger", options={"inductor": False})
    compare(model, compiled, batch())
    assert len(second_versions) == 1
