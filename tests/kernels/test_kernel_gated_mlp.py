"""liger::gated_mlp against float64 act(gate) * up: Triton launchers (1-D and 2-D), op (autograd), torch.compile."""
import math
import pytest
import torch

# Without a GPU, tests/conftest.py has Triton's interpreter run the kernels on CPU tensors; with one, the same
# tests run the real kernels on the GPU.

from liger_compile.kernels import gated_mlp
from models import DEVICE, OP_DEVICES, assert_close_f64

# dtype -> (atol, rtol). The kernels round once from fp32; bf16/fp16 allow a couple of output ulps.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}
DTYPES = list(TOL)
ACTS = ["silu", "gelu_tanh"]
ROWS, COLS = 5, 123

# The interpreter's sigmoid is 1 / (1 + exp(-x)) in numpy: exp overflows to inf for x < -88, sigmoid -> 0 as wanted.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def act_f64(g, activation):
    """The HF formulas (SiLU; GELU with the tanh approximation), float64."""
    g = g.double()
    if activation == "silu":
        return g * torch.sigmoid(g)
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))


def ref_f64(gate, up, activation, dy):
    """(y, d_gate, d_up) by float64 autograd."""
    g = gate.detach().double().requires_grad_()
    u = up.detach().double().requires_grad_()
    y = act_f64(g, activation) * u
    dg, du = torch.autograd.grad(y, (g, u), dy.double())
    return y.detach(), dg, du


def inputs(kind, dtype, device):
    """(gate, up): contiguous [ROWS, COLS] / [2, 3, COLS], or the two halves of one fused gate_up tensor."""
    def rnd(*shape):
        return (torch.randn(*shape, device=device) * 3).to(dtype)  # * 3 reaches the activations' tails

    if kind == "contiguous":
        return rnd(ROWS, COLS), rnd(ROWS, COLS)
    if kind == "contiguous_3d":
        return rnd(2, 3, COLS), rnd(2, 3, COLS)
    gate, up = rnd(2, 3, 2 * COLS).chunk(2, dim=-1)  # Phi3: gate_up_proj(x).chunk(2, dim=-1)
    assert not gate.is_contiguous() and gate.stride(-1) == 1
    return gate, up


def assert_close(actual, expected, dtype):
    assert_close_f64(actual, expected, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("kind", ["contiguous", "contiguous_3d", "chunked"])
def test_launchers(dtype, activation, kind):
    torch.manual_seed(0)
    gate, up = inputs(kind, dtype, DEVICE)
    y = gated_mlp.launch_forward(gate, up, activation)
    dy = torch.randn_like(y)
    ry, rdg, rdu = ref_f64(gate, up, activation, dy)
    assert y.shape == gate.shape and y.dtype == dtype and y.is_contiguous()
    assert_close(y, ry, dtype)
    dg, du = gated_mlp.launch_backward(dy, gate, up, activation)
    assert dg.dtype == dtype and du.dtype == dtype
    assert_close(dg, rdg, dtype)
    assert_close(du, rdu, dtype)


@pytest.mark.parametrize("activation", ACTS)
def test_launchers_many_programs(activation):
    # Small tiles so the 1-D kernel runs several programs with a ragged tail, and the 2-D kernel tiles both axes.
    torch.manual_seed(1)
    dtype = torch.float32
    for kind, cfg in (("contiguous", dict(BLOCK=128, num_warps=1)),
                      ("chunked", dict(ROWS=4, BLOCK_C=32, num_warps=1))):
        gate, up = inputs(kind, dtype, DEVICE)
        dy = torch.randn(gate.shape, device=DEVICE)
        ry, rdg, rdu = ref_f64(gate, up, activation, dy)
        assert_close(gated_mlp.launch_forward(gate, up, activation, config=cfg), ry, dtype)
        dg, du = gated_mlp.launch_backward(dy, gate, up, activation, config=cfg)
        assert_close(dg, rdg, dtype)
        assert_close(du, rdu, dtype)
    # contiguous gate/up with a strided dy (e.g. a transposed grad) take the 2-D backward
    gate, up = inputs("contiguous", dtype, DEVICE)
    dy = torch.randn(COLS, ROWS, device=DEVICE).t()
    _, rdg, rdu = ref_f64(gate, up, activation, dy)
    dg, du = gated_mlp.launch_backward(dy, gate, up, activation)
    assert_close(dg, rdg, dtype)
    assert_close(du, rdu, dtype)


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
def test_op_autograd_chunked(device, dtype, activation):
    # Gradients flow through the chunk back into the one fused gate_up tensor.
    torch.manual_seed(2)
    gate_up = (torch.randn(ROWS, 2 * COLS, device=device) * 3).to(dtype).requires_grad_()
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch.ops.liger.gated_mlp(gate, up, activation)
    dy = torch.randn_like(y)
    ry, rdg, rdu = ref_f64(gate, up, activation, dy)
    assert_close(y, ry, dtype)
    y.backward(dy)
    assert gate_up.grad.dtype == dtype
    assert_close(gate_up.grad, torch.cat((rdg, rdu), dim=-1), dtype)


def test_opcheck():
    gate, up = inputs("chunked", torch.float32, "cpu")
    for activation in ACTS:
        torch.library.opcheck(torch.ops.liger.gated_mlp, (gate.clone().requires_grad_(), up, activation))
        torch.library.opcheck(torch.ops.liger.gated_mlp_backward, (torch.randn(gate.shape), gate, up, activation))


def test_rejects_bad_arguments():
    gate, up = inputs("contiguous", torch.float32, "cpu")
    with pytest.raises(ValueError, match="activation"):
        torch.ops.liger.gated_mlp(gate, up, "relu")
    with pytest.raises(ValueError, match="differ"):
        torch.ops.liger.gated_mlp(gate, up[:, :-1], "silu")


@pytest.mark.parametrize("device", OP_DEVICES)
def test_torch_compile_inductor(device):
    torch.manual_seed(3)
    w = torch.randn(ROWS, COLS, device=device)

    def f(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch.ops.liger.gated_mlp(gate, up, "silu") + torch.ops.liger.gated_mlp(gate, up, "gelu_tanh")
        return (y * w).sum(), y

    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    x = torch.randn(ROWS, 2 * COLS, device=device)
    leaves = [x.clone().requires_grad_() for _ in range(2)]
    eager_out = f(leaves[0])
    comp_out = compiled(leaves[1])
    for a, b in zip(comp_out, eager_out):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    eager_out[0].backward()
    comp_out[0].backward()
    torch.testing.assert_close(leaves[1].grad, leaves[0].grad, atol=1e-5, rtol=1e-5)
