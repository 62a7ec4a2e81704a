"""q/k/v and gate/up carrying PEFT LoRA adapters as one grouped op each (patterns/lora_shared_input.py, off by
default, on through LIGER_COMPILE_ENABLE): routing (the report), eager's loss and every gradient in fp32 and under
bf16 autocast with PEFT's float32 adapters; a trained base layer keeps one op per projection; the grouped op's
backward against autograd of its plain-torch math."""
import pytest
import torch

import liger_compile
from liger_compile.kernels import lora_linear_group
from models import assert_matches_eager, batch
from test_gated_down_proj_fusion import EVERY_PROJECTION, lora_model
from test_lora_projection import assert_autocast_step_within_bf16_noise, sites

pytest.importorskip("peft")


@pytest.fixture
def enabled(monkeypatch):
    monkeypatch.setenv("LIGER_COMPILE_ENABLE", "lora_shared_input")
    torch._dynamo.reset()


def test_off_by_default():
    report = liger_compile.explain(lora_model(EVERY_PROJECTION), **batch())
    assert report.counts["lora_shared_input"] == 0 and report.counts["lora_projection"] == 12, report


def test_qkv_and_gate_up_group_and_match_eager(enabled):
    model = lora_model(EVERY_PROJECTION)
    report = liger_compile.explain(model, **batch())
    found = sites(report)
    assert found.get("lora_shared_input [q, k, v with LoRA]") == 2, report  # one per layer
    assert found.get("lora_shared_input [gate, up with LoRA]") == 2, report
    assert report.counts["lora_projection"] == 2 and report.counts["swiglu"] == 2, report  # o_proj; down_proj
    assert_matches_eager(model, batch())
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)


def test_bf16_model_with_float32_adapters_under_autocast(enabled):
    model = lora_model(EVERY_PROJECTION, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = liger_compile.explain(model, **batch())
    assert sites(report).get("lora_shared_input [q, k, v with LoRA, adapter input cast]") == 2, report
    assert sites(report).get("lora_shared_input [gate, up with LoRA, adapter input cast]") == 2, report
    assert_autocast_step_within_bf16_noise(model)


def test_a_trained_base_layer_keeps_one_op_per_projection(enabled):
    model = lora_model(EVERY_PROJECTION)
    for layer in model.base_model.model.model.layers:
        layer.self_attn.k_proj.base_layer.weight.requires_grad_(True)
    report = liger_compile.explain(model, **batch())
    assert sites(report).get("lora_shared_input [q, k, v with LoRA]") is None, report
    assert sites(report).get("lora_shared_input [gate, up with LoRA]") == 2, report
    assert report.counts["lora_projection"] == 8, report  # q, k, v and o alone in each layer
    assert_matches_eager(model, batch())  # q, k, v each through liger::lora_linear, k_proj's weight trained


@pytest.mark.parametrize("n", [2, 3])
def test_grouped_op_against_autograd_of_its_math(n):
    g = torch.Generator().manual_seed(n)
    rnd = lambda *s, grad=True: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(grad)  # noqa: E731
    x = rnd(2, 3, 8)
    weights = [rnd(5 + i, 8, grad=False) for i in range(n)]
    biases = [rnd(5, grad=False)] + [None] * (n - 1)
    lora_as = [rnd(2 + i, 8) for i in range(n)]
    lora_bs = [rnd(5 + i, 2 + i) for i in range(n)]
    scalings = [0.5 + i for i in range(n)]
    op = getattr(torch.ops.liger, f"lora_linear_group{n}")
    outs = op(x, *weights, *biases, torch.cat(lora_as), *lora_bs, *scalings)[:n]
    expected = [torch.nn.functional.linear(x, w, b) + s * (x @ a.t() @ bb.t())
                for w, b, a, bb, s in zip(weights, biases, lora_as, lora_bs, scalings)]
    for y, e in zip(outs, expected):
        torch.testing.assert_close(y, e)
    upstream = [torch.randn(e.shape, generator=g, dtype=torch.float64) for e in expected]
    inputs = [x, *lora_as, *lora_bs]
    got = torch.autograd.grad(outs, inputs, upstream)
    want = torch.autograd.grad(expected, inputs, upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert lora_linear_group.FORWARD[n] is not None


def test_trained_base_weight_given_to_the_op_is_refused():
    x, w = torch.randn(2, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    a, b = torch.randn(4, 4, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    ys = torch.ops.liger.lora_linear_group2(x, w, w.detach(), None, None, a, b, b.detach(), 1.0, 1.0)
    with pytest.raises(RuntimeError, match="frozen"):
        ys[0].sum().backward()
