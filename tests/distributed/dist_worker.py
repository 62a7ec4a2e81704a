"""One rank of the 2-process CPU (gloo) runs of tests/distributed/test_distributed.py.

Trains a tiny Llama for a few SGD steps with backend="liger" under DDP (either wrapping order) or FSDP2, or runs a
sequence-parallel block whose RMSNorm sees DTensors, and compares with the single-process eager run of the same
global batch, which every rank computes for itself. Each rank writes rank{RANK}.json into OUT_DIR.

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/distributed/dist_worker.py SCENARIO OUT_DIR
"""
from __future__ import annotations

import copy
import os
import sys
import time
import traceback
from datetime import timedelta

import torch

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the checkout, if not installed
if not torch.cuda.is_available():  # as tests/conftest.py: Triton's interpreter, chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import liger_compile  # noqa: E402
import liger_compile.backend as backend_module  # noqa: E402
from dist_exit import finish  # noqa: E402

VOCAB, HIDDEN, SEQ, PER_RANK_BATCH, STEPS, LR = 128, 32, 8, 2, 3, 0.5
RTOL, ATOL = 1e-5, 1e-6
# A rank may wait in a collective while its peer compiles a graph: a cold CPU compile takes 30-60 s, several times
# that on a loaded machine.
COLLECTIVE_TIMEOUT_S = 600

# wrap: how the model is distributed; tied: tie_word_embeddings; intermediate: MLP width; bucket_cap_mb: DDP's
# (1 MiB with a 4096-wide MLP, 1.5 MiB of weights, makes Dynamo's DDP optimizer split the graph); inductor: False
# would run the rewritten graph eagerly (our ops with their autograd formulas) and skip the CPU C++ compile, 20-40 s
# per scenario here; every scenario compiles with Inductor, the file stays under 2.5 minutes with a cold cache.
SCENARIOS = {
    "ddp_compile_inside": dict(wrap="ddp_inner", tied=False, layers=2, intermediate=64, inductor=True),
    "ddp_compile_outside_split": dict(wrap="ddp_outer", tied=True, layers=1, intermediate=4096, bucket_cap_mb=1,
                                      inductor=True),
    "fsdp2": dict(wrap="fsdp2", tied=False, layers=2, intermediate=64, inductor=True),
    "fsdp2_tied": dict(wrap="fsdp2", tied=True, layers=2, intermediate=64, inductor=True),
    "sequence_parallel_norm": dict(wrap="sp", inductor=True),
}

# What the Dynamo graphs receive: every placeholder's example value (type and shape), recorded on the way into our
# rewrite (the real backend="liger" path; only this observation is patched in).
SEEN: list[tuple[str, str, list[int]]] = []
_rewrite_graph = backend_module.rewrite_graph


def _recording_rewrite_graph(gm, opts):
    for n in gm.graph.nodes:
        v = n.meta.get("example_value")
        if n.op == "placeholder" and isinstance(v, torch.Tensor):
            SEEN.append((n.name, type(v).__name__, list(v.shape)))
    return _rewrite_graph(gm, opts)


backend_module.rewrite_graph = _recording_rewrite_graph


def llama(tied: bool, layers: int, intermediate: int):
    import transformers  # noqa: PLC0415

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=HIDDEN // 4, use_cache=False, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def global_batch(step: int, world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (world * PER_RANK_BATCH, SEQ), generator=g)


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


class Checker:
    """Compares with the single-process reference; keeps every max error and the mismatches."""

    def __init__(self):
        self.errors: dict[str, float] = {}
        self.mismatches: list[str] = []

    def __call__(self, what: str, got: torch.Tensor, want: torch.Tensor):
        got, want = got.detach().float(), want.detach().float()
        if got.shape != want.shape:
            self.mismatches.append(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
            return
        err = (got - want).abs().max().item() if got.numel() else 0.0
        self.errors[what] = err
        if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
            self.mismatches.append(f"{what}: max abs err {err:.3g} (max |ref| {want.abs().max().item():.3g})")


def report_summary(report: liger_compile.Report) -> dict:
    return {
        "counts": report.counts,
        "graphs": len(report.graphs),
        "near_misses": [[m.pattern, m.where, m.reason] for m in report.near_misses],
        "fallbacks": report.fallbacks,
        "text": str(report),
        "layer_calls": dict(liger_compile.facts.stats),  # graph calls run with a run-time assumption, or not
    }


def run_lm(spec: dict, rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415
    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

    model = llama(spec["tied"], spec["layers"], spec["intermediate"])
    ref = copy.deepcopy(model)
    report = liger_compile.Report()
    opts = {"report": report, "inductor": spec["inductor"]}
    bucket = spec.get("bucket_cap_mb", 25)
    if spec["wrap"] == "ddp_inner":
        run = DDP(torch.compile(model, backend="liger", options=opts), bucket_cap_mb=bucket)
    elif spec["wrap"] == "ddp_outer":
        run = torch.compile(DDP(model, bucket_cap_mb=bucket), backend="liger", options=opts)
    else:  # FSDP2: each decoder layer, then the root (embeddings, final norm, lm_head)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        run = torch.compile(model, backend="liger", options=opts)
    out: dict = {"tied_after_wrap": model.lm_head.weight is model.model.embed_tokens.weight,
                 "param_kinds": sorted({type(p).__name__ for p in model.parameters()})}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    ref_params = dict(ref.named_parameters())
    check = Checker()
    losses, ref_losses, step_s = [], [], []
    for step in range(STEPS):
        ids = global_batch(step, world)
        local = ids[rank * PER_RANK_BATCH:(rank + 1) * PER_RANK_BATCH]
        t0 = time.perf_counter()
        loss = run(input_ids=local, labels=local).loss
        loss.backward()
        step_s.append(time.perf_counter() - t0)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)  # equal token counts per rank: the mean of the ranks' means is the global mean
        mean_loss /= world
        ref_loss = ref(input_ids=ids, labels=ids).loss
        ref_loss.backward()
        losses.append(mean_loss.item())
        ref_losses.append(ref_loss.item())
        check(f"loss step {step}", mean_loss, ref_loss)
        if step == 0:
            for name, p in model.named_parameters():
                want = ref_params[name].grad
                check(f"grad {name}", full(p.grad), want)
                if isinstance(p.grad, DTensor):  # this rank's shard holds this rank's rows of the full gradient
                    mine = want.chunk(world, dim=0)[rank]
                    check(f"grad shard {name}", p.grad.to_local(), mine)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        check(f"param after {STEPS} steps {name}", full(p.detach()), ref_params[name])
    out.update(losses=losses, ref_losses=ref_losses, step_seconds=step_s, errors=check.errors,
               mismatches=check.mismatches, param_names=[n for n, _ in model.named_parameters()])
    return out | report_summary(report)


class NormMLP(nn.Module):
    """An RMSNorm (sequence parallel: DTensor in, DTensor weight) followed by a SwiGLU MLP on plain tensors."""

    def __init__(self):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: PLC0415

        self.norm = LlamaRMSNorm(HIDDEN)
        self.gate = nn.Linear(HIDDEN, 2 * HIDDEN, bias=False)
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN, bias=False)
        self.down = nn.Linear(2 * HIDDEN, HIDDEN, bias=False)
        with torch.no_grad():
            self.norm.weight.normal_(1.0, 0.2)

    def forward(self, x):
        h = self.norm(x)
        return self.down(F.silu(self.gate(h)) * self.up(h))


def run_sequence_parallel(spec: dict, rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module  # noqa: PLC0415

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    block = NormMLP()
    ref = copy.deepcopy(block)
    # The norm's input is taken as this rank's slice of the sequence (a DTensor sharded on dim 1), its weight
    # becomes a replicated DTensor, and its output comes back as a plain local tensor.
    parallelize_module(block, mesh, {"norm": SequenceParallel(use_local_output=True)})
    report = liger_compile.Report()
    run = torch.compile(block, backend="liger", options={"report": report, "inductor": spec["inductor"]})
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, world * SEQ, HIDDEN, generator=g)
    target = torch.randn(2, world * SEQ, HIDDEN, generator=g)
    x_local = x.chunk(world, dim=1)[rank].clone().requires_grad_()
    y_local = run(x_local)
    scale = 1.0 / target.numel()  # a mean over the global tensor, so gradients are O(1e-2) like a model's
    loss = (y_local * target.chunk(world, dim=1)[rank]).sum() * scale
    loss.backward()
    x_ref = x.clone().requires_grad_()
    y_ref = ref(x_ref)
    ref_loss = (y_ref * target).sum() * scale
    ref_loss.backward()

    check = Checker()
    total = loss.detach().clone()
    dist.all_reduce(total)
    check("loss", total, ref_loss)
    check("output (this rank's rows)", y_local, y_ref.chunk(world, dim=1)[rank])
    check("grad x (this rank's rows)", x_local.grad, x_ref.grad.chunk(world, dim=1)[rank])
    ref_params = dict(ref.named_parameters())
    for name, p in block.named_parameters():
        if isinstance(p.grad, DTensor):  # the replicated norm weight: its gradient is already summed over ranks
            grad = p.grad.full_tensor()
        else:  # plain parameters hold this rank's contribution
            grad = p.grad.clone()
            dist.all_reduce(grad)
        check(f"grad {name}", grad, ref_params[name].grad)
    return {"param_kinds": {n: type(p).__name__ for n, p in block.named_parameters()}, "errors": check.errors,
            "mismatches": check.mismatches, "losses": [total.item()], "ref_losses": [ref_loss.item()],
            **report_summary(report)}


def main() -> int:
    scenario, out_dir = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    start = time.perf_counter()
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    spec = SCENARIOS[scenario]
    result: dict = {"scenario": scenario, "rank": rank, "world": world}
    try:
        fn = run_sequence_parallel if spec["wrap"] == "sp" else run_lm
        result.update(fn(spec, rank, world))
    except Exception:
        result["error"] = traceback.format_exc()
    result["seen"] = SEEN
    result["seconds"] = time.perf_counter() - start
    return finish(out_dir, rank, world, result)


if __name__ == "__main__":
    sys.exit(main())
