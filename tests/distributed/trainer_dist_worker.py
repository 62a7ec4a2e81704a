"""One rank of tests/distributed/test_trainer_distributed.py: the HF Trainer with torch_compile_backend="liger" on CPU processes
with the gloo backend, distributed by accelerate (FSDP2, or DeepSpeed ZeRO-2/3), or the single-process eager run
they are compared with.

accelerate 1.15 turns FSDP and DeepSpeed off on CPU (see the README's distributed section). `cpu_gate` widens each
gate by exactly the case it leaves out, so that accelerate's own preparation code runs on CPU:
- FSDP: `AcceleratorState` keeps the FSDP plugin only for accelerator process groups (MULTI_GPU, MULTI_XPU, ...);
  MULTI_CPU gets plain DDP and the plugin is dropped. We keep it for MULTI_CPU too.
- DeepSpeed: with `use_cpu=True` DeepSpeed is off; without it, `PartialState` finds no accelerator backend, counts
  1 process on every rank (so no rank gets its share of the batch) while DeepSpeed itself runs on all of them. We
  let `PartialState` choose gloo, as it does for `use_cpu=True`.
Everything else (the Trainer, the wrapping, the compile, the optimizer step) is the libraries' own code.

Each rank writes rank{RANK}.json (what accelerate set up, what our backend fused, the logged losses and gradient
norms) and rank 0 also params.pt (every parameter after training, gathered whole) into OUT_DIR.

    RANK=0 LOCAL_RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \
        python tests/distributed/trainer_dist_worker.py SCENARIO OUT_DIR
"""
from __future__ import annotations

import os
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path.insert(1, os.path.dirname(TESTS))  # the checkout, if not installed
sys.path.insert(1, TESTS)  # tests/models.py
sys.path.insert(1, HERE)  # dist_exit.py
if not torch.cuda.is_available():  # as tests/conftest.py: Triton's interpreter, chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import liger_compile  # noqa: E402
import liger_compile.backend as backend_module  # noqa: E402
from dist_exit import finish  # noqa: E402

WORLD = 2
VOCAB, SEQ, SAMPLES, PER_RANK_BATCH, STEPS, LR = 64, 10, 12, 2, 3, 0.1
LAYER = "LlamaDecoderLayer"

# fsdp: TrainingArguments' fsdp=; zero: a DeepSpeed config of that stage; cpu_gate: see the module docstring.
# "reference" is one process, eager, with the global batch (WORLD * PER_RANK_BATCH) per step. "fsdp_as_released"
# records what accelerate does with fsdp= on CPU as it is (it trains eagerly: only the wrapping is in question).
SCENARIOS = {
    "reference": dict(world=1, compile=False),
    "fsdp_as_released": dict(world=WORLD, compile=False, fsdp=True),
    "fsdp2": dict(world=WORLD, compile=True, fsdp=True, cpu_gate=True),
    "zero2": dict(world=WORLD, compile=True, zero=2, cpu_gate=True),
    "zero3": dict(world=WORLD, compile=True, zero=3, cpu_gate=True),
}

# Every graph our backend rewrites, recorded on the way (the real backend="liger" path; only this observation is
# patched in): accelerate compiles without our options, so there is no Report to hand it.
REPORT = liger_compile.Report()
_rewrite_graph = backend_module.rewrite_graph


def _recording_rewrite_graph(gm, opts):
    new_gm, report = _rewrite_graph(gm, opts)
    REPORT.add(report)
    return new_gm, report


backend_module.rewrite_graph = _recording_rewrite_graph


def widen_accelerate_cpu_gates() -> None:
    from accelerate.state import AcceleratorState, PartialState  # noqa: PLC0415
    from accelerate.utils import DistributedType  # noqa: PLC0415

    init = AcceleratorState.__init__

    def init_keeping_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP  # what the accelerator branch does
            self.fsdp_plugin = fsdp_plugin

    prepare_backend = PartialState._prepare_backend

    def prepare_backend_gloo_on_cpu(self, cpu=False, sagemaker_dp=False, backend=None):
        chosen, kind = prepare_backend(self, cpu, sagemaker_dp, backend)
        if chosen is None and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return prepare_backend(self, True, sagemaker_dp, backend)  # the use_cpu=True choice: gloo, MULTI_CPU
        return chosen, kind

    AcceleratorState.__init__ = init_keeping_fsdp_on_cpu
    PartialState._prepare_backend = prepare_backend_gloo_on_cpu


def llama():
    from models import tiny  # noqa: PLC0415

    return tiny("llama", layers=2, vocab=VOCAB, hidden=32)


def dataset():
    import datasets  # noqa: PLC0415

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=g).tolist()  # equal lengths: no padding
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def training_args(spec: dict, out_dir: str):
    from transformers import TrainingArguments  # noqa: PLC0415

    extra: dict = {"use_cpu": True}
    if spec.get("fsdp"):
        extra["fsdp"] = True
        extra["fsdp_config"] = {"version": 2, "transformer_layer_cls_to_wrap": [LAYER]}
    if spec.get("zero"):
        extra["use_cpu"] = False  # use_cpu=True turns DeepSpeed off
        extra["deepspeed"] = {
            "zero_optimization": {"stage": spec["zero"], "stage3_gather_16bit_weights_on_model_save": True},
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
        }
    if spec["compile"]:
        extra.update(torch_compile=True, torch_compile_backend="liger")
    # SGD with a constant rate: parameters follow the gradients linearly, so they can be compared tightly (Adam's
    # first step divides by |grad| and turns rounding noise in near-zero gradients into full-size updates).
    return TrainingArguments(
        output_dir=out_dir, max_steps=STEPS, per_device_train_batch_size=PER_RANK_BATCH * WORLD // spec["world"],
        optim="sgd", learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=1e9, logging_steps=1,
        train_sampling_strategy="sequential", save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
        **extra)


def full_params(model, trainer) -> dict[str, torch.Tensor]:
    """Every parameter, whole (collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    params = dict(model.named_parameters())
    if trainer.is_deepspeed_enabled and any(hasattr(p, "ds_id") for p in params.values()):  # ZeRO-3 shards
        import deepspeed  # noqa: PLC0415

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().clone() for n, p in params.items()}
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in params.items()}


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU backend builds its shared-memory all-reduce op with the C++ compiler when it starts (minutes on
    2 cores, every fresh machine). Only its inference all-reduce uses that op; training reduces through
    torch.distributed (gloo here), so the backend starts without it, as it does where the op cannot be built."""
    import deepspeed.comm.torch as deepspeed_torch_comm  # noqa: PLC0415

    deepspeed_torch_comm.build_shm_op = lambda: None


def run(spec: dict, out_dir: str, rank: int) -> dict:
    from transformers import Trainer  # noqa: PLC0415

    if spec.get("cpu_gate"):
        widen_accelerate_cpu_gates()
    if spec.get("zero"):
        skip_deepspeed_shm_build()
    model = llama()
    trainer = Trainer(model=model, args=training_args(spec, os.path.join(out_dir, "trainer")),
                      train_dataset=dataset())
    state = trainer.accelerator.state
    out = {"distributed_type": str(state.distributed_type).split(".")[-1],
           "num_processes": trainer.accelerator.num_processes, "process_index": trainer.accelerator.process_index,
           "fsdp_version": getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", None),
           "trainer_fsdp": trainer.is_fsdp_enabled, "trainer_deepspeed": trainer.is_deepspeed_enabled}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    out.update(wrapper=type(trainer.model_wrapped).__name__,
               param_kinds=sorted({type(p).__name__ for p in model.parameters()}),
               zero_partitioned=any(hasattr(p, "ds_id") for p in model.parameters()),
               losses=[h["loss"] for h in logs], grad_norms=[h.get("grad_norm") for h in logs],
               counts=REPORT.counts, graphs=len(REPORT.graphs), fallbacks=REPORT.fallbacks, text=str(REPORT),
               near_misses=[[m.pattern, m.where, m.reason] for m in REPORT.near_misses],
               layer_calls=dict(liger_compile.facts.stats))
    params = full_params(model, trainer)
    if rank == 0:
        torch.save(params, os.path.join(out_dir, "params.pt"))
    return out


def main() -> int:
    scenario, out_dir = sys.argv[1], sys.argv[2]
    spec = SCENARIOS[scenario]
    if spec["world"] == 1:  # a plain single process: accelerate must not see a launcher's variables
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            os.environ.pop(name, None)
    rank = int(os.environ.get("RANK", 0))
    torch.set_num_threads(1)
    start = time.perf_counter()
    result: dict = {"scenario": scenario, "rank": rank}
    try:
        result.update(run(spec, out_dir, rank))
    except Exception:
        result["error"] = traceback.format_exc()
    result["seconds"] = time.perf_counter() - start
    return finish(out_dir, rank, int(os.environ.get("WORLD_SIZE", 1)) if spec["world"] > 1 else 1, result)


if __name__ == "__main__":
    sys.exit(main())
