"""Kernel benchmarks on one CUDA GPU: HF eager, torch.compile (Inductor) of the same code, Liger-Kernel, ours.

    python bench/bench_kernels.py [--only rms_norm,add_rms_norm,rotary,gated_mlp,linear_cross_entropy,layer_norm]
        [--out bench/results]

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
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import bar_chart, extra_peak_gib, graph_ms, kernel_ms, median_ms, write_results  # noqa: E402

DT = torch.bfloat16
DEV = "cuda"


def _liger(name):
    try:
        import liger_kernel  # noqa: F401, PLC0415
    except ImportError:
        return None
    return name


def _show_fusions(fn, *inputs):
    """Prints what backend="liger" fuses in fn (so a table row for ours_backend is known to be ours)."""
    import liger_compile  # noqa: PLC0415

    print(liger_compile.explain(fn, *inputs), flush=True)


# --- cases: each returns (inputs, params needing grad, {variant: fn(*inputs)}, floor) ----------------------------
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
        variants["liger"] = (lg, [x, lg.weight])
    _show_fusions(hf, x)
    # fwd: read x, write y; bwd: read dy and x, write dx (weight and rstd are negligible)
    return [x], [x, hf.weight], variants, {"bytes": 5 * n * d * 2}


def case_add_rms_norm():
    """A decoder's residual add feeding its RMSNorm: `h = residual + branch_out; normed = norm(h)`, h kept (it is
    the next residual), so every variant returns both."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: PLC0415

    import liger_compile.kernels.add_rms_norm  # noqa: F401, PLC0415

    n, d = 16384, 4096
    x = torch.randn(n, d, device=DEV, dtype=DT, requires_grad=True)
    residual = torch.randn(n, d, device=DEV, dtype=DT, requires_grad=True)
    hf = LlamaRMSNorm(d, eps=1e-5).to(DEV, DT)
    hf.weight.data.normal_(1.0, 0.1)

    def hf_block(x, residual):
        h = residual + x
        return h, hf(h)

    variants = {
        "hf_eager": hf_block,
        "inductor": torch.compile(hf_block),
        "ours": lambda x, r: torch.ops.liger.add_rms_norm(x, r, hf.weight, 1e-5, 0.0, True)[:2],
        "ours_backend": torch.compile(hf_block, backend="liger"),
    }
    if _liger("fused_add_rms_norm"):
        try:  # not in every Liger-Kernel release
            from liger_kernel.transformers.fused_add_rms_norm import LigerFusedAddRMSNorm  # noqa: PLC0415
        except ImportError:
            print("add_rms_norm/liger: this Liger-Kernel has no fused add + RMSNorm; skipped", flush=True)
        else:
            lg = LigerFusedAddRMSNorm(d, eps=1e-5).to(DEV, DT)  # returns (normed, sum)
            lg.weight.data.copy_(hf.weight.data)
            variants["liger"] = (lg, [x, residual, lg.weight])
    _show_fusions(hf_block, x, residual)
    # fwd: read x and residual, write the sum and y; bwd: read dy, the sum's gradient and the sum, write dx (the
    # gradient of both addends: one tensor); weight and rstd are negligible
    return [x, residual], [x, residual, hf.weight], variants, {"bytes": 8 * n * d * 2}


def case_rotary():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: PLC0415

    import liger_compile.kernels.rotary  # noqa: F401, PLC0415

    b, t, hq, hk, d = 4, 4096, 32, 8, 128
    # as HF makes them: views of the projections, transposed to [B, H, T, D]
    q = torch.randn(b, t, hq, d, device=DEV, dtype=DT).transpose(1, 2).requires_grad_()
    k = torch.randn(b, t, hk, d, device=DEV, dtype=DT).transpose(1, 2).requires_grad_()
    pos = torch.arange(t, device=DEV, dtype=torch.float32)
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=DEV, dtype=torch.float32) / d))
    emb = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)[None]
    cos, sin = emb.cos().to(DT), emb.sin().to(DT)
    variants = {
        "hf_eager": lambda q, k: apply_rotary_pos_emb(q, k, cos, sin),
        "inductor": torch.compile(lambda q, k: apply_rotary_pos_emb(q, k, cos, sin)),
        "ours": lambda q, k: torch.ops.liger.rotary(q, k, cos, sin, 1),
        "ours_backend": torch.compile(lambda q, k: apply_rotary_pos_emb(q, k, cos, sin), backend="liger"),
    }
    if _liger("rope"):
        from liger_kernel.transformers.rope import liger_rotary_pos_emb  # noqa: PLC0415

        variants["liger"] = lambda q, k: liger_rotary_pos_emb(q, k, cos, sin)
    _show_fusions(lambda q, k: apply_rotary_pos_emb(q, k, cos, sin), q, k)
    return [q, k], [q, k], variants, {"bytes": 4 * (q.numel() + k.numel()) * 2}


def case_gated_mlp():
    import liger_compile.kernels.gated_mlp  # noqa: F401, PLC0415

    n, f = 16384, 14336
    a = torch.randn(n, f, device=DEV, dtype=DT, requires_grad=True)
    b = torch.randn(n, f, device=DEV, dtype=DT, requires_grad=True)

    def hf(a, b):
        return torch.nn.functional.silu(a) * b

    variants = {"hf_eager": hf, "inductor": torch.compile(hf),
                "ours": lambda a, b: torch.ops.liger.gated_mlp(a, b, "silu"),
                "ours_backend": torch.compile(hf, backend="liger")}
    if _liger("swiglu"):
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction  # noqa: PLC0415

        variants["liger"] = LigerSiLUMulFunction.apply
    _show_fusions(hf, a, b)
    # fwd: read a, b, write c; bwd: read dc, a, b, write da, db
    return [a, b], [a, b], variants, {"bytes": 8 * n * f * 2}


def case_linear_cross_entropy():
    import torch.nn.functional as F  # noqa: PLC0415

    import liger_compile.kernels.linear_cross_entropy  # noqa: F401, PLC0415

    n, h, v = 16384, 4096, 128256
    x = (torch.randn(n, h, device=DEV, dtype=DT) * 0.5).requires_grad_()
    w = (torch.randn(v, h, device=DEV, dtype=DT) * 0.02).requires_grad_()
    labels = torch.randint(0, v, (n,), device=DEV)
    labels[::7] = -100  # one in seven ignored

    def hf(x, w):  # written as HF's loss writes it (.view(-1, V)), so backend="liger" recognises it
        return F.cross_entropy(F.linear(x, w).float().view(-1, v), labels, ignore_index=-100)

    variants = {"hf_eager": hf, "inductor": torch.compile(hf),
                "ours": lambda x, w: torch.ops.liger.linear_cross_entropy(x, w, None, labels, None, -100, 0.0, 0.0,
                                                                         "mean")[0],
                "ours_backend": torch.compile(hf, backend="liger")}
    if _liger("flce"):
        from liger_kernel.transformers.fused_linear_cross_entropy import (  # noqa: PLC0415
            LigerFusedLinearCrossEntropyLoss,
        )

        lce = LigerFusedLinearCrossEntropyLoss()
        variants["liger"] = lambda x, w: lce(w, x, labels)
    _show_fusions(hf, x, w)
    return [x, w], [x, w], variants, {"flops": 3 * 2 * n * h * v}


def case_layer_norm():
    """nn.LayerNorm with weight and bias (GPT-NeoX, Phi, StableLM, OPT), at the other cases' rows and width."""
    import liger_compile.kernels.layer_norm  # noqa: F401, PLC0415

    n, d = 16384, 4096
    x = torch.randn(n, d, device=DEV, dtype=DT, requires_grad=True)
    hf = torch.nn.LayerNorm(d, eps=1e-5).to(DEV, DT)
    hf.weight.data.normal_(1.0, 0.1)
    hf.bias.data.normal_(0.0, 0.1)
    variants = {
        "hf_eager": hf,
        "inductor": torch.compile(hf),
        "ours": lambda t: torch.ops.liger.layer_norm(t, hf.weight, hf.bias, 1e-5)[0],
        "ours_backend": torch.compile(hf, backend="liger"),
    }
    if _liger("layer_norm"):
        from liger_kernel.transformers.layer_norm import LigerLayerNorm  # noqa: PLC0415

        lg = LigerLayerNorm(d, eps=1e-5, bias=True).to(DEV, DT)
        lg.weight.data.copy_(hf.weight.data)
        lg.bias.data.copy_(hf.bias.data)
        variants["liger"] = (lg, [x, lg.weight, lg.bias])
    _show_fusions(hf, x)
    # fwd: read x, write y; bwd: read dy and x, write dx (weight, bias, mean and rstd are negligible)
    return [x], [x, hf.weight, hf.bias], variants, {"bytes": 5 * n * d * 2}


# kernel module -> its case, in the table's order
CASES = {"rms_norm": case_rms_norm, "add_rms_norm": case_add_rms_norm, "rotary": case_rotary,
         "gated_mlp": case_gated_mlp, "linear_cross_entropy": case_linear_cross_entropy,
         "layer_norm": case_layer_norm}


def untimed_kernels() -> list[str]:
    """The kernel modules of the op registry (liger_compile.kernels._op.all_ops) that no case here times."""
    from liger_compile.kernels._op import all_ops  # noqa: PLC0415

    modules = {op.module.split(".")[2] for op in all_ops().values()}  # liger_compile.kernels.<module>[.<part>]
    return sorted(modules - set(CASES))


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
    ap.add_argument("--only", default=",".join(CASES))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    for name in untimed_kernels():
        print(f"bench_kernels: no case times kernels/{name}", file=sys.stderr, flush=True)
    rows = []
    for name in args.only.split(","):
        rows += run_case(name, CASES[name])
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
