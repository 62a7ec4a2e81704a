"""FSDP2 training steps on the GPUs of one host: eager, Inductor, Liger-Kernel and backend="liger" side by side.

    python bench/bench_fsdp.py --gpus 2 [--model llama-1b --batch 4 --seq 4096 --variants eager,inductor,...]

One launch per variant, one process per GPU (NCCL). Each rank builds bench_e2e.py's model (random init, seed 0, bf16
parameters, SDPA), puts every decoder layer and then the whole model under `fully_shard` (FSDP2: parameters,
gradients and optimizer state sharded over the GPUs), compiles it as the variant says, and trains on its own batch
of batch x seq tokens (seed 1 + rank) with `AdamW(fused=True)`: 3 warm-up steps, the median of the timed ones.
Prints and writes (fsdp2_<model>_<gpus>gpu_<b>x<t>.md/.json/.png in --out) tokens/s per GPU, peak memory of the
fullest GPU, first-step (compile) time and the first loss averaged over the ranks (equal across variants: same
init, same data).

Hidden, for checking the driver without GPUs: `--device cpu --tiny` (gloo, a 2-layer model).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_e2e import MODELS, build, classify_failure, timed_steps  # noqa: E402

VARIANTS = ["eager", "inductor", "liger_kernel", "ours"]
# Shared multi-GPU hosts may need NVLink multicast off (it can take a shared host's GPUs down); the
# children get these even if the caller's environment lacks them.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def run_rank(args) -> dict | None:
    """One rank's steps; rank 0 returns the result row, the others None."""
    import torch.distributed as dist  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    variant = args.one
    if variant == "liger_kernel":
        import liger_kernel.transformers as lk  # noqa: PLC0415

        getattr(lk, f"apply_liger_kernel_to_{MODELS[args.model][2]}")()
    model, _ = build(args.model, str(device), args.tiny)
    model.train()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    run, report = model, None
    if variant == "inductor":
        run = torch.compile(model)
    elif variant == "ours":
        import liger_compile  # noqa: PLC0415

        report = liger_compile.Report()
        run = torch.compile(model, backend="liger", options={"report": report})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    g = torch.Generator(device=device).manual_seed(1 + rank)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device, generator=g)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = timed_steps(run, opt, ids, args.warmup + args.steps, sync, before_step=dist.barrier)
    # every rank's numbers: the slowest rank sets the step, the fullest GPU the memory, the loss is the ranks' mean
    step = torch.tensor(statistics.median(times[args.warmup:]), device=device)
    first = torch.tensor(times[0], device=device)
    peak = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0, device=device)
    loss0 = losses[0].float().clone()
    for t, op in ((step, dist.ReduceOp.MAX), (first, dist.ReduceOp.MAX), (peak, dist.ReduceOp.MAX),
                  (loss0, dist.ReduceOp.SUM)):
        dist.all_reduce(t, op=op)
    dist.destroy_process_group()
    if rank:
        return None
    row = {"variant": variant, "tokens/s per GPU": args.batch * args.seq / step.item(),
           "tokens/s": world * args.batch * args.seq / step.item(), "step_ms": step.item() * 1e3,
           "peak_GiB": peak.item() if cuda else None, "first_step_s": first.item(),
           "first_loss": loss0.item() / world}
    if report is not None:
        from liger_compile import facts  # noqa: PLC0415

        row["fused"] = report.counts
        row["layer_calls"] = dict(facts.stats)  # rank 0's graph calls run with the causal mask assumed, or not
        print(report, file=sys.stderr)
    return row


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(args, variant: str) -> dict:
    """Launches one process per GPU for `variant`, killed (with Inductor's workers) at --timeout; rank 0's row,
    or {"error": ...} saying why it failed."""
    t0 = time.time()
    env = {**os.environ, **NO_MULTICAST, "WORLD_SIZE": str(args.gpus), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    argv = [sys.executable, os.path.abspath(__file__), "--one", variant, "--model", args.model, "--batch",
            str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--device", args.device] + (["--tiny"] if args.tiny else [])
    procs = [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for r in range(args.gpus)]
    outs, timed_out = [], False
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(1.0, args.timeout - (time.time() - t0))))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out or any(p.returncode for p in procs if p.returncode is not None):
        for p in procs:  # one rank failing leaves the others waiting in a collective: end them all
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        outs = [p.communicate() if i >= len(outs) else outs[i] for i, p in enumerate(procs)]
    err = "\n".join(e for _, e in outs)
    line = [x for x in outs[0][0].splitlines() if x.startswith("RESULT ")]
    if timed_out:
        row = {"error": f"timeout after {args.timeout} s", "error_kind": "timeout"}
    elif any(p.returncode for p in procs) or not line:
        kind, msg = classify_failure(err)
        row = {"error": f"{kind}: {msg}", "error_kind": kind}
    else:
        row = json.loads(line[0][len("RESULT "):])
    if variant == "ours" and err:
        print("\n".join(x for x in err.splitlines() if "graph" in x or "near miss" in x or "report" in x)[:3000])
    return {"variant": variant, **row, "gpus": args.gpus, "model": args.model, "batch": args.batch,
            "seq": args.seq, "wall_s": time.time() - t0}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--model", default="llama-1b", choices=list(MODELS))
    ap.add_argument("--batch", type=int, default=4, help="per GPU")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--timeout", type=int, default=240, help="seconds per variant")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        row = run_rank(args)
        if row is not None:
            print("RESULT " + json.dumps(row), flush=True)
        return
    rows = []
    for v in args.variants.split(","):
        rows.append(run_variant(args, v))
        print(f"{v}: {rows[-1]}", flush=True)
    from common import write_results  # noqa: PLC0415
    from summary import e2e_chart  # noqa: PLC0415

    name = f"fsdp2_{args.model}_{args.gpus}gpu_{args.batch}x{args.seq}"
    title = (f"FSDP2 training step on {args.gpus} GPUs, {args.model} shape, {args.batch} x {args.seq} per GPU, bf16"
             + (" (TINY, CPU check)" if args.tiny else ""))
    cols = ["variant", "tokens/s per GPU", "tokens/s", "peak_GiB", "step_ms", "first_step_s", "first_loss", "error"]
    print(write_results(args.out, name, title, rows, cols))
    try:  # charts per-GPU throughput (the e2e chart's tokens/s panel) and the fullest GPU's memory
        config = f"{args.model} {args.gpus}x({args.batch}x{args.seq})"
        per_gpu = [{**r, "tokens/s": r.get("tokens/s per GPU")} for r in rows]
        e2e_chart(os.path.join(args.out, name + ".png"), title + " (tokens/s per GPU)", [config], {config: per_gpu})
    except Exception as e:  # the chart never costs the results written above
        print(f"chart not written: {e!r}")


if __name__ == "__main__":
    main()
