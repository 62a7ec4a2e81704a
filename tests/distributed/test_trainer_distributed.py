"""The HF Trainer with torch_compile_backend="liger", distributed by accelerate over 2 CPU processes (gloo): FSDP2,
and DeepSpeed ZeRO-2/3 where DeepSpeed is installed.

accelerate 1.15 enables neither on CPU. test_fsdp_request_on_cpu_trains_with_ddp records what it does instead, so
that we notice when that changes. The other runs widen accelerate's CPU gates by the one case each leaves out
(tests/distributed/trainer_dist_worker.py says exactly how); from there on, the wrapping, the compile, the loss and the
optimizer step are accelerate's and the Trainer's own code.

Every run's logged losses and gradient norms (3 SGD steps) and its parameters afterwards (gathered whole) equal the
single-process eager Trainer run on the same global batch (4 sequences of 10 tokens a step, in order): fp32,
rtol 1e-5, atol 1e-6.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_distributed import assert_counts, misses, needs_gloo, run_scenario

pytest.importorskip("datasets")
WORKER = Path(__file__).with_name("trainer_dist_worker.py")
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process eager Trainer run: (its result, its parameters after training)."""
    out = tmp_path_factory.mktemp("reference")
    (result,) = run_scenario("reference", out, worker=WORKER, world=1)
    return result, torch.load(next(out.glob("reference_*/params.pt")))


def run(scenario: str, tmp_path: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    results = run_scenario(scenario, tmp_path, worker=WORKER)
    return results, torch.load(next(tmp_path.glob(f"{scenario}_*/params.pt")))


def assert_parity(results: list[dict], params: dict[str, torch.Tensor], reference) -> None:
    ref, ref_params = reference
    for r in results:
        assert r["num_processes"] == 2 and r["process_index"] == r["rank"], r  # each rank got its half of the batch
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(torch.tensor(r["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=RTOL,
                                   atol=ATOL)
    assert params.keys() == ref_params.keys()
    for name, want in ref_params.items():
        torch.testing.assert_close(params[name], want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


@needs_gloo
def test_fsdp_request_on_cpu_trains_with_ddp(tmp_path, reference):
    """TrainingArguments(use_cpu=True, fsdp=True, fsdp_config={"version": 2, ...}) on 2 gloo processes: accelerate
    1.15 keeps the FSDP plugin only for accelerator process groups, so the state is MULTI_CPU, the Trainer sees no
    FSDP, and the model is wrapped in DDP, silently. (Without use_cpu the Trainer refuses: no process group is made
    on a machine without an accelerator, so "Using fsdp only works in distributed training".)"""
    results, params = run("fsdp_as_released", tmp_path)
    for r in results:
        assert r["distributed_type"] == "MULTI_CPU" and r["fsdp_version"] is None and not r["trainer_fsdp"], r
        assert r["wrapper"] == "DistributedDataParallel" and r["param_kinds"] == ["Parameter"], r
    assert_parity(results, params, reference)


@needs_gloo
def test_fsdp2_through_accelerate(tmp_path, reference):
    """accelerate's FSDP2 preparation: fully_shard per decoder layer, a unit of [final norm, lm_head], the embedding
    and the root, then torch.compile. FSDP2's hooks run outside the graphs, so every unit is its own graph: the
    layer sites are fused (the two layers run one graph, so they count once), but the lm_head's unit ends its graph
    and the loss graph receives the logits as an input: lm_head + cross-entropy cannot be fused there (reported as a
    near miss). The causal mask, built before the first layer, is checked when it is built and the layers run
    SDPA is_causal for it (liger_compile/facts.py)."""
    results, params = run("fsdp2", tmp_path)
    assert_counts(results, dict(rms_norm=3, rotary=1, swiglu=1, linear_cross_entropy=0, causal_mask=1))
    for r in results:
        assert r["distributed_type"] == "FSDP" and r["fsdp_version"] == 2 and r["trainer_fsdp"], r
        assert r["wrapper"] == "FSDPOptimizedModule" and r["param_kinds"] == ["DTensor"], r
        (lce,) = misses(r, "linear_cross_entropy")
        assert "placeholder" in lce, lce  # the logits: an input of the loss's graph
        assert not misses(r, "causal_mask"), r["text"]
        # every layer call of every step (2 layers, STEPS=3 in trainer_dist_worker.py) ran the causal version
        assert r["layer_calls"].get("assumed") == 2 * 3 and not r["layer_calls"].get("fallback"), r["layer_calls"]
    assert_parity(results, params, reference)


@needs_gloo
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero(stage, tmp_path, reference):
    """DeepSpeed on CPU (its CPU accelerator, gloo) through the Trainer; accelerate compiles with
    `engine.compile(backend="liger")`. ZeRO-2 keeps whole parameters in the forward: one graph, everything fused.
    ZeRO-3 gathers each module's parameters in hooks that break the graph at every module: each RMSNorm module is a
    graph of its own (one compiled graph serves all five) and is fused; the other sites are cut apart (reported as
    near misses)."""
    pytest.importorskip("deepspeed")
    results, params = run(f"zero{stage}", tmp_path)
    for r in results:
        assert r["distributed_type"] == "DEEPSPEED" and r["trainer_deepspeed"], r
        assert r["wrapper"] == "DeepSpeedEngine" and r["zero_partitioned"] is (stage == 3), r
    if stage == 2:
        assert_counts(results, dict(rms_norm=5, rotary=2, swiglu=2, linear_cross_entropy=1, causal_mask=2))
        assert all(r["graphs"] == 1 and not r["near_misses"] for r in results)
    else:
        # the graph piece with the attention fuses it as the variable-length op; the rotary halves, the MLP and
        # lm_head + cross-entropy are cut apart by the hooks' graph breaks (near misses)
        assert_counts(results, dict(rms_norm=1, varlen_attention=1))
        for r in results:
            assert r["graphs"] == 20, r["text"]
            assert sorted(m[0] for m in r["near_misses"]) == ["linear_cross_entropy", "rotary", "rotary", "swiglu"], \
                r["text"]
    assert_parity(results, params, reference)
