"""RMSNorm kernels (Triton: the interpreter on CPU, the real thing on CUDA) against a float64 reference."""
import pytest
import torch

from liger_compile.kernels import rms_norm
from models import DEVICE

# dtype -> (atol, rtol) against float64 math; bf16/fp16 include rounding the output (and, in the Llama form,
# the normalised value) to the input dtype, as eager does
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
FORMS = [(0.0, True), (0.0, False), (1.0, False)]  # (offset, cast_before_weight): Llama, OLMo2, Gemma
SHAPES = [(1, 123), (7, 123), (2, 3, 64), (2, 5, 3, 72), (33, 1000)]


def reference64(x, w, eps, offset, cast_before_weight):
    x64 = x.double()
    y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * (w.double() + offset)
    return y


def inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(DEVICE, dtype)
    w = (torch.randn(shape[-1], generator=g) * 0.5 + 1).to(DEVICE, dtype)
    return x, w


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset,cast_before", FORMS)
def test_forward_kernel_matches_float64(shape, dtype, offset, cast_before):
    x, w = inputs(shape, dtype)
    y, rstd = rms_norm.launch_forward(x, w, 1e-6, offset, cast_before)
    atol, rtol = TOL[dtype]
    assert y.shape == x.shape and y.dtype == rms_norm.out_dtype(x, w, cast_before)
    torch.testing.assert_close(y.double(), reference64(x, w, 1e-6, offset, cast_before), atol=atol, rtol=rtol)
    rstd_ref = torch.rsqrt(x.double().pow(2).mean(-1) + 1e-6)
    torch.testing.assert_close(rstd.double(), rstd_ref, atol=1e-6, rtol=1e-5)
    # the kernel computes exactly what the torch path computes (same fp32 math), to rounding
    y_torch, _ = rms_norm.reference_forward(x, w, 1e-6, offset, cast_before)
    torch.testing.assert_close(y, y_torch, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset,cast_before", FORMS)
def test_backward_kernel_matches_float64(shape, dtype, offset, cast_before):
    x, w = inputs(shape, dtype, seed=1)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, rms_norm.out_dtype(x, w, cast_before))
    _, rstd = rms_norm.launch_forward(x, w, 1e-6, offset, cast_before)
    dx, dw = rms_norm.launch_backward(dy, x, w, rstd, offset, cast_before)

    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    reference64(x64, w64, 1e-6, offset, cast_before).backward(dy.double())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(dx.double(), x64.grad, atol=atol * 2, rtol=rtol)
    # dw sums over all rows: scale the tolerance with the number of rows summed
    rows = x.numel() // x.shape[-1]
    torch.testing.assert_close(dw.double(), w64.grad, atol=atol * rows ** 0.5 * 2, rtol=rtol * 2)


def test_non_contiguous_input():
    base = torch.randn(4, 72, 6, device=DEVICE)
    x = base.transpose(1, 2)  # [4, 6, 72], last-dim stride 6
    w = torch.randn(72, device=DEVICE)
    y, _ = rms_norm.launch_forward(x, w, 1e-5, 0.0, True)
    torch.testing.assert_close(y.double(), reference64(x, w, 1e-5, 0.0, True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("offset,cast_before", FORMS)
def test_op_autograd_matches_float64(offset, cast_before):
    """The registered op with its autograd formula, as the compiled graph calls it."""
    x, w = inputs((3, 5, 40), torch.float32, seed=3)
    x.requires_grad_(), w.requires_grad_()
    y = torch.ops.liger.rms_norm(x, w, 1e-6, offset, cast_before)[0]
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    reference64(x64, w64, 1e-6, offset, cast_before).backward(dy.double())
    torch.testing.assert_close(y.double(), reference64(x64, w64, 1e-6, offset, cast_before), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows_per_step,rows_per_program", [(1, 4), (2, 3), (4, 16)])
@pytest.mark.parametrize("with_sum_grad", [False, True])
def test_backward_prefetch_gives_the_same_result(rows_per_step, rows_per_program, with_sum_grad):
    """The backward with the next step's rows loaded ahead (PREFETCH) writes exactly what the plain loop writes:
    33 rows in blocks that end mid-step (3 rows per program with 2 per step) and a ragged last program."""
    x, w = inputs((33, 200), torch.bfloat16, seed=3)
    g = torch.Generator().manual_seed(4)
    dy = torch.randn(x.shape, generator=g).to(DEVICE, x.dtype)
    ds = torch.randn(x.shape, generator=g).to(DEVICE, x.dtype) if with_sum_grad else None
    _, rstd = rms_norm.launch_forward(x, w, 1e-6, 0.0, True)
    outs = []
    for prefetch in (False, True):
        cfg = dict(ROWS=rows_per_step, num_warps=4, ROWS_PER_PROGRAM=rows_per_program, PREFETCH=prefetch)
        outs.append(rms_norm.launch_backward(dy, x, w, rstd, 0.0, True, config=cfg, d_sum=ds))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    ref_dx, ref_dw = rms_norm.reference_backward(dy, x, w, rstd, 0.0, True)
    if ds is not None:
        ref_dx = (ref_dx.float() + ds.float()).to(x.dtype)
    torch.testing.assert_close(outs[1][0].float(), ref_dx.float(), atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(outs[1][1].float(), ref_dw.float(), atol=0.3, rtol=4e-2)


# --- without a weight (Nanochat, Falcon-Mamba, Gemma 3n's v_norm): y = n.to(x.dtype), no dweight --------------------
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", [(7, 123), (2, 3, 64)])
def test_weightless_forward_and_backward_match_float64(shape, dtype):
    x, _ = inputs(shape, dtype, seed=5)
    y, rstd = rms_norm.launch_forward(x, None, 1e-6, 0.0, False)
    assert y.dtype == x.dtype
    atol, rtol = TOL[dtype]
    x64 = x.double().requires_grad_()
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    dx, dw = rms_norm.launch_backward(dy, x, None, rstd, 0.0, False)
    ref.backward(dy.double())
    torch.testing.assert_close(dx.double(), x64.grad, atol=atol * 2, rtol=rtol)
    assert dw.numel() == 0
    torch.testing.assert_close(dx, rms_norm.reference_backward(dy, x, None, rstd, 0.0, False)[0], atol=atol,
                               rtol=rtol)


def test_weightless_add_rms_norm_matches_float64():
    from liger_compile.kernels import add_rms_norm

    x, _ = inputs((5, 40), torch.float32, seed=7)
    r, _ = inputs((5, 40), torch.float32, seed=8)
    s, y, rstd = add_rms_norm.launch_forward(x, r, None, 1e-6, 0.0, False)
    s64 = (x.double() + r.double()).requires_grad_()
    ref = s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(s.double(), s64.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(9)
    dy, ds = torch.randn(5, 40, generator=g).to(DEVICE), torch.randn(5, 40, generator=g).to(DEVICE)
    dx, _ = add_rms_norm.launch_backward(dy, ds, s, None, rstd, 0.0, False)
    ref.backward(dy.double())
    torch.testing.assert_close(dx.double(), s64.grad + ds.double(), atol=1e-5, rtol=1e-5)


def test_weightless_op_autograd():
    """The registered ops without a weight, as the compiled graph calls them: x gets eager's gradient."""
    x, _ = inputs((3, 5, 24), torch.float32, seed=10)
    r, _ = inputs((3, 5, 24), torch.float32, seed=11)
    x.requires_grad_(), r.requires_grad_()
    y = torch.ops.liger.rms_norm(x, None, 1e-6, 0.0, False)[0]
    s, y2, _ = torch.ops.liger.add_rms_norm(x, r, None, 1e-6, 0.0, False)
    (y.sum() + (y2 * y2).sum() + s.sum()).backward()
    xe, re = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    norm = lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    se = xe + re
    (norm(xe).sum() + (norm(se) ** 2).sum() + se.sum()).backward()
    torch.testing.assert_close(x.grad, xe.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.grad, re.grad, atol=1e-5, rtol=1e-5)


# --- the inverse RMS rounded to the input dtype before scaling (DeepSeek-V4's unweighted norm) --------------------
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", [(7, 123), (2, 3, 64)])
def test_rounded_rstd_forward_and_backward(shape, dtype):
    """Forward: eager's own rounding, x * rstd.to(x.dtype) from fp32 math (to the rounding of the fp32 sum, or of one
    bf16/fp16 step). Backward: the float64 gradient of the same function (the rounding passes the gradient through)."""
    x, _ = inputs(shape, dtype, seed=12)
    y, rstd = rms_norm.launch_forward(x, None, 1e-6, 0.0, False, True)
    eager = x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + 1e-6).to(x.dtype)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, eager, atol=atol, rtol=rtol)
    torch.testing.assert_close(y, rms_norm.reference_forward(x, None, 1e-6, 0.0, False, True)[0], atol=atol, rtol=rtol)
    if dtype == torch.float16:  # where the interpreter rounds as CUDA does: eager's very values (not rounding rstd
        # first gives about a third of them one unit off)
        assert (y == eager).float().mean() > 0.99

    class Round(torch.autograd.Function):  # the forward's rounding of rstd, with its identity gradient
        @staticmethod
        def forward(ctx, r):
            return r.to(dtype).double()

        @staticmethod
        def backward(ctx, g):
            return g

    x64 = x.double().requires_grad_()
    ref = x64 * Round.apply(torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6))
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(13)).to(DEVICE, dtype)
    ref.backward(dy.double())
    dx, dw = rms_norm.launch_backward(dy, x, None, rstd, 0.0, False, True)
    torch.testing.assert_close(dx.double(), x64.grad, atol=atol * 2, rtol=rtol)
    torch.testing.assert_close(dx, rms_norm.reference_backward(dy, x, None, rstd, 0.0, False, True)[0], atol=atol,
                               rtol=rtol)
    assert dw.numel() == 0


# --- liger::gated_rms_norm: Mamba2's weight * rms_norm(x * silu(gate)); rms_norm(x) * w * act(gate) (Kimi-Linear) ---
GATE_FORMS = [("silu", False), ("sigmoid", True), ("silu", True)]


def gated_reference64(x, gate, w, eps, activation, after):
    act = torch.sigmoid(gate.double()) if activation == "sigmoid" else torch.nn.functional.silu(gate.double())
    h = x.double() if after else x.double() * act
    y = w.double() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))
    return y * act if after else y


@pytest.mark.parametrize("activation,after", GATE_FORMS)
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", [(7, 123), (2, 3, 64)])
def test_gated_forward_and_backward_match_float64(shape, dtype, activation, after):
    x, w = inputs(shape, dtype, seed=14)
    gate, _ = inputs(shape, dtype, seed=15)
    y, rstd = rms_norm.gated_launch_forward(x, gate, w, 1e-6, activation, after)
    atol, rtol = TOL[dtype]
    x64, g64, w64 = (t.double().requires_grad_() for t in (x, gate, w))
    ref = gated_reference64(x64, g64, w64, 1e-6, activation, after)
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)
    y_torch = rms_norm.gated_reference_forward(x, gate, w, 1e-6, activation, after)[0]
    torch.testing.assert_close(y, y_torch, atol=atol, rtol=rtol)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(16)).to(DEVICE, y.dtype)
    ref.backward(dy.double())
    dx, dgate, dw = rms_norm.gated_launch_backward(dy, x, gate, w, rstd, activation, after)
    rows = x.numel() // x.shape[-1]
    torch.testing.assert_close(dx.double(), x64.grad, atol=atol * 2, rtol=rtol)
    torch.testing.assert_close(dgate.double(), g64.grad, atol=atol * 2, rtol=rtol)
    torch.testing.assert_close(dw.double(), w64.grad, atol=atol * rows ** 0.5 * 2, rtol=rtol * 2)
    for got, want in zip((dx, dgate, dw), rms_norm.gated_reference_backward(dy, x, gate, w, rstd, activation, after)):
        torch.testing.assert_close(got, want, atol=atol * rows ** 0.5, rtol=rtol)


@pytest.mark.parametrize("activation,after", GATE_FORMS)
def test_gated_backward_prefetch_gives_the_same_result(activation, after):
    """The gate rides the prefetched loads: the same values with and without PREFETCH, over a ragged last block."""
    x, w = inputs((33, 200), torch.float32, seed=17)
    gate, _ = inputs((33, 200), torch.float32, seed=18)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(19)).to(DEVICE)
    _, rstd = rms_norm.gated_launch_forward(x, gate, w, 1e-6, activation, after)
    outs = [rms_norm.gated_launch_backward(dy, x, gate, w, rstd, activation, after,
                                           config=dict(ROWS=2, num_warps=4, ROWS_PER_PROGRAM=3, PREFETCH=prefetch))
            for prefetch in (False, True)]
    assert all(torch.equal(a, b) for a, b in zip(*outs))
