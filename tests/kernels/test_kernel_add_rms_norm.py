"""The residual add + RMSNorm kernels (Triton: the interpreter on CPU, the real thing on CUDA) against float64."""
import pytest
import torch

from liger_compile.kernels import add_rms_norm
from liger_compile.kernels import rms_norm
from models import DEVICE
from test_kernel_rms_norm import FORMS, TOL, reference64

SHAPES = [(1, 123), (7, 123), (2, 3, 64), (2, 5, 3, 72), (33, 1000)]


def sum_tol(dtype):
    """Exact, except bf16 in Triton's interpreter: it truncates fp32 -> bf16 (CUDA rounds to nearest even, as
    eager does), so there the sum may be one bf16 step off."""
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        return dict(atol=0, rtol=2.0**-7)
    return dict(atol=0, rtol=0)


def inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(DEVICE, dtype)
    res = (torch.randn(shape, generator=g) * 2 - 0.3).to(DEVICE, dtype)
    w = (torch.randn(shape[-1], generator=g) * 0.5 + 1).to(DEVICE, dtype)
    return x, res, w


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset,cast_before", FORMS)
def test_forward_kernel_matches_eager_add_and_float64_norm(shape, dtype, offset, cast_before):
    x, res, w = inputs(shape, dtype)
    s, y, rstd = add_rms_norm.launch_forward(x, res, w, 1e-6, offset, cast_before)
    # the sum is eager's, bit for bit (one rounding to the input dtype)
    assert s.dtype == dtype and s.shape == x.shape
    torch.testing.assert_close(s, x + res, **sum_tol(dtype))
    # the norm is of the rounded sum, as eager's norm reads it
    atol, rtol = TOL[dtype]
    assert y.shape == x.shape and y.dtype == rms_norm.out_dtype(x, w, cast_before)
    torch.testing.assert_close(y.double(), reference64(s, w, 1e-6, offset, cast_before), atol=atol, rtol=rtol)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(s.double().pow(2).mean(-1) + 1e-6), atol=1e-6, rtol=1e-5)
    # and, on one tile shape, it is liger::rms_norm's kernel's result on that sum (two kernels autotuned apart may
    # take different tiles for narrow rows, and so sum a row in another order: one fp32 ulp apart on CUDA)
    cfg = rms_norm.fwd_config(shape[-1])
    _, y, rstd = add_rms_norm.launch_forward(x, res, w, 1e-6, offset, cast_before, config=cfg)
    y_norm, rstd_norm = rms_norm.launch_forward(s, w, 1e-6, offset, cast_before, config=cfg)
    torch.testing.assert_close(y, y_norm, atol=0, rtol=0)
    torch.testing.assert_close(rstd, rstd_norm, atol=0, rtol=0)


@pytest.mark.parametrize("with_ds", [True, False])
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset,cast_before", FORMS)
def test_backward_kernel_matches_float64(shape, dtype, offset, cast_before, with_ds):
    x, res, w = inputs(shape, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(shape, generator=g).to(DEVICE, rms_norm.out_dtype(x, w, cast_before))
    ds = torch.randn(shape, generator=g).to(DEVICE, dtype) if with_ds else None
    s, _, rstd = add_rms_norm.launch_forward(x, res, w, 1e-6, offset, cast_before)
    dx, dw = add_rms_norm.launch_backward(dy, ds, s, w, rstd, offset, cast_before)

    # float64: the norm of the (rounded) sum, whose gradient reaches both addends, plus ds from the sum's other uses
    s64 = s.double().requires_grad_()
    w64 = w.double().requires_grad_()
    outs, grads = [reference64(s64, w64, 1e-6, offset, cast_before)], [dy.double()]
    if with_ds:
        outs.append(s64 * 1)
        grads.append(ds.double())
    torch.autograd.backward(outs, grads)
    atol, rtol = TOL[dtype]
    assert dx.dtype == dtype and dx.shape == x.shape
    torch.testing.assert_close(dx.double(), s64.grad, atol=atol * 2, rtol=rtol)
    rows = x.numel() // x.shape[-1]
    torch.testing.assert_close(dw.double(), w64.grad, atol=atol * rows ** 0.5 * 2, rtol=rtol * 2)
    # without ds it is liger::rms_norm's backward on the sum
    if not with_ds:
        dx_norm, dw_norm = rms_norm.launch_backward(dy, s, w, rstd, offset, cast_before)
        torch.testing.assert_close(dx, dx_norm, atol=0, rtol=0)
        torch.testing.assert_close(dw, dw_norm, atol=0, rtol=0)


def test_non_contiguous_addends():
    base = torch.randn(4, 72, 6, device=DEVICE)
    x = base.transpose(1, 2)  # [4, 6, 72], last-dim stride 6
    res = torch.randn(8, 6, 72, device=DEVICE)[::2]  # row stride twice the width
    w = torch.randn(72, device=DEVICE)
    s, y, _ = add_rms_norm.launch_forward(x, res, w, 1e-5, 0.0, True)
    torch.testing.assert_close(s, x + res, atol=0, rtol=0)
    torch.testing.assert_close(y.double(), reference64(x + res, w, 1e-5, 0.0, True), atol=1e-5, rtol=1e-5)


def test_mismatched_addends_are_refused():
    x, res, w = inputs((3, 16), torch.float32)
    with pytest.raises(ValueError, match="one shape and dtype"):
        torch.ops.liger.add_rms_norm(x, res[:1], w, 1e-6, 0.0, True)
    with pytest.raises(ValueError, match="one shape and dtype"):
        torch.ops.liger.add_rms_norm(x, res.double(), w, 1e-6, 0.0, True)


@pytest.mark.parametrize("sum_used", [True, False])
@pytest.mark.parametrize("offset,cast_before", FORMS)
def test_op_autograd_matches_float64(offset, cast_before, sum_used):
    """The registered op with its autograd formula, as the compiled graph calls it: the sum used later (the next
    residual) or only by the norm (the final norm); both addends get the same gradient."""
    x, res, w = inputs((3, 5, 40), torch.float32, seed=3)
    x.requires_grad_(), res.requires_grad_(), w.requires_grad_()
    s, y, _ = torch.ops.liger.add_rms_norm(x, res, w, 1e-6, offset, cast_before)
    g = torch.Generator().manual_seed(4)
    dy, ds = torch.randn(y.shape, generator=g).to(DEVICE), torch.randn(s.shape, generator=g).to(DEVICE)
    outs, grads = ([y, s], [dy, ds]) if sum_used else ([y], [dy])
    torch.autograd.backward(outs, grads)

    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, res, w))
    s64 = x64 + r64
    y64 = reference64(s64, w64, 1e-6, offset, cast_before)
    torch.autograd.backward([y64, s64][:len(outs)], [g.double() for g in grads])
    torch.testing.assert_close(s.double(), s64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.grad.double(), r64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-4, rtol=1e-5)


def test_op_autograd_only_one_addend_needs_grad():
    x, res, w = inputs((4, 24), torch.float32, seed=5)
    x.requires_grad_()
    s, y, _ = torch.ops.liger.add_rms_norm(x, res, w, 1e-6, 0.0, True)
    (y.sum() + s.sum()).backward()
    x64 = x.detach().double().requires_grad_()
    s64 = x64 + res.double()
    (reference64(s64, w.double(), 1e-6, 0.0, True).sum() + s64.sum()).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    assert res.grad is None and w.grad is None
