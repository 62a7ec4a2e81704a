"""End-to-end training steps on one GPU: eager, Inductor, Liger-Kernel, Liger-Kernel + Inductor, backend="liger".

    python bench/bench_e2e.py --model llama-1b --batch 4 --seq 4096 --variants eager,inductor,liger_kernel,ours
    python bench/bench_e2e.py ... --one VARIANT        (what the driver runs: one process per variant)

Settings follow ../shared/ANCHORS.md: random init (seed 0), bf16 parameters, SDPA attention,
`model(input_ids=ids, labels=ids).loss.backward()` then `AdamW(fused=True).step()`, 3 warm-up steps, median of
the timed steps. Prints tokens/s, peak memory, first-step (compile) time and first loss per variant, and writes
e2e_<model>_<b>x<t>.md/.json into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

MODELS = {
    "llama-1b": ("LlamaConfig", "LlamaForCausalLM", "llama", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, use_cache=False,
        max_position_embeddings=131072)),
    "qwen2-1.5b": ("Qwen2Config", "Qwen2ForCausalLM", "qwen2", dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, tie_word_embeddings=True, use_cache=False, max_position_embeddings=131072)),
}
VARIANTS = ["eager", "inductor", "liger_kernel", "liger_kernel_inductor", "ours"]


def build(model: str):
    import transformers  # noqa: PLC0415

    cfg_name, cls_name, family, kwargs = MODELS[model]
    cfg = getattr(transformers, cfg_name)(**kwargs, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = getattr(transformers, cls_name)(cfg).to(torch.bfloat16)
    return m, family


def run_one(args) -> dict:
    variant = args.one
    if variant.startswith("liger_kernel"):
        import liger_kernel.transformers as lk  # noqa: PLC0415

        family = MODELS[args.model][2]
        getattr(lk, f"apply_liger_kernel_to_{family}")()
    model, _ = build(args.model)
    model.train()
    run = model
    if variant in ("inductor", "liger_kernel_inductor"):
        run = torch.compile(model, mode=args.mode)
    elif variant == "ours":
        import liger_compile  # noqa: PLC0415, F401

        report = liger_compile.Report()
        opts = {"report": report}
        run = torch.compile(model, backend="liger", **({"mode": args.mode} if args.mode else {"options": opts}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda", generator=g)
    times, losses = [], []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    step = statistics.median(times[args.warmup:])
    peak = torch.cuda.max_memory_allocated() / 2**30  # read before phase_peaks resets the counter
    phases = phase_peaks(run, opt, ids)
    if args.profile:
        profile_step(run, opt, ids, f"{args.profile}/profile_{variant}.txt")
    result = {
        "variant": variant, "tokens/s": args.batch * args.seq / step, "step_ms": step * 1e3,
        "peak_GiB": peak, "first_step_s": times[0], "first_loss": losses[0],
        **phases,
    }
    if variant == "ours" and not args.mode:
        result["fused"] = report.counts
        print(report, file=sys.stderr)
    return result


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


def profile_step(run, opt, ids, path):
    """One step under torch.profiler: the kernels that take the time, written to `path`."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(table)


def drive(args) -> list[dict]:
    rows = []
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, "--one", v, "--model", args.model, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        if args.mode:
            cmd += ["--mode", args.mode]
        if args.profile:
            cmd += ["--profile", args.profile]
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            err = (p.stderr.strip().splitlines() or ["?"])[-1][:200]
            oom = "OutOfMemoryError" in p.stderr or "out of memory" in p.stderr
            rows.append({"variant": v, "error": "OOM" if oom else err})
        else:
            rows.append(json.loads(line[0][len("RESULT "):]))
        print(f"{v}: {rows[-1]} ({time.time() - t0:.0f} s)", flush=True)
        if p.stderr and v == "ours":
            print("\n".join(l for l in p.stderr.splitlines() if "graph" in l or "near miss" in l)[:4000])
    return rows


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
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    rows = drive(args)
    from common import write_results  # noqa: PLC0415

    name = f"e2e_{args.model}_{args.batch}x{args.seq}" + (f"_{args.mode}" if args.mode else "")
    cols = ["variant", "tokens/s", "peak_GiB", "step_ms", "first_step_s", "first_loss", "peak_fwd_GiB",
            "peak_bwd_GiB", "peak_opt_GiB", "error"]
    print(write_results(args.out, name, f"Training step, {args.model} shape, {args.batch} x {args.seq}, bf16",
                        rows, cols))


if __name__ == "__main__":
    main()
