"""liger::linear_jsd and liger_compile.ops.linear_jsd: the Triton row kernel (interpreted on CPU, real on a GPU) and
the torch path against TRL's generalized_jsd_loss on the full logits in float64, gradients included."""
import pytest
import torch
import triton

import liger_compile.ops as ops
from liger_compile.kernels import linear_jsd as jsd
from models import DEVICE

gkd_trainer = pytest.importorskip("trl.experimental.gkd.gkd_trainer")

B, T, H, HT, V = 2, 7, 16, 12, 333  # teacher of another hidden size; the vocabulary no multiple of a tile


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(jsd, "chunk_rows", lambda n, v, dtype: 4)  # 14 rows: chunks of 4, 4, 4, 2


def make(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s, w_s = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) / 2
    h_t, w_t = torch.randn(B, T, HT, generator=g), torch.randn(V, HT, generator=g) / 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100  # prompts
    return [t.to(DEVICE, dtype) for t in (h_s, w_s, h_t, w_t)] + [labels.to(DEVICE)]


def trl_loss(h_s, w_s, h_t, w_t, labels, beta, temperature, num_items=None):
    return gkd_trainer.GKDTrainer.generalized_jsd_loss(h_s.double() @ w_s.double().T, h_t.double() @ w_t.double().T,
                                                       labels, beta=beta, temperature=temperature,
                                                       num_items_in_batch=num_items)


@pytest.mark.parametrize("use_kernel", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.5, 1.0), (1.0, 0.7), (0.3, 0.7)])
def test_loss_and_student_gradients_match_trl(use_kernel, beta, temperature):
    if use_kernel and DEVICE == "cpu" and isinstance(jsd._row_kernel, triton.runtime.jit.JITFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")
    h_s, w_s, h_t, w_t, labels = make()
    forward = jsd.launch if use_kernel else jsd.reference
    total, grad_h, grad_w = forward(h_s, w_s, h_t, w_t, labels, -100, beta, temperature, True)
    leaves = [h_s.clone().requires_grad_(), w_s.clone().requires_grad_()]
    want = trl_loss(*leaves, h_t, w_t, labels, beta, temperature)
    want_h, want_w = torch.autograd.grad(want, leaves)
    count = int((labels != -100).sum())
    torch.testing.assert_close(total.double().cpu() / count, want.detach().cpu(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_h.double().cpu() / count, want_h.double().cpu(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_w.double().cpu() / count, want_w.double().cpu(), atol=1e-6, rtol=1e-5)


def test_public_function_divides_as_trl_and_backpropagates_to_the_student_only():
    h_s, w_s, h_t, w_t, labels = make()
    for t in (h_s, w_s, h_t, w_t):
        t.requires_grad_()
    for num_items in (None, 9):
        loss = ops.linear_jsd(h_s, w_s, h_t, w_t, labels, beta=0.5, num_items_in_batch=num_items)
        want = trl_loss(h_s, w_s, h_t, w_t, labels, 0.5, 1.0, num_items)
        torch.testing.assert_close(loss.double(), want.double(), atol=1e-6, rtol=1e-5)
        got = torch.autograd.grad(loss, [h_s, w_s, h_t, w_t], allow_unused=True)
        ref = torch.autograd.grad(want, [h_s, w_s])
        for a, b in zip(got[:2], ref):
            torch.testing.assert_close(a.double(), b.double(), atol=1e-6, rtol=1e-5)
        assert got[2] is None and got[3] is None  # the teacher is read, never differentiated


def test_frozen_student_head_computes_no_weight_gradient():
    h_s, w_s, h_t, w_t, labels = make()
    h_s.requires_grad_()
    loss = ops.linear_jsd(h_s, w_s, h_t, w_t, labels)
    (grad_h,) = torch.autograd.grad(loss, [h_s])
    want = trl_loss(h_s, w_s, h_t, w_t, labels, 0.5, 1.0)  # ops.linear_jsd's default beta and temperature
    (want_h,) = torch.autograd.grad(want, [h_s])
    torch.testing.assert_close(grad_h.double(), want_h.double(), atol=1e-6, rtol=1e-5)


def test_all_labels_ignored_gives_zero():
    h_s, w_s, h_t, w_t, labels = make()
    labels[:] = -100
    w_s.requires_grad_()
    loss = ops.linear_jsd(h_s, w_s, h_t, w_t, labels)
    assert loss.item() == 0 and not torch.autograd.grad(loss, [w_s])[0].any()


def test_compiles_without_a_graph_break():
    h_s, w_s, h_t, w_t, labels = make()
    h_s.requires_grad_()

    def f(h):
        return ops.linear_jsd(h, w_s, h_t, w_t, labels, beta=0.3)

    eager = torch.autograd.grad(f(h_s), h_s)[0]
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(h_s), h_s)[0]
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bad,message", [
    (dict(beta=1.5), "beta"),
    (dict(w_t=torch.zeros(V + 1, HT)), "vocabularies differ"),
    (dict(labels=torch.zeros(B, T + 1, dtype=torch.long)), "labels for hidden"),
])
def test_bad_arguments_raise_clear_errors(bad, message):
    h_s, w_s, h_t, w_t, labels = make()
    args = dict(h_s=h_s, w_s=w_s, h_t=h_t, w_t=w_t, labels=labels)
    beta = bad.pop("beta", 0.5)
    args.update({k: v.to(DEVICE) for k, v in bad.items()})
    with pytest.raises(ValueError, match=message):
        ops.linear_jsd(*args.values(), beta=beta)
