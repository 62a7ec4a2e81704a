"""liger::rotary against a float64 HF apply_rotary_pos_emb: Triton launcher, op (autograd), torch.compile."""
import pytest
import torch

# Without a GPU, tests/conftest.py has Triton's interpreter run the kernels on CPU tensors; with one, the same
# tests run the real kernels on the GPU.

from liger_compile.kernels import rotary
from models import DEVICE, OP_DEVICES, assert_close_f64

# dtype -> (atol, rtol). The kernel rounds once from fp32; bf16/fp16 allow a couple of output ulps.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}
DTYPES = list(TOL)

B, T, HQ, HK, D = 3, 7, 4, 2, 72


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def hf_rotary_f64(q, k, cos, sin, unsqueeze_dim):
    """HF apply_rotary_pos_emb, evaluated in float64."""
    c = cos.double().unsqueeze(unsqueeze_dim)
    s = sin.double().unsqueeze(unsqueeze_dim)
    q, k = q.double(), k.double()
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s


def hf_rotary_grads_f64(q, k, cos, sin, unsqueeze_dim, dq_out, dk_out):
    """(dq, dk) by float64 autograd through the HF formula."""
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    qo, ko = hf_rotary_f64(q64, k64, cos, sin, unsqueeze_dim)
    return torch.autograd.grad((qo, ko), (q64, k64), (dq_out.double(), dk_out.double()))


def cos_sin(batch, dtype, device, random_tables=False):
    """[batch, T, D] tables. batch == B: packed rows whose positions restart inside the row."""
    if random_tables:  # halves of sin differ: checks the backward for any table, not just HF's cat(f, f)
        return (torch.randn(batch, T, D, device=device).to(dtype), torch.randn(batch, T, D, device=device).to(dtype))
    if batch == 1:
        pos = torch.arange(T, device=device)[None]
    else:
        pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4]], device=device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_qk(unsqueeze_dim, dtype, device, layout="hf"):
    """Non-contiguous q, k as models make them ("hf"), or contiguous, or with a non-unit head-dim stride."""
    def one(h):
        if layout == "contiguous":
            shape = (B, h, T, D) if unsqueeze_dim == 1 else (B, T, h, D)
            return torch.randn(shape, device=device).to(dtype)
        if layout == "strided_d":  # d is not the innermost axis in memory
            x = torch.randn(B, D, T, h, device=device).to(dtype)
            return x.permute(0, 3, 2, 1) if unsqueeze_dim == 1 else x.permute(0, 2, 3, 1)
        if unsqueeze_dim == 1:  # linear(x).view(B, T, H, D).transpose(1, 2)
            return torch.randn(B, T, h * D, device=device).to(dtype).view(B, T, h, D).transpose(1, 2)
        # [B, T, H, D] out of a fused qkv projection: a slice, then a view
        qkv = torch.randn(B, T, (h + 3) * D, device=device).to(dtype)
        return qkv[..., D: (h + 1) * D].view(B, T, h, D)

    q, k = one(HQ), one(HK)
    if layout != "contiguous":
        assert not q.is_contiguous() and not k.is_contiguous()
    return q, k


def assert_close(actual, expected, dtype):
    assert_close_f64(actual, expected, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("cos_batch", [1, B])
def test_launcher_forward_backward(dtype, unsqueeze_dim, cos_batch):
    torch.manual_seed(0)
    q, k = make_qk(unsqueeze_dim, dtype, DEVICE)
    cos, sin = cos_sin(cos_batch, dtype, DEVICE)
    qo, ko = rotary.launch(q, k, cos, sin, unsqueeze_dim)
    rq, rk = hf_rotary_f64(q, k, cos, sin, unsqueeze_dim)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    assert qo.is_contiguous() and ko.is_contiguous()
    assert_close(qo, rq, dtype)
    assert_close(ko, rk, dtype)

    dq_out, dk_out = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = rotary.launch(dq_out, dk_out, cos, sin, unsqueeze_dim, backward=True)
    rdq, rdk = hf_rotary_grads_f64(q, k, cos, sin, unsqueeze_dim, dq_out, dk_out)
    assert_close(dq, rdq, dtype)
    assert_close(dk, rdk, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "strided_d"])
@pytest.mark.parametrize("unsqueeze_dim", [1, -2])
def test_launcher_any_strides_and_tables(layout, unsqueeze_dim):
    # Random cos/sin (sin halves differ), non-contiguous grads, small head tiles so the head loop runs twice.
    torch.manual_seed(1)
    dtype = torch.float32
    q, k = make_qk(2 if unsqueeze_dim == -2 else 1, dtype, DEVICE, layout)
    cos, sin = cos_sin(B, dtype, DEVICE, random_tables=True)
    cfg = dict(BLOCK_H=2, BLOCK_HALF=64, num_warps=1)
    qo, ko = rotary.launch(q, k, cos, sin, unsqueeze_dim, config=cfg)
    rq, rk = hf_rotary_f64(q, k, cos, sin, unsqueeze_dim)
    assert_close(qo, rq, dtype)
    assert_close(ko, rk, dtype)
    dq_out = torch.randn(*reversed(q.shape), device=DEVICE).permute(3, 2, 1, 0)  # grads with odd strides too
    dk_out = torch.randn(*k.shape[:-1], 1, device=DEVICE).expand(k.shape)  # a zero inner stride
    dq, dk = rotary.launch(dq_out, dk_out, cos, sin, unsqueeze_dim, backward=True, config=cfg)
    rdq, rdk = hf_rotary_grads_f64(q, k, cos, sin, unsqueeze_dim, dq_out, dk_out)
    assert_close(dq, rdq, dtype)
    assert_close(dk, rdk, dtype)


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_op_autograd(device, dtype, unsqueeze_dim):
    torch.manual_seed(2)
    q, k = make_qk(unsqueeze_dim, dtype, device)
    q.requires_grad_()
    k.requires_grad_()
    cos, sin = cos_sin(B, dtype, device)
    qo, ko = torch.ops.liger.rotary(q, k, cos, sin, unsqueeze_dim)
    rq, rk = hf_rotary_f64(q.detach(), k.detach(), cos, sin, unsqueeze_dim)
    assert qo.dtype == dtype and qo.is_contiguous()
    assert_close(qo, rq, dtype)
    assert_close(ko, rk, dtype)
    dq_out, dk_out = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (dq_out, dk_out))
    rdq, rdk = hf_rotary_grads_f64(q, k, cos, sin, unsqueeze_dim, dq_out, dk_out)
    assert q.grad.dtype == dtype
    assert_close(q.grad, rdq, dtype)
    assert_close(k.grad, rdk, dtype)


def test_opcheck():
    q, k = make_qk(1, torch.float32, "cpu")
    cos, sin = cos_sin(1, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.liger.rotary, (q.requires_grad_(), k.requires_grad_(), cos, sin, 1))
    torch.library.opcheck(torch.ops.liger.rotary_backward, (q.detach(), k.detach(), cos, sin, 1))


def test_rejects_bad_arguments():
    q, k = make_qk(1, torch.float32, "cpu")
    cos, sin = cos_sin(1, torch.float32, "cpu")
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        torch.ops.liger.rotary(q, k, cos, sin, 3)
    with pytest.raises(ValueError, match="cos"):
        torch.ops.liger.rotary(q, k, cos[:, :-1], sin, 1)


@pytest.mark.parametrize("device", OP_DEVICES)
def test_torch_compile_inductor(device):
    torch.manual_seed(3)
    q, k = make_qk(1, torch.float32, device)
    cos, sin = cos_sin(B, torch.float32, device)
    wq, wk = torch.randn(q.shape, device=device), torch.randn(k.shape, device=device)

    def f(q, k, cos, sin):
        qo, ko = torch.ops.liger.rotary(q, k, cos, sin, 1)
        return (qo * wq).sum() + (ko * wk).sum(), qo, ko

    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    leaves = [(q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()) for _ in range(2)]
    eager_out = f(*leaves[0], cos, sin)
    comp_out = compiled(*leaves[1], cos, sin)
    for a, b in zip(comp_out, eager_out):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    eager_out[0].backward()
    comp_out[0].backward()
    for a, b in zip(leaves[1], leaves[0]):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


# --- the other forms: interleaved pairs, a rotated slice with the rest copied, one angle per pair, one tensor ---

def hf_forms_f64(x, cos, sin, unsqueeze_dim, pairs, rotary_start, rotary_dim):
    """The models' own formulas in float64: rotate_half ("halves"), GPT-J's rotate_every_two ("interleaved"),
    DeepSeek's apply_rotary_pos_emb_interleave ("interleaved_to_halves"); a table of width R/2 is expanded as HF
    does (cat(f, f) / repeat_interleave); the channels outside the slice are concatenated back."""
    r = rotary_dim or x.shape[-1]
    x = x.double()
    c, s = cos.double().unsqueeze(unsqueeze_dim), sin.double().unsqueeze(unsqueeze_dim)
    rot = x[..., rotary_start:rotary_start + r]
    if pairs == "halves":
        if c.shape[-1] == r // 2:
            c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
        y = rot * c + rotate_half(rot) * s
    elif pairs == "interleaved":
        if c.shape[-1] == r // 2:
            c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
        y = rot * c + torch.stack((-rot[..., 1::2], rot[..., ::2]), -1).flatten(-2) * s
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        y = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    return torch.cat((x[..., :rotary_start], y, x[..., rotary_start + r:]), -1)


# (pairs, rotary_start, rotary_dim, table width as a fraction of the rotated width)
FORMS = [("halves", 0, 0, 0.5), ("halves", 0, 40, 1), ("interleaved", 0, 0, 1), ("interleaved", 0, 40, 0.5),
         ("interleaved", 32, 40, 0.5), ("interleaved_to_halves", 0, 0, 0.5), ("interleaved_to_halves", 32, 40, 0.5)]
FORM_IDS = [f"{p}-{s}-{r}-{w}" for p, s, r, w in FORMS]


def form_tables(rotary_dim, frac, dtype, device):
    w = int((rotary_dim or D) * frac)
    return torch.randn(1, T, w, device=device).to(dtype), torch.randn(B, T, w, device=device).to(dtype)


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_launcher_forms_forward_backward(form, dtype):
    # Random tables (halves of sin differ), non-contiguous q/k as models make them, both layouts across the grid.
    pairs, start, rdim, frac = form
    unsqueeze_dim = 1 if dtype == torch.float32 else 2
    torch.manual_seed(4)
    q, k = make_qk(unsqueeze_dim, dtype, DEVICE)
    cos, sin = form_tables(rdim, frac, dtype, DEVICE)
    qo, ko = rotary.launch(q, k, cos, sin, unsqueeze_dim, pairs, start, rdim)
    assert qo.shape == q.shape and qo.is_contiguous() and qo.dtype == dtype
    assert_close(qo, hf_forms_f64(q, cos, sin, unsqueeze_dim, pairs, start, rdim), dtype)
    assert_close(ko, hf_forms_f64(k, cos, sin, unsqueeze_dim, pairs, start, rdim), dtype)

    dq_out, dk_out = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = rotary.launch(dq_out, dk_out, cos, sin, unsqueeze_dim, pairs, start, rdim, backward=True)
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    outs = [hf_forms_f64(x, cos, sin, unsqueeze_dim, pairs, start, rdim) for x in (q64, k64)]
    rdq, rdk = torch.autograd.grad(outs, (q64, k64), (dq_out.double(), dk_out.double()))
    assert_close(dq, rdq, dtype)
    assert_close(dk, rdk, dtype)


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("form", FORMS[2:4] + FORMS[-1:], ids=FORM_IDS[2:4] + FORM_IDS[-1:])
def test_op_one_and_two_tensors_autograd(device, form):
    pairs, start, rdim, frac = form
    torch.manual_seed(5)
    q, k = make_qk(1, torch.float32, device, layout="strided_d")
    cos, sin = form_tables(rdim, frac, torch.float32, device)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, q)]
    qo, ko = torch.ops.liger.rotary(leaves[0], leaves[1], cos, sin, 1, pairs, start, rdim)
    one = torch.ops.liger.rotary_one(leaves[2], cos, sin, 1, pairs, start, rdim)
    want_q, want_k = (hf_forms_f64(x, cos, sin, 1, pairs, start, rdim) for x in (q, k))
    assert_close(qo, want_q, torch.float32)
    assert_close(ko, want_k, torch.float32)
    assert_close(one, want_q, torch.float32)
    dq_out, dk_out = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko, one), (dq_out, dk_out, dq_out))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    outs = [hf_forms_f64(x, cos, sin, 1, pairs, start, rdim) for x in (q64, k64)]
    rdq, rdk = torch.autograd.grad(outs, (q64, k64), (dq_out.double(), dk_out.double()))
    assert_close(leaves[0].grad, rdq, torch.float32)
    assert_close(leaves[1].grad, rdk, torch.float32)
    assert_close(leaves[2].grad, rdq, torch.float32)


def test_opcheck_forms():
    q, k = make_qk(2, torch.float32, "cpu")
    cos, sin = form_tables(40, 0.5, torch.float32, "cpu")
    args = (cos, sin, 2, "interleaved", 32, 40)
    torch.library.opcheck(torch.ops.liger.rotary, (q.requires_grad_(), k.requires_grad_(), *args))
    torch.library.opcheck(torch.ops.liger.rotary_backward, (q.detach(), k.detach(), *args))
    torch.library.opcheck(torch.ops.liger.rotary_one, (q.detach().requires_grad_(), *args))
    torch.library.opcheck(torch.ops.liger.rotary_one_backward, (q.detach(), *args))


def test_rejects_bad_forms():
    q, k = make_qk(1, torch.float32, "cpu")
    cos, sin = cos_sin(1, torch.float32, "cpu")
    with pytest.raises(ValueError, match="pairs"):
        torch.ops.liger.rotary(q, k, cos, sin, 1, "pairwise")
    with pytest.raises(ValueError, match="start or end"):
        torch.ops.liger.rotary(q, k, cos[..., :40], sin[..., :40], 1, "halves", 8, 40)
    with pytest.raises(ValueError, match="one angle per pair"):
        torch.ops.liger.rotary(q, k, cos, sin, 1, "interleaved_to_halves")
