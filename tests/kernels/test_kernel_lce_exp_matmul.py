"""lm_head + cross-entropy's exp-epilogue path (kernels/linear_cross_entropy/exp_epilogue.py and its kernels):
loss and gradients against float64 and against eager bf16's own error.

On CPU the three Triton kernels run in Triton's interpreter (tests/conftest.py) with 16-row tiles; on the H200 they
run for real, where this path is the op's default for bf16."""
import math

import pytest
import torch
import torch.nn.functional as F
import triton

from liger_compile.kernels import linear_cross_entropy as lce
from liger_compile.kernels.linear_cross_entropy import exp_matmul as lce_exp_matmul
from models import DEVICE

IGNORE = -100
N = 300 if DEVICE == "cuda" else 37  # several 128-row (GPU) or 16-row (CPU) tiles, the last one ragged
H, V = 48, 203  # a vocabulary no multiple of any tile


@pytest.fixture(autouse=True)
def interpreted_or_cuda():
    if DEVICE == "cpu" and isinstance(lce_exp_matmul.exp_matmul_kernel, triton.runtime.jit.JITFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; set it in the environment (or conftest)")


@pytest.fixture
def several_chunks(monkeypatch):
    """Workspace for one row tile per chunk: N rows go in several chunks, so dW accumulates across them."""
    bm = lce_exp_matmul.config(DEVICE)["BM"]
    tiles = triton.cdiv(V, lce_exp_matmul.config(DEVICE)["BN"])
    monkeypatch.setattr(lce.exp_epilogue, "EXP_MATMUL_WORKSPACE_BYTES",
                        bm * (triton.cdiv(V, 8) * 8 * 2 + tiles * 4 + 24))
    assert len(lce.exp_matmul_chunks(N, V, bm, tiles)) == triton.cdiv(N, bm)


def make(seed=0, scale=2.0, n=N):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g).bfloat16()
    w = (torch.randn(V, H, generator=g) * scale / math.sqrt(H)).bfloat16()
    y = torch.randint(0, V, (n,), generator=g)
    y[::7] = IGNORE
    return x, w, y


def exp_path(x, w, y, num_items=None, softcap=0.0, reduction="mean"):
    out = lce.launch_forward(x.to(DEVICE), w.to(DEVICE), None, y.to(DEVICE),
                             None if num_items is None else num_items.to(DEVICE), IGNORE, 0.0, softcap, reduction, True,
                             path="exp_matmul")
    return [t.cpu() for t in out[:3]]


def reference(x, w, y, dtype, num_items=None, softcap=0.0, reduction="mean"):
    """Eager: F.linear in dtype, then cross-entropy on the fp32 (fp64) logits; loss and (dx, dw)."""
    xx, ww = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    z = F.linear(xx, ww)
    z = z.double() if dtype == torch.float64 else z.float()
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, y, ignore_index=IGNORE, reduction=reduction)
    if num_items is not None:
        loss = loss / num_items
    return [loss.detach(), *torch.autograd.grad(loss, (xx, ww))]


def rel(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("case", ["mean", "num_items", "softcap", "sum_softcap"])
def test_exp_path_as_close_to_float64_as_eager_bf16(case, several_chunks):
    kw = dict(mean={}, num_items=dict(num_items=torch.tensor(29.0), reduction="sum"), softcap=dict(softcap=3.0),
              sum_softcap=dict(softcap=3.0, reduction="sum"))[case]
    x, w, y = make()
    ours = exp_path(x, w, y, **kw)
    ref = reference(x, w, y, torch.float64, **kw)
    eager = reference(x, w, y, torch.bfloat16, **kw)
    assert abs(ours[0].item() - ref[0].item()) <= abs(eager[0].item() - ref[0].item()) * 2 + 1e-4 * abs(ref[0].item())
    for got, want, theirs in zip(ours[1:], ref[1:], eager[1:]):
        assert torch.isfinite(got).all()
        assert rel(got, want) <= rel(theirs, want) * 2 + 1e-4


def test_exp_path_rows_far_below_their_max_are_computed_again(several_chunks):
    """Logits ~ +-300 apart: exp(z - z_label) overflows fp32 on most rows, the first pass flags them and the second
    launch recomputes them against their true max. Without it the loss and gradients would be inf/nan."""
    x, w, y = make(scale=60.0)
    ours = exp_path(x, w, y)
    ref = reference(x, w, y, torch.float64)
    eager = reference(x, w, y, torch.bfloat16)
    assert abs(ours[0].item() - ref[0].item()) <= abs(eager[0].item() - ref[0].item()) * 2 + 1e-3 * ref[0].item()
    for got, want, theirs in zip(ours[1:], ref[1:], eager[1:]):
        assert torch.isfinite(got).all()
        assert rel(got, want) <= rel(theirs, want) * 2 + 1e-3


def test_exp_path_a_few_far_rows_among_ordinary_ones(several_chunks):
    """Only some rows of a tile pass SAFE_EXP (their hidden states scaled up 40x, so their labels' logits end up
    far below their max): those rows are redone against their max, their neighbours keep the first pass's result."""
    x, w, y = make(seed=3)
    x[1::9] *= 40
    ours = exp_path(x, w, y)
    ref = reference(x, w, y, torch.float64)
    eager = reference(x, w, y, torch.bfloat16)
    assert (F.linear(x.float(), w.float()).amax(1) - F.linear(x.float(), w.float()).gather(1, y.clamp(min=0)[:, None])
            .squeeze(1))[1::9].max() > lce_exp_matmul.SAFE_EXP  # the case is what it says
    assert abs(ours[0].item() - ref[0].item()) <= abs(eager[0].item() - ref[0].item()) * 2 + 1e-3 * ref[0].item()
    for got, want, theirs in zip(ours[1:], ref[1:], eager[1:]):
        assert torch.isfinite(got).all()
        assert rel(got, want) <= rel(theirs, want) * 2 + 1e-3


def test_exp_path_confident_rows_keep_their_gradient():
    """p_label -> 1: the label's gradient p - 1 is ~ -sum of the others, kept without cancellation."""
    x, w, y = make(n=16)
    y[:] = torch.arange(16)
    w[:16] = (x[:16].float()).bfloat16()  # the label's logit ~ |x|^2 ~ 48, far above the rest
    ours = exp_path(x[:16], w, y)
    ref = reference(x[:16], w, y, torch.float64)
    assert ref[0].item() < 1e-7 and ours[0].item() > 0  # eager fp32 would round lse - z_y to 0 here
    assert abs(ours[0].item() - ref[0].item()) <= 0.05 * ref[0].item()
    assert rel(ours[1], ref[1]) < 0.05 and rel(ours[2], ref[2]) < 0.05


def test_exp_path_all_ignored_and_bad_labels():
    x, w, y = make(n=20)
    loss, dx, dw = exp_path(x, w, torch.full_like(y, IGNORE))
    assert math.isnan(loss.item()) and (dx == 0).all() and (dw == 0).all()  # torch: 0/0
    y_bad = y.clone()
    y_bad[3] = V  # outside the vocabulary, not ignore_index: the loss is NaN, never a silent number
    assert math.isnan(exp_path(x, w, y_bad)[0].item())


def test_exp_path_one_token():
    x, w, y = make(n=1)
    y[0] = 5
    ours, ref = exp_path(x, w, y), reference(x, w, y, torch.float64)
    assert abs(ours[0].item() - ref[0].item()) < 1e-2
    assert rel(ours[1], ref[1]) < 2e-2 and rel(ours[2], ref[2]) < 2e-2


def test_exp_matmul_chunks_fit_the_workspace():
    """Llama-3's vocabulary: 16384 tokens in 16 chunks of 1024 rows, the working memory under 0.25 GiB."""
    v, tiles = 128256, triton.cdiv(128256, 256)
    chunks = lce.exp_matmul_chunks(16384, v, 128, tiles)
    assert [e - s for s, e in chunks] == [1024] * 16
    assert 1024 * (v * 2 + tiles * 4 + 24) < 0.25 * 2**30
    chunks = lce.exp_matmul_chunks(1000, v, 128, tiles)  # a ragged end
    assert chunks[0][0] == 0 and chunks[-1][1] == 1000 and all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))


def test_exp_matmul_applies_only_where_it_is_exact_and_measured_faster():
    hid = lce.EXP_MATMUL_MIN_HIDDEN
    x, w = torch.randn(4, hid).bfloat16(), torch.randn(8, hid).bfloat16()
    assert not lce.exp_matmul_applies(x, w, None, 0.0, False)  # CPU
    if DEVICE == "cuda":
        xc, wc = x.cuda(), w.cuda()
        assert lce.exp_matmul_applies(xc, wc, None, 0.0, False) == (torch.cuda.get_device_capability() >= (9, 0))
        assert not lce.exp_matmul_applies(xc.float(), wc.float(), None, 0.0, False)
        assert not lce.exp_matmul_applies(xc.half(), wc.half(), None, 0.0, False)
        assert not lce.exp_matmul_applies(xc, wc, torch.zeros(8).cuda(), 0.0, False)
        assert not lce.exp_matmul_applies(xc, wc, None, 0.1, False)
        assert not lce.exp_matmul_applies(xc, wc, None, 0.0, True)
        assert not lce.exp_matmul_applies(torch.randn(4, hid + 4).bfloat16().cuda(),
                                          torch.randn(8, hid + 4).bfloat16().cuda(), None, 0.0, False)  # TMA strides
        assert not lce.exp_matmul_applies(xc[:, : hid // 2], wc[:, : hid // 2].contiguous(), None, 0.0, False)


@pytest.mark.parametrize("path", ["exp_matmul", "row_kernel"])
def test_launches_keep_nothing_alive(path):
    """The op launches its kernels directly: torch.library.wrap_triton, called outside tracing, files each call's
    non-tensor arguments in torch's kernel side table for good, and a TMA descriptor among them kept the chunk
    buffer and the hidden states alive, step after step (3.3 GiB after nine Llama-1B steps on the H200)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    x, w, y = make(n=20)
    args = (x.to(DEVICE), w.to(DEVICE), None, y.to(DEVICE), None, IGNORE, 0.0, 0.0, "mean", True)
    lce.launch_forward(*args, path=path)
    entries = len(kernel_side_table.constant_args)
    allocated = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
    for _ in range(3):
        lce.launch_forward(*args, path=path)
    assert len(kernel_side_table.constant_args) == entries
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == allocated


@pytest.mark.skipif(DEVICE != "cuda", reason="Llama-3's full vocabulary: too large for the interpreter")
def test_exp_path_full_vocab_bf16_vs_float64():
    """V = 128256, 2048 tokens in two chunks: loss and gradients at least as close to float64 as eager bf16's (x2)."""
    n, hid, v = 2048, 1024, 128256
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(n, hid, device="cuda", generator=g) * 0.5).bfloat16()
    w = (torch.randn(v, hid, device="cuda", generator=g) * 0.02).bfloat16()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[::7] = IGNORE
    loss, dx, dw = lce.launch_forward(x, w, None, y, None, IGNORE, 0.0, 0.0, "mean", True, path="exp_matmul")[:3]
    ref, eager = reference(x, w, y, torch.float64), reference(x, w, y, torch.bfloat16)
    assert abs(loss.item() - ref[0].item()) <= abs(eager[0].item() - ref[0].item()) * 2 + 1e-4
    assert rel(dx, ref[1]) <= rel(eager[1], ref[1]) * 2 + 1e-4
    assert rel(dw, ref[2]) <= rel(eager[2], ref[2]) * 2 + 1e-4


def test_exp_path_refuses_what_it_would_get_wrong():
    """Asked for by name with a bias, label smoothing, kept logits or fp32 inputs, the path raises instead of
    returning a loss without those terms."""
    x, w, y = make(n=4)
    b = torch.zeros(V).bfloat16()
    cases = [dict(bias=b), dict(ls=0.1), dict(keep=True), dict(dtype=torch.float32)]
    for case in cases:
        xx, ww = (x.float(), w.float()) if case.get("dtype") else (x, w)
        with pytest.raises(ValueError, match="exp_matmul path"):
            lce.launch_forward(xx.to(DEVICE), ww.to(DEVICE), None if "bias" not in case else b.to(DEVICE),
                               y.to(DEVICE), None, IGNORE, case.get("ls", 0.0), 0.0, "mean", True,
                               keep_logits=case.get("keep", False), path="exp_matmul")


def test_environment_pin_never_takes_the_exp_path_where_it_is_inexact(monkeypatch):
    monkeypatch.setattr(lce.paths, "FORCED_PATH", "exp_matmul")
    x, w, y = make(n=4)
    args = (x.to(DEVICE), w.to(DEVICE), torch.zeros(V).bfloat16().to(DEVICE), y.to(DEVICE), None, IGNORE, 0.0, 0.0,
            "mean", True)
    called = []
    monkeypatch.setattr(lce.exp_epilogue, "forward", lambda *a, **k: called.append(1))
    lce.launch_forward(*args)  # a bias: the row-kernel path, whatever the pin
    assert not called


def test_every_chunk_launches_the_same_specialisation(several_chunks, monkeypatch):
    """Triton compiles a kernel once per pattern of 16-byte-aligned pointer arguments: every chunk's launches must
    show the same pattern, or chunks after the first compile copies of their own (the cold and warm first steps)."""
    patterns: dict[str, set] = {}
    real = lce.exp_epilogue.direct_launch

    def recording(kernel):
        class Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    aligned = tuple(a.data_ptr() % 16 == 0 for a in args if isinstance(a, torch.Tensor))
                    patterns.setdefault(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), set()).add(
                        (aligned, tuple(v for v in kwargs.values() if isinstance(v, (bool, int)))))
                    return real(kernel)[grid](*args, **kwargs)
                return launch
        return Grid()

    monkeypatch.setattr(lce.exp_epilogue, "direct_launch", recording)
    exp_path(*make())
    assert len(patterns) == 4, patterns  # label_logit, exp_matmul, row_combine, row_scaled_matmul
    for name, seen in patterns.items():
        # the matmul and the combine run twice per chunk, the second time as the rerun (IS_RERUN=True)
        assert len(seen) == (2 if any(k in name for k in ("exp_matmul", "row_combine")) else 1), (name, seen)
