"""liger::gated_down_proj_lora = F.linear(y, W) + scaling * F.linear(F.linear(y, A), B) with y = act(gate) * up (a
down_proj carrying a LoRA adapter), against float64 autograd: every gradient, a frozen down_proj (no weight gradient,
none computed), the product y not kept for backward, and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from liger_compile.kernels import gated_down_proj_lora  # noqa: F401  (defines the op)
from models import OP_DEVICES
from test_kernel_gated_mlp import ACTS, DTYPES, act_f64

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
HIDDEN, INTER, RANK, SCALING = 24, 123, 4, 2.0


def make(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up = ((torch.randn(2, 3, INTER, generator=g) * 3).to(device, dtype).requires_grad_() for _ in range(2))
    weight, a = ((torch.randn(n, INTER, generator=g) * 0.1).to(device, dtype) for n in (HIDDEN, RANK))
    b = (torch.randn(HIDDEN, RANK, generator=g) * 0.1).to(device, dtype)
    return gate, up, weight.requires_grad_(), a.requires_grad_(), b.requires_grad_()


def ref_f64(tensors, activation, dz):
    gate, up, w, a, b = (t.detach().double().requires_grad_() for t in tensors)
    y = act_f64(gate, activation) * up
    z = F.linear(y, w) + F.linear(F.linear(y, a), b) * SCALING
    return (z.detach(), *torch.autograd.grad(z, (gate, up, w, a, b), dz.double()))


TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=0.4, rtol=5e-2),
       torch.float16: dict(atol=0.1, rtol=5e-2)}


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
def test_op_and_every_gradient_match_float64(device, dtype, activation):
    tensors = make(device, dtype)
    z, u = torch.ops.liger.gated_down_proj_lora(*tensors, SCALING, activation)
    dz = torch.randn(z.shape, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    want = ref_f64(tensors, activation, dz)
    assert z.shape == (2, 3, HIDDEN) and z.dtype == dtype and u.shape == (2, 3, RANK)
    torch.testing.assert_close(z.double().cpu(), want[0].cpu(), **TOL[dtype])
    for got, expected in zip(torch.autograd.grad(z, tensors, dz), want[1:]):
        torch.testing.assert_close(got.double().cpu(), expected.cpu(), **TOL[dtype])


@pytest.mark.parametrize("device", OP_DEVICES)
def test_frozen_down_proj_gets_no_gradient_and_y_is_not_kept(device):
    gate, up, weight, a, b = make(device, torch.float32)
    weight.requires_grad_(False)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z, _ = torch.ops.liger.gated_down_proj_lora(gate, up, weight, a, b, SCALING, "silu")
    # gate and up are the only [.., intermediate] activations kept (autograd would keep y as well)
    assert sorted(s for s in saved if s[-1] == INTER and len(s) == 3) == [(2, 3, INTER)] * 2, saved
    grads = torch.autograd.grad(z.sum(), (gate, up, a, b))
    want = ref_f64((gate, up, weight, a, b), "silu", torch.ones_like(z))
    for got, expected in zip(grads, (want[1], want[2], want[4], want[5])):
        torch.testing.assert_close(got.double().cpu(), expected.cpu(), **TOL[torch.float32])
    dg, du, dw, da, db = torch.ops.liger.gated_down_proj_lora_backward(
        torch.ones_like(z), gate, up, weight, a, b, F.linear(F.silu(gate) * up, a), SCALING, "silu", False, True,
        True)
    assert dw.numel() == 0 and da.shape == a.shape and db.shape == b.shape


def test_compiles_and_matches_eager():
    tensors = make("cpu", torch.float32)

    def f(*t):
        return torch.ops.liger.gated_down_proj_lora(*t, SCALING, "silu")[0].square().sum()

    eager = torch.autograd.grad(f(*tensors), tensors)
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(*tensors), tensors)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bad_shapes_raise_clear_errors():
    gate, up, weight, a, b = make("cpu", torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        torch.ops.liger.gated_down_proj_lora(gate, up, weight, a, b.t().contiguous(), SCALING, "silu")
