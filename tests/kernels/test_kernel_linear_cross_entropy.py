"""liger::linear_cross_entropy: the op (torch chunk path on CPU) and the Triton per-row kernel against float64
references and against eager PyTorch's own error."""
import math

import pytest
import torch
import torch.nn.functional as F
import triton

from liger_compile.kernels import linear_cross_entropy as lce
from models import DEVICE

# Without a GPU, tests/conftest.py has Triton's interpreter run the kernel on CPU tensors; with one, the same kernel
# tests run the real kernel on the GPU.

N, H, V = 10, 123, 317  # odd hidden size, vocabulary no multiple of any block
SMALL_TILE = dict(BLOCK_V=128, num_warps=1)  # V=317 -> three tiles, the last one ragged
IGNORE = -100
CHUNK_ROWS = lce.chunk_rows  # the real one; the autouse fixture below replaces it for the other tests


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Three rows per chunk: N=10 gives chunks of 3, 3, 3 and a ragged 1."""
    monkeypatch.setattr(lce.row_kernel, "chunk_rows", lambda n, v, dtype: 3)


@pytest.fixture
def interpreted():
    """The Triton kernel runs on CPU tensors only in the interpreter, which Triton picks when it is first imported
    (its own tl.sum, tl.max, ... are @triton.jit functions too). If something imported triton before this module
    set TRITON_INTERPRET=1, the kernel cannot run here: skip, saying why, rather than fail."""
    if DEVICE == "cpu" and isinstance(lce.row_kernel._lce_chunk_kernel, triton.runtime.jit.JITFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; set it in the environment (or conftest)")


def chunk_fn(use_kernel, request):
    """The Triton per-row kernel (interpreted on CPU) or its torch twin; both take the same arguments."""
    if use_kernel:
        request.getfixturevalue("interpreted")
        return lce.launch_chunk_kernel
    return lce.reference_chunk


def run_chunk(fn, logits, labels, inv_denom, ls=0.0, softcap=0.0):
    """One chunk through fn on DEVICE; returns (d loss / d logits, per-row losses) on CPU."""
    z, losses = logits.to(DEVICE, copy=True), torch.full(labels.shape, -1.0, device=DEVICE)  # fn overwrites z
    fn(z, labels.to(DEVICE), losses, torch.tensor([inv_denom], device=DEVICE), IGNORE, ls, softcap, config=SMALL_TILE)
    return z.cpu(), losses.cpu()


def make_inputs(dtype, n=N, h=H, v=V, bias=False, ignore_every=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / math.sqrt(h) * 2).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = IGNORE
    return hidden, weight, b, labels


def eager_loss(hidden, weight, bias, labels, num_items, ls, softcap, reduction):
    """The function the op replaces: F.linear in the input dtype, then fp32 (or fp64) cross-entropy."""
    z = F.linear(hidden, weight, bias)
    z = z.double() if z.dtype == torch.float64 else z.float()
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, labels, ignore_index=IGNORE, reduction=reduction, label_smoothing=ls)
    return loss / num_items if num_items is not None else loss


def run_eager(hidden, weight, bias, labels, num_items, ls, softcap, reduction, grad_scale, dtype=None):
    """Loss and gradients of eager_loss, with the inputs cast to dtype first (float64 for the reference)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss = eager_loss(*leaves[:2], leaves[2], labels, num_items, ls, softcap, reduction)
    (loss * grad_scale).backward()
    return loss.detach(), *[t.grad if t is not None else None for t in leaves]


def run_op(hidden, weight, bias, labels, num_items, ls, softcap, reduction, grad_scale):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss = torch.ops.liger.linear_cross_entropy(
        leaves[0], leaves[1], leaves[2], labels, num_items, IGNORE, ls, softcap, reduction)[0]
    (loss * grad_scale).backward()
    return loss.detach(), *[t.grad if t is not None else None for t in leaves]


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# (reduction, num_items, label_smoothing, softcap, bias, grad_scale)
CASES = {
    "mean": ("mean", None, 0.0, 0.0, False, 1.0),
    "sum_x2.5": ("sum", None, 0.0, 0.0, False, 2.5),
    "num_items": ("sum", torch.tensor(37), 0.0, 0.0, False, 1.0),
    "smoothing": ("mean", None, 0.1, 0.0, False, 1.0),
    "softcap_bias": ("mean", None, 0.0, 30.0, True, 2.5),
    "all_features": ("sum", torch.tensor(23.0), 0.1, 30.0, True, 0.5),
}


def case_args(case, dtype):
    """CASES[case] as the arguments of run_op and run_eager, on inputs of dtype."""
    reduction, num_items, ls, softcap, bias, scale = CASES[case]
    hidden, weight, b, labels = make_inputs(dtype, bias=bias)
    return hidden, weight, b, labels, num_items, ls, softcap, reduction, scale


@pytest.mark.parametrize("case", list(CASES))
def test_op_fp32_matches_fp64(case):
    args = case_args(case, torch.float32)
    ours = run_op(*args)
    ref = run_eager(*args, dtype=torch.float64)
    assert ours[0].dtype == torch.float32
    for got, want, name in zip(ours, ref, ("loss", "grad_hidden", "grad_weight", "grad_bias")):
        if want is None:
            assert got is None
            continue
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item(), msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_op_bf16_no_worse_than_eager(case):
    args = case_args(case, torch.bfloat16)
    ours = run_op(*args)
    eager = run_eager(*args)
    ref = run_eager(*args, dtype=torch.float64)
    assert ours[0].dtype == torch.float32  # the loss stays fp32, as eager's (logits upcast before the loss)
    for got, base, want, name in zip(ours, eager, ref, ("loss", "grad_hidden", "grad_weight", "grad_bias")):
        if want is None:
            continue
        assert got.dtype == base.dtype, name
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) <= 2 * rel_err(base, want) + 1e-4, (name, rel_err(got, want), rel_err(base, want))


def test_n1_single_row():
    hidden, weight, _, labels = make_inputs(torch.float32, n=1, ignore_every=0)
    args = (hidden, weight, None, labels, None, 0.0, 0.0, "mean", 1.0)
    for got, want in zip(run_op(*args), run_eager(*args, dtype=torch.float64)):
        if want is not None:
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_tokens_like_torch(reduction):
    """Zero tokens: torch's loss (nan for the mean of nothing, 0 for the sum) and zero gradients, not a crash."""
    hidden = torch.randn(0, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.empty(0, dtype=torch.long)
    loss = torch.ops.liger.linear_cross_entropy(hidden, weight, None, labels, None, IGNORE, 0.0, 0.0, reduction)[0]
    want = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, reduction=reduction)
    torch.testing.assert_close(loss, want, equal_nan=True)
    if reduction == "sum":
        loss.backward()
        assert hidden.grad.shape == (0, H) and (weight.grad == 0).all()


def test_batched_hidden_shape():
    """[B, T, H] hidden with [B, T] labels: flattened inside, grad_hidden comes back in the input's shape."""
    hidden, weight, _, labels = make_inputs(torch.float32, n=12)
    args = (hidden.view(3, 4, H), weight, None, labels.view(3, 4), None, 0.0, 0.0, "mean", 1.0)
    ours = run_op(*args)
    ref = run_eager(hidden, weight, None, labels, None, 0.0, 0.0, "mean", 1.0, dtype=torch.float64)
    assert ours[1].shape == (3, 4, H)
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(ours[1].double().view(12, H), ref[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ls,softcap", [(0.0, 0.0), (0.1, 0.0), (0.0, 30.0), (0.1, 30.0)])
def test_chunk_kernel_matches_torch_chunk(interpreted, dtype, ls, softcap):
    """The Triton per-row kernel against reference_chunk on the same logits; tiles of 128 over V=317."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(N, V, generator=g) * 4).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = IGNORE
    gk, lk = run_chunk(lce.launch_chunk_kernel, logits, labels, 1 / 7.0, ls, softcap)
    gt, lt = run_chunk(lce.reference_chunk, logits, labels, 1 / 7.0, ls, softcap)
    torch.testing.assert_close(lk, lt, rtol=1e-5, atol=1e-5)  # (approximate exp/log on a GPU)
    assert (lk[::4] == 0).all() and (gk[::4] == 0).all()  # ignored rows: no loss, no gradient
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(gk.float(), gt.float(), **tol)

    # both against float64 autograd of the same logits (mean over the 7 kept rows is the 1/7 scale)
    z64 = logits.double().requires_grad_()
    zz = softcap * torch.tanh(z64 / softcap) if softcap > 0 else z64
    rows = F.cross_entropy(zz, labels, ignore_index=IGNORE, reduction="none", label_smoothing=ls)
    (rows.sum() / 7).backward()
    torch.testing.assert_close(lk.double(), rows.detach(), rtol=1e-5, atol=1e-5)
    tol = dict(rtol=1e-4, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(gk.double(), z64.grad, **tol)


@pytest.mark.parametrize("case", ["mean", "softcap_bias", "all_features"])
def test_forward_with_kernel_matches_fp64(interpreted, case):
    """The whole chunked algorithm with the Triton kernel (as on CUDA), run on CPU through the interpreter."""
    reduction, num_items, ls, softcap, bias, _ = CASES[case]
    hidden, weight, b, labels = make_inputs(torch.float32, bias=bias)
    on_dev = [t.to(DEVICE) if t is not None else None for t in (hidden, weight, b, labels, num_items)]
    got = lce.launch_forward(*on_dev, IGNORE, ls, softcap, reduction, use_kernel=True, config=SMALL_TILE)
    got = [t.cpu() for t in got]
    plain = lce.launch_forward(hidden, weight, b, labels, num_items, IGNORE, ls, softcap, reduction, use_kernel=False)
    ref = run_eager(hidden, weight, b, labels, num_items, ls, softcap, reduction, 1.0, dtype=torch.float64)
    for k, (g_, p_, r_) in enumerate(zip(got, plain, ref)):
        if r_ is None:
            assert g_.numel() == 0
            continue
        torch.testing.assert_close(g_, p_, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g_.double(), r_, rtol=1e-5, atol=1e-6 * r_.abs().max().item())


def test_all_ignored_gives_nan_like_torch():
    hidden, weight, _, labels = make_inputs(torch.float32)
    labels[:] = IGNORE
    for reduction in ("mean", "sum"):
        ours = run_op(hidden, weight, None, labels, None, 0.0, 0.0, reduction, 1.0)
        want = eager_loss(hidden, weight, None, labels, None, 0.0, 0.0, reduction)
        torch.testing.assert_close(ours[0], want, equal_nan=True)
        assert (ours[1] == 0).all() and (ours[2] == 0).all()  # no row contributes, and no 0 * inf = nan


def test_all_ignored_kernel(interpreted):
    z, losses = run_chunk(lce.launch_chunk_kernel, torch.randn(3, V), torch.full((3,), IGNORE), math.inf, ls=0.1)
    assert (z == 0).all() and (losses == 0).all()


@pytest.mark.parametrize("bad", [V, V + 5, -1])
def test_out_of_range_label_raises(bad):
    hidden, weight, _, labels = make_inputs(torch.float32)
    labels[4] = bad
    with pytest.raises(ValueError, match=rf"label {bad} at position 4 is outside the vocabulary \[0, {V}\)"):
        torch.ops.liger.linear_cross_entropy(hidden, weight, None, labels, None, IGNORE, 0.0, 0.0, "mean")


@pytest.mark.parametrize("use_kernel", [False, True])
def test_out_of_range_label_poisons_loss(request, use_kernel):
    """Where the eager check is skipped (tracing), a bad label makes the loss NaN rather than a plausible number."""
    g = torch.Generator().manual_seed(2)
    z, losses = run_chunk(chunk_fn(use_kernel, request), torch.randn(4, V, generator=g),
                          torch.tensor([3, V, IGNORE, -7]), 0.5)
    assert torch.isfinite(losses[0]) and losses[2] == 0
    assert losses[1].isnan() and losses[3].isnan() and losses.sum().isnan()
    assert z[1].isnan().all() and z[3].isnan().all() and torch.isfinite(z[0]).all() and (z[2] == 0).all()


def test_bad_arguments_raise():
    hidden, weight, _, labels = make_inputs(torch.float32)
    op = torch.ops.liger.linear_cross_entropy
    with pytest.raises(ValueError, match="reduction"):
        op(hidden, weight, None, labels, None, IGNORE, 0.0, 0.0, "none")
    with pytest.raises(ValueError, match="num_items"):
        op(hidden, weight, None, labels, torch.tensor(5), IGNORE, 0.0, 0.0, "mean")


def confident_logits(n, v, margin, seed):
    """bf16 logits whose label beats every other class by about `margin`: p_y = 1 - O(v e^-margin)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    z[torch.arange(n), labels] = margin
    return z.to(torch.bfloat16), labels


@pytest.mark.parametrize("use_kernel", [False, True])
def test_confident_rows_keep_label_gradient(request, use_kernel):
    """p_y - 1 and lse - z_y are ~1e-11 here: computed directly in fp32 they round to 0 (as eager's are)."""
    z, labels = confident_logits(6, V, 30.0, seed=3)
    z64 = z.double().requires_grad_()
    rows = F.cross_entropy(z64, labels, reduction="none")
    rows.sum().backward()
    g, losses = run_chunk(chunk_fn(use_kernel, request), z, labels, 1.0)
    true_grad = z64.grad[torch.arange(6), labels]
    assert (true_grad < -1e-12).all()  # what is at stake
    torch.testing.assert_close(losses.double(), rows.detach(), rtol=1e-4, atol=0)
    torch.testing.assert_close(g.double(), z64.grad, rtol=1e-2, atol=0)


def test_confident_predictions_op_bf16():
    """End to end in bf16 with hidden scaled so the label's logit leads by ~30: gradients finite and close to fp64.
    (The fp64 reference uses exact logits; ours round them to bf16 first, as eager does, hence the 5% band. Eager's
    fp32 cross-entropy is off by ~80% here: its loss is 0 and the label's logit gets no gradient.)"""
    hidden, weight, _, labels = make_inputs(torch.bfloat16, ignore_every=0, seed=4)
    w32 = weight.float()
    target = w32[labels]
    hidden = (target * (40.0 / target.pow(2).sum(1, keepdim=True))).to(torch.bfloat16)  # z_y ~ 40, others ~ +-8
    args = (hidden, weight, None, labels, None, 0.0, 0.0, "mean", 1.0)
    ours = run_op(*args)
    ref = run_eager(*args, dtype=torch.float64)
    z64 = F.linear(hidden.double(), weight.double())
    margin = (z64.gather(1, labels[:, None]).squeeze(1) - z64.scatter(1, labels[:, None], -1e9).amax(1)).min()
    assert margin > 20
    for got, want in zip(ours[:3], ref[:3]):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < 0.05, rel_err(got, want)


@pytest.mark.parametrize("programs", [1, 3, 4])
def test_chunk_kernel_rows_shared_by_fewer_programs(interpreted, programs):
    """With fewer programs than rows each program walks rows p, p + G, ...: every row's loss and gradient come out
    as with one program per row (N=10 rows over 1, 3 or 4 programs: ragged last turns)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(N, V, generator=g) * 3
    labels = torch.randint(0, V, (N,), generator=g)
    labels[1::3] = IGNORE
    z_one, l_one = run_chunk(lce.launch_chunk_kernel, logits, labels, 1 / 7.0, 0.1, 0.0)
    z, losses = logits.to(DEVICE, copy=True), torch.full(labels.shape, -1.0, device=DEVICE)
    lce.launch_chunk_kernel(z, labels.to(DEVICE), losses, torch.tensor([1 / 7.0], device=DEVICE), IGNORE, 0.1, 0.0,
                            config=dict(SMALL_TILE, PROGRAMS=programs))
    assert torch.equal(z.cpu(), z_one) and torch.equal(losses.cpu(), l_one)


def test_chunk_rows_default():
    assert CHUNK_ROWS(16384, 128256, torch.bfloat16) == 912  # 18 equal chunks under 232 MiB of bf16 logits
    assert CHUNK_ROWS(16384, 128256, torch.float32) == 469  # 35 equal chunks; rounded up to 480 would not fit
    assert CHUNK_ROWS(1000, 128256, torch.bfloat16) == 512  # two chunks, not 948 + 52
    assert CHUNK_ROWS(5, 128256, torch.bfloat16) == 5
    assert CHUNK_ROWS(100, 10**9, torch.float32) == 1
    assert lce.kernel_config(128256) == dict(BLOCK_V=4096, num_warps=8)
    assert lce.kernel_config(317)["BLOCK_V"] == 512


def test_traces_without_host_sync():
    """Under AOT tracing the op decomposes into its body on fake tensors: the label check is skipped and no value is
    read on the host (a .item() would fail on fake tensors)."""
    hidden, weight, b, labels = make_inputs(torch.float32, bias=True)

    def f(h, w, bb, y):
        return torch.ops.liger.linear_cross_entropy(h, w, bb, y, torch.tensor(9), IGNORE, 0.1, 30.0, "sum")[0] * 3

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    loss = compiled(leaves[0], leaves[1], leaves[2], labels)
    loss.backward()
    ref = run_eager(hidden, weight, b, labels, torch.tensor(9), 0.1, 30.0, "sum", 3.0, dtype=torch.float64)
    torch.testing.assert_close(loss.double(), ref[0] * 3, rtol=1e-5, atol=0)
    for t, r in zip(leaves, ref[1:]):
        torch.testing.assert_close(t.grad.double(), r, rtol=1e-5, atol=1e-6 * r.abs().max().item())
