"""q, k and v of one input as one matmul (patterns/qkv_projection.py, off unless enabled): fused where k and v are
narrower than q, with and without biases, eager's loss and every gradient; left alone for equal widths, and each
weight keeps its own gradient; off by default, on through the `enable` option and LIGER_COMPILE_ENABLE."""
import pytest
import torch
import transformers as T

import liger_compile
from liger_compile import options
from models import assert_matches_eager, batch, tiny, tiny_model


@pytest.fixture(autouse=True)
def enabled(monkeypatch):
    monkeypatch.setenv("LIGER_COMPILE_ENABLE", "qkv_projection")


def test_off_by_default_and_on_by_option(monkeypatch):
    monkeypatch.delenv("LIGER_COMPILE_ENABLE")
    assert liger_compile.explain(tiny("llama"), **batch()).counts["qkv_projection"] == 0
    report = liger_compile.Report()
    model = tiny("llama")
    torch.compile(model, backend="liger", options={"enable": "qkv_projection", "report": report})(**batch())
    assert report.counts["qkv_projection"] == 2, report
    with pytest.raises(ValueError, match="option 'enable' names unknown pattern"):
        options.parse(options={"enable": ["qkv"]})
    monkeypatch.setenv("LIGER_COMPILE_ENABLE", "rotary, qkv_projection")
    assert options.parse().enable == ("rotary", "qkv_projection")


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # no biases; biases on q, k and v
def test_grouped_kv_projections_merge_and_match_eager(family):
    model = tiny("llama") if family == "llama" else tiny_model(T.Qwen2Config, T.Qwen2ForCausalLM)
    report = liger_compile.explain(model, **batch())
    assert report.counts["qkv_projection"] == 2, report
    assert_matches_eager(model, batch())
    assert all(p.grad is not None and p.grad.shape == p.shape for n, p in model.named_parameters()
               if any(k in n for k in ("q_proj", "k_proj", "v_proj")))


def test_equal_widths_are_left_apart_with_a_reason():
    torch.manual_seed(0)  # as many k/v heads as q heads: not measured, not merged
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4, use_cache=False))
    report = liger_compile.explain(model, **batch())
    assert report.counts["qkv_projection"] == 0
    reasons = [m.reason for m in report.near_misses if m.pattern == "qkv_projection"]
    assert reasons and "grouped key/value heads" in reasons[0], report
