"""A residual add feeding an RMSNorm is fused with it (liger::add_rms_norm), its sum kept for its other users."""
import pytest
import torch

import liger_compile
from liger_compile.matcher import try_match
from liger_compile.pattern import all_patterns

# In real models (tiny Llama, Qwen3, Gemma, OLMo2: which norms take the add, at fixed and dynamic lengths, fp32
# and bf16) these sites are checked by test_rms_norm_fusion.py; here, the add's other users on a single block.


def norm_variants(report):
    return [s.variant for g in report.graphs for s in g.fused if s.pattern == "rms_norm"]


class Block(torch.nn.Module):
    """A residual add, Llama's RMSNorm of it, and the sum used again: `use` says where and how."""

    def __init__(self, d=24, use="after"):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d) * 0.5 + 1)
        self.proj = torch.nn.Linear(d, d)
        self.use = use

    def norm(self, h):
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(dtype)

    def forward(self, x, residual):
        if self.use == "bias":  # an add that broadcasts: not a residual add of two streams
            return self.norm(x + self.weight) * 2 + residual
        h = residual + self.proj(x)
        if self.use == "before":  # a use of the sum placed between the add and the end of the norm
            early = h * 3
            return self.norm(h) + early
        if self.use == "returned":  # the graph returns the sum itself (the residual passed on)
            return self.norm(h), h
        if self.use == "only":  # the norm is the sum's one use (a final norm)
            return self.norm(h)
        return self.proj(self.norm(h)) + h


def _inputs(d=24):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 5, d, generator=g).requires_grad_(), torch.randn(2, 5, d, generator=g).requires_grad_())


def _check_against_eager(module, *inputs):
    torch._dynamo.reset()
    ref = module(*inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    ref_grads = torch.autograd.grad([r.sum() * (i + 1) for i, r in enumerate(ref)], [*inputs, module.weight])
    out = torch.compile(module, backend="liger")(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad([o.sum() * (i + 1) for i, o in enumerate(out)], [*inputs, module.weight])
    for a, b in zip([*out, *grads], [*ref, *ref_grads]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use", ["after", "returned", "only"])
def test_sum_with_other_users_becomes_an_output_of_the_fused_op(use):
    module, inputs = Block(use=use), _inputs()
    report = liger_compile.explain(module, *inputs)
    assert norm_variants(report) == ["llama, + residual"], str(report)
    _check_against_eager(module, *inputs)


def test_sum_used_before_the_norm_ends_keeps_the_add_apart():
    module, inputs = Block(use="before"), _inputs()
    report = liger_compile.explain(module, *inputs)
    assert norm_variants(report) == ["llama"], str(report)  # the plain norm still fuses
    _check_against_eager(module, *inputs)


def test_broadcasting_add_is_not_a_residual_add():
    module = Block(use="bias")
    report = liger_compile.explain(module, *_inputs())
    assert norm_variants(report) == ["llama"], str(report)
    _check_against_eager(module, *_inputs())


def _dynamo_graph(module, *inputs) -> torch.fx.GraphModule:
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=capture)(*inputs)
    (gm,) = graphs
    return gm


def _norm_output(gm):
    """The norm's last op: `weight * h.to(dtype)`, the last product of a cast value."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "mul"
            and any(a.op == "call_method" and a.target == "to" for a in n.all_input_nodes)][-1]


def test_matcher_returns_the_interior_output_as_a_root():
    """The general mechanism: a search function returning an interior value makes that node a root of the match
    (its outside users allowed); a use of it before the pattern's end is refused with the reason."""
    pattern = next(p for p in all_patterns() if p.variant == "llama, + residual")
    gm = _dynamo_graph(Block(use="after"), *_inputs())
    root = _norm_output(gm)
    m, failure, _ = try_match(pattern.graph, root)
    assert failure is None and m.roots[0] is root, failure
    (s,) = m.roots[1:]
    assert s.target.__name__ == "add" and s in m.nodes and len(s.users) == 2

    gm = _dynamo_graph(Block(use="before"), *_inputs())
    m, failure, _ = try_match(pattern.graph, _norm_output(gm))
    assert m is None and "before the pattern's end" in failure.reason, failure
