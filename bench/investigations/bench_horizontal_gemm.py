"""Horizontal GEMMs: do q/k/v (and gate/up) projections of one input run faster as one matmul?

    python bench/investigations/bench_horizontal_gemm.py [--out DIR]

For each shape (Llama-3.2-1B and Qwen2-1.5B projections, 4 x 4096 tokens, bf16), forward + backward of:
- separate: one matmul per projection (what the model runs; k/v are narrow GEMMs);
- cat per step: the weights concatenated at every call, one matmul, the output split (what a graph rewrite that
  leaves the user's parameters separate would run; autograd hands each weight its slice of the gradient);
- concatenated: one weight held concatenated (the ceiling, without the copy).
GPU time from the profiler (kernels only) and wall time by do_bench; every variant's outputs and gradients are
checked against the separate one first. Writes horizontal_gemm.md/.json/.png. `--check` runs only that check, on
CPU too (small shapes).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# name: (hidden, [output widths of the projections of one input])
SHAPES = {
    "llama-1b q/k/v": (2048, [2048, 512, 512]),
    "llama-1b gate/up": (2048, [8192, 8192]),
    "qwen2-1.5b q/k/v": (1536, [1536, 256, 256]),
    "qwen2-1.5b gate/up": (1536, [8960, 8960]),
}


def separate(x, weights):
    return [x @ w.t() for w in weights]


def cat_per_step(x, weights):
    out = x @ torch.cat(weights).t()
    return list(out.split([w.shape[0] for w in weights], dim=-1))


def concatenated(x, weight, widths):
    return list((x @ weight.t()).split(widths, dim=-1))


def setup(hidden, widths, tokens, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g).requires_grad_()
    weights = [(torch.randn(n, hidden, device=device, dtype=dtype, generator=g) / hidden**0.5).requires_grad_()
               for n in widths]
    whole = torch.cat([w.detach() for w in weights]).requires_grad_()
    grads = [torch.randn(tokens, n, device=device, dtype=dtype, generator=g) for n in widths]
    return x, weights, whole, grads


def step(fn, x, params, grads):
    """forward + backward: the outputs' gradients given, every input's gradient computed."""
    outs = fn()
    torch.autograd.grad(outs, [x, *params], grads)


def check(hidden, widths, tokens, device, dtype, tol):
    x, weights, whole, grads = setup(hidden, widths, tokens, device, dtype)
    ref = torch.autograd.grad(separate(x, weights), [x, *weights], grads)
    got = torch.autograd.grad(cat_per_step(x, weights), [x, *weights], grads)
    whole_got = torch.autograd.grad(concatenated(x, whole, widths), [x, whole], grads)
    def close(a, b):  # bf16 rounds each sum in a different order: an error of a few ulps of the largest value
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())

    for a, b in zip(got, ref):
        close(a, b)
    close(whole_got[0], ref[0])
    close(whole_got[1], torch.cat(ref[1:]))


def measure(tokens: int) -> list[dict]:
    from triton.testing import do_bench  # noqa: PLC0415

    from common import kernel_ms  # noqa: PLC0415

    rows = []
    for name, (hidden, widths) in SHAPES.items():
        check(hidden, widths, 1024, "cuda", torch.bfloat16, 2e-2)
        x, weights, whole, grads = setup(hidden, widths, tokens, "cuda", torch.bfloat16)
        variants = {
            "separate": (lambda: separate(x, weights), weights),
            "cat per step": (lambda: cat_per_step(x, weights), weights),
            "concatenated": (lambda: concatenated(x, whole, widths), [whole]),
        }
        base = None
        for variant, (fn, params) in variants.items():
            run = (lambda fn=fn, params=params: step(fn, x, params, grads))
            gpu = kernel_ms(run)
            wall = do_bench(run, warmup=25, rep=200)
            base = base or gpu
            flops = 6 * tokens * hidden * sum(widths)
            rows.append({"shape": name, "variant": variant, "gpu_ms": gpu, "wall_ms": wall,
                         "vs_separate": base / gpu, "TFLOP/s": flops / gpu / 1e9})
            print(rows[-1], flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4 * 4096)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    ap.add_argument("--check", action="store_true", help="only check the variants agree (CPU: small shapes)")
    args = ap.parse_args(argv)
    if args.check:
        for hidden, widths in SHAPES.values():
            check(64, [max(8, n // 64) for n in widths], 32, "cpu", torch.float32, 1e-5)
        print("variants agree")
        return
    from common import bar_chart, write_results  # noqa: PLC0415

    rows = measure(args.tokens)
    title = f"Horizontal GEMMs, forward + backward, {args.tokens} tokens, bf16"
    print(write_results(args.out, "horizontal_gemm", title, rows,
                        ["shape", "variant", "gpu_ms", "wall_ms", "vs_separate", "TFLOP/s"]))
    shapes = list(SHAPES)
    series = {v: [next(r["gpu_ms"] for r in rows if r["shape"] == s and r["variant"] == v) for s in shapes]
              for v in ("separate", "cat per step", "concatenated")}
    bar_chart(os.path.join(args.out, "horizontal_gemm.png"), title, shapes, series, "GPU ms")


if __name__ == "__main__":
    main()
