"""liger::token_logprobs with a frozen head (the weight takes no gradient, as under LoRA): the forward keeps d hidden's
direction per row (kernels/_frozen_head_grad.py) and the backward scales it by whatever per-token gradient arrives
(DPO-, KTO-, GRPO-like weights, SFT's uniform one), from the first step on; an entropy gradient makes the backward
compute again and ends the keeping for that head. d hidden equals a float64 computation over the full logits."""
import pytest
import torch

from liger_compile.kernels import _frozen_head_grad, _uniform_grad
from liger_compile.kernels import token_logprobs as tlp
from models import DEVICE

from test_kernel_token_logprobs import IGNORE, N, call, full_logits, kernels, make  # noqa: E402, F401


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(tlp, "chunk_rows", lambda n, v, dtype: 4)
    _frozen_head_grad.reset()
    _uniform_grad.reset()
    yield
    _frozen_head_grad.reset()
    _uniform_grad.reset()


def frozen(bias, seed=0):
    h, w, b, labels = make(torch.float32, bias, seed=seed)
    return h.requires_grad_(), w, b, labels


def check(dh, h, w, b, labels, loss_of, temperature=0.8, softcap=0.0, scale=1.0):
    expected = full_logits(h, w, b, labels, temperature, softcap, scale)
    want, = torch.autograd.grad(loss_of(expected[0], expected[1]), [h])
    # fp32 against float64: rounding relative to the largest gradient (per-token weights of a few units)
    torch.testing.assert_close(dh.double(), want.double(), atol=1e-5 * want.abs().max().item(), rtol=1e-5)


def per_sequence(weights):
    return lambda lp, ent: -(lp * weights.to(lp.dtype)).sum() + 0.0 * ent.detach().sum()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("settings", [(0.8, 0.0, 1.0), (0.7, 3.0, 0.5)])
def test_per_token_weights_use_the_forward_direction_from_the_first_step(kernels, bias, settings):
    h, w, b, labels = frozen(bias)
    for step in range(3):  # new weights every step, as DPO's and GRPO's are
        weights = torch.linspace(0.5, 1.5, N, device=DEVICE) * (step + 1) - 0.7
        lp, ent = call(h, w, b, labels, kernels, *settings)
        dh, = torch.autograd.grad(per_sequence(weights)(lp, ent), [h])
        check(dh, h, w, b, labels, per_sequence(weights), *settings)
        assert _frozen_head_grad.stats == {"kept": step + 1, "used": step + 1, "recomputed": 0}
    assert not _frozen_head_grad._kept and _uniform_grad.stats["kept"] == 0


def test_an_entropy_gradient_is_computed_again_and_ends_the_keeping(kernels):
    h, w, b, labels = frozen(False)

    def entropy_bonus(lp, ent):
        return -lp.sum() / 8 - 0.1 * ent.sum()

    lp, ent = call(h, w, b, labels, kernels)
    check(torch.autograd.grad(entropy_bonus(lp, ent), [h])[0], h, w, b, labels, entropy_bonus)
    assert _frozen_head_grad.stats == {"kept": 1, "used": 0, "recomputed": 1}
    lp, ent = call(h, w, b, labels, kernels)  # this head shape keeps nothing any more
    check(torch.autograd.grad(entropy_bonus(lp, ent), [h])[0], h, w, b, labels, entropy_bonus)
    assert _frozen_head_grad.stats["kept"] == 1 and not _frozen_head_grad._kept


def test_two_forwards_before_their_backwards(kernels):
    h, w, b, labels = frozen(False)
    first_weights, second_weights = torch.linspace(1, 2, N, device=DEVICE), torch.linspace(-1, 1, N, device=DEVICE)
    first = call(h, w, b, labels, kernels)
    second = call(h, w, b, labels, kernels)  # replaces the first one's direction
    check(torch.autograd.grad(per_sequence(second_weights)(*second), [h])[0], h, w, b, labels,
          per_sequence(second_weights))
    check(torch.autograd.grad(per_sequence(first_weights)(*first), [h])[0], h, w, b, labels,
          per_sequence(first_weights))
    assert _frozen_head_grad.stats == {"kept": 2, "used": 1, "recomputed": 1}


def test_a_trainable_head_or_no_gradient_keeps_nothing(kernels):
    h, w, b, labels = make(torch.float32, False)
    lp, _ = call(h.requires_grad_(), w.requires_grad_(), b, labels, kernels)  # trainable: not this mechanism
    torch.autograd.grad(-lp.sum(), [h, w])
    with torch.no_grad():  # a reference model's forward
        (tlp.launch if kernels == "triton" else tlp.reference)(h.detach(), w.detach(), None, labels)
    assert _frozen_head_grad.stats["kept"] == 0 and not _frozen_head_grad._kept


def test_through_the_op_and_torch_compile():
    """The op's own autograd under torch.compile with a frozen weight: the kept direction reaches the compiled
    backward, and per-sequence weights computed in the graph scale it."""
    h, w, _, labels = frozen(False)
    weights = torch.linspace(0.5, 1.5, N, device=DEVICE)

    def f(h, w):
        out = torch.ops.liger.token_logprobs(h, w, None, labels, IGNORE, 0.8, 0.0, 1.0, True, False)
        return per_sequence(weights)(out[0], out[1])

    compiled = torch.compile(f, fullgraph=True)
    for _ in range(2):
        dh, = torch.autograd.grad(compiled(h, w), [h])
        check(dh, h, w, None, labels, per_sequence(weights))
    assert _frozen_head_grad.stats["used"] == 2


def test_bf16_direction_is_as_accurate_as_recomputing(kernels):
    """In bf16 the kept direction is rounded once before the per-token scaling: its d hidden is as close to a float64
    computation as the recomputing backward's (which rounds the scaled logit gradient instead)."""
    h, w, b, labels = make(torch.bfloat16, False)
    h.requires_grad_()
    weights = torch.linspace(0.5, 1.5, N, device=DEVICE)
    lp, ent = call(h, w, b, labels, kernels)
    kept, = torch.autograd.grad(per_sequence(weights)(lp, ent), [h])
    _frozen_head_grad._off.add(_frozen_head_grad.weight_key(w))  # the same call, recomputed in backward
    lp, ent = call(h, w, b, labels, kernels)
    recomputed, = torch.autograd.grad(per_sequence(weights)(lp, ent), [h])
    assert _frozen_head_grad.stats == {"kept": 1, "used": 1, "recomputed": 0}
    expected = full_logits(h.double(), w.double(), None, labels, 0.8, 0.0, 1.0)
    want, = torch.autograd.grad(per_sequence(weights)(expected[0], expected[1]), [h])
    scale = want.abs().max().item()
    err_kept = (kept.double() - want).abs().max().item() / scale
    err_recomputed = (recomputed.double() - want).abs().max().item() / scale
    print(f"bf16 d hidden error, largest |difference| / largest |gradient|: kept {err_kept:.2e}, recomputed "
          f"{err_recomputed:.2e}")
    assert err_kept <= max(2 * err_recomputed, 1e-2), (err_kept, err_recomputed)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
@pytest.mark.parametrize("trainable", [False, True])
def test_under_cuda_graphs_nothing_is_kept_and_the_gradient_is_exact(trainable):
    """torch.compile(mode="reduce-overhead"): Inductor's CUDA-graph trees run the op once eagerly in their private
    memory pool, then capture and replay it, and refuse a tensor kept past the call in that pool. Neither the frozen
    head's direction nor the trainable head's uniform-gradient guess is kept there, and d hidden stays exact."""
    h, w, _, labels = frozen(False)
    w.requires_grad_(trainable)
    weights = torch.full((N,), 0.125, device=DEVICE) if trainable else torch.linspace(0.5, 1.5, N, device=DEVICE)

    def f(h, w):
        out = torch.ops.liger.token_logprobs(h, w, None, labels, IGNORE, 0.8, 0.0, 1.0, True, trainable)
        return per_sequence(weights)(out[0], out[1])

    compiled = torch.compile(f, mode="reduce-overhead")
    for _ in range(4):  # warm-up, capture, replays
        torch.compiler.cudagraph_mark_step_begin()
        dh = torch.autograd.grad(compiled(h, w), [h])[0].clone()
        check(dh, h, w, None, labels, per_sequence(weights))
    assert _frozen_head_grad.stats["kept"] == 0 and _uniform_grad.stats["kept"] == 0
