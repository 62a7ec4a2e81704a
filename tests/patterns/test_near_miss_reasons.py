"""Sites left unfused say what differs from the form the op computes, read from transformers' own modules: gated
MLPs of other activations (squared ReLU, a clamped and scaled SwiGLU, the exact GELU, a gate fed by a projection plus
an adapter), a rotary whose tables the forms do not build, and a hand-written LayerNorm reported as one (not as an
RMSNorm). The matcher explains a failed match by the order of a commutative op's operands that got furthest."""
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import BitNetConfig, ZambaConfig
from transformers.models.bitnet import modeling_bitnet
from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl
from transformers.models.roformer import modeling_roformer
from transformers.models.xlstm import modeling_xlstm
from transformers.models.zamba import modeling_zamba

import liger_compile
from liger_compile.matcher import try_match

D, F_ = 16, 32


def _misses(report, pattern):
    return [m for m in report.near_misses if m.pattern == pattern]


def _mean_of(module):
    class Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, x):
            return self.inner(x).square().mean()

    return Loss()


# --- the matcher -------------------------------------------------------------------------------------------------
def test_failure_is_the_commutative_order_that_got_furthest():
    """`sigmoid(a + 1) * b` against `sigmoid(x + 2) * y`: the written order matches up to the constant; the swapped
    one stops at once, and must not be the reason because it was tried last."""
    pattern = torch.fx.symbolic_trace(lambda a, b: torch.sigmoid(a + 1.0) * b).graph
    graph = torch.fx.symbolic_trace(lambda x, y: torch.sigmoid(x + 2.0) * y).graph
    root = next(n for n in graph.nodes if n.op == "call_function" and "mul" in str(n.target))
    match, failure, _ = try_match(pattern, root)
    assert match is None
    assert "expected the constant 1.0, found the constant 2.0" in failure.reason, failure.reason


# --- gated MLPs of other forms -----------------------------------------------------------------------------------
def _zamba_mlp():
    torch.manual_seed(0)
    return modeling_zamba.ZambaMLP(ZambaConfig(hidden_size=D, intermediate_size=F_, hidden_act="gelu"))


class AdapterGatedMLP(torch.nn.Module):
    """A fused gate_up projection plus a low-rank adapter's, split into gate and up, exact GELU on the gate."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gate_up_proj = torch.nn.Linear(D, 2 * F_, bias=False)
        self.adapter = torch.nn.Sequential(torch.nn.Linear(D, 4, bias=False), torch.nn.Linear(4, 2 * F_, bias=False))
        self.down_proj = torch.nn.Linear(F_, D, bias=False)

    def forward(self, x):
        gate_up = torch.chunk(self.gate_up_proj(x) + self.adapter(x), 2, dim=-1)
        return self.down_proj(F.gelu(gate_up[0]) * gate_up[1])


def _bitnet_mlp():
    torch.manual_seed(0)
    return modeling_bitnet.BitNetMLP(BitNetConfig(hidden_size=D, intermediate_size=F_, hidden_act="relu2"))


def _clamped_mlp():
    torch.manual_seed(0)
    config = types.SimpleNamespace(dense_intermediate_size=F_, hidden_size=D, swiglu_alpha=1.702, swiglu_limit=7.0)
    return modeling_minimax_m3_vl.MiniMaxM3VLDenseMLP(config)


GATED = {  # name -> (module, the pattern reporting it, words of the reason)
    "exact GELU": (_zamba_mlp, "geglu", "exact GELU"),
    "exact GELU, gate from a projection plus an adapter": (AdapterGatedMLP, "geglu", "exact GELU"),
    "squared ReLU": (_bitnet_mlp, "swiglu", "squared ReLU"),
    "clamped, scaled SwiGLU": (_clamped_mlp, "swiglu", "clamped"),
}


@pytest.mark.parametrize("name", GATED)
def test_gated_mlp_of_another_form_is_a_near_miss_saying_what_differs(name):
    make, pattern, words = GATED[name]
    module = _mean_of(make())
    x = torch.randn(2, 5, D)
    report = liger_compile.explain(module, x)
    assert report.counts["swiglu"] == report.counts["geglu"] == 0, str(report)
    misses = _misses(report, pattern)
    assert len(misses) == 1 and words in misses[0].reason, str(report)
    other = "geglu" if pattern == "swiglu" else "swiglu"
    assert not _misses(report, other), str(report)
    # left as the model wrote it: eager's numbers
    torch.testing.assert_close(torch.compile(module, backend="liger", options={"inductor": False})(x), module(x))


def test_a_plain_gelu_mlp_is_no_gated_near_miss():
    mlp = torch.nn.Sequential(torch.nn.Linear(D, F_), torch.nn.GELU(), torch.nn.Linear(F_, D))
    report = liger_compile.explain(_mean_of(mlp), torch.randn(2, 5, D))
    assert not _misses(report, "swiglu") and not _misses(report, "geglu"), str(report)


# --- rotary ------------------------------------------------------------------------------------------------------
class InterleavedRotaryByStack(torch.nn.Module):
    """Interleaved rotary whose tables are `stack([cos, cos], -1).reshape_as(pos)` of a 4-D table: the anchor (the
    negated odd channels) is never reached by a match, which stops at the tables."""

    def forward(self, pos, q, k):
        q, k = modeling_roformer.RoFormerSelfAttention.apply_rotary_position_embeddings(pos, q, k)
        return (q * k).sum()


def test_rotary_near_miss_names_the_table_the_forms_do_not_build():
    pos = torch.randn(1, 1, 6, 8)
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    report = liger_compile.explain(InterleavedRotaryByStack(), pos, q, k)
    assert report.counts["rotary"] == 0
    misses = _misses(report, "rotary")
    assert len(misses) == 2, str(report)  # q and k
    assert all("reshape_as" in m.reason and "no variant" not in m.reason for m in misses), str(report)


# --- a hand-written LayerNorm ------------------------------------------------------------------------------------
class MultiHeadNorm(torch.nn.Module):
    """The norm over each head's channels of [batch, seq, heads, head_dim], a weight over the merged heads after."""

    def __init__(self, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.norm = modeling_xlstm.xLSTMMultiHeadLayerNorm(num_heads=4, head_dim=8, **kw)
        torch.nn.init.normal_(self.norm.weight, 1.0, 0.3)

    def forward(self, x):
        return self.norm(x).square().mean()


def test_layer_norm_with_var_over_heads_is_fused_and_matches_eager():
    module, x = MultiHeadNorm(), torch.randn(2, 5, 4, 8, requires_grad=True)
    report = liger_compile.explain(module, x)
    assert report.counts["layer_norm"] == 1 and report.counts["rms_norm"] == 0, str(report)
    assert [s.variant for g in report.graphs for s in g.fused] == ["mean_var"]
    assert not report.near_misses, str(report)
    ref = module(x)
    (gx_ref,) = torch.autograd.grad(ref, x)
    got = torch.compile(module, backend="liger", options={"inductor": False})(x)
    (gx,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


class UnbiasedNorm(torch.nn.Module):
    def forward(self, x):
        h = x.float()
        y = (h - h.mean(-1, keepdim=True)) * torch.rsqrt(h.var(-1, keepdim=True, unbiased=True) + 1e-6)
        return y.to(x.dtype).square().mean()


def test_a_hand_written_layer_norm_left_unfused_is_a_layer_norm_near_miss():
    report = liger_compile.explain(UnbiasedNorm(), torch.randn(2, 5, D))
    assert report.counts["layer_norm"] == 0
    (miss,) = _misses(report, "layer_norm")
    assert "unbiased" in miss.reason, str(report)
    assert not _misses(report, "rms_norm"), str(report)  # its rsqrt is a LayerNorm's


class L2Norm(torch.nn.Module):
    """x / ||x||, as Qwen3-Next's l2norm writes it: the rsqrt of a sum of squares."""

    def forward(self, x):
        return (x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)).square().mean()


class SquaredSum(torch.nn.Module):
    """The rsqrt of one value's sum of squares scaling another value: no norm of either."""

    def forward(self, x, y):
        return (y * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)).square().mean()


def test_an_l2_norm_is_a_near_miss_saying_it_sums():
    report = liger_compile.explain(L2Norm(), torch.randn(2, 5, D))
    (miss,) = _misses(report, "rms_norm")
    assert miss.reason.startswith("[L2 norm] an L2 norm: the squares are summed, not averaged"), str(report)


def test_an_inverse_norm_scaling_another_value_is_a_near_miss_saying_so():
    report = liger_compile.explain(SquaredSum(), torch.randn(2, 5, D), torch.randn(2, 5, D))
    (miss,) = _misses(report, "rms_norm")
    assert miss.reason == "[L2 norm] `x` must be the same value in both places it is used", str(report)
