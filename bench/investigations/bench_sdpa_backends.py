"""Causal attention on Hopper: which kernel is fastest at the shapes our users train?

    python bench/investigations/bench_sdpa_backends.py [--out DIR]

Forward + backward of causal attention with grouped k/v heads (the layout after our rewrite: `enable_gqa`), bf16,
through each SDPA backend torch offers (cuDNN, FlashAttention-2, memory-efficient) and FlexAttention compiled by
Inductor with a causal block mask; head dim 64 and 128, 4 x 4096 and 1 x 32768 tokens. FlashAttention-2 and the
memory-efficient kernel take no grouped heads, so k/v are repeated for them (timed with it). Each backend's output
and gradients are checked against the memory-efficient one's (bf16 tolerance) before it is timed; a backend that
refuses a shape is a row saying so. Writes sdpa_backends.md/.json/.png. `--check` compares FlexAttention's forward
with the math backend's on CPU (small shapes).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# name: (batch, seq, query heads, kv heads, head dim)
SHAPES = {
    "4x4096 d64 (Llama-3.2-1B)": (4, 4096, 32, 8, 64),
    "4x4096 d128 (Llama-3-8B)": (4, 4096, 32, 8, 128),
    "1x32768 d64": (1, 32768, 32, 8, 64),
    "1x32768 d128": (1, 32768, 32, 8, 128),
}


def inputs(b, t, h, hk, d, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, h, t, d, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(b, hk, t, d, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(b, hk, t, d, device=device, dtype=dtype, generator=g).requires_grad_()
    dout = torch.randn(b, h, t, d, device=device, dtype=dtype, generator=g)
    return q, k, v, dout


def sdpa_with(backend, expand=False):
    """Causal SDPA on one backend. FlashAttention-2 and the memory-efficient kernel take no grouped k/v heads
    (enable_gqa): with expand, k and v are repeated to the query heads first, as HF's attention does for them."""
    from torch.nn.attention import sdpa_kernel  # noqa: PLC0415

    def attend(q, k, v):
        if expand:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not expand)

    return attend


def flex(t, device, compiled=True):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: PLC0415

    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, t, t, device=device)
    fn = torch.compile(flex_attention) if compiled else flex_attention
    return lambda q, k, v: fn(q, k, v, block_mask=mask, enable_gqa=True)


def grads(attend, q, k, v, dout):
    out = attend(q, k, v)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]


def backends(t, device):
    from torch.nn.attention import SDPBackend  # noqa: PLC0415

    if device == "cpu":
        return {"math": sdpa_with(SDPBackend.MATH), "flex (eager)": flex(t, device, compiled=False)}
    return {"cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION),
            "flash (k/v repeated)": sdpa_with(SDPBackend.FLASH_ATTENTION, expand=True),
            "efficient (k/v repeated)": sdpa_with(SDPBackend.EFFICIENT_ATTENTION, expand=True),
            "flex (Inductor)": flex(t, device)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    ap.add_argument("--check", action="store_true", help="only compare the backends, on CPU, small shapes")
    args = ap.parse_args(argv)
    if args.check:  # CPU: FlexAttention has no backward there, so its forward only
        from torch.nn.attention import SDPBackend  # noqa: PLC0415

        q, k, v, _ = (t.detach() for t in inputs(1, 256, 4, 2, 16, "cpu", torch.float32))
        found = backends(256, "cpu")
        with torch.no_grad():
            torch.testing.assert_close(found["flex (eager)"](q, k, v), found["math"](q, k, v), rtol=1e-4, atol=1e-4)
            repeated = sdpa_with(SDPBackend.MATH, expand=True)(q, k, v)  # k/v repeated as for flash / efficient
            torch.testing.assert_close(repeated, found["math"](q, k, v), rtol=1e-5, atol=1e-5)
        print("backends agree")
        return
    from triton.testing import do_bench  # noqa: PLC0415

    from common import bar_chart, kernel_ms, write_results  # noqa: PLC0415

    rows = []
    for name, (b, t, h, hk, d) in SHAPES.items():
        q, k, v, dout = inputs(b, t, h, hk, d, "cuda", torch.bfloat16)
        found = backends(t, "cuda")
        ref = grads(found["efficient (k/v repeated)"], q, k, v, dout)
        flops = 4 * b * h * t * t * d / 2 * 3.5  # causal half; forward 1 + backward 2.5 matmul passes
        for backend, fn in found.items():
            row = {"shape": name, "backend": backend}
            try:
                for a, r in zip(grads(fn, q, k, v, dout), ref):
                    torch.testing.assert_close(a.float(), r.float(), rtol=3e-2, atol=3e-2)

                def run(fn=fn):
                    out = fn(q, k, v)
                    torch.autograd.grad(out, (q, k, v), dout)

                row.update(gpu_ms=kernel_ms(run), wall_ms=do_bench(run, warmup=25, rep=200))
                row["TFLOP/s"] = flops / row["gpu_ms"] / 1e9
            except Exception as e:  # a backend that refuses the shape or differs: a row saying so
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            print(row, flush=True)
    title = "Causal attention, forward + backward, bf16, grouped k/v heads"
    print(write_results(args.out, "sdpa_backends", title, rows,
                        ["shape", "backend", "gpu_ms", "wall_ms", "TFLOP/s", "error"]))
    names = list(SHAPES)
    series = {bk: [next((r.get("gpu_ms", float("nan")) for r in rows if r["shape"] == s and r["backend"] == bk),
                        float("nan")) for s in names] for bk in dict.fromkeys(r["backend"] for r in rows)}
    bar_chart(os.path.join(args.out, "sdpa_backends.png"), title, names, series, "GPU ms")


if __name__ == "__main__":
    main()
