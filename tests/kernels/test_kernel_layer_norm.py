"""LayerNorm kernels (Triton: the interpreter on CPU, the real thing on CUDA) against a float64 reference; the op
(opcheck, autograd, outputs that are not views)."""
import pytest
import torch
import torch.nn.functional as F

from liger_compile.kernels import layer_norm
from models import DEVICE

# dtype -> (atol, rtol) against float64 math; bf16/fp16 include rounding the output to the input dtype (and the
# interpreter's fp32 -> bf16 store truncates instead of rounding)
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
SHAPES = [(1, 123), (7, 123), (2, 3, 8), (2, 3, 64), (33, 1000), (3, 1536)]  # head dims to hidden sizes, odd ones
AFFINE = [(True, True), (True, False), (False, False), (False, True)]  # (weight, bias)
EPS = 1e-5


def inputs(shape, dtype, weight, bias, seed=0, param_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(DEVICE, dtype)
    pd = param_dtype or dtype
    w = (torch.randn(shape[-1], generator=g) * 0.5 + 1).to(DEVICE, pd) if weight else None
    b = torch.randn(shape[-1], generator=g).to(DEVICE, pd) if bias else None
    return x, w, b


def f64(t, grad=False):
    return None if t is None else t.detach().double().requires_grad_(grad)


def reference64(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, EPS)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weight,bias", AFFINE)
def test_forward_kernel_matches_float64(shape, dtype, weight, bias):
    x, w, b = inputs(shape, dtype, weight, bias)
    y, mean, rstd = layer_norm.launch_forward(x, w, b, EPS)
    atol, rtol = TOL[dtype]
    assert y.shape == x.shape and y.dtype == dtype and mean.dtype == rstd.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference64(f64(x), f64(w), f64(b)), atol=atol, rtol=rtol)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(x64.var(-1, unbiased=False) + EPS), atol=1e-6, rtol=1e-5)
    # the kernel computes what the plain-torch twin computes (same fp32 math), to rounding
    y_torch, _, _ = layer_norm.reference_forward(x, w, b, EPS)
    torch.testing.assert_close(y, y_torch, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weight,bias", AFFINE)
def test_backward_kernel_matches_float64(shape, dtype, weight, bias):
    x, w, b = inputs(shape, dtype, weight, bias, seed=1)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    _, mean, rstd = layer_norm.launch_forward(x, w, b, EPS)
    dx, dw, db = layer_norm.launch_backward(dy, x, w, mean, rstd, weight, b.dtype if bias else None)

    x64, w64, b64 = f64(x, True), f64(w, True), f64(b, True)
    reference64(x64, w64, b64).backward(dy.double())
    atol, rtol = TOL[dtype]
    assert dx.dtype == dtype
    torch.testing.assert_close(dx.double(), x64.grad, atol=atol * 2, rtol=rtol)
    # dw and db sum over all rows: scale the tolerance with the number of rows summed
    rows = x.numel() // x.shape[-1]
    for got, ref in ((dw, w64), (db, b64)):
        if ref is None:
            assert got.numel() == 0
            continue
        assert got.dtype == dtype and got.shape == (shape[-1],)
        torch.testing.assert_close(got.double(), ref.grad, atol=atol * rows ** 0.5 * 2, rtol=rtol * 2)
    # and what the plain-torch twin computes
    ref_dx, ref_dw, ref_db = layer_norm.reference_backward(dy, x, w, mean, rstd, weight, b.dtype if bias else None)
    torch.testing.assert_close(dx, ref_dx, atol=atol * 2, rtol=rtol)
    assert dw.shape == ref_dw.shape and db.shape == ref_db.shape


def test_fp32_parameters_with_a_bf16_input():
    """F.layer_norm's mixed rule: bf16 x with fp32 weight and bias gives a bf16 output; their gradients are fp32."""
    x, w, b = inputs((5, 96), torch.bfloat16, True, True, seed=4, param_dtype=torch.float32)
    y, mean, rstd = layer_norm.launch_forward(x, w, b, EPS)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference64(f64(x), f64(w), f64(b)), atol=3e-2, rtol=2e-2)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, x.dtype)
    _, dw, db = layer_norm.launch_backward(dy, x, w, mean, rstd, True, b.dtype)
    assert dw.dtype == db.dtype == torch.float32
    x64, w64, b64 = f64(x, True), f64(w, True), f64(b, True)
    reference64(x64, w64, b64).backward(dy.double())
    torch.testing.assert_close(dw.double(), w64.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(db.double(), b64.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("layout", ["row_strided", "transposed"])
def test_strided_inputs(layout):
    # rows of 72 with a row stride of 80 (read in place), or a transposed input (copied into rows first)
    if layout == "row_strided":
        x = torch.randn(4, 6, 80, device=DEVICE)[..., :72]
    else:
        x = torch.randn(4, 72, 6, device=DEVICE).transpose(1, 2)
    w, b = torch.randn(72, device=DEVICE), torch.randn(72, device=DEVICE)
    y, mean, rstd = layer_norm.launch_forward(x, w, b, EPS)
    assert y.is_contiguous()
    torch.testing.assert_close(y.double(), reference64(f64(x), f64(w), f64(b)), atol=1e-5, rtol=1e-5)
    dy = torch.randn(4, 72, 6, device=DEVICE).transpose(1, 2)  # a strided gradient too
    dx, dw, db = layer_norm.launch_backward(dy, x, w, mean, rstd, True, b.dtype)
    x64, w64, b64 = f64(x, True), f64(w, True), f64(b, True)
    reference64(x64, w64, b64).backward(dy.double())
    torch.testing.assert_close(dx.double(), x64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw.double(), w64.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(db.double(), b64.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows_per_program,rows", [(3, 1), (5, 2), (16, 4)])
def test_backward_row_blocks_end_anywhere(rows_per_program, rows):
    """Programs own blocks of rows that end mid-step (5 rows per program, 2 per step) and a ragged last block."""
    x, w, b = inputs((33, 200), torch.float32, True, True, seed=6)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    _, mean, rstd = layer_norm.launch_forward(x, w, b, EPS)
    cfg = dict(ROWS=rows, num_warps=4, ROWS_PER_PROGRAM=rows_per_program)
    dx, dw, db = layer_norm.launch_backward(dy, x, w, mean, rstd, True, b.dtype, config=cfg)
    ref = layer_norm.reference_backward(dy, x, w, mean, rstd, True, b.dtype)
    for got, want in zip((dx, dw, db), ref):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("weight,bias", AFFINE)
def test_op_autograd_matches_float64(weight, bias):
    """The registered op with its autograd formula, as the compiled graph calls it."""
    x, w, b = inputs((3, 5, 40), torch.float32, weight, bias, seed=3)
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_()
    y = torch.ops.liger.layer_norm(x, w, b, EPS)[0]
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64, b64 = f64(x, True), f64(w, True), f64(b, True)
    ref = reference64(x64, w64, b64)
    ref.backward(dy.double())
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    for got, want in ((w, w64), (b, b64)):
        if got is not None:
            torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-4, rtol=1e-5)


def test_frozen_parameters_get_no_gradient():
    x, w, b = inputs((4, 24), torch.float32, True, True, seed=8)
    x.requires_grad_()
    torch.ops.liger.layer_norm(x, w, b, EPS)[0].square().sum().backward()  # w, b frozen (as under LoRA)
    assert x.grad is not None and w.grad is None and b.grad is None


def test_opcheck():
    for weight, bias in AFFINE:
        x, w, b = inputs((3, 4, 24), torch.float32, weight, bias, seed=9)
        grads = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
        torch.library.opcheck(torch.ops.liger.layer_norm, (*grads, EPS))
        _, mean, rstd = layer_norm.reference_forward(x, w, b, EPS)
        torch.library.opcheck(torch.ops.liger.layer_norm_backward,
                              (torch.randn(x.shape, device=x.device), x, w, mean, rstd, weight, b.dtype if bias else None))


def test_outputs_are_not_views_and_take_in_place_updates():
    x, w, b = inputs((2, 3, 16), torch.float32, True, True, seed=10)
    for t in (x, w, b):
        t.requires_grad_()
    outs = torch.ops.liger.layer_norm(x, w, b, EPS)
    assert all(t._base is None for t in outs)
    assert len({t.untyped_storage().data_ptr() for t in outs}) == 3
    y = outs[0]
    y.add_(1.0)  # what a model may do with the output; autograd must accept it
    y.sum().backward()
    assert all(t.grad is not None for t in (x, w, b))
    with torch.no_grad():
        launched = layer_norm.launch_forward(x, w, b, EPS)
        grads = layer_norm.launch_backward(torch.ones_like(x), x, w, *launched[1:], True, b.dtype)
    assert all(t._base is None for t in (*launched, *grads))


def test_torch_compile_inductor():
    """The op inside an Inductor graph (its Triton kernels traced in on CUDA), forward and backward."""
    x, w, b = inputs((4, 48), torch.float32, True, True, seed=11)

    def f(x, w, b):
        return torch.ops.liger.layer_norm(x, w, b, EPS)[0].square().sum()

    eager = [t.clone().requires_grad_() for t in (x, w, b)]
    compiled = [t.clone().requires_grad_() for t in (x, w, b)]
    f(*eager).backward()
    torch.compile(f, backend="inductor", fullgraph=True)(*compiled).backward()
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(c.grad, a.grad, atol=1e-5, rtol=1e-5)
