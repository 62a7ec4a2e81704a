"""Every rotary form the patterns know, fused and equal to eager.

Each case calls a transformers model's own rotary function (imported from its modeling module, so the test reads
the form as the model writes it) on tiny q/k/cos/sin built as that model builds them, and checks that the report
fuses the expected number of sites with the expected variant and that outputs and q/k gradients equal eager's.
Then whole models of the sweep's tiny configs (the kinds of form its subset lacks) train one step equal to eager
with every rotary site fused, and a site that differs from every form is a near miss naming what differs.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import liger_compile
import model_sweep

B, H, HK, T, D = 2, 4, 2, 6, 8


class _Form:
    """A model's rotary function, imported when a test runs it: where the installed transformers lacks that model
    (an older release), the case is skipped saying so."""

    def __init__(self, model_type: str, make):
        self.model_type, self.make = model_type, make

    def resolve(self):
        name = f"transformers.models.{self.model_type}.modeling_{self.model_type}"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            pytest.skip(f"this transformers has no model type {self.model_type!r}")
        return self.make(module)


def _angles(width: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(width)
    return torch.randn(batch, T, width, generator=g)


def _halves(width):  # cat(freqs, freqs): Llama's tables
    f = _angles(width // 2)
    return torch.cat((f, f), -1)


def _pairs(width):  # one angle per pair, repeated: Cohere's tables
    return _angles(width // 2).repeat_interleave(2, -1)


def _qk(unsqueeze_dim=1, d=D, hk=HK, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    shape = (lambda h: (B, h, T, d)) if unsqueeze_dim == 1 else (lambda h: (B, T, h, d))
    return torch.randn(shape(H), generator=g).to(dtype), torch.randn(shape(hk), generator=g).to(dtype)


def _two(model_type, name="apply_rotary_pos_emb", **kw):
    return _Form(model_type, lambda m: lambda q, k, cos, sin: getattr(m, name)(q, k, cos, sin, **kw))


def _gemma_like(model_type):  # q rotated and used before k is computed: one op for both has no place
    def make(m):
        def f(q, k, cos, sin):
            q = m.apply_rotary_pos_emb(q, cos, sin, unsqueeze_dim=2)
            score = (q * 2).sum()
            return q, m.apply_rotary_pos_emb(k * score.sigmoid(), cos, sin, unsqueeze_dim=2)

        return f

    return _Form(model_type, make)


def _gptj_form(m):  # GPT-J's attention: rotary on the first 4 channels of [B, T, H, D], one tensor per call
    def f(q, k, cos, sin):
        outs = []
        for x in (k, q):
            x_rot, x_pass = x[:, :, :, :4], x[:, :, :, 4:]
            outs.append(torch.cat([m.apply_rotary_pos_emb(x_rot, sin, cos), x_pass], dim=-1))
        return outs[1], outs[0]

    return f


def _deepseek_v4_form(m):  # rotary on the last 4 channels, tables with one angle per pair
    return lambda q, k, cos, sin: (m.apply_rotary_pos_emb(q, cos, sin), m.apply_rotary_pos_emb(k, cos, -sin))


def _complex(m):  # Llama 4's and DeepSeek-V2's complex multiply
    return lambda q, k, cos, sin: m.apply_rotary_emb(q, k, torch.polar(cos, sin))


# id -> (function, (q, k), cos, sin, sites, variant)
CASES = {
    "llama": (_two("llama"), _qk(), _halves(D), _halves(D), 1, "rotate_half"),
    "neox_partial": (_two("gpt_neox"), _qk(), _halves(4), _halves(4), 1, "rotate_half_partial"),
    "modernbert_fp32": (_two("modernbert_decoder"), _qk(), _halves(D), _halves(D), 1, "rotate_half_fp32"),
    "nanochat_negated": (_two("nanochat"), _qk(), _halves(D), _halves(D), 1, "rotate_half_negated"),
    "helium_interleaved": (_two("helium"), _qk(), _halves(D), _halves(D), 1, "every_two"),
    "glm_interleaved_partial": (_two("glm"), _qk(), _halves(4), _halves(4), 1, "every_two_partial"),
    "ernie_interleaved_fp32": (_two("ernie4_5"), _qk(), _halves(D), _halves(D), 1, "every_two_fp32"),
    "cohere_interleaved_tables": (_two("cohere"), _qk(), _pairs(D), _pairs(D), 1, "every_two_tables_fp32"),
    "deepseek_interleaved_to_halves": (_two("deepseek_v3", "apply_rotary_pos_emb_interleave"), _qk(hk=1),
                                       _halves(D), _halves(D), 1, "interleaved_to_halves"),
    "gpt_oss_chunk": (_two("gpt_oss"), _qk(), _angles(D // 2, B).cos(), _angles(D // 2, B).sin(), 1, "chunk"),
    "gemma_one_tensor": (_gemma_like("gemma4"), _qk(2), _halves(D), _halves(D), 2, "rotate_half_one"),
    "gptj_one_tensor_partial": (_Form("gptj", _gptj_form), _qk(2), _angles(2).sin(), _angles(2).cos(), 2, "every_two_index_partial"),
    "deepseek_v4_last_slice": (_Form("deepseek_v4", _deepseek_v4_form), _qk(hk=1), _angles(2), _angles(2), 2, "every_two_last_fp32"),
    "llama4_complex": (_Form("llama4", _complex), _qk(2), _angles(D // 2).exp(), _angles(D // 2), 1, "complex"),
    "deepseek_v2_complex": (_Form("deepseek_v2", _complex), _qk(hk=1), _angles(D // 2).exp(), _angles(D // 2), 1,
                            "complex_unsqueezed"),
}


def _run(f, q, k, cos, sin, compiled):
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    outs = (torch.compile(f, backend="liger", options={"inductor": False}) if compiled else f)(q, k, cos, sin)
    g = torch.Generator().manual_seed(3)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs], q.grad, k.grad


@pytest.mark.parametrize("case", list(CASES))
def test_form_is_fused_and_equal_to_eager(case):
    form, (q, k), cos, sin, sites, variant = CASES[case]
    f = form.resolve()
    report = liger_compile.explain(f, q, k, cos, sin)
    assert report.counts["rotary"] == sites, str(report)
    assert {s.variant for g in report.graphs for s in g.fused if s.pattern == "rotary"} == {variant}, str(report)
    assert not [m for m in report.near_misses if m.pattern == "rotary"], str(report)
    torch._dynamo.reset()
    want, got = _run(f, q, k, cos, sin, compiled=False), _run(f, q, k, cos, sin, compiled=True)
    for a, b in zip(got[0] + list(got[1:]), want[0] + list(want[1:])):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fp32_result_cast_to_bf16_is_fused_with_the_cast():
    # Cohere computes in fp32 and casts back; with bf16 q/k and fp32 tables the op returns fp32 and the cast follows
    f = _two("cohere").resolve()
    q, k = _qk(dtype=torch.bfloat16)
    cos, sin = _pairs(D), _pairs(D)
    report = liger_compile.explain(f, q, k, cos, sin)
    assert report.counts["rotary"] == 1, str(report)
    torch._dynamo.reset()
    want, got = _run(f, q, k, cos, sin, compiled=False), _run(f, q, k, cos, sin, compiled=True)
    for a, b in zip(got[0] + list(got[1:]), want[0] + list(want[1:])):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_a_form_that_differs_is_a_near_miss_naming_it():
    # rotate_half splitting off-centre: every variant refuses or stops; the closest names what differs
    def f(q, k, cos, sin):
        def turn(x):
            return torch.cat((-x[..., 3:], x[..., :3]), dim=-1)

        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + turn(q) * sin, k * cos + turn(k) * sin

    (q, k), t = _qk(), _halves(D)
    report = liger_compile.explain(f, q, k, t, t)
    assert report.counts["rotary"] == 0
    reasons = [m.reason for m in report.near_misses if m.pattern == "rotary"]
    assert reasons and all("splits at 3" in r or "expected" in r for r in reasons), reasons
    assert any("rotate_half splits at 3, not at half of the 8 rotated channels" in r for r in reasons), reasons


# One whole model per kind of form: one tensor at a time (Gemma 4), GPT-J's per-tensor partial rotary; each rotates
# q and k in two calls per layer, two layers. Interleaved with a rotated slice (GLM) and DeepSeek's MLA (interleaved
# to halves) are in the model sweep's subset: tests/models/test_model_sweep.py runs the same step and counts.
ROTARY_CALLS = {"gemma4_text": 4, "gptj": 4}


@pytest.mark.parametrize("model_type", list(ROTARY_CALLS))
def test_model_has_every_rotary_site_fused_and_matches_eager(model_type):
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no model type {model_type!r}")
    model, cfg, _ = model_sweep.build(model_type)
    inputs = model_sweep.make_batch(cfg)
    with model_sweep.ModelSites(model) as sites:
        ref = model_sweep.loss_and_grads(model, inputs)
    report = liger_compile.Report()
    got = model_sweep.compiled_step(model, inputs, report=report)
    diff = model_sweep.compare(ref, got)
    assert diff["close"], diff
    assert sites.calls["rotary"] == report.counts["rotary"] == ROTARY_CALLS[model_type], (sites.calls, str(report))
    assert not [m for m in report.near_misses if m.pattern == "rotary"], str(report)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(CASES))
def test_form_on_cuda_under_inductor_equals_eager_in_bf16(case):
    """The same forms through the whole backend on the GPU: q/k in bf16, our Triton kernels inside Inductor's graph
    (the complex forms included), outputs and q/k gradients within bf16 rounding of eager's."""
    form, (q, k), cos, sin, sites, _ = CASES[case]
    f = form.resolve()
    q, k, cos, sin = q.cuda().bfloat16(), k.cuda().bfloat16(), cos.cuda(), sin.cuda()
    report = liger_compile.Report()

    def run(fn):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        outs = fn(qq, kk, cos, sin)
        g = torch.Generator(device="cuda").manual_seed(3)
        sum((o.float() * torch.randn(o.shape, generator=g, device="cuda")).sum() for o in outs).backward()
        return [o.detach().float() for o in outs] + [qq.grad.float(), kk.grad.float()]

    want = run(f)
    got = run(torch.compile(f, backend="liger", options={"report": report}))
    assert report.counts["rotary"] == sites, str(report)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
