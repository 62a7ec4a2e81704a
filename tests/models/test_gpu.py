"""On a CUDA GPU (run on an H200): bf16 at real shapes, and the whole backend on CUDA."""
import pytest
import torch

import liger_compile
import liger_compile.kernels.rms_norm  # noqa: F401  (torch.ops.liger.rms_norm)
from models import batch, loss_and_grads, tiny

pytestmark = pytest.mark.gpu


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


# Llama-3-8B hidden, Llama-3.2-1B hidden, q_norm-like heads: every backward tile (one or two rows per step, prefetch)
@pytest.mark.parametrize("shape", [(4, 4096, 4096), (4, 4096, 2048), (4, 4096, 32, 128)])
def test_rms_norm_bf16_vs_hf_module(shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    d = shape[-1]
    hf = LlamaRMSNorm(d, eps=1e-5).to("cuda", torch.bfloat16)
    hf.weight.data.normal_(1.0, 0.2)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    y_hf = hf(x)
    dx_hf, dw_hf = torch.autograd.grad(y_hf, (x, hf.weight), dy)
    y = torch.ops.liger.rms_norm(x, hf.weight, 1e-5, 0.0, True)[0]
    dx, dw = torch.autograd.grad(y, (x, hf.weight), dy)

    x64, w64 = x.detach().double().requires_grad_(), hf.weight.detach().double().requires_grad_()
    y64 = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5))
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    # ours is at least as close to float64 as HF's own bf16 module (small slack for rounding ties)
    assert rel_err(y, y64) <= rel_err(y_hf, y64) * 1.05 + 1e-4
    assert rel_err(dx, dx64) <= rel_err(dx_hf, dx64) * 1.05 + 1e-4
    assert rel_err(dw, dw64) <= rel_err(dw_hf, dw64) * 1.05 + 1e-4


@pytest.mark.parametrize("d", [4096, 2048])
def test_add_rms_norm_bf16_vs_hf_at_training_shapes(d):
    """liger::add_rms_norm (residual + branch, then the norm; the sum is the next residual and has its own later
    gradient) at 16384 tokens, as close to float64 as HF's bf16 code for the normalised output, the sum and every
    gradient."""
    import liger_compile.kernels.add_rms_norm  # noqa: F401, PLC0415
    from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: PLC0415

    hf = LlamaRMSNorm(d, eps=1e-5).to("cuda", torch.bfloat16)
    hf.weight.data.normal_(1.0, 0.2)
    x = torch.randn(16384, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(16384, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy, ds = torch.randn_like(x), torch.randn_like(x)

    def grads(normed, s, inputs):
        return torch.autograd.grad((normed, s), inputs, (dy, ds))

    s_hf = x + r
    y_hf = hf(s_hf)
    g_hf = grads(y_hf, s_hf, (x, r, hf.weight))
    s, y, _ = torch.ops.liger.add_rms_norm(x, r, hf.weight, 1e-5, 0.0, True)
    g = grads(y, s, (x, r, hf.weight))

    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    w64 = hf.weight.detach().double().requires_grad_()
    s64 = x64 + r64
    y64 = w64 * (s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-5))
    g64 = grads(y64, s64, (x64, r64, w64))
    assert rel_err(y, y64) <= rel_err(y_hf, y64) * 1.05 + 1e-4
    assert rel_err(s, s64) <= rel_err(s_hf, s64) * 1.05 + 1e-4
    for ours, theirs, ref in zip(g, g_hf, g64):
        assert rel_err(ours, ref) <= rel_err(theirs, ref) * 1.05 + 1e-4


# family -> RMSNorms of the 2-layer model: 2 per layer (Qwen3: + q/k norms) and the final one
RMS_NORMS = {"llama": 5, "qwen3": 9, "gemma": 5}


@pytest.mark.parametrize("family", list(RMS_NORMS))
@pytest.mark.parametrize("dynamic", [None, True])
def test_backend_on_cuda_bf16_matches_eager(family, dynamic):
    model = tiny(family, hidden=64).to("cuda", torch.bfloat16)
    inputs = {k: v.cuda() for k, v in batch(t=16).items()}
    ref_loss, ref_grads = loss_and_grads(model, inputs)
    report = liger_compile.Report()
    compiled = torch.compile(model, backend="liger", dynamic=dynamic, options={"report": report})
    loss, grads = loss_and_grads(model, inputs, run=compiled)
    assert report.counts["rms_norm"] == RMS_NORMS[family] and not report.fallbacks, str(report)
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=2e-2, atol=2e-2)
    for name, g in ref_grads.items():
        assert rel_err(grads[name], g.double()) < 5e-2, name


def test_linear_cross_entropy_bf16_full_vocab_vs_float64():
    import torch.nn.functional as F

    import liger_compile.kernels.linear_cross_entropy  # noqa: F401

    n, h, v = 2048, 1024, 128256
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(n, h, device="cuda", generator=g) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(v, h, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[::7] = -100

    loss = torch.ops.liger.linear_cross_entropy(x, w, None, y, None, -100, 0.0, 0.0, "mean")[0]
    dx, dw = torch.autograd.grad(loss * 2.5, (x, w))
    ref_loss = F.cross_entropy(F.linear(x, w).float(), y)
    rdx, rdw = torch.autograd.grad(ref_loss * 2.5, (x, w))
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss64 = F.cross_entropy(F.linear(x64, w64), y)
    dx64, dw64 = torch.autograd.grad(loss64 * 2.5, (x64, w64))
    assert abs(loss.item() - loss64.item()) <= abs(ref_loss.item() - loss64.item()) * 2 + 1e-4
    assert rel_err(dx, dx64) <= rel_err(rdx, dx64) * 2 + 1e-4
    assert rel_err(dw, dw64) <= rel_err(rdw, dw64) * 2 + 1e-4
