"""Kernel benchmarks on one CUDA GPU: HF eager, torch.compile (Inductor) of the same code, Liger-Kernel, ours.

    python bench/bench_kernels.py [--only rms_norm,rotary,gated_mlp,linear_cross_entropy] [--out bench/results]

Shapes are Llama-3-8B's at 16,384 tokens, bf16 (see ../shared/ANCHORS.md). For each variant: forward,
backward (= fwd+bwd minus fwd) and fwd+bwd median ms (triton.testing.do_bench), the extra peak memory of one
fwd+bwd call, and fwd+bwd GB/s over the minimal bytes (or TFLOP/s for the matmul-bound lm_head+CE).
Writes kernels.md / kernels.json / kernels.png into --out.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import bar_chart, extra_peak_gib, median_ms, write_results  # noqa: E402

DT = torch.bfloat16
DEV = "cuda"


def _liger(name):
    try:
        import liger_kernel  # noqa: F401, PLC0415
    except ImportError:
        return None
    return name


# --- cases: each returns (inputs needing grad, {variant: forward fn}, minimal bytes or flops) -----------------
def case_rms_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: PLC0415

    import liger_compile.kernels.rms_norm  # noqa: F401, PLC0415

    n, d = 16384, 4096
    x = torch.randn(n, d, device=DEV, dtype=DT, requires_grad=True)
    hf = LlamaRMSNorm(d, eps=1e-5).to(DEV, DT)
    hf.weight.data.normal_(1.0, 0.1)
    variants = {
        "hf_eager": hf,
        "inductor": torch.compile(hf),
        "ours": lambda t: torch.ops.liger.rms_norm(t, hf.weight, 1e-5, 0.0, True)[0],
        "ours_backend": torch.compile(hf, backend="liger"),
    }
    if _liger("rms"):
        from liger_kernel.transformers.rms_norm import LigerRMSNorm  # noqa: PLC0415

        lg = LigerRMSNorm(d, eps=1e-5).to(DEV, DT)
        lg.weight.data.copy_(hf.weight.data)
        variants["liger"] = lg
    # fwd: read x, write y; bwd: read dy and x, write dx (weight and rstd are negligible)
    return [x, hf.weight], variants, {"bytes": 5 * n * d * 2}


CASES = {"rms_norm": case_rms_norm}


def run_case(name, make):
    inputs, variants, floor = make()
    out = next(iter(variants.values()))(inputs[0])
    dy = torch.randn_like(out) if out.dim() else torch.ones_like(out)
    rows = []
    for vname, fn in variants.items():
        try:
            fwd = median_ms(lambda: fn(inputs[0]))
            both = median_ms(lambda: fn(inputs[0]).backward(dy), grad_to_none=inputs)
            mem = extra_peak_gib(lambda: fn(inputs[0]).backward(dy))
        except Exception as e:  # one broken variant must not hide the others
            print(f"{name}/{vname}: FAILED {type(e).__name__}: {str(e)[:300]}")
            continue
        row = {"kernel": name, "variant": vname, "fwd_ms": fwd, "bwd_ms": both - fwd, "fwd_bwd_ms": both,
               "extra_peak_gib": mem}
        if "bytes" in floor:
            row["GB/s"] = floor["bytes"] / both / 1e6
            row["floor_ms"] = floor["bytes"] / 4.3e12 * 1e3
        if "flops" in floor:
            row["TFLOP/s"] = floor["flops"] / both / 1e9
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        for p in inputs:
            p.grad = None
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(CASES))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    rows = []
    for name in args.only.split(","):
        rows += run_case(name, CASES[name])
        torch.cuda.empty_cache()
    cols = ["kernel", "variant", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "extra_peak_gib", "GB/s", "TFLOP/s", "floor_ms"]
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
