"""The model sweep (tests/model_sweep.py) over a representative subset of transformers' causal-LM types.

Each type of SUBSET is built from the sweep's one generic tiny config, trained one step eagerly and under
backend="liger" (our ops run eagerly, no Inductor) in a process of its own, and must give eager's loss and every
gradient (rtol/atol 1e-4): no crash, no mismatch, no skip (every type here builds). The types in EVERY_SITE_FUSED
must also have every RMSNorm, rotary and gated-MLP site they run fused. About a minute on 2 CPU cores.

The full sweep (every type of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, about 10 minutes on 2 cores) runs only with
LIGER_FULL_SWEEP=1; it asserts no crash and no mismatch over all of them, and writes its results where
LIGER_SWEEP_OUT says (a .json path; a .md table beside it). `python tests/model_sweep.py --markdown` writes
bench/results/coverage.json and coverage.md.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import model_sweep

# dense Llama-likes, Gemma's (1 + w) norms and GeGLU, Phi3's fused gate_up, OLMo2's q/k norms, Granite's scales,
# MoE (Mixtral, Qwen3-MoE, DeepSeek-V3's MLA), partial rotary (GPT-NeoX, Phi, StableLM, GLM), LayerNorm models
# (Cohere, StarCoder2, GPT-2: nothing of ours to fuse but the loss and the mask), a hybrid linear-attention model
# (Qwen3-Next)
SUBSET = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite",
          "cohere", "glm", "gpt_neox", "phi", "stablelm", "deepseek_v3", "mixtral", "qwen3_moe", "starcoder2",
          "qwen3_next", "gpt2"]
# every site they run is fused (all of SUBSET)
EVERY_SITE_FUSED = SUBSET
TIMEOUT_S = 120.0  # per type; a type takes 3-7 s alone, more on a loaded machine

FULL = os.environ.get("LIGER_FULL_SWEEP") == "1"


def _failure(r: dict) -> str:
    return (f"{r['type']}: {r['status']}: {r.get('reason')}\ndiagnosis: {r.get('diagnosis')}\n"
            f"{r.get('traceback', '')}")


@pytest.fixture(scope="module")
def subset():
    return model_sweep.sweep(SUBSET, workers=2, timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("model_type", SUBSET)
def test_training_step_matches_eager(subset, model_type):
    r = subset[model_type]
    assert r["status"] == "ok", _failure(r)
    assert r["diff"]["loss"] <= 1e-4 and not r["diff"]["mismatched_params"], r["diff"]
    assert not r["fallbacks"], r["fallbacks"]
    if model_type != "gpt2":  # GPT-2's loss: see bench/results/coverage.md
        assert r["fused"]["linear_cross_entropy"] == 1, (r["fused"], r["near_misses"])


@pytest.mark.parametrize("model_type", EVERY_SITE_FUSED)
def test_every_site_the_model_runs_is_fused(subset, model_type):
    r = subset[model_type]
    assert r["status"] == "ok", _failure(r)
    assert all(r["all_fused"].values()), (r["model"], r["fused"], r["unfused"], r["near_misses"])


def test_model_sites_are_counted(subset):
    """The sweep's own count of what the model runs: Llama (2 layers) runs 2 norms per layer and the final one,
    rotary and a SwiGLU MLP per layer, and each is one fused site of its module; so are GLM's and DeepSeek-V3's
    rotary calls."""
    r = subset["llama"]
    assert {k: r["model"][k] for k in ("rms_norm", "rotary", "swiglu", "gated_mlp", "layer_norm")} == {
        "rms_norm": 5, "rotary": 2, "swiglu": 2, "gated_mlp": 2, "layer_norm": 0}
    assert {k: r["fused"][k] for k in ("rms_norm", "rotary", "swiglu")} == {"rms_norm": 5, "rotary": 2, "swiglu": 2}
    assert r["unfused"] == {"rms_norm": [], "layer_norm": [], "gated_mlp": []}
    assert subset["stablelm"]["model"]["layer_norm"] == 5 and subset["stablelm"]["model"]["rms_norm"] == 0
    # two rotary forms of tests/patterns/test_rotary_forms.py in whole models: GLM's interleaved rotated slice,
    # DeepSeek-V3's MLA (interleaved to halves); one call per layer, each one fused site, no rotary near miss
    for model_type in ("glm", "deepseek_v3"):
        r = subset[model_type]
        assert r["model"]["rotary"] == r["fused"]["rotary"] == 2, (model_type, r["model"], r["fused"])
        assert not [m for m in r["near_misses"] if m["pattern"] == "rotary"], (model_type, r["near_misses"])


def test_compare_catches_a_wrong_gradient():
    """The comparison that decides `mismatch`: one gradient off by more than the tolerance, or missing, fails."""
    ref = (torch.tensor(1.0), {"a": torch.ones(3), "b": torch.zeros(2)})
    assert model_sweep.compare(ref, ref)["close"]
    off = model_sweep.compare(ref, (torch.tensor(1.0), {"a": torch.tensor([1.0, 1.0, 1.001]), "b": torch.zeros(2)}))
    assert not off["close"] and off["mismatched_params"] == ["a"] and off["worst_param"] == "a"
    missing = model_sweep.compare(ref, (torch.tensor(1.0), {"a": torch.ones(3)}))
    assert not missing["close"] and missing["missing_grads"] == ["b"]
    nan = model_sweep.compare(ref, (torch.tensor(float("nan")), ref[1]))
    assert not nan["close"]


def test_a_type_past_its_time_is_skipped_with_the_reason():
    (r,) = model_sweep.sweep(["llama"], workers=1, timeout_s=0.5).values()
    assert r["status"] == "skipped" and r["reason"].startswith("timeout: "), r


def test_generic_config_rules():
    """One sliding and one full attention layer from a per-layer list; token ids inside the tiny vocab; MLA keeps
    a key/value head per query head; widths equal to a hidden size follow it."""
    from transformers import CONFIG_MAPPING  # noqa: PLC0415

    assert model_sweep._two_layers(["sliding_attention"] * 5 + ["full_attention"]) == ["sliding_attention",
                                                                                       "full_attention"]
    assert model_sweep._two_layers({5: "a", 11: "b"}) == {1: "a"}
    cfg = model_sweep.tiny_config("gemma3_text")
    assert cfg.layer_types == ["sliding_attention", "full_attention"] and cfg.num_hidden_layers == 2
    assert all(0 <= i < 128 for i in model_sweep.special_ids(cfg) if i is not None)
    mla = model_sweep.tiny_config("deepseek_v3")
    assert mla.num_key_value_heads == mla.num_attention_heads == 4
    kw = model_sweep.shrink_kwargs(CONFIG_MAPPING["llama"](), {4096})
    assert kw["hidden_size"] == 32 and kw["num_key_value_heads"] == 2


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="the full sweep over every causal-LM type runs with LIGER_FULL_SWEEP=1 "
                                     "(about 10 minutes on 2 cores)")
def test_full_sweep_no_crash_no_mismatch():
    results = model_sweep.sweep(model_sweep.all_types(), workers=2)
    out = os.environ.get("LIGER_SWEEP_OUT")
    if out:
        meta = model_sweep.versions()
        with open(out, "w") as f:
            json.dump({"meta": meta, "summary": model_sweep.summarize(results), "results": results}, f, indent=1,
                      default=str)
        with open(os.path.splitext(out)[0] + ".md", "w") as f:
            f.write(model_sweep.markdown(results, meta))
    bad = [r for r in results.values() if r["status"] in ("crash", "mismatch")]
    assert not bad, "\n\n".join(f"{r['type']}: {r['status']}: {r.get('reason')} ({r.get('diagnosis')})"
                                for r in bad)
