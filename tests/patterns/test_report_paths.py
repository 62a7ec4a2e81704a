"""Where the report says a fused site is: the module path relative to the frame's module (a value a resumed frame
carries over a graph break too), and every module one of the site's ops ran in (a norm module called with the
casts its caller puts around it)."""
import torch

import liger_compile
from liger_compile.report import module_path, where


def _node_in(path: str) -> torch.fx.Node:
    graph = torch.fx.Graph()
    node = graph.placeholder("x")
    node.meta["nn_module_stack"] = {"m": (path, torch.nn.Module)}
    return node


def test_module_path_is_read_relative_to_the_frames_local():
    assert module_path(_node_in("L['self']._modules['model']._modules['norm']")) == "model.norm"
    assert module_path(_node_in("L['__resume_frame_values'][2].attention._modules['layer_norm']")) == (
        "attention.layer_norm")
    assert where(_node_in("L['args'][0].mlp")) == "mlp"


class Indexer(torch.nn.Module):
    """An fp32 LayerNorm module called on a cast of the input, its result cast back by the caller."""

    def __init__(self):
        super().__init__()
        self.k_norm = torch.nn.LayerNorm(8, dtype=torch.float32)

    def forward(self, x):
        return self.k_norm(x.to(self.k_norm.weight.dtype)).to(x.dtype)


class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.indexer = Indexer()

    def forward(self, x):
        return self.indexer(x).square().mean()


def test_a_site_lists_the_modules_its_ops_ran_in():
    report = liger_compile.explain(Outer(), torch.randn(2, 3, 8))
    (site,) = [s for g in report.graphs for s in g.fused]
    assert site.pattern == "layer_norm" and site.variant == "upcast"
    assert site.where.startswith("indexer (")  # the output: the caller's cast
    assert "indexer.k_norm" in site.modules and "indexer" in site.modules
