"""Rotary, gated MLP, causal mask and lm_head+CE fused in real HF models, with eager's numbers."""
import pytest
import torch

import liger_compile
from liger_compile.lazy import LazyTensor
from models import assert_matches_eager, batch, loss_and_grads, tiny

L = 2


# The families' counts and training steps: tests/models/test_families.py (its Llama, Qwen3, Gemma and Phi3 are the
# tiny models of tests/models.py, seeds included; its Gemma2 has a sliding window). Gemma2 here has none: soft-capped
# logits, four norms per layer, GeGLU.
def test_gemma2_without_a_window_counts_and_training_parity():
    model = tiny("gemma2", layers=L)
    report = liger_compile.explain(model, **batch())
    # its soft-capped attention scores run HF's eager attention where transformers gives them no SDPA path
    causal = L if model.config._attn_implementation == "sdpa" else 0
    counts = {p: report.counts[p] for p in ("rms_norm", "rotary", "swiglu", "geglu", "linear_cross_entropy",
                                            "causal_mask")}
    assert counts == dict(rms_norm=4 * L + 1, rotary=L, swiglu=0, geglu=L, linear_cross_entropy=1,
                          causal_mask=causal), str(report)
    torch._dynamo.reset()
    assert_matches_eager(model, batch())


def test_num_items_in_batch_and_softcap():
    model = tiny("gemma2", layers=1)
    inputs = {**batch(), "num_items_in_batch": torch.tensor(11)}
    report = liger_compile.explain(model, **inputs)
    (site,) = [s for g in report.graphs for s in g.fused if s.pattern == "linear_cross_entropy"]
    assert "softcap" in site.variant and "num_items" in site.variant
    torch._dynamo.reset()
    assert_matches_eager(model, inputs)


def test_packed_sequences_rotary_fused_attention_per_document():
    """Packed position ids: the causal rewrite is compiled for plain positions and not taken for these; the
    version that runs has the variable-length attention (causal within each document)."""
    model = tiny("llama", layers=1)
    inputs = {**batch(), "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2, 3, 4]])}
    report = liger_compile.explain(model, **inputs)
    assert report.counts["rotary"] == 1 and report.counts["causal_mask"] == 1, str(report)
    assert report.counts["varlen_attention"] == 1 and not report.near_misses, str(report)
    torch._dynamo.reset()
    assert_matches_eager(model, inputs)


def test_padding_mask_runs_the_varlen_version_and_is_correct():
    model = tiny("qwen3", layers=1)
    ids = batch()["input_ids"]
    labels = ids.clone()
    labels[1, :3] = -100
    inputs = {"input_ids": ids, "labels": labels, "attention_mask": torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5])}
    report = liger_compile.explain(model, **inputs)
    # fused assuming the mask input is all ones; this batch is not, so it ran the version with the variable-length
    # attention (left padding: the leading pads see nothing and give 0, as SDPA does)
    assert report.counts["causal_mask"] == 1 and report.counts["linear_cross_entropy"] == 1, str(report)
    (site,) = [s for g in report.graphs for s in g.fused if s.pattern == "varlen_attention"]
    assert site.variant == "sdpa, repeat_kv -> enable_gqa, for inputs the assumptions do not hold for", str(report)
    assert not report.near_misses, str(report)
    torch._dynamo.reset()
    assert_matches_eager(model, inputs)


def test_training_logits_are_lazy_and_correct_when_read():
    model = tiny("llama", layers=1)
    compiled = torch.compile(model, backend="liger")
    out = compiled(**batch())
    assert isinstance(out.logits, LazyTensor) and out.logits.shape == (2, 8, 128)
    ref = model(**batch())
    torch.testing.assert_close(out.logits * 1, ref.logits.detach(), rtol=1e-5, atol=1e-5)
    assert out.logits.argmax(-1).shape == (2, 8)


def test_lazy_logits_after_an_optimizer_step_raise_a_clear_error():
    model = tiny("llama", layers=1)
    compiled = torch.compile(model, backend="liger")
    out = compiled(**batch())
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with pytest.raises(RuntimeError, match="skip_logits"):
        out.logits.sum()


def test_eval_logits_are_real_and_equal_eager():
    model = tiny("gemma2", layers=1).eval()
    with torch.no_grad():
        report = liger_compile.explain(model, **batch())
        assert report.counts["linear_cross_entropy"] == 0
        assert any("evaluation" in m.reason for m in report.near_misses)
        torch._dynamo.reset()
        out = torch.compile(model, backend="liger")(**batch())
        ref = model(**batch())
    assert not isinstance(out.logits, LazyTensor)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_partial_rotary_is_fused_and_correct():
    # Phi-style partial rotary: only the first rotary_dim channels are rotated
    class PartialRope(torch.nn.Module):
        def forward(self, q, k, cos, sin):
            def rotate_half(x):
                return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)

            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            q_rot, q_pass = q[..., :4], q[..., 4:]
            k_rot, k_pass = k[..., :4], k[..., 4:]
            q_rot = q_rot * cos + rotate_half(q_rot) * sin
            k_rot = k_rot * cos + rotate_half(k_rot) * sin
            return torch.cat([q_rot, q_pass], -1), torch.cat([k_rot, k_pass], -1)

    args = (torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(1, 5, 4), torch.randn(1, 5, 4))
    report = liger_compile.explain(PartialRope(), *args)
    torch._dynamo.reset()
    out = torch.compile(PartialRope(), backend="liger")(*args)
    for a, b in zip(out, PartialRope()(*args)):
        torch.testing.assert_close(a, b)
    assert report.counts["rotary"] == 1, report  # the rotated slice fused, the rest copied by the op


def test_disabling_each_pattern_keeps_the_numbers():
    model = tiny("llama", layers=1)
    ref_loss, _ = loss_and_grads(model, batch())
    for name in ("rotary", "swiglu", "linear_cross_entropy", "causal_mask", "varlen_attention"):
        torch._dynamo.reset()
        report = liger_compile.Report()
        compiled = torch.compile(model, backend="liger", options={"disable": [name], "report": report})
        loss, _ = loss_and_grads(model, batch(), run=compiled)
        assert report.counts[name] == 0
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_skip_logits_false_keeps_real_logits(family):
    model = tiny(family, layers=1)
    report = liger_compile.Report()
    compiled = torch.compile(model, backend="liger", options={"skip_logits": False, "report": report})
    out = compiled(**batch())
    ref = model(**batch())
    assert report.counts["linear_cross_entropy"] == 1
    assert any("logits kept" in s.variant for g in report.graphs for s in g.fused)
    assert not isinstance(out.logits, LazyTensor) and out.logits.dtype == ref.logits.dtype
    torch.testing.assert_close(out.logits, ref.logits.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)


def _saved_bytes(run, inputs):
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run(**inputs).loss
    loss.backward()
    return sum(sizes)


def test_gqa_attention_reads_shared_kv_heads_and_saves_less():
    model = tiny("llama", layers=L).to(torch.bfloat16)
    report = liger_compile.explain(model, **batch())
    variants = [s.variant for g in report.graphs for s in g.fused if s.pattern == "causal_mask"]
    assert variants == ["sdpa, repeat_kv -> enable_gqa"] * L
    torch._dynamo.reset()
    ours = _saved_bytes(torch.compile(model, backend="liger"), batch())
    torch._dynamo.reset()
    inductor = _saved_bytes(torch.compile(model, backend="inductor"), batch())
    assert ours < inductor, (ours, inductor)


def test_causal_check_compares_block_by_block(monkeypatch):
    # The compile-time check never builds a second full-size mask: rows go in blocks (here 3 rows of 10 at a time).
    from liger_compile.patterns import causal_mask

    monkeypatch.setattr(causal_mask, "COMPARE_BLOCK_ELEMENTS", 30)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()[None, None]
    assert causal_mask._real_rows_causal(causal)
    for i, j in ((9, 3), (0, 1), (5, 2)):  # a flipped entry anywhere, including the last, partial block
        wrong = causal.clone()
        wrong[0, 0, i, j] = ~wrong[0, 0, i, j]
        assert not causal_mask._real_rows_causal(wrong)
    # a query that does not see itself is padding: its row is not the real tokens' business (right padding)
    right_padded = causal & torch.tensor([True] * 7 + [False] * 3)
    assert causal_mask._real_rows_causal(right_padded)
    left_padded = causal & torch.tensor([False] * 3 + [True] * 7)  # real tokens that do not see the tokens before
    assert not causal_mask._real_rows_causal(left_padded)
    assert causal_mask._check_budget(torch.device("cpu")) == causal_mask.MAX_CHECKED_ELEMENTS_OFF_GPU


def test_logits_cast_to_fp32_by_mixed_precision_stay_lazy():
    # accelerate's mixed precision (the Trainer's bf16=True) returns every output cast to fp32, inside the compiled
    # graph: `logits.float()` only reaches the output, so the loss is still fused and the cast logits come lazily.
    from accelerate.utils import convert_outputs_to_fp32

    model = tiny("llama", layers=1).to(torch.bfloat16)
    ref = tiny("llama", layers=1).to(torch.bfloat16)
    for m in (model, ref):
        m.forward = convert_outputs_to_fp32(m.forward)
    inputs = batch()
    report = liger_compile.explain(model, **inputs)
    assert report.counts["linear_cross_entropy"] == 1, str(report)
    out = torch.compile(model, backend="liger")(**inputs)
    want = ref(**inputs)
    assert isinstance(out.logits, LazyTensor) and out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits.float(), want.logits, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.loss, want.loss, rtol=2e-2, atol=2e-2)


def test_rotary_with_cos_sin_unsqueezed_twice_is_fused():
    # Dynamo may emit `cos.unsqueeze(1)` once per use (seen under DeepSpeed ZeRO-3): two nodes, one value.
    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    def f(q, k, cos, sin):
        q_embed = (q * cos.unsqueeze(1)) + (rotate_half(q) * sin.unsqueeze(1))
        k_embed = (k * cos.unsqueeze(1)) + (rotate_half(k) * sin.unsqueeze(1))
        return q_embed, k_embed

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    cos, sin = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    report = liger_compile.explain(f, q, k, cos, sin)
    assert report.counts["rotary"] == 1, str(report)
    for got, want in zip(torch.compile(f, backend="liger")(q, k, cos, sin), f(q, k, cos, sin)):
        torch.testing.assert_close(got, want)
