"""Tiny random-init Hugging Face models, the eager-vs-compiled comparison and the test devices the tests share."""
from __future__ import annotations

import torch
import transformers as T

# Where the tests that follow the machine run: the GPU if there is one (the real Triton kernels), else the CPU
# (Triton's interpreter, tests/conftest.py). An op is tested on OP_DEVICES: its plain-torch CPU path always.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OP_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# family -> (config class, model class, extra config)
FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {}),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, {}),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, {"eos_token_id": None, "pad_token_id": None}),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {"final_logit_softcapping": 30.0}),
}


def tiny(family: str, layers: int = 2, vocab: int = 128, hidden: int = 32, seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    return tiny_model(config_cls, model_cls, layers, vocab, hidden, seed, **{**extra, **overrides})


def tiny_model(config_cls, model_cls, layers: int = 2, vocab: int = 128, hidden: int = 32, seed: int = 0,
               **overrides):
    """`tiny`'s model for any config and model class (4 heads, 2 key/value heads, MLP twice the hidden size)."""
    cfg = config_cls(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, use_cache=False, **overrides,
    )
    torch.manual_seed(seed)
    return model_cls(cfg)


def batch(vocab: int = 128, b: int = 2, t: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    return {"input_ids": ids, "labels": ids}


def loss_and_grads(model, inputs, run=None):
    """Loss of `run(**inputs)` (default: the model itself) and the gradients it leaves on model's parameters."""
    model.zero_grad(set_to_none=True)
    loss = (model if run is None else run)(**inputs).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_matches_eager(model, inputs, rtol=1e-5, atol=1e-5, **compile_kwargs):
    """Loss and every parameter gradient of torch.compile(model, backend="liger") equal eager's."""
    compiled = torch.compile(model, backend="liger", **compile_kwargs)
    return assert_step_matches_eager(model, compiled, inputs, rtol=rtol, atol=atol)


def assert_step_matches_eager(model, run, inputs, rtol=1e-5, atol=1e-5):
    """Loss and every parameter gradient of `run(**inputs)` (model compiled already) equal the model's own."""
    ref_loss, ref_grads = loss_and_grads(model, inputs)
    loss, grads = loss_and_grads(model, inputs, run=run)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    return loss


def assert_close_f64(actual, expected, tol):
    """`actual` against a (float64) reference, both read as float64 on the CPU; tol: (atol, rtol)."""
    atol, rtol = tol
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)
