"""Attention of one layer, forward + backward, for the batches the trainers send: no padding, padded, packed.

    python bench/bench_attention.py [--batch 4 --seq 2048 --heads 32 --kv-heads 8 --head-dim 64] [--out bench/results]

Llama-3.2-1B's attention shape by default, bf16. For each batch kind, what runs:
  - `sdpa masked`: what HF runs for it under torch.compile (and eagerly when the batch is padded): the [B, 1, T, T]
    boolean mask and the key/value heads repeated (`repeat_kv`) for F.scaled_dot_product_attention;
  - `sdpa is_causal`: SDPA without a mask (enable_gqa), what eager HF runs for an unpadded batch: the floor for
    the same number of positions (not a correct result for padded or packed batches);
  - `ours`: liger::varlen_attention with the same mask (the segments read off the mask, FlashAttention within each).
Median ms of fwd+bwd (triton.testing.do_bench). Padded: right-padded rows of random lengths, the given fraction
padding; packed: each row split into documents of random lengths. Writes attention.md / .json / .png into --out.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

from common import bar_chart, median_ms, write_results  # noqa: E402


def masks(b: int, t: int, padding: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(t)
    causal = pos[None, :] <= pos[:, None]
    lengths = torch.randint(int(t * (1 - 2 * padding)), t + 1, (b,), generator=g)
    lengths[0] = t
    valid = pos[None, :] < lengths[:, None]
    docs = []
    for _ in range(b):
        cuts = sorted(torch.randint(1, t, (3,), generator=g).tolist())
        bounds = [0, *cuts, t]
        docs.append(torch.cat([torch.full((e - s,), i) for i, (s, e) in enumerate(zip(bounds, bounds[1:]))]))
    ids = torch.stack(docs)
    return {
        "no padding": causal.expand(b, 1, t, t),
        f"padded {padding:.0%}": (causal[None] & valid[:, None, :])[:, None],
        "packed, 4 documents a row": (causal[None] & (ids[:, None, :] == ids[:, :, None]))[:, None],
    }


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--padding", type=float, default=0.25)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    import liger_compile.kernels.varlen_attention  # noqa: PLC0415, F401  (defines the op)

    b, t, h, hkv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    rep = h // hkv
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, t, n, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for n in (h, hkv, hkv))
    dout = torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)

    def sdpa_masked(mask):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1),
                                              v.transpose(1, 2).repeat_interleave(rep, 1), attn_mask=mask
                                              ).transpose(1, 2)

    def sdpa_causal(mask):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=True).transpose(1, 2)

    def ours(mask):
        return torch.ops.liger.varlen_attention(q, k, v, mask, None)[0]

    variants = {"sdpa masked": sdpa_masked, "sdpa is_causal": sdpa_causal, "ours": ours}
    rows = []
    for kind, mask in masks(b, t, args.padding).items():
        mask = mask.cuda()
        row = {"batch": kind}
        for name, fn in variants.items():
            def step(fn=fn):
                out = fn(mask)
                torch.autograd.grad(out, (q, k, v), dout)

            row[f"{name} ms"] = median_ms(step, grad_to_none=[q, k, v])
        row["ours vs sdpa masked"] = row["ours ms"] / row["sdpa masked ms"]
        rows.append(row)
        print(row, flush=True)
    cols = ["batch", "sdpa masked ms", "sdpa is_causal ms", "ours ms", "ours vs sdpa masked"]
    title = f"Attention of one layer, fwd+bwd, q[{b},{t},{h},{d}] k/v[{b},{t},{hkv},{d}] bf16"
    print(write_results(args.out, "attention", title, rows, cols,
                        notes="sdpa is_causal ignores the padding and the documents: the floor for the same number "
                              "of positions, not a correct result for those batches."))
    bar_chart(os.path.join(args.out, "attention.png"), title, [r["batch"] for r in rows],
              {name: [r[f"{name} ms"] for r in rows] for name in variants}, "ms, fwd+bwd (lower is better)")


if __name__ == "__main__":
    main()
