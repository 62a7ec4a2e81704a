"""Tiny random-init Hugging Face models and the eager-vs-compiled comparison the tests share."""
from __future__ import annotations

import torch
import transformers as T

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
    cfg = config_cls(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, use_cache=False,
        **{**extra, **overrides},
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
    ref_loss, ref_grads = loss_and_grads(model, inputs)
    compiled = torch.compile(model, backend="liger", **compile_kwargs)
    loss, grads = loss_and_grads(model, inputs, run=compiled)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    return loss
