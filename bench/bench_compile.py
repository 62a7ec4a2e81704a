"""Compile time of a training step: where the first step's seconds go, on a cold start and on a warm restart.

    python bench/bench_compile.py --model llama-1b --batch 4 --seq 4096 --variants inductor,ours [--mode MODE]

For each variant two processes run one after the other over one fresh pair of cache directories
(TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR): the cold start compiles everything, the warm restart (same model,
shapes and machine) should find all of it cached. Each process trains warmup + steps steps as bench_e2e.py does
(random init, bf16, AdamW fused) and reports:
- first step (s) and the steady step (median of the steps after the warm-up), tokens/s;
- Dynamo's compile-time metrics (`torch._dynamo.utils.compile_times`): tracing, our rewrite (`liger_compile.rewrite`),
  AOTAutograd, Inductor's lowering, code generation, the wait for its Triton compiles, C++ builds, autotuning;
- the Triton kernels compiled just in time in the process (our kernels: a launch that missed Triton's in-memory cache)
  and their seconds, and the compiled kernels (.cubin) and C++ objects (.so) the cache directories gained;
- graphs, recompiles (each with the guard that failed), FX-graph and AOTAutograd cache hits and misses.
Variant "ours-no-memo" is ours without the memo of torch's per-call analysis of our Triton kernels (what it saves).
The metrics are Dynamo's own, summed over graphs and threads: nested phases are each counted (AOTAutograd's time
holds Inductor's), and C++ builds run in parallel, so the columns are not parts of the first step that add up.
Writes compile_<model>_<b>x<t>[_<mode>].md/.json/.png into --out. --profile DIR runs each variant's cold start once
more, over fresh caches and under cProfile, and writes its tables to DIR (not timed: the profiler slows it).

Hidden, for checking the driver without a GPU: `--device cpu --tiny`.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from bench_e2e import build, run_variant, timed_steps  # noqa: E402

def compile_context(fn, device) -> dict:
    """What enters Triton's cache key besides the launch's arguments, read when a kernel compiles: the environment
    variables that invalidate the cache, the backend's hash (compiler and ptxas versions, target), Triton's own key,
    and the cache directory the compile will look in. Each part is left out where this Triton has no such thing."""
    import importlib  # noqa: PLC0415

    out = {}
    readers = {
        "env": lambda: importlib.import_module("triton._C.libtriton").get_cache_invalidating_env_vars(),
        "backend": lambda: fn.device_caches[device][3].hash(),
        "triton_key": lambda: importlib.import_module("triton.compiler.compiler").triton_key(),
        "cache_dir": lambda: importlib.import_module("triton").knobs.cache.dir,
    }
    for name, read in readers.items():
        try:
            out[name] = read()
        except Exception:  # noqa: BLE001 - a diagnostic: a Triton without the part simply does not report it
            pass
    return out


class JitCompiles:
    """Counts and times Triton's just-in-time compiles in this process (a launch of a @triton.jit kernel whose
    specialisation is not in the in-memory cache: compiled, or loaded from the disk cache)."""

    def __init__(self):
        from triton.runtime.jit import JITFunction  # noqa: PLC0415

        self.calls: dict[str, list[float]] = {}
        self.keys: dict[str, list[dict]] = {}
        self.contexts: dict[str, list[dict]] = {}
        original = JITFunction._do_compile
        names = list(inspect.signature(original).parameters)[1:]  # key, signature, device, constexprs, ...

        def timed(fn, *args, **kwargs):
            t0 = time.perf_counter()
            context = compile_context(fn, dict(zip(names, args), **kwargs).get("device"))
            kernel = None
            try:
                kernel = original(fn, *args, **kwargs)
                return kernel
            finally:
                self.calls.setdefault(fn.__name__, []).append(time.perf_counter() - t0)
                # what goes into Triton's cache key, by part: a warm restart that compiles again differs in one;
                # "hash" is the key Triton computed (its cache directory's name), the context what else enters it
                parts = {**dict(zip(names, args)), **kwargs, "source": getattr(fn, "cache_key", None), **context,
                         "hash": getattr(kernel, "hash", None)}
                self.keys.setdefault(fn.__name__, []).append(
                    {k: hashlib.sha1(repr(v).encode()).hexdigest()[:10] for k, v in parts.items() if k != "device"})
                self.contexts.setdefault(fn.__name__, []).append({k: repr(v)[:300] for k, v in context.items()})

        JITFunction._do_compile = timed

    def summary(self) -> dict:
        try:
            from triton._C.libtriton import get_cache_invalidating_env_vars  # noqa: PLC0415

            env = get_cache_invalidating_env_vars()
        except Exception as e:
            env = repr(e)
        return {"jit_cache_key_parts": self.keys, "jit_compile_context": self.contexts, "jit_env": env,
                "jit_compiles": sum(len(v) for v in self.calls.values()),
                "jit_s": sum(sum(v) for v in self.calls.values()),
                "jit_kernels": {k: [len(v), round(sum(v), 3)] for k, v in sorted(self.calls.items())}}


def without_kernel_memo() -> list[str]:
    """Variant "ours-no-memo": ours without liger_compile/kernel_analysis.py's memo of torch's analysis of our
    kernels' calls (what the memo saves in a cold compile)."""
    from liger_compile import kernel_analysis  # noqa: PLC0415

    kernel_analysis.install = lambda: ()
    return ["kernel_analysis.install"]


def cache_files(dirs: list[str]) -> dict[str, int]:
    """Compiled artefacts under the cache directories: GPU binaries and C++ shared objects."""
    n = {"cubin": 0, "so": 0}
    for d in dirs:
        for _, _, files in os.walk(d):
            for f in files:
                ext = f.rsplit(".", 1)[-1]
                if ext in n:
                    n[ext] += 1
    return n


def run_one(args) -> dict:
    import torch  # noqa: PLC0415
    from torch._dynamo.utils import counters  # noqa: PLC0415

    from common import compile_phases, recompiles  # noqa: PLC0415

    cuda = args.device == "cuda"
    dirs = [os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"]]
    files_before = cache_files(dirs)
    jit = JitCompiles() if cuda else None
    model, _ = build(args.model, args.device, args.tiny)
    model.train()
    report = None
    patched = without_kernel_memo() if args.one == "ours-no-memo" else []
    if args.one == "inductor":
        run = torch.compile(model, mode=args.mode)
    else:
        import liger_compile  # noqa: PLC0415

        report = liger_compile.Report()
        run = torch.compile(model, backend="liger", mode=args.mode, options={"report": report})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    g = torch.Generator(device=args.device).manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=args.device, generator=g)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    profiler = None
    if args.cprofile:  # Python's profiler over the whole run (the first step's compile is nearly all of it)
        import cProfile  # noqa: PLC0415

        profiler = cProfile.Profile()
        profiler.enable()
    times, losses = timed_steps(run, opt, ids, args.warmup + args.steps, sync)
    if profiler is not None:
        profiler.disable()
        write_profile(profiler, args.cprofile)
    step = statistics.median(times[args.warmup:]) if args.steps else times[-1]
    files_after = cache_files(dirs)
    n_recompiles, reasons = recompiles()
    row = {
        "first_step_s": times[0], "step_ms": step * 1e3, "tokens/s": args.batch * args.seq / step,
        "first_loss": losses[0].item(),
        **compile_phases(),
        "graphs": counters["stats"]["unique_graphs"], "recompiles": n_recompiles, "recompile_reasons": reasons,
        "fx_hit": counters["inductor"].get("fxgraph_cache_hit", 0),
        "fx_miss": counters["inductor"].get("fxgraph_cache_miss", 0),
        "fx_bypass": counters["inductor"].get("fxgraph_cache_bypass", 0),
        "aot_hit": counters["aot_autograd"].get("autograd_cache_hit", 0),
        "aot_miss": counters["aot_autograd"].get("autograd_cache_miss", 0),
        "new_cubin": files_after["cubin"] - files_before["cubin"], "new_so": files_after["so"] - files_before["so"],
    }
    if jit is not None:
        row.update(jit.summary())
    if report is not None:
        row["fused"] = report.counts
    if patched:
        row["patched"] = patched
    return row


def write_profile(profiler, path: str):
    """The profile's 70 largest cumulative and 40 largest own times, as text (pstats' table)."""
    import io  # noqa: PLC0415
    import pstats  # noqa: PLC0415

    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("cumulative").print_stats(70)
    stats.sort_stats("tottime").print_stats(40)
    with open(path, "w") as f:
        f.write(text.getvalue())


def child_argv(args, variant: str) -> list[str]:
    argv = ["--one", variant, "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    argv += ["--mode", args.mode] if args.mode else []
    argv += ["--tiny"] if args.tiny else []
    return argv


def fresh_caches(variant: str, cache_root: str | None) -> tuple[str, dict]:
    """A new pair of empty cache directories under one root, and the environment that points a process at them."""
    root = tempfile.mkdtemp(prefix=f"compile_{variant}_", dir=cache_root)
    return root, {"TORCHINDUCTOR_CACHE_DIR": os.path.join(root, "inductor"),
                  "TRITON_CACHE_DIR": os.path.join(root, "triton"),
                  "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}


def drive(args) -> list[dict]:
    rows = []
    for variant in args.variants.split(","):
        root, env = fresh_caches(variant, args.cache_root)
        for start in ("cold", "warm"):
            row = run_variant(child_argv(args, variant), args.timeout, script=os.path.abspath(__file__), env=env)
            stderr = row.pop("stderr")
            row = {"variant": variant, "start": start, **row}
            rows.append(row)
            brief = {k: v for k, v in row.items() if k not in ("compile_times", "jit_kernels", "recompile_reasons")}
            print(f"{variant} {start}: {brief}", flush=True)
            if "error" in row:
                print(stderr[-3000:], flush=True)
                break
        shutil.rmtree(root, ignore_errors=True)
        if args.profile:  # a third process, cold again over fresh caches, under the profiler (not in the table)
            root, env = fresh_caches(variant, args.cache_root)
            path = os.path.join(args.profile, f"compile_profile_{variant}_cold.txt")
            row = run_variant(child_argv(args, variant) + ["--cprofile", path], args.timeout,
                              script=os.path.abspath(__file__), env=env)
            print(f"{variant} cold, profiled: first step {row.get('first_step_s')} s, profile in {path}"
                  + (f" ({row['error']})" if "error" in row else ""), flush=True)
            shutil.rmtree(root, ignore_errors=True)
    cold = {r["variant"]: r for r in rows if r["start"] == "cold" and "first_step_s" in r}
    for r in rows:
        if "inductor" in cold and "first_step_s" in r:
            r["first_step_vs_inductor_cold"] = r["first_step_s"] / cold["inductor"]["first_step_s"]
    return rows


def key_differences(rows: list[dict]) -> list[str]:
    """For each kernel compiled just in time in both the cold and the warm process of a variant: the parts of
    Triton's cache key whose values differ between the two (the reason a warm restart compiled it again)."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        runs = {r["start"]: r.get("jit_cache_key_parts") for r in rows if r["variant"] == variant}
        cold, warm = runs.get("cold") or {}, runs.get("warm") or {}
        for kernel in sorted(set(cold) & set(warm)):
            differ = sorted({part for a in cold[kernel] for b in warm[kernel] for part in a if a[part] != b.get(part)}
                            if not any(a == b for a in cold[kernel] for b in warm[kernel]) else set())
            out.append(f"- {variant} {kernel}: " + (f"cache key differs cold vs warm in {differ}" if differ
                                                      else "a compile of the cold process has the same key"))
    return out


def chart(path: str, title: str, rows: list[dict]):
    from common import bar_chart  # noqa: PLC0415

    ok = [r for r in rows if "first_step_s" in r]
    groups = [f"{r['variant']} {r['start']}" for r in ok]
    series = {"first step": [r["first_step_s"] for r in ok],
              "Dynamo tracing": [r["dynamo_s"] for r in ok],
              "backend (rewrite + AOT + Inductor)": [r["backend_s"] for r in ok],
              "Triton JIT in the step": [r.get("jit_s", 0.0) for r in ok]}
    bar_chart(path, title, groups, series, "seconds")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mode", default=None, help="torch.compile mode for both variants, e.g. max-autotune")
    ap.add_argument("--variants", default="inductor,ours")
    ap.add_argument("--one", default=None)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per process")
    ap.add_argument("--cache-root", default=None, help="where the fresh cache directories are made (default: tmp)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--name", default=None)
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="also run each variant's cold start under cProfile; its tables go to "
                         "DIR/compile_profile_<variant>_cold.txt")
    ap.add_argument("--cprofile", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    rows = drive(args)
    from common import COMPILE_PHASES, write_results  # noqa: PLC0415

    name = args.name or f"compile_{args.model}_{args.batch}x{args.seq}" + (f"_{args.mode}" if args.mode else "")
    cols = ["variant", "start", "first_step_s", "first_step_vs_inductor_cold", "step_ms", "tokens/s"]
    cols += [c for c, _ in COMPILE_PHASES] + ["jit_compiles", "jit_s", "new_cubin", "new_so", "graphs", "recompiles",
                                      "fx_hit", "fx_miss", "aot_hit", "aot_miss", "error"]
    title = f"Compile time, {args.model} shape, {args.batch} x {args.seq}, bf16" + (
        f", mode={args.mode}" if args.mode else "") + (" (TINY, CPU check)" if args.tiny else "")
    notes = "\n".join(f"- {r['variant']} {r['start']}: recompiles: {r['recompile_reasons']}"
                      for r in rows if r.get("recompile_reasons"))
    notes += "\n" + "\n".join(f"- {r['variant']} {r['start']}: just-in-time Triton compiles (count, s): "
                              f"{r['jit_kernels']}" for r in rows if r.get("jit_kernels"))
    notes += "\n" + "\n".join(key_differences(rows))
    print(write_results(args.out, name, title, rows, cols, notes=notes))
    try:
        chart(os.path.join(args.out, name + ".png"), title, rows)
    except Exception as e:  # the chart never costs the results written above
        print(f"chart not written: {e!r}")


if __name__ == "__main__":
    main()
