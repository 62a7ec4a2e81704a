"""Should the rotary kernel compute cos/sin itself from the position ids instead of reading the
[B, T, D] tensors HF's rotary embedding materialises? (one CUDA GPU)

    python bench/bench_rotary_trig.py [--out DIR]

Times, by CUDA-graph replay at Llama-3-8B shapes (q [4, 32, 4096, 128], k [4, 8, 4096, 128] bf16, as HF's transposed
views): our kernel reading cos/sin (forward + backward), a bench-only variant of it that computes
cos(pos * inv_freq) * scaling and sin(...) in fp32 (libdevice, accurate), rounds them to bf16 as HF does and then
rotates with the same tile code, and HF's cos/sin computation itself (done once per step, shared by every layer).
Also counts how many of the variant's bf16 cos/sin values differ from HF's. Writes rotary_trig.md/json.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/: common.py and results/
sys.path.insert(0, BENCH)
from common import graph_ms, write_results  # noqa: E402

from liger_compile.kernels import rotary as R  # noqa: E402
from liger_compile.kernels.rotary import _rotate_heads  # noqa: E402

B, T, HQ, HK, D = 4, 4096, 32, 8, 128


@triton.jit
def _rotary_trig_kernel(
    Q, K, POS, INV_FREQ, QO, KO, COS_OUT, SIN_OUT, scaling,
    n_t, half, n_q_heads, n_k_heads,
    q_sb, q_st, q_sh, k_sb, k_st, k_sh, qo_sb, qo_st, qo_sh, ko_sb, ko_st, ko_sh, pos_sb,
    BACKWARD: tl.constexpr, WRITE_TRIG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_t
    t = pid % n_t
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < half
    pos = tl.load(POS + b * pos_sb + t).to(tl.float32)
    f = pos * tl.load(INV_FREQ + d, mask=d_mask, other=0.0)
    sc = tl.cast(scaling, tl.float32)
    # HF: (cos(emb) * attention_scaling).to(x.dtype), the same value for both halves
    c = (libdevice.cos(f) * sc).to(Q.dtype.element_ty).to(tl.float32)
    s = (libdevice.sin(f) * sc).to(Q.dtype.element_ty).to(tl.float32)
    if WRITE_TRIG:  # for the equality check only
        tl.store(COS_OUT + pid * half + d, c, mask=d_mask)
        tl.store(SIN_OUT + pid * half + d, s, mask=d_mask)
    s1 = s
    s2 = s
    if BACKWARD:
        s1, s2 = -s2, -s1
    _rotate_heads(Q, QO, b * q_sb + t * q_st, b * qo_sb + t * qo_st, n_q_heads, q_sh, 1, qo_sh,
                    c, c, s1, s2, half, True, BLOCK_H, BLOCK_HALF)
    _rotate_heads(K, KO, b * k_sb + t * k_st, b * ko_sb + t * ko_st, n_k_heads, k_sh, 1, ko_sh,
                    c, c, s1, s2, half, True, BLOCK_H, BLOCK_HALF)


def trig_launch(q, k, pos, inv_freq, scaling, backward=False, trig_out=None):
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    q_s, k_s = R._bthd_strides(q, 1), R._bthd_strides(k, 1)
    qo_s, ko_s = R._bthd_strides(qo, 1)[:3], R._bthd_strides(ko, 1)[:3]
    cfg = R.kernel_config(D, HQ)
    c_out, s_out = trig_out if trig_out is not None else (q, q)
    _rotary_trig_kernel[(B * T,)](
        q, k, pos, inv_freq, qo, ko, c_out, s_out, scaling, T, D // 2, HQ, HK,
        *q_s[:3], *k_s[:3], *qo_s, *ko_s, pos.stride(0) if pos.shape[0] > 1 else 0,
        BACKWARD=backward, WRITE_TRIG=trig_out is not None, **cfg)
    return qo, ko


def hf_cos_sin(pos, inv_freq, scaling, dtype):
    freqs = (inv_freq[None, :, None].float() @ pos[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(BENCH, "results"))
    ap.add_argument("--chart", metavar="JSON", help="only redraw the chart of a recorded run")
    args = ap.parse_args(argv)
    if args.chart:
        return chart(args.chart)
    dt = torch.bfloat16
    q = torch.randn(B, T, HQ, D, device="cuda", dtype=dt).transpose(1, 2)
    k = torch.randn(B, T, HK, D, device="cuda", dtype=dt).transpose(1, 2)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    pos = torch.arange(T, device="cuda").repeat(B, 1)
    pos[1] = torch.arange(T, device="cuda") % 1000  # packed sequences in one row
    scaling = 1.0
    cos, sin = hf_cos_sin(pos, inv_freq, scaling, dt)

    # equality: cos/sin values and the rotated outputs
    c_out = torch.empty(B * T, D // 2, device="cuda")
    s_out = torch.empty_like(c_out)
    qo_t, ko_t = trig_launch(q, k, pos, inv_freq, scaling, trig_out=(c_out, s_out))
    qo_r, ko_r = R.launch(q, k, cos, sin, 1)
    cos_diff = int((c_out.view(B, T, -1) != cos[..., : D // 2].float()).sum())
    sin_diff = int((s_out.view(B, T, -1) != sin[..., : D // 2].float()).sum())
    out_same = bool(torch.equal(qo_t, qo_r) and torch.equal(ko_t, ko_r))
    print(f"cos values differing from HF's: {cos_diff} of {B * T * D // 2}; sin: {sin_diff}; outputs equal: {out_same}")

    dq = torch.randn(q.shape, device="cuda", dtype=dt)
    dk = torch.randn(k.shape, device="cuda", dtype=dt)
    rows = []
    timings = {
        "ours (reads cos/sin)": lambda: (R.launch(q, k, cos, sin, 1), R.launch(dq, dk, cos, sin, 1, backward=True)),
        "cos/sin computed in the kernel": lambda: (trig_launch(q, k, pos, inv_freq, scaling),
                                                   trig_launch(dq, dk, pos, inv_freq, scaling, backward=True)),
        "HF cos/sin, eager (once per step)": lambda: hf_cos_sin(pos, inv_freq, scaling, dt),
        "HF cos/sin, Inductor (once per step)": torch.compile(lambda: hf_cos_sin(pos, inv_freq, scaling, dt)),
    }
    for name, fn in timings.items():
        ms = graph_ms(fn, replays=100)
        rows.append(dict(variant=name, fwd_bwd_ms=ms))
        print(f"| {name} | {ms:.4f} ms |", flush=True)
    notes = (f"q [{B}, {HQ}, {T}, {D}] + k [{B}, {HK}, {T}, {D}] bf16 (transposed views), forward + backward kernels, "
             f"CUDA-graph replay medians. In-kernel cos/sin values differing from HF's bf16 ones: cos {cos_diff}, "
             f"sin {sin_diff} of {B * T * D // 2}; rotated outputs equal to ours: {out_same}.")
    write_results(args.out, "rotary_trig", "Rotary: cos/sin read vs computed in the kernel", rows,
                  ["variant", "fwd_bwd_ms"], notes)
    chart(os.path.join(args.out, "rotary_trig.json"))


def chart(json_path):
    import json  # noqa: PLC0415

    from common import bar_chart  # noqa: PLC0415

    rows = json.load(open(json_path))["rows"]
    bar_chart(json_path[:-5] + ".png", "Rotary q+k at Llama-3-8B shapes, fwd+bwd, H200", [r["variant"] for r in rows],
              {"ms (CUDA-graph replay)": [r["fwd_bwd_ms"] for r in rows]}, "ms")


if __name__ == "__main__":
    main()
