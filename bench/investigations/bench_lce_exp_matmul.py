"""lm_head + cross-entropy with the softmax in the logits matmul's epilogue, one CUDA GPU
(kernels/linear_cross_entropy/exp_matmul.py).

    python bench/bench_lce_exp_matmul.py [--out DIR] [--configs all|exp|default]

--configs: all = every exp-matmul tile setting and the dh / dW candidate sweeps; exp = the tile settings only;
default = the default setting only.

x[16384, 4096] bf16, W[128256, 4096] bf16, one label in seven ignored (the kernel table's case). Prints:
  1. one 1024-row chunk's logits matmul: cuBLAS (bf16 out) against our exp-epilogue kernel per tile setting, ms and
     TFLOP/s (graph replay);
  2. the whole op (forward + the backward's scaling) per path: row_kernel (cuBLAS + per-row Triton pass) and
     exp_matmul with the default and the fastest tile setting, ms and memory beyond the gradients, next to the three
     plain matmuls; the two paths' loss and gradients against each other;
  3. a profile of the exp_matmul path: device ms per op.
Writes lce_exp_matmul.md/json into --out.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/: common.py and results/
sys.path.insert(0, BENCH)
from common import graph_ms, median_ms, print_profile, write_results  # noqa: E402

from bench_lce import DT, H, IGNORE, V, extra_gib, inputs, op_call, three_matmuls_call  # noqa: E402

from liger_compile.kernels.linear_cross_entropy import exp_matmul as lce_exp_matmul  # noqa: E402
from liger_compile.kernels.linear_cross_entropy import row_scaled_matmul as lce_row_scaled_matmul  # noqa: E402

CHUNK = 1024

BASE = lce_exp_matmul.config("cuda")  # 128 x 256, 3 stages, two halves, persistent, warp-specialised
CONFIGS = [
    {},
    dict(PLAIN=True, SUBTILE=1),  # the matmul alone (bf16 logits out): what the epilogue costs
    dict(SUBTILE=1),
    dict(WARP_SPECIALIZE=False),
    dict(PERSISTENT=False, WARP_SPECIALIZE=False),
    dict(num_stages=4),
    # two programs per SM on half-width tiles (while one finishes its tile, the other keeps the tensor cores busy):
    # all measured slower (bench/results/lce_exp_matmul_sweep.md), so only the best of them stays as a reference
    dict(BN=128, num_warps=4, num_stages=3, PROGRAMS_PER_SM=2, WARP_SPECIALIZE=False),
]
DH_CONFIGS = [
    dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=4),
    dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=3),
    dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=4),
    dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=3),
    dict(BM=64, BN=256, BK=64, num_warps=4, num_stages=4),
]


def chunk_matmul(x, w, y, cfg):
    """One launch of the exp-epilogue kernel on the first CHUNK rows (first pass only: the rerun launch is a no-op)."""
    from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: PLC0415

    cfg = dict(cfg)
    bm, bn, bk = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BK")
    persistent = cfg.pop("PERSISTENT")
    per_sm = cfg.pop("PROGRAMS_PER_SM", 1)
    subtile, plain = cfg.pop("SUBTILE"), cfg.pop("PLAIN", False)
    h_c, y_c = x[:CHUNK], y[:CHUNK]
    p = torch.empty(CHUNK, V, device="cuda", dtype=DT)
    tiles_n = triton.cdiv(V, bn)
    part_sum = torch.empty(CHUNK, tiles_n, device="cuda")
    row_max = torch.full((CHUNK,), float("-inf"), device="cuda")
    ref = torch.bmm(h_c.float().unsqueeze(1), w[y_c.clamp(min=0)].float().unsqueeze(2)).view(CHUNK)
    ref = ref.masked_fill(y_c == IGNORE, float("inf"))
    flag = torch.zeros(1, device="cuda", dtype=torch.int32)
    tiles = triton.cdiv(CHUNK, bm) * tiles_n
    grid = (min(tiles, per_sm * torch.cuda.get_device_properties(0).multi_processor_count) if persistent else tiles,)
    descs = (TensorDescriptor.from_tensor(h_c, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
             TensorDescriptor.from_tensor(p, [bm, bn // subtile]))

    def run():
        lce_exp_matmul.exp_matmul_kernel[grid](*descs, ref, y_c, part_sum, row_max, flag,
                                               CHUNK, V, H, tiles_n, 0.0, HAS_SOFTCAP=False, IS_RERUN=False,
                                               UPCAST_DOT=False, BM=bm, BN=bn, BK=bk, SUBTILE=subtile,
                                               PLAIN=plain, **cfg)
    run()
    # check against fp32 logits: P = exp(z - ref) off the label column (the kernel does not round z to bf16)
    z = torch.mm(h_c[:64].float(), w.t().float())
    want = torch.exp(z[:64] - ref[:64, None])
    want.scatter_(1, y_c[:64].clamp(min=0)[:, None], 0.0)
    if plain:
        want = z[:64].bfloat16().float()
    err = ((p[:64].float() - want).norm() / want.norm()).item()
    return run, err


@triton.jit
def acc_matmul_kernel(a_desc, b_desc, C, c_row_stride, m_dim, n_dim, k_dim, PREFETCH_C: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Bench-only candidate for dW += P^T hs: C[M, N] (bf16) += A^T B, A: [K, M] blocks [BK, BM], B: [K, N] blocks
    [BK, BN]. PREFETCH_C loads C's tile before the K loop, so that its read overlaps the products (cuBLAS's addmm
    reads C after them)."""
    n_col_tiles = tl.cdiv(n_dim, BN)
    off_m = (tl.program_id(0) // n_col_tiles) * BM  # the N tiles of one M block are neighbours: A leaves DRAM once
    off_n = (tl.program_id(0) % n_col_tiles) * BN
    rows = off_m + tl.arange(0, BM)
    cols = off_n + tl.arange(0, BN)
    mask = (rows < m_dim)[:, None] & (cols < n_dim)[None, :]
    ptrs = C + rows.to(tl.int64)[:, None] * c_row_stride + cols[None, :]
    if PREFETCH_C:
        c = tl.load(ptrs, mask=mask, other=0.0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, k_dim, BK):
        a = a_desc.load([k, off_m])
        b = b_desc.load([k, off_n])
        acc = tl.dot(a.T, b, acc)
    if not PREFETCH_C:
        c = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, (acc + c.to(tl.float32)).to(tl.bfloat16), mask=mask)


DW_CONFIGS = [
    dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=3, PREFETCH_C=True),
    dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=3, PREFETCH_C=False),
    dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=4, PREFETCH_C=True),
    dict(BM=128, BN=128, BK=64, num_warps=4, num_stages=4, PREFETCH_C=True),
    dict(BM=256, BN=128, BK=64, num_warps=8, num_stages=3, PREFETCH_C=True),
]


def time_candidates(rows, part, configs, launch, out, want, flops):
    """For each config (BM, BN, BK and launch settings): launch(bm, bn, bk, cfg) returns a function that runs the
    candidate once writing `out`; its error against `want` and its graph-replay ms go into rows (a config that does
    not build is printed and skipped)."""
    for cfg in configs:
        cfg = dict(cfg)
        bm, bn, bk = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BK")
        name = f"{bm}x{bn}x{bk} {cfg}"
        try:
            run = launch(bm, bn, bk, cfg)
            run()
            err = ((out.float() - want).norm() / want.norm()).item()
            ms = graph_ms(run, replays=20)
        except Exception as e:  # noqa: BLE001
            print(f"| {part} {name} | {type(e).__name__}: {str(e)[:160]} |", flush=True)
            continue
        rows.append(dict(part=f"chunk: {part}", config=name, ms=ms, tflops=flops / ms / 1e9, rel_err_vs_cublas=err))
        print(f"| {part} {name} | {ms:.3f} ms | {flops / ms / 1e9:.0f} TFLOP/s | err {err:.2e} |", flush=True)


def dh_sweep(rows, p, w, r):
    """dh = diag(r) (P @ W) for one chunk: cuBLAS's plain product against lce_row_scaled_matmul settings."""
    from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: PLC0415

    flops = 2 * CHUNK * V * H
    dh = torch.empty(CHUNK, H, device="cuda", dtype=DT)
    ms = graph_ms(lambda: torch.mm(p, w, out=dh), replays=20)
    rows.append(dict(part=f"chunk {CHUNK} rows: cuBLAS dh = P @ W", ms=ms, tflops=flops / ms / 1e9))
    print(f"| cuBLAS dh [{CHUNK}, {V}] x [{V}, {H}] | {ms:.3f} ms | {flops / ms / 1e9:.0f} TFLOP/s |", flush=True)

    def launch(bm, bn, bk, cfg):
        descs = (TensorDescriptor.from_tensor(p, [bm, bk]), TensorDescriptor.from_tensor(w, [bk, bn]),
                 TensorDescriptor.from_tensor(dh, [bm, bn]))
        return lambda: lce_row_scaled_matmul.row_scaled_matmul_kernel[(triton.cdiv(CHUNK, bm) * triton.cdiv(H, bn),)](
            *descs, r, CHUNK, V, UPCAST_DOT=False, BM=bm, BN=bn, BK=bk, **cfg)
    time_candidates(rows, "row-scaled dh", DH_CONFIGS, launch, dh, torch.mm(p, w).float() * r[:, None], flops)


def dw_sweep(rows, p, w, r):
    """dW += P^T hs for one chunk: cuBLAS's addmm_ against acc_matmul_kernel settings (graph replay)."""
    from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: PLC0415

    hs = (torch.randn(CHUNK, H, device="cuda") * r[:, None]).to(DT)
    dw0 = torch.randn(V, H, device="cuda", dtype=DT) * 1e-2
    dw = dw0.clone()
    flops = 2 * CHUNK * V * H
    ms = graph_ms(lambda: dw.addmm_(p.t(), hs), replays=20)
    rows.append(dict(part=f"chunk {CHUNK} rows: cuBLAS dW += P^T hs", ms=ms, tflops=flops / ms / 1e9))
    print(f"| cuBLAS dW addmm_ | {ms:.3f} ms | {flops / ms / 1e9:.0f} TFLOP/s |", flush=True)

    def launch(bm, bn, bk, cfg):
        descs = (TensorDescriptor.from_tensor(p, [bk, bm]), TensorDescriptor.from_tensor(hs, [bk, bn]))
        dw.copy_(dw0)  # the error is checked after one run from dw0

        def run():
            acc_matmul_kernel[(triton.cdiv(V, bm) * triton.cdiv(H, bn),)](
                *descs, dw, H, V, H, CHUNK, BM=bm, BN=bn, BK=bk, **cfg)
        return run
    time_candidates(rows, "dW acc matmul", DW_CONFIGS, launch, dw,
                    torch.addmm(dw0.float(), p.t().float(), hs.float()), flops)


def dw_layouts(rows, p, r):
    """dW's cuBLAS product for one chunk, three ways: added into the [V, H] accumulator (every chunk but the first),
    written into it (the first chunk), and added into a transposed [H, V] accumulator (another operand layout for
    cuBLAS; the op would then pay one transposing copy at the end)."""
    hs = (torch.randn(CHUNK, H, device="cuda") * r[:, None]).to(DT)
    dw = torch.zeros(V, H, device="cuda", dtype=DT)
    dwt = torch.zeros(H, V, device="cuda", dtype=DT)
    flops = 2 * CHUNK * V * H
    for name, fn in (("dW += P^T hs", lambda: dw.addmm_(p.t(), hs)),
                     ("dW = P^T hs (first chunk)", lambda: torch.mm(p.t(), hs, out=dw)),
                     ("dW^T += hs^T P", lambda: dwt.addmm_(hs.t(), p)),
                     ("transposing copy [H, V] -> [V, H]", lambda: dw.copy_(dwt.t()))):
        ms = graph_ms(fn, replays=20)
        rows.append(dict(part=f"chunk {CHUNK} rows: cuBLAS {name}", ms=ms, tflops=flops / ms / 1e9))
        print(f"| cuBLAS {name} | {ms:.3f} ms | {flops / ms / 1e9:.0f} TFLOP/s |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(BENCH, "results"))
    ap.add_argument("--configs", default="all", choices=["all", "exp", "default"])
    ap.add_argument("--name", default="lce_exp_matmul")
    args = ap.parse_args(argv)
    x, w, y = inputs()
    flops = 2 * CHUNK * V * H
    rows = []
    buf = torch.empty(CHUNK, V, device="cuda", dtype=DT)
    ms = graph_ms(lambda: torch.mm(x[:CHUNK], w.t(), out=buf), replays=20)
    rows.append(dict(part=f"chunk {CHUNK} rows: cuBLAS logits", ms=ms, tflops=flops / ms / 1e9))
    print(f"| cuBLAS mm [{CHUNK}, {H}] x [{H}, {V}] | {ms:.3f} ms | {flops / ms / 1e9:.0f} TFLOP/s |", flush=True)
    best = (None, float("inf"))
    for change in [{}] if args.configs == "default" else CONFIGS:
        cfg = {**BASE, **change}
        try:
            run, err = chunk_matmul(x, w, y, cfg)
            ms = graph_ms(run, replays=20)
        except Exception as e:  # a tile that does not fit (registers, shared memory) is just not a candidate
            print(f"| exp matmul {change} | {type(e).__name__}: {str(e)[:160]} |", flush=True)
            continue
        rows.append(dict(part="chunk: exp matmul", config=str(change or "default"), ms=ms,
                         tflops=flops / ms / 1e9, rel_err_vs_cublas=err))
        print(f"| exp matmul {change or 'default'} | {ms:.3f} ms | {flops / ms / 1e9:.0f} TFLOP/s | err {err:.2e} |",
              flush=True)
        if ms < best[1] and err < 1e-2 and not cfg.get("PLAIN"):
            best = (cfg, ms)

    p = torch.rand(CHUNK, V, device="cuda", dtype=DT) * 1e-3
    r = torch.rand(CHUNK, device="cuda")
    dw_layouts(rows, p, r)
    if args.configs == "all":
        dh_sweep(rows, p, w, r)
        dw_sweep(rows, p, w, r)
    del p

    three_matmuls = three_matmuls_call(x, w)
    three = graph_ms(three_matmuls, replays=10)
    rows.append(dict(part="three plain matmuls", ms=three))
    print(f"three plain matmuls: {three:.2f} ms", flush=True)
    results = {}
    for name, path, mcfg in (("row_kernel", "row_kernel", None), ("exp_matmul default", "exp_matmul", None),
                             ("exp_matmul fastest", "exp_matmul", best[0])):
        if name.endswith("fastest") and (best[0] is None or best[0] == BASE):
            continue
        fn = op_call(x, w, y, path=path, matmul_config=mcfg)
        ms = graph_ms(fn, replays=10)
        gib = extra_gib(op_call(x, w, y, scale=False, path=path, matmul_config=mcfg), x, w)
        results[name] = fn()
        ev = median_ms(fn)  # events around eager calls, for comparison with the replay
        print(f"   (events, no graph: {ev:.2f} ms)", flush=True)
        rows.append(dict(part=f"op: {name}", config=str(mcfg), ms=ms, extra_beyond_grads_gib=gib))
        print(f"| op {name} | {ms:.2f} ms | {gib:.3f} GiB |", flush=True)
    ref = results["row_kernel"]
    for name, got in results.items():
        d = [abs(got[0] - ref[0]).item()] + [((a.float() - b.float()).norm() / b.float().norm()).item()
                                              for a, b in zip(got[1:], ref[1:])]
        print(f"{name} vs row_kernel: |loss diff| {d[0]:.2e}, grad_h rel {d[1]:.2e}, grad_w rel {d[2]:.2e}")
        rows.append(dict(part=f"agreement: {name} vs row_kernel", loss_diff=d[0], grad_h_rel=d[1], grad_w_rel=d[2]))
    three = graph_ms(three_matmuls, replays=10)
    rows.append(dict(part="three plain matmuls (again)", ms=three))
    print(f"three plain matmuls, again: {three:.2f} ms", flush=True)

    print_profile(op_call(x, w, y, path="exp_matmul", matmul_config=best[0]))
    cols = ["part", "config", "ms", "tflops", "rel_err_vs_cublas", "extra_beyond_grads_gib", "loss_diff",
            "grad_h_rel", "grad_w_rel"]
    write_results(args.out, args.name, "lm_head + cross-entropy: the exp-epilogue matmul (graph replay)", rows, cols)


if __name__ == "__main__":
    main()
