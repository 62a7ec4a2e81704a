"""liger::lora_linear = F.linear(x, W, bias) + scaling * F.linear(F.linear(x, A), B) (a projection carrying a LoRA
adapter), against float64 autograd: every gradient, with and without bias, a frozen base layer (no weight or bias
gradient, none computed), what is kept for backward, and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from liger_compile.kernels import lora_linear  # noqa: F401  (defines the op)
from models import OP_DEVICES

K, N, RANK, SCALING = 40, 24, 4, 2.0
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=0.1, rtol=5e-2)}


def make(device, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, K, generator=g).to(device, dtype).requires_grad_()
    w, a = ((torch.randn(n, K, generator=g) * 0.2).to(device, dtype).requires_grad_() for n in (N, RANK))
    b = (torch.randn(N, RANK, generator=g) * 0.2).to(device, dtype).requires_grad_()
    bias = torch.randn(N, generator=g).to(device, dtype).requires_grad_() if bias else None
    return x, w, bias, a, b


def ref_f64(tensors, dy):
    x, w, bias, a, b = (None if t is None else t.detach().double().requires_grad_() for t in tensors)
    y = F.linear(x, w, bias) + F.linear(F.linear(x, a), b) * SCALING
    inputs = [t for t in (x, w, bias, a, b) if t is not None]
    return y.detach(), torch.autograd.grad(y, inputs, dy.double())


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_op_and_every_gradient_match_float64(device, dtype, bias):
    tensors = make(device, dtype, bias)
    y, h = torch.ops.liger.lora_linear(*tensors, SCALING)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    want, want_grads = ref_f64(tensors, dy)
    assert y.shape == (2, 3, N) and y.dtype == dtype and h.shape == (2, 3, RANK) and not h.requires_grad
    torch.testing.assert_close(y.double().cpu(), want.cpu(), **TOL[dtype])
    grads = torch.autograd.grad(y, [t for t in tensors if t is not None], dy)
    for got, expected in zip(grads, want_grads):
        assert got.shape == expected.shape
        torch.testing.assert_close(got.double().cpu(), expected.cpu(), **TOL[dtype])


@pytest.mark.parametrize("device", OP_DEVICES)
def test_frozen_base_layer_gets_no_gradient_and_keeps_only_the_input_and_rank_r_product(device):
    x, w, bias, a, b = make(device, torch.float32)
    w.requires_grad_(False)
    bias.requires_grad_(False)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = torch.ops.liger.lora_linear(x, w, bias, a, b, SCALING)
    # x, the three weights and h: no [tokens, N] tensor (the output, or the adapter's own product) is kept
    assert sorted(saved) == sorted([(2, 3, K), (N, K), (RANK, K), (N, RANK), (2, 3, RANK)])
    y.sum().backward()
    assert w.grad is None and bias.grad is None and a.grad is not None and b.grad is not None and x.grad is not None


@pytest.mark.parametrize("device", OP_DEVICES)
def test_compiled_matches_eager(device):
    tensors = make(device, torch.float32)

    def f(*t):
        return torch.ops.liger.lora_linear(*t, SCALING)[0].square().sum()

    want = torch.autograd.grad(f(*tensors), [t for t in tensors if t is not None])
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(*tensors), [t for t in tensors if t is not None])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
