"""Kernel benchmarks on one CUDA GPU: HF eager, torch.compile (Inductor) of the same code, Liger-Kernel, ours.

    python bench/bench_kernels.py [--only rms_norm,add_rms_norm,...] [--out bench/results]

One case per kernel, each in bench/kernel_cases/<kernel>.py (found there: a new kernel adds a file, not an edit here).

Shapes are Llama-3-8B's at 16,384 tokens, bf16. For each variant: forward,
backward (= fwd+bwd minus fwd) and fwd+bwd median ms (triton.testing.do_bench), the extra peak memory of one
fwd+bwd call, and fwd+bwd GB/s over the minimal bytes (or TFLOP/s for the matmul-bound lm_head+CE). Two clocks:
`*_ms` are CUDA-event medians (wall time of a call, launch overhead included); `gpu_*_ms` sum the kernels' own
durations (torch.profiler), which is what a kernel costs inside a busy training step; `graph_*_ms` replay the call
from a CUDA graph (no Python or launch overhead; NaN where a variant cannot be captured). `extra_beyond_grads_gib`
is the extra peak minus the gradients' own size (what the op needs beyond its results).
Writes kernels.md / kernels.json / kernels.png into --out.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import bar_chart, extra_peak_gib, graph_ms, kernel_ms, median_ms, write_results  # noqa: E402

def cases() -> dict:
    """kernel name -> its case() from bench/kernel_cases/, in the table's order (each module's ORDER)."""
    import kernel_cases  # noqa: PLC0415

    modules = [importlib.import_module(f"kernel_cases.{info.name}") for info in pkgutil.iter_modules(
        kernel_cases.__path__) if not info.name.startswith("_")]
    return {m.__name__.split(".")[-1]: m.case for m in sorted(modules, key=lambda m: (m.ORDER, m.__name__))}


def untimed_kernels() -> list[str]:
    """The kernel modules of the op registry (liger_compile.kernels._op.all_ops) that no case here times."""
    from liger_compile.kernels._op import all_ops  # noqa: PLC0415

    modules = {op.module.split(".")[2] for op in all_ops().values()}  # liger_compile.kernels.<module>[.<part>]
    return sorted(modules - set(cases()))


def run_case(name, make):
    inputs, params, variants, floor = make()
    rows = []
    for vname, fn in variants.items():
        fn, vparams = fn if isinstance(fn, tuple) else (fn, params)
        y = fn(*inputs)
        ys = y if isinstance(y, tuple) else (y,)
        # made with a CPU generator: a failed CUDA-graph capture of an earlier variant can leave CUDA's RNG unusable
        cpu_gen = torch.Generator().manual_seed(0)
        dys = [torch.ones_like(t) if t.dim() == 0 else
               torch.randn(t.shape, generator=cpu_gen).to(t.device, t.dtype) for t in ys]
        del y, ys

        def fwd():
            return fn(*inputs)

        def fwd_bwd():
            y = fn(*inputs)
            return torch.autograd.grad(y if isinstance(y, tuple) else (y,), vparams, dys)

        # extra memory beyond the gradients themselves (outputs of any variant)
        grads_gib = sum(p.numel() * p.element_size() for p in vparams) / 2**30
        try:
            t_fwd = median_ms(fwd)
            t_both = median_ms(fwd_bwd)
            gpu_fwd, gpu_both = kernel_ms(fwd), kernel_ms(fwd_bwd)
            mem = extra_peak_gib(fwd_bwd)
            graph_fwd, graph_both = graph_ms(fwd), graph_ms(fwd_bwd)  # last: a failed capture may upset state
        except Exception as e:  # one broken variant must not hide the others
            print(f"{name}/{vname}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        row = {"kernel": name, "variant": vname, "fwd_ms": t_fwd, "bwd_ms": t_both - t_fwd, "fwd_bwd_ms": t_both,
               "gpu_fwd_ms": gpu_fwd, "gpu_fwd_bwd_ms": gpu_both, "graph_fwd_ms": graph_fwd,
               "graph_fwd_bwd_ms": graph_both, "extra_peak_gib": mem, "extra_beyond_grads_gib": mem - grads_gib}
        if "bytes" in floor:
            row["GB/s"] = floor["bytes"] / t_both / 1e6
            row["gpu_GB/s"] = floor["bytes"] / gpu_both / 1e6
            row["floor_ms"] = floor["bytes"] / 4.3e12 * 1e3
        if "flops" in floor:
            row["TFLOP/s"] = floor["flops"] / t_both / 1e9
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        del dys
    del inputs, params, variants
    torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    found = cases()
    ap.add_argument("--only", default=",".join(found))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    for name in untimed_kernels():
        print(f"bench_kernels: no case times kernels/{name}", file=sys.stderr, flush=True)
    rows = []
    for name in args.only.split(","):
        rows += run_case(name, found[name])
        torch.cuda.empty_cache()
    cols = ["kernel", "variant", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "gpu_fwd_ms", "gpu_fwd_bwd_ms", "graph_fwd_ms",
            "graph_fwd_bwd_ms", "extra_peak_gib", "extra_beyond_grads_gib", "GB/s", "gpu_GB/s", "TFLOP/s", "floor_ms"]
    md = write_results(args.out, "kernels", "Kernels, forward + backward (bf16, Llama-3-8B shapes, 16k tokens)",
                       rows, cols)
    print(md)
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    series = {v: [next((r["fwd_bwd_ms"] for r in rows if r["kernel"] == k and r["variant"] == v), float("nan"))
                  for k in kernels] for v in variants}
    # normalise per kernel to HF eager so kernels of different sizes share one chart
    speedup = {v: [series["hf_eager"][i] / t if t == t else float("nan") for i, t in enumerate(ts)]
               for v, ts in series.items()} if "hf_eager" in series else series
    bar_chart(os.path.join(args.out, "kernels.png"), "fwd+bwd speed-up over HF eager (higher is better)",
              kernels, speedup, "x HF eager")


if __name__ == "__main__":
    main()
