"""liger::token_logprobs computing its gradients in forward where the loss weights every scored token alike
(kernels/_uniform_grad.py): SFT's loss takes the kept gradients from its second step on, every other loss the
recomputing backward, and the gradients equal a float64 computation over the full logits in every case."""
import pytest
import torch

from liger_compile.kernels import _uniform_grad
from liger_compile.kernels import token_logprobs as tlp
from models import DEVICE

from test_kernel_token_logprobs import IGNORE, N, call, full_logits, kernels, make  # noqa: E402, F401


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(tlp, "chunk_rows", lambda n, v, dtype: 4)
    _uniform_grad.reset()
    yield
    _uniform_grad.reset()


def params(bias, seed=0):
    h, w, b, labels = make(torch.float32, bias, seed=seed)
    return [t.requires_grad_() if t is not None else None for t in (h, w, b)], labels


def check(got, inputs, labels, loss_of, temperature=0.8):
    """got: the op's gradients of loss_of(log_probs, entropy); compared with the same loss over the full logits."""
    live = [t for t in inputs if t is not None]
    expected = full_logits(*inputs, labels, temperature, 0.0, 1.0)
    want = torch.autograd.grad(loss_of(expected[0], expected[1]), live)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=2e-6, rtol=1e-5)


def sft_loss(n_tokens):
    return lambda lp, ent: -lp.sum() / n_tokens + 0.0 * ent.detach().sum()


@pytest.mark.parametrize("bias", [False, True])
def test_sft_loss_uses_the_forward_gradients_from_the_second_step(kernels, bias):
    inputs, labels = params(bias)
    live = [t for t in inputs if t is not None]
    for step, n_tokens in enumerate([8, 8, 5]):  # the last step's token count differs: the kept ones are rescaled
        lp, ent = call(*inputs, labels, kernels)
        grads = torch.autograd.grad(sft_loss(n_tokens)(lp, ent), live)
        check(grads, inputs, labels, sft_loss(n_tokens))
        assert _uniform_grad.stats["used"] == step  # the first backward only learns that the gradient is uniform
    assert _uniform_grad.stats["kept"] == 2 and not _uniform_grad._kept


def test_per_token_weights_never_use_forward_gradients(kernels):
    inputs, labels = params(False)
    weights = torch.linspace(0.5, 1.5, N, device=DEVICE)

    def dpo_like(lp, ent):
        return -(lp * weights).sum()

    for _ in range(3):
        lp, ent = call(*inputs, labels, kernels)
        check(torch.autograd.grad(dpo_like(lp, ent), inputs[:2]), inputs, labels, dpo_like)
    assert _uniform_grad.stats == {"kept": 0, "used": 0, "recomputed": 1}  # decided once, no check after


def test_a_loss_that_changes_after_guessing_gets_its_own_gradients(kernels):
    inputs, labels = params(False)
    lp, ent = call(*inputs, labels, kernels)
    torch.autograd.grad(sft_loss(8)(lp, ent), inputs[:2])

    def entropy_bonus(lp, ent):  # uniform on log_probs, but the entropy has a gradient too
        return -lp.sum() / 8 - 0.1 * ent.sum()

    lp, ent = call(*inputs, labels, kernels)  # keeps gradients for the SFT loss
    assert _uniform_grad.stats["kept"] == 1
    check(torch.autograd.grad(entropy_bonus(lp, ent), inputs[:2]), inputs, labels, entropy_bonus)
    assert _uniform_grad.stats["used"] == 0
    lp, ent = call(*inputs, labels, kernels)
    assert _uniform_grad.stats["kept"] == 1  # guessing ended for this weight


def test_two_forwards_before_their_backwards(kernels):
    inputs, labels = params(False)
    lp, ent = call(*inputs, labels, kernels)
    torch.autograd.grad(sft_loss(8)(lp, ent), inputs[:2])
    first = call(*inputs, labels, kernels)
    second = call(*inputs, labels, kernels)  # replaces the first's kept gradients
    assert len(_uniform_grad._kept) == 1
    check(torch.autograd.grad(sft_loss(4)(*second), inputs[:2]), inputs, labels, sft_loss(4))
    check(torch.autograd.grad(sft_loss(8)(*first), inputs[:2]), inputs, labels, sft_loss(8))
    assert _uniform_grad.stats["used"] == 1 and _uniform_grad.stats["recomputed"] == 2


def test_no_gradient_expected_keeps_nothing(kernels):
    inputs, labels = params(False)
    lp, ent = call(*inputs, labels, kernels)
    torch.autograd.grad(sft_loss(8)(lp, ent), inputs[:2])
    with torch.no_grad():
        forward = tlp.launch if kernels == "triton" else tlp.reference
        forward(inputs[0].detach(), inputs[1].detach(), None, labels)  # a reference model's forward
    assert not _uniform_grad._kept


def test_through_the_op_and_torch_compile():
    """The op's own autograd under torch.compile: the kept gradients reach the compiled backward."""
    (h, w, _), labels = params(False)

    def f(h, w):
        out = torch.ops.liger.token_logprobs(h, w, None, labels, IGNORE, 0.8, 0.0, 1.0, True, True)
        return -out[0].sum() / 8

    compiled = torch.compile(f, fullgraph=True)
    for _ in range(3):
        grads = torch.autograd.grad(compiled(h, w), [h, w])
        check(grads, [h, w, None], labels, sft_loss(8))
    assert _uniform_grad.stats["used"] == 2
