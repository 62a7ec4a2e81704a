"""The sweep's count of the sites a model runs (tests/model_sweep.py), on small modules: a norm wrapping a norm is
one site, recomputation in the backward pass is none, a rotary static method is counted, a site in a graph that ran
for two layers counts twice, a graph compiled on a submodule names its sites from there, and calls Dynamo ran
outside every compiled graph are counted apart."""
import types

import torch
import torch.utils.checkpoint
from transformers.models.axk2 import modeling_axk2

import model_sweep
from liger_compile.report import GraphReport, Site

D = 16


class Toy(torch.nn.Module):
    config = types.SimpleNamespace(hidden_act="silu")

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return {"loss": self.body(x).square().mean()}


def _sites(model, *args):
    with model_sweep.ModelSites(model) as sites:
        model(*args)["loss"].backward()
    return sites


def test_a_norm_wrapping_a_norm_is_one_site():
    config = types.SimpleNamespace(hidden_size=D, rms_norm_eps=1e-6, gated_norm_rank=4)
    model = Toy(modeling_axk2.AXK2GatedRMSNorm(config))  # RMSNorm, then a sigmoid gate: a wrapper module
    sites = _sites(model, torch.randn(2, 3, D))
    assert sites.counts()["rms_norm"] == 1
    assert set(sites.called) == {("rms_norm", "body.norm")}


class Checkpointed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(D)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.norm, x, use_reentrant=True)  # recomputes in backward


def test_calls_recomputed_in_the_backward_pass_are_not_sites():
    sites = _sites(Toy(Checkpointed()), torch.randn(2, 3, D, requires_grad=True))
    assert sites.counts()["layer_norm"] == 1


class StaticRotary(torch.nn.Module):
    @staticmethod
    def apply_rotary_position_embeddings(pos, q):
        return q * pos.cos()

    def forward(self, x):
        return self.apply_rotary_position_embeddings(x, x)


def test_a_rotary_static_method_is_counted():
    model = Toy(StaticRotary())
    sites = _sites(model, torch.randn(2, 3, D, requires_grad=True))
    assert sites.counts()["rotary"] == 1
    assert isinstance(vars(StaticRotary)["apply_rotary_position_embeddings"], staticmethod)  # put back


def _result(model_counts, called, graphs, runs):
    res = {"model": {**dict.fromkeys(("rms_norm", "layer_norm", "rotary", "swiglu", "geglu", "gated_other",
                                      "gated_experts", "gated_mlp"), 0), **model_counts}}
    report = types.SimpleNamespace(graphs=graphs, counts={"rms_norm": 0, "layer_norm": 0}, fallbacks=[],
                                   near_misses=[])
    for g in graphs:
        for s in g.fused:
            report.counts[s.pattern] += 1
    model_sweep._add_report(res, report, called, runs)
    return res


def test_a_site_counts_once_per_run_of_its_graph():
    """A layer's graph, compiled once and run for both layers, names its norm relative to the layer; the final
    norm's own forward, compiled as a frame, has no module path."""
    layer, final = GraphReport(0), GraphReport(1)
    layer.fused.append(Site("rms_norm", "llama", "input_layernorm (modeling.py:63 in forward)"))
    final.fused.append(Site("rms_norm", "llama", "modeling.py:63 in forward"))
    called = {("rms_norm", "model.layers.0.input_layernorm"): 1, ("rms_norm", "model.layers.1.input_layernorm"): 1,
              ("rms_norm", "model.norm"): 1}
    res = _result({"rms_norm": 3}, called, [layer, final], {id(layer): 2, id(final): 1})
    assert res["fused_calls"]["rms_norm"] == 3 and res["fused"]["rms_norm"] == 2
    assert res["all_fused"]["rms_norm"] and res["unfused"]["rms_norm"] == ["model.norm"]
    once = _result({"rms_norm": 3}, called, [layer, final], {id(layer): 1, id(final): 1})
    assert not once["all_fused"]["rms_norm"]


def test_a_graph_compiled_on_a_submodule_names_its_norm_from_there():
    g = GraphReport(0)
    g.fused.append(Site("layer_norm", "functional, + residual", "layernorm (modeling.py:334 in resumed)"))
    res = _result({"layer_norm": 1}, {("layer_norm", "transformer.layernorm"): 1}, [g], {id(g): 1})
    assert res["all_fused"]["layer_norm"] and res["unfused"]["layer_norm"] == []


def test_a_norm_kind_is_judged_by_its_own_modules():
    """An unfused RMSNorm does not make the fused LayerNorm beside it unfused; a site named after the caller of
    the LayerNorm module (its casts) still covers it."""
    g = GraphReport(0)
    g.fused.append(Site("layer_norm", "upcast", "attn.indexer (modeling.py:229 in forward)",
                        ("attn.indexer", "attn.indexer.k_norm")))
    called = {("layer_norm", "attn.indexer.k_norm"): 1, ("rms_norm", "attn.input_norm"): 1}
    res = _result({"layer_norm": 1, "rms_norm": 1}, called, [g], {id(g): 1})
    assert res["all_fused"]["layer_norm"]
    assert not res["all_fused"]["rms_norm"] and res["unfused"]["rms_norm"] == ["attn.input_norm"]


class EagerPart(torch.nn.Module):
    """A norm in the compiled frame, and one in a function Dynamo runs eagerly."""

    def __init__(self):
        super().__init__()
        self.inside, self.outside = torch.nn.LayerNorm(D), torch.nn.LayerNorm(D)

    @torch._dynamo.disable
    def _eager(self, x):
        return self.outside(x)

    def forward(self, x):
        return self._eager(self.inside(x))


def test_calls_outside_every_compiled_graph_are_counted_apart():
    model = Toy(EagerPart())
    x = torch.randn(2, 3, D)
    outside = model_sweep.OutsideGraphs(model)
    model_sweep.compiled_step(model, {"x": x}, outside=outside)
    assert outside.counts()["layer_norm"] == 1
    assert set(outside.called) == {("layer_norm", "body.outside")}
    cell = model_sweep._cell({"fused": {"layer_norm": 1}, "fused_calls": {"layer_norm": 1},
                              "model": {"layer_norm": 2}, "outside_graphs": {"layer_norm": 1},
                              "all_fused": {"layer_norm": True}}, "layer_norm")
    assert cell == "1/1 (+1 eager)"
