"""End-to-end training steps on one GPU: eager, Inductor, Liger-Kernel, Liger-Kernel + Inductor, backend="liger".

    python bench/bench_e2e.py --model llama-1b --batch 4 --seq 4096 --variants eager,inductor,liger_kernel,ours
    python bench/bench_e2e.py --model qwen2-1.5b ...  /  --batch 1 --seq 65536 ...
    python bench/bench_e2e.py ... --one VARIANT        (what the driver runs: one process per variant)

Settings: random init (seed 0), bf16 parameters, SDPA attention,
`model(input_ids=ids, labels=ids).loss.backward()` then `AdamW(fused=True).step()`, 3 warm-up steps, median of
the timed steps. Variant "ours-no-P1+P2" is backend="liger" with those patterns disabled (the step with and without
each pattern). With --profile, one more step runs under torch.profiler: its kernel table per variant, the GPU time
and the attention kernels' time per layer. Prints tokens/s, peak memory, first-step (compile) time, its ratio to Inductor's first step (when
inductor ran in the same invocation) and first loss per variant, and writes e2e_<model>_<b>x<t>.md/.json/.png into
--out. A variant that runs out of memory, hits a CUDA error or its --timeout is a row with its error; the driver
goes on with the next one.

Hidden, for checking the driver without a GPU: `--device cpu --tiny` (a 2-layer model of the same family, no peak
memory), `--fake-oom-tokens N` (a variant raises torch.OutOfMemoryError when batch x seq > N).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import is_gpu_work  # noqa: E402

MODELS = {
    "llama-1b": ("LlamaConfig", "LlamaForCausalLM", "llama", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, use_cache=False,
        max_position_embeddings=131072)),
    "qwen2-1.5b": ("Qwen2Config", "Qwen2ForCausalLM", "qwen2", dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, tie_word_embeddings=True, use_cache=False, max_position_embeddings=131072)),
}
VARIANTS = ["eager", "inductor", "liger_kernel", "liger_kernel_inductor", "ours", "ours_offload"]
OURS = ("ours", "ours_offload")  # ours_offload: backend="liger" with offload_activations (its variable)
# "ours-no-P1+P2": backend="liger" with patterns P1, P2 disabled (the step with and without each pattern)
ABLATION = "ours-no-"
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)  # --tiny: the driver checked on CPU


def build(model: str, device: str = "cuda", tiny: bool = False):
    import transformers  # noqa: PLC0415

    cfg_name, cls_name, family, kwargs = MODELS[model]
    cfg = getattr(transformers, cfg_name)(**{**kwargs, **(TINY if tiny else {})}, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        m = getattr(transformers, cls_name)(cfg).to(torch.bfloat16)
    return m, family


def run_one(args) -> dict:
    variant = args.one
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if variant.startswith("liger_kernel"):
        import liger_kernel.transformers as lk  # noqa: PLC0415

        family = MODELS[args.model][2]
        getattr(lk, f"apply_liger_kernel_to_{family}")()
    model, _ = build(args.model, args.device, args.tiny)
    model.train()
    if args.checkpointing:  # HF's, as the Trainer turns it on (non-reentrant)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.fake_oom_tokens and args.batch * args.seq > args.fake_oom_tokens:
        raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {args.batch * args.seq} tokens > "
                                     f"--fake-oom-tokens {args.fake_oom_tokens})")
    run = model
    if variant in ("inductor", "liger_kernel_inductor"):
        run = torch.compile(model, mode=args.mode)
    elif variant in OURS or variant.startswith(ABLATION):
        import liger_compile  # noqa: PLC0415, F401

        report = liger_compile.Report()
        opts = {"report": report}
        if variant == "ours_offload":  # by the environment, which also holds with --mode (no options then)
            os.environ["LIGER_COMPILE_OFFLOAD_ACTIVATIONS"] = "1"
        if variant.startswith(ABLATION):  # e.g. ours-no-rms_norm+swiglu: those patterns left to Inductor
            opts["disable"] = variant[len(ABLATION):].split("+")
        run = torch.compile(model, backend="liger", **({"mode": args.mode} if args.mode else {"options": opts}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    g = torch.Generator(device=args.device).manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=args.device, generator=g)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = timed_steps(run, opt, ids, args.warmup + args.steps, sync)
    losses = [loss.item() for loss in losses]
    step = statistics.median(times[args.warmup:])
    # read before phase_peaks resets the counter
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    phases = phase_peaks(run, opt, ids) if cuda and not args.no_phases else {}
    if args.profile:
        phases.update(profile_step(run, opt, ids, f"{args.profile}/profile_{args.batch}x{args.seq}_{variant}.txt",
                                   model.config.num_hidden_layers))
    result = {
        "variant": variant, "tokens/s": args.batch * args.seq / step, "step_ms": step * 1e3,
        "peak_GiB": peak, "first_step_s": times[0], "first_loss": losses[0],
        **phases,
    }
    if (variant in OURS or variant.startswith(ABLATION)) and not args.mode:
        result["fused"] = report.counts
        print(report, file=sys.stderr)
    return result


def timed_steps(run, opt, ids, n: int, sync, before_step=lambda: None) -> tuple[list[float], list[torch.Tensor]]:
    """n training steps (forward, backward, optimizer step): each one's wall time in s, between synchronisations,
    and its loss (detached)."""
    times, losses = [], []
    for _ in range(n):
        before_step()
        sync()
        t0 = time.perf_counter()
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.detach())
    return times, losses


def phase_peaks(run, opt, ids) -> dict:
    """Peak memory within forward, backward and the optimizer step of one more step (GiB): where the peak is."""
    out = {}
    for phase in ("fwd", "bwd", "opt"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        if phase == "fwd":
            loss = run(input_ids=ids, labels=ids).loss
        elif phase == "bwd":
            loss.backward()
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        out[f"peak_{phase}_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# Kernel names of SDPA's backends (cuDNN, flash, memory-efficient) and of the math fallback's softmax; the
# cross-entropy's log-softmax kernels (eager's `cunn_SoftMaxForward<..LogSoftMax..>`, Inductor's
# `triton_red_fused__log_softmax..`) are not attention.
ATTENTION_KERNELS = ("attention", "flash", "fmha", "cudnn", "sdpa", "softmax")
NOT_ATTENTION = ("logsoftmax", "log_softmax")


def is_attention_kernel(name: str) -> bool:
    name = name.lower()
    return any(k in name for k in ATTENTION_KERNELS) and not any(k in name for k in NOT_ATTENTION)


def profile_step(run, opt, ids, path, layers: int) -> dict:
    """One step under torch.profiler: the kernels that take the time, written to `path`. Returns the step's GPU
    time and the attention kernels' time per layer (ms)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    events = prof.key_averages()
    table = events.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
    kernels = [e for e in events if is_gpu_work(e) and e.self_device_time_total > 0]
    attention_us = sum(e.self_device_time_total for e in kernels if is_attention_kernel(e.key))
    total_us = sum(e.self_device_time_total for e in kernels)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(table + f"\nGPU time {total_us / 1e3:.1f} ms; attention kernels {attention_us / 1e3:.1f} ms "
                f"({attention_us / 1e3 / layers:.2f} ms per layer)\n")
    return {"attention_ms_per_layer": attention_us / 1e3 / layers, "gpu_ms": total_us / 1e3}


def classify_failure(stderr: str) -> tuple[str, str]:
    """(kind, message) of a failed child: kind is OOM, cuda (a CUDA error: illegal address, launch failure, ...)
    or error; the message is the line that says so (shortened, no table-breaking characters)."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]

    def find(*needles):
        return next((x for x in reversed(lines) if any(n in x for n in needles)), None)

    if line := find("OutOfMemoryError", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED"):
        kind = "OOM"
    elif line := find("CUDA error", "illegal memory access", "AcceleratorError", "CUDA_ERROR"):
        kind = "cuda"
    else:
        kind, line = "error", find("Error", "error") or (lines[-1] if lines else "no output")
    return kind, line.replace("|", "/")[:240]


def run_variant(argv: list[str], timeout: float, script: str = __file__, env: dict | None = None) -> dict:
    """Runs `script --one ...` (argv after the script; bench_e2e.py by default) in its own process group, with `env`
    added to the environment, killed with its children (Inductor's compile workers) at `timeout`. Returns the
    child's RESULT dict, or {"error": ..., "error_kind": ...}; with "wall_s" (and "stderr" for the caller to filter)
    either way."""
    t0 = time.time()
    p = subprocess.Popen([sys.executable, os.path.abspath(script), *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, **env} if env else None)
    try:
        out, err = p.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        timed_out = True
    line = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if timed_out:
        row = {"error": f"timeout after {timeout:.0f} s", "error_kind": "timeout"}
    elif p.returncode or not line:
        kind, msg = classify_failure(err)
        row = {"error": f"{kind}: {msg}" if kind != "OOM" else f"OOM: {msg}", "error_kind": kind}
    else:
        row = json.loads(line[0][len("RESULT "):])
    row["wall_s"] = time.time() - t0
    row["stderr"] = err
    return row


def one_argv(args, variant: str, batch: int, seq: int) -> list[str]:
    """The --one command line for `variant` at batch x seq, carrying this invocation's settings."""
    argv = ["--one", variant, "--model", args.model, "--batch", str(batch), "--seq", str(seq),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    for flag, val in (("--mode", args.mode), ("--profile", getattr(args, "profile", None)),
                      ("--fake-oom-tokens", args.fake_oom_tokens)):
        if val:
            argv += [flag, str(val)]
    for flag, on in (("--tiny", args.tiny), ("--no-phases", args.no_phases),
                     ("--checkpointing", getattr(args, "checkpointing", False))):
        if on:
            argv.append(flag)
    return argv


def drive(args) -> list[dict]:
    rows = []
    for rep in range(args.repeat):  # round robin: a drift of the machine reaches every variant alike
        for v in args.variants.split(","):
            row = run_variant(one_argv(args, v, args.batch, args.seq), args.timeout)
            stderr = row.pop("stderr")
            row = {"variant": v, **row, "model": args.model, "batch": args.batch, "seq": args.seq}
            if args.repeat > 1:
                row["repeat"] = rep
            rows.append(row)
            print(f"{v}: {row} ({row['wall_s']:.0f} s)", flush=True)
            if stderr and v == "ours" and rep == 0:
                print("\n".join(x for x in stderr.splitlines() if "graph" in x or "near miss" in x)[:4000])
    if args.repeat > 1:
        rows = combine_repeats(rows)
    ind = next((r for r in rows if r["variant"] == "inductor" and "first_step_s" in r), None)
    for r in rows:
        if ind and "first_step_s" in r:
            r["first_step_vs_inductor"] = r["first_step_s"] / ind["first_step_s"]
    print("first step (compile included), s: " + ", ".join(
        f"{r['variant']} {r['first_step_s']:.1f}" + (f" ({r['first_step_vs_inductor']:.2f}x inductor)"
                                                     if "first_step_vs_inductor" in r else "")
        for r in rows if "first_step_s" in r), flush=True)
    return rows


def combine_repeats(rows: list[dict]) -> list[dict]:
    """One row per variant from its repeated runs: median tokens/s and step, their range, the runs kept in "runs".
    The first run's first step is the compile time (later runs find the kernels compiled)."""
    out = []
    for v in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == v]
        ok = [r for r in runs if "tokens/s" in r]
        if not ok:
            out.append({**runs[0], "runs": runs})
            continue
        tps = sorted(r["tokens/s"] for r in ok)
        out.append({**ok[0], "tokens/s": statistics.median(tps), "tokens/s_min": tps[0], "tokens/s_max": tps[-1],
                    "step_ms": statistics.median(r["step_ms"] for r in ok),
                    "peak_GiB": max(r["peak_GiB"] for r in ok) if ok[0].get("peak_GiB") is not None else None,
                    "n_runs": len(ok), "runs": runs})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b", choices=list(MODELS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--mode", default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--one", default=None)
    ap.add_argument("--profile", default=None, help="directory: write a one-step kernel profile per variant there")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per variant (its process is killed after)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--no-phases", action="store_true", help="skip the extra step that measures per-phase peaks")
    ap.add_argument("--checkpointing", action="store_true", help="HF gradient checkpointing on (non-reentrant)")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fake-oom-tokens", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=1, help="run the variant list this many times, round robin; the "
                    "table gives each variant's median tokens/s and range")
    ap.add_argument("--name", default=None, help="results file name (default e2e_<model>_<b>x<t>[_<mode>])")
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    rows = drive(args)
    from common import write_results  # noqa: PLC0415

    name = args.name or (f"e2e_{args.model}_{args.batch}x{args.seq}" + (f"_{args.mode}" if args.mode else "")
                         + ("_checkpointing" if args.checkpointing else ""))
    cols = ["variant", "tokens/s", "peak_GiB", "step_ms", "first_step_s", "first_step_vs_inductor", "first_loss",
            "peak_fwd_GiB", "peak_bwd_GiB", "peak_opt_GiB"]
    cols += ["attention_ms_per_layer", "gpu_ms"] if args.profile else []
    cols += ["tokens/s_min", "tokens/s_max", "n_runs"] if args.repeat > 1 else []
    cols += ["error"]
    title = f"Training step, {args.model} shape, {args.batch} x {args.seq}, bf16" + (
        ", gradient checkpointing" if args.checkpointing else "") + (" (TINY, CPU check)"
                                                                                    if args.tiny else "")
    print(write_results(args.out, name, title, rows, cols))
    try:
        from summary import anchor_rows, config_name, e2e_chart  # noqa: PLC0415

        config = config_name(args.model, args.batch, args.seq, args.mode)
        anchors = [] if args.tiny or args.device != "cuda" else anchor_rows(config)
        e2e_chart(os.path.join(args.out, name + ".png"), title + (" (anchors hatched)" if anchors else ""),
                  [config], {config: anchors + rows})
    except Exception as e:  # the chart never costs the results written above
        print(f"chart not written: {e!r}")


if __name__ == "__main__":
    main()
