"""liger::gated_down_proj = F.linear(act(gate) * up, W), which saves gate and up but not the product, against
float64 autograd: the backward kernel's recomputed product, the op's gradients (also with a frozen W), opcheck and
torch.compile. Under TRITON_INTERPRET=1 (no GPU) the launchers run the kernels on CPU tensors."""
import pytest
import torch

from liger_compile.kernels import gated_down_proj  # noqa: F401  (defines the op)
from liger_compile.kernels import gated_mlp
from models import DEVICE, OP_DEVICES
from test_kernel_gated_mlp import ACTS, DTYPES, act_f64, inputs

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
HIDDEN = 24


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("kind", ["contiguous", "chunked"])
def test_backward_kernel_recomputes_the_forward_product(dtype, activation, kind):
    torch.manual_seed(0)
    gate, up = inputs(kind, dtype, DEVICE)
    dy = torch.randn(gate.shape, device=DEVICE).to(dtype)
    dg, du = gated_mlp.launch_backward(dy, gate, up, activation)
    dg2, du2, y = gated_mlp.launch_backward(dy, gate, up, activation, recompute_y=True)
    # the same kernel math as the forward, rounded once: bit-identical to what the forward wrote
    assert torch.equal(y, gated_mlp.launch_forward(gate, up, activation))
    assert torch.equal(dg2, dg) and torch.equal(du2, du)
    # with dy the caller's scratch, y is written over it, every value the same
    scratch = dy.clone()
    dg3, du3, y3 = gated_mlp.launch_backward(scratch, gate, up, activation, recompute_y=True, dy_is_scratch=True)
    assert y3.data_ptr() == scratch.data_ptr()
    assert torch.equal(y3, y) and torch.equal(dg3, dg) and torch.equal(du3, du)


def ref_f64(gate, up, weight, activation, dz):
    g, u, w = (t.detach().double().requires_grad_() for t in (gate, up, weight))
    z = torch.nn.functional.linear(act_f64(g, activation) * u, w)
    return (z.detach(), *torch.autograd.grad(z, (g, u, w), dz.double()))


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
def test_op_gradients(device, dtype, activation):
    torch.manual_seed(1)
    gate_up = (torch.randn(2, 3, 2 * 123, device=device) * 3).to(dtype).requires_grad_()
    gate, up = gate_up.chunk(2, dim=-1)  # the strided halves of a fused gate_up_proj, as in Phi3
    w = (torch.randn(HIDDEN, 123, device=device) * 0.1).to(dtype).requires_grad_()
    z = torch.ops.liger.gated_down_proj(gate, up, w, activation)
    dz = torch.randn_like(z)
    rz, rdg, rdu, rdw = ref_f64(gate, up, w, activation, dz)
    assert z.shape == (2, 3, HIDDEN) and z.dtype == dtype
    # sums of 123 (or HIDDEN) rounded products: a few ulps of the largest term for bf16/fp16
    tol = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=0.4, rtol=5e-2),
           torch.float16: dict(atol=0.1, rtol=5e-2)}[dtype]
    torch.testing.assert_close(z.double().cpu(), rz.cpu(), **tol)
    z.backward(dz)
    torch.testing.assert_close(gate_up.grad.double().cpu(), torch.cat((rdg, rdu), -1).cpu(), **tol)
    torch.testing.assert_close(w.grad.double().cpu(), rdw.cpu(), **tol)


@pytest.mark.parametrize("device", OP_DEVICES)
def test_frozen_weight_gets_no_gradient(device):
    torch.manual_seed(2)
    gate, up = (torch.randn(5, 40, device=device, requires_grad=True) for _ in range(2))
    w = torch.randn(HIDDEN, 40, device=device)  # frozen, as under a LoRA adapter
    z = torch.ops.liger.gated_down_proj(gate, up, w, "silu")
    _, rdg, rdu, _ = ref_f64(gate, up, w, "silu", torch.ones_like(z))
    z.sum().backward()
    assert w.grad is None
    torch.testing.assert_close(gate.grad.double().cpu(), rdg.cpu(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(up.grad.double().cpu(), rdu.cpu(), atol=1e-4, rtol=1e-4)


def test_opcheck_and_bad_weight():
    gate, up = inputs("chunked", torch.float32, "cpu")
    w = torch.randn(HIDDEN, gate.shape[-1])
    for activation in ACTS:
        torch.library.opcheck(torch.ops.liger.gated_down_proj,
                              (gate.clone().requires_grad_(), up, w.clone().requires_grad_(), activation))
    with pytest.raises(ValueError, match="weight"):
        torch.ops.liger.gated_down_proj(gate, up, w[:, :-1], "silu")


@pytest.mark.parametrize("device", OP_DEVICES)
def test_torch_compile_inductor(device):
    torch.manual_seed(3)
    w = torch.randn(HIDDEN, 64, device=device)

    def f(gate, up, w):
        return torch.ops.liger.gated_down_proj(gate, up, w, "silu").square().sum()

    eager = [torch.randn(4, 64, device=device, requires_grad=True) for _ in range(2)] + [w.requires_grad_()]
    compiled = [t.detach().clone().requires_grad_() for t in eager]
    f(*eager).backward()
    torch.compile(f, backend="inductor", fullgraph=True)(*compiled).backward()
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)
