"""liger::token_logprobs: the Triton row kernels (interpreted on CPU, real on a GPU) and the torch path against a
float64 computation over the full logits, gradients included, and the rows with ignored labels left out."""
import math

import pytest
import torch
import triton

from liger_compile.kernels import token_logprobs as tlp
from models import DEVICE

N, H, V = 11, 24, 333  # the vocabulary no multiple of a tile; four rows per chunk below: chunks of 4, 4, 3
IGNORE = -100
SETTINGS = [  # (bias, temperature, softcap, logit_scale)
    (False, 1.0, 0.0, 1.0),
    (True, 0.7, 3.0, 0.5),
    (False, 1.3, 0.0, 0.0625),
]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(tlp, "chunk_rows", lambda n, v, dtype: 4)


@pytest.fixture(params=["torch", "triton"])
def kernels(request):
    """Both paths of the op: the Triton row kernels (interpreted on CPU) and the plain-torch twin."""
    if request.param == "triton" and DEVICE == "cpu" and isinstance(tlp._forward_kernel, triton.runtime.jit.JITFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")
    return request.param


def call(h, w, b, labels, kernels, temperature=0.8, softcap=0.0, scale=1.0):
    """(log_probs, entropy) through the op's autograd with the chosen path on CPU, asking for the gradients of
    what requires one, as the op does."""
    forward = tlp.launch if kernels == "triton" else tlp.reference
    backward = tlp.launch_backward if kernels == "triton" else tlp.reference_backward
    settings = (IGNORE, temperature, softcap, scale)

    class Head(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w, b):
            outs = forward(h, w, b, labels, *settings, h.requires_grad, w.requires_grad)
            ctx.save_for_backward(h, w, b, outs[0], outs[1], outs[5])
            return outs[0], outs[1]

        @staticmethod
        def backward(ctx, g_lp, g_ent):
            h, w, b, lp, ent, lz = ctx.saved_tensors
            needs = ctx.needs_input_grad
            dh, dw, db = backward(g_lp, g_ent, h, w, b, labels, lp, ent, lz, *settings, needs[0], needs[1],
                                  b is not None and needs[2])
            return dh if needs[0] else None, dw if needs[1] else None, db if b is not None and needs[2] else None

    return Head.apply(h, w, b)


@pytest.fixture
def interpreted():
    if DEVICE == "cpu" and isinstance(tlp._forward_kernel, triton.runtime.jit.JITFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; set it in the environment (or conftest)")


def full_logits(h, w, b, labels, temperature, softcap, scale):
    """Every output in float64 from the [N, V] logits, as TRL's eager head defines them."""
    z = (h.double() @ w.double().T + (b.double() if b is not None else 0.0)) * scale
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    log_p = z.log_softmax(-1)
    valid = labels != IGNORE
    y = labels.clamp(min=0)
    zero = torch.zeros((), dtype=torch.float64)
    outs = [log_p.gather(1, y[:, None]).squeeze(1), -(log_p.exp() * log_p).sum(-1), torch.logsumexp(2 * log_p, -1),
            z.mean(-1)]
    return [torch.where(valid, o, zero) for o in outs] + [valid & (z.argmax(-1) == y)]


def make(dtype, bias, seed=0, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(DEVICE, dtype)
    w = (torch.randn(V, H, generator=g) / math.sqrt(H) * 3).to(DEVICE, dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(DEVICE, dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::ignore_every] = IGNORE
    return h, w, b, labels.to(DEVICE)


def grads_of(outs, inputs, g_lp, g_ent):
    loss = (outs[0].double() * g_lp).sum() + (outs[1].double() * g_ent).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("use_kernel", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("bias,temperature,softcap,scale", SETTINGS)
def test_outputs_and_gradients_match_full_logits(use_kernel, bias, temperature, softcap, scale, request):
    if use_kernel:
        request.getfixturevalue("interpreted")
    forward, backward = (tlp.launch, tlp.launch_backward) if use_kernel else (tlp.reference, tlp.reference_backward)
    h, w, b, labels = make(torch.float32, bias)
    settings = (IGNORE, temperature, softcap, scale)
    outs = forward(h, w, b, labels, *settings)
    params = [t.clone().requires_grad_() for t in (h, w, b) if t is not None]
    expected = full_logits(*(params if b is not None else [*params, None]), labels, temperature, softcap, scale)
    for name, got, want in zip(("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"), outs, expected):
        torch.testing.assert_close(got.double().cpu(), want.detach().cpu(), atol=2e-6, rtol=1e-5, msg=name)
    assert torch.equal(outs[4].cpu(), expected[4].cpu())

    g = torch.Generator().manual_seed(5)
    g_lp, g_ent = torch.randn(N, generator=g).to(DEVICE), torch.randn(N, generator=g).to(DEVICE)
    want = grads_of(expected, params, g_lp.double(), g_ent.double())
    got = backward(g_lp, g_ent, h, w, b, labels, outs[0], outs[1], outs[5], *settings, True, True, bias)
    for got_g, want_g in zip([t for t in got if t.numel()], want):
        torch.testing.assert_close(got_g.double().cpu(), want_g.double().cpu(), atol=2e-6, rtol=1e-5)


def test_autograd_through_the_op_matches_full_logits():
    h, w, b, labels = make(torch.float32, True)
    params = [t.requires_grad_() for t in (h, w, b)]
    outs = torch.ops.liger.token_logprobs(h, w, b, labels, IGNORE, 0.8, 0.0, 1.0)
    expected = full_logits(h, w, b, labels, 0.8, 0.0, 1.0)
    g_lp, g_ent = torch.linspace(-1, 1, N, dtype=torch.float64, device=DEVICE), torch.full((N,), 0.3, device=DEVICE)
    for got_g, want_g in zip(grads_of(outs, params, g_lp, g_ent.double()), grads_of(expected, params, g_lp,
                                                                                     g_ent.double())):
        torch.testing.assert_close(got_g.double().cpu(), want_g.double().cpu(), atol=2e-6, rtol=1e-5)


def test_confident_rows_keep_their_small_values():
    """p_label -> 1: log p and 1 - p are far from 0 in fp32 terms although z_y - log Z rounds to 0."""
    h = torch.zeros(2, 4)
    h[:, 0] = 1.0
    w = torch.zeros(7, 4)
    w[3, 0] = 30.0  # label 3 has logit 30, every other 0: log p_3 = -6 e^-30 ~ -5.6e-13
    labels = torch.tensor([3, 3])
    out = tlp.reference(h.to(DEVICE), w.to(DEVICE), None, labels.to(DEVICE))
    log_p3 = -math.log1p(6 * math.exp(-30.0))
    assert out[0][0].item() == pytest.approx(log_p3, rel=1e-4)
    # the entropy too: -p_3 log p_3 - 6 q log q with q = e^-30 p_3, ~1.7e-11
    p3 = math.exp(log_p3)
    entropy = -p3 * log_p3 - 6 * math.exp(-30.0) * p3 * (log_p3 - 30.0)
    assert out[1][0].item() == pytest.approx(entropy, rel=1e-4)


@pytest.mark.parametrize("use_kernel", [False, True], ids=["torch", "triton"])
def test_ignored_rows_are_left_out_of_the_matmuls(use_kernel, request, monkeypatch):
    """With a quarter of the labels ignored the op scores the other rows only, and equals scoring all of them."""
    if use_kernel:
        request.getfixturevalue("interpreted")
    scored_rows = []
    real_logits = tlp._logits
    monkeypatch.setattr(tlp, "_logits", lambda buf, h_c, w, b: scored_rows.append(h_c.shape[0])
                        or real_logits(buf, h_c, w, b))
    h, w, _, labels = make(torch.float32, False, ignore_every=4)  # 3 of 11 ignored
    fn = tlp.launch if use_kernel else tlp.reference
    outs = fn(h, w, None, labels)
    assert sum(scored_rows) == int((labels != IGNORE).sum())
    monkeypatch.setattr(tlp, "SKIP_FRACTION", 1.1)  # never skip
    scored_rows.clear()
    every = fn(h, w, None, labels)
    assert sum(scored_rows) == N
    for a, b in zip(outs, every):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_all_rows_ignored_gives_zeros_and_zero_gradients():
    h, w, _, labels = make(torch.float32, False)
    labels[:] = IGNORE
    h.requires_grad_()
    w.requires_grad_()
    outs = torch.ops.liger.token_logprobs(h, w, None, labels)
    assert all(not o.any() for o in outs[:5])
    gh, gw = torch.autograd.grad(outs[0].sum() + outs[1].sum(), [h, w])
    assert not gh.any() and not gw.any()


def test_bf16_matches_fp32_within_bf16_noise(request):
    request.getfixturevalue("interpreted")
    h, w, _, labels = make(torch.float32, False)
    exact = tlp.launch(h, w, None, labels)
    rounded = tlp.launch(h.bfloat16(), w.bfloat16(), None, labels)
    torch.testing.assert_close(rounded[0], exact[0], atol=0.05, rtol=0.02)
    torch.testing.assert_close(rounded[1], exact[1], atol=0.05, rtol=0.02)


def test_compiles_without_a_graph_break_and_matches_eager():
    h, w, b, labels = make(torch.float32, True)
    h.requires_grad_()

    def f(h):
        out = torch.ops.liger.token_logprobs(h, w, b, labels, IGNORE, 0.9, 0.0, 1.0)
        return out[0].sum() + 0.1 * out[1].sum()

    eager = torch.autograd.grad(f(h), h)[0]
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(h), h)[0]
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bad,message", [
    (dict(weight=torch.zeros(V, H + 1)), "hidden size"),
    (dict(weight=torch.zeros(V, H, dtype=torch.float64)), "share a dtype"),
    (dict(labels=torch.zeros(N + 1, dtype=torch.long)), "labels for hidden"),
    (dict(temperature=0.0), "temperature"),
])
def test_bad_arguments_raise_clear_errors(bad, message):
    h, w, _, labels = make(torch.float32, False)
    args = dict(hidden=h, weight=w, bias=None, labels=labels, ignore_index=IGNORE, temperature=1.0, softcap=0.0,
                logit_scale=1.0)
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in bad.items()})
    with pytest.raises(ValueError, match=message):
        torch.ops.liger.token_logprobs(*args.values())
