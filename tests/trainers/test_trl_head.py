"""TRL's fused LM head (add_fused_lm_head) under backend="liger": compiled into the model's graph on our op, with
no graph break, the labelled rows only, and every output and gradient equal to TRL's own eager head."""
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import liger_compile

trl_utils = pytest.importorskip("trl.trainer.utils")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def model_with_head(temperature=1.0, softcap=None, logit_scale=None):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if softcap is not None:
        cfg.final_logit_softcapping = softcap
    if logit_scale is not None:
        cfg.logit_scale = logit_scale
    model = LlamaForCausalLM(cfg)
    trl_utils.add_fused_lm_head(model, temperature=temperature, outputs=OUTPUTS)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[1, :3] = -100
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)


def step(model, params):
    out = model(**batch())
    # per-token weights as DPO/GRPO apply them, and an entropy bonus: every gradient path of the head
    weights = torch.linspace(0.5, 1.5, out.log_probs.numel()).view_as(out.log_probs)
    loss = -(out.log_probs * weights).sum() / out.label_mask.sum() - 0.05 * out.entropy.sum()
    return out, loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("temperature,softcap,logit_scale", [(1.0, None, None), (0.7, 30.0, 0.25)])
def test_head_compiles_into_the_graph_and_matches_trl(temperature, softcap, logit_scale):
    model = model_with_head(temperature, softcap, logit_scale)
    params = list(model.parameters())
    eager_out, eager_loss, eager_grads = step(model, params)

    report = liger_compile.explain(model, **batch())
    assert report.counts["trl_labelled_rows"] == 1, report  # the head is our op, fed the unclamped labels
    counters.clear()
    compiled = torch.compile(model, backend="liger")
    out, loss, grads = step(compiled, params)
    assert not counters["graph_break"], dict(counters["graph_break"])

    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for name in OUTPUTS:
        got, want = getattr(out, name), getattr(eager_out, name)
        if name == "is_top1":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
    for (name, _), got, want in zip(model.named_parameters(), grads, eager_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)


def test_without_compile_the_head_is_trls_own():
    """Outside tracing both patched names answer as TRL's: the eager trainer path is untouched."""
    head, use_triton = trl_utils._ChunkedLogProbFunction, trl_utils._use_triton
    assert isinstance(head, liger_compile.trl_support._CompiledHead)
    assert use_triton(torch.device("cpu")) == head.original.forward.__globals__["_use_triton"](torch.device("cpu"))
    h, w = torch.randn(6, 8), torch.randn(13, 8)
    targets = torch.tensor([1, 2, 0, 5, 12, 3])
    ours = head.apply(h, w, None, targets, 1.0, 32768, None, 1.0, ("entropy",))
    theirs = head.original.apply(h, w, None, targets, 1.0, 32768, None, 1.0, ("entropy",))
    assert ours[2] is None and theirs[2] is None
    torch.testing.assert_close(ours[0], theirs[0], atol=0, rtol=0)


@pytest.mark.parametrize("order", ["liger_compile first", "trl first"])
def test_installed_whichever_is_imported_first(order):
    first, second = ("liger_compile", "trl.trainer.utils") if order == "liger_compile first" else \
        ("trl.trainer.utils", "liger_compile")
    code = (f"import {first}; import {second}; import trl.trainer.utils as u; "
            "print(type(u._ChunkedLogProbFunction).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "_CompiledHead", out.stderr[-2000:]


def test_an_unknown_head_is_left_alone():
    """A TRL whose head has another signature keeps its own (and a graph break), rather than a wrong call."""

    class OtherHead:
        @staticmethod
        def forward(ctx, hidden, weight, targets):
            return hidden

    module = type(sys)("fake_trl_utils")
    module._ChunkedLogProbFunction, module._use_triton = OtherHead, lambda device: True
    assert not liger_compile.trl_support._patch(module)
    assert module._ChunkedLogProbFunction is OtherHead
