"""Where lm_head + cross-entropy's time goes, and which chunk / row-kernel settings are fastest (one CUDA GPU).

    python bench/bench_lce.py [--out DIR]

x[16384, 4096] bf16, W[128256, 4096] bf16, one label in seven ignored (the kernel table's case). Prints:
  1. the per-row kernel alone on one chunk's logits, per tile / warps / programs per SM / num_stages (graph replay)
     against its byte floor (two reads of the chunk, one write, at 4.3 TB/s);
  2. the whole op (forward + the backward's scaling) per chunk budget and row-kernel setting: graph-replay ms and
     extra memory beyond the gradients; the three plain matmuls of the same shapes as the floor;
  3. a variant that runs the first half-chunk's row kernel on a second stream while the second half's logits
     matmul runs (bench only: kept if it wins);
  4. a profile of the best setting: device ms per op and shape.
Writes lce_sweep.md/json into --out.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/: common.py and results/
sys.path.insert(0, BENCH)
from common import extra_peak_gib, graph_ms, print_profile, write_results  # noqa: E402

from liger_compile.kernels import linear_cross_entropy as lce  # noqa: E402
from liger_compile.kernels.linear_cross_entropy import row_kernel  # noqa: E402  (where its settings are read)

N, H, V, DT, IGNORE = 16384, 4096, 128256, torch.bfloat16, -100


def inputs(h=H):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, h, device="cuda", dtype=DT, generator=g)
    w = (torch.randn(V, h, device="cuda", dtype=DT, generator=g) * h ** -0.5)
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    y[::7] = IGNORE
    return x, w, y


def row_kernel_sweep(x, w, y):
    rows = lce.chunk_rows(N, V, DT)
    logits = torch.mm(x[:rows], w.t())
    losses = torch.empty(rows, device="cuda")
    inv = torch.tensor([1 / N], device="cuda")
    floor = 3 * rows * V * 2 / 4.3e12 * 1e3
    out = []
    for (block_v, warps), per_sm, stages in itertools.product(
            [(8192, 16), (8192, 8), (4096, 8), (4096, 16), (4096, 4), (2048, 4), (2048, 8), (16384, 16)],
            [None, 1, 2, 4], [1, 3]):
        cfg = dict(BLOCK_V=block_v, num_warps=warps, num_stages=stages, PROGRAMS_PER_SM=per_sm)
        z = logits.clone()
        try:
            ms = graph_ms(lambda: lce.launch_chunk_kernel(z, y[:rows], losses, inv, IGNORE, 0.0, 0.0, config=cfg))
        except Exception as e:  # a tile that does not fit (registers, shared memory) is just not a candidate
            print(f"  {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
            continue
        out.append(dict(part="row kernel", rows=rows, BLOCK_V=block_v, num_warps=warps, num_stages=stages,
                        programs_per_sm=per_sm or "row", ms=ms, floor_ms=floor))
        print(f"| row | {block_v} | {warps} | {per_sm or 'row'} | {stages} | {ms:.4f} | floor {floor:.4f} |", flush=True)
    return out


def three_matmuls_call(x, w):
    """The three plain cuBLAS matmuls of the op's shapes over all rows (logits, dh, dW): the yardstick."""
    def run():
        z = torch.mm(x, w.t())
        return torch.mm(z, w), torch.mm(z.t(), x)
    return run


def op_call(x, w, y, cfg=None, scale=True, path="row_kernel", matmul_config=None):
    """The op's forward (+ the backward's scaling by grad_output, as traced) on one path; this script's subject is
    the row-kernel path, with row-kernel settings cfg (bench_lce_exp_matmul.py passes the other path)."""
    def run():
        loss, gh, gw, _, _ = lce.launch_forward(x, w, None, y, None, IGNORE, 0.0, 0.0, "mean", True, config=cfg,
                                                path=path, matmul_config=matmul_config)
        return (loss, gh * 1.0, gw * 1.0) if scale else (loss, gh, gw)
    return run


def two_stream_forward(x, w, y, cfg):
    """launch_forward's loop (no bias/softcap/smoothing) with each chunk split in halves: the first half's row
    kernel runs on a side stream while the second half's logits matmul runs on the main one."""
    side = torch.cuda.Stream()

    def run():
        main = torch.cuda.current_stream()
        h, labels = x, y
        denom = (labels != IGNORE).sum().float()
        inv = (1.0 / denom).reshape(1)
        gh = torch.empty_like(h)
        gw = torch.zeros_like(w)
        losses = torch.empty(N, device="cuda")
        rows = lce.chunk_rows(N, V, DT)
        buf = torch.empty((rows, V), dtype=DT, device="cuda")
        for s in range(0, N, rows):
            e = min(s + rows, N)
            m = s + (e - s) // 2
            z = buf[: e - s]
            torch.mm(h[s:m], w.t(), out=z[: m - s])
            side.wait_stream(main)
            with torch.cuda.stream(side):
                lce.launch_chunk_kernel(z[: m - s], labels[s:m], losses[s:m], inv, IGNORE, 0.0, 0.0, config=cfg)
            torch.mm(h[m:e], w.t(), out=z[m - s:])
            lce.launch_chunk_kernel(z[m - s:], labels[m:e], losses[m:e], inv, IGNORE, 0.0, 0.0, config=cfg)
            main.wait_stream(side)
            torch.mm(z, w, out=gh[s:e])
            gw.addmm_(z.t(), h[s:e])
        return losses.sum() / denom, gh, gw
    return run


def extra_gib(fn, x, w):
    return extra_peak_gib(fn) - (x.numel() + w.numel()) * 2 / 2**30  # beyond the two gradients (bf16)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(BENCH, "results"))
    ap.add_argument("--parts", default="rows,budgets,streams,chunk_rows,profile")
    ap.add_argument("--chart", metavar="JSON", help="only redraw the charts of a recorded run")
    ap.add_argument("--chunk-rows", default="704,745,768,781,820,912,964",
                    help="explicit rows per chunk to time (745, 781, 820, 912, 964: 16384 rows in 22..17 equal chunks)")
    ap.add_argument("--name", default="lce_sweep")
    args = ap.parse_args(argv)
    if args.chart:
        return chart(args.chart)
    parts = args.parts.split(",")
    x, w, y = inputs()
    print(f"x[{N}, {H}] W[{V}, {H}] bf16, chunk rows {lce.chunk_rows(N, V, DT)}", flush=True)
    rows = []
    best_cfg = lce.kernel_config(V)
    if "rows" in parts:
        print("| part | BLOCK_V | warps | programs/SM | stages | ms | |", flush=True)
        rows = row_kernel_sweep(x, w, y)
        best = min(rows, key=lambda r: r["ms"])
        best_cfg = dict(BLOCK_V=best["BLOCK_V"], num_warps=best["num_warps"], num_stages=best["num_stages"],
                        PROGRAMS_PER_SM=None if best["programs_per_sm"] == "row" else best["programs_per_sm"])
        print(f"best row kernel: {best_cfg} {best['ms']:.4f} ms", flush=True)

    three_matmuls = three_matmuls_call(x, w)
    three = graph_ms(three_matmuls, replays=10)
    print(f"three plain matmuls (logits, dh, dW over all {N} rows): {three:.2f} ms", flush=True)
    rows.append(dict(part="three plain matmuls", ms=three))
    default = row_kernel.LOGITS_CHUNK_BYTES
    for budget_mib, cfg_name in itertools.product((192, 224, 240) if "budgets" in parts else (),
                                                  ("default", "best")):
        row_kernel.LOGITS_CHUNK_BYTES = budget_mib * 2**20
        cfg = None if cfg_name == "default" else best_cfg
        fn = op_call(x, w, y, cfg)
        ms = graph_ms(fn, replays=10)
        gib = extra_gib(op_call(x, w, y, cfg, scale=False), x, w)
        rows.append(dict(part="op", chunk_mib=budget_mib, chunk_rows=lce.chunk_rows(N, V, DT), row_cfg=cfg_name,
                         ms=ms, extra_beyond_grads_gib=gib))
        print(f"| op | chunk {budget_mib} MiB ({lce.chunk_rows(N, V, DT)} rows) | row cfg {cfg_name} | {ms:.2f} ms "
              f"| {gib:.3f} GiB |", flush=True)
    row_kernel.LOGITS_CHUNK_BYTES = default
    real_chunk_rows = row_kernel.chunk_rows
    for c in [int(r) for r in args.chunk_rows.split(",")] if "chunk_rows" in parts else []:
        row_kernel.chunk_rows = lambda n, v, dtype, c=c: min(n, c)
        ms = graph_ms(op_call(x, w, y, None), replays=10)
        gib = extra_gib(op_call(x, w, y, None, scale=False), x, w)
        rows.append(dict(part="op", chunk_rows=c, row_cfg="default", ms=ms, extra_beyond_grads_gib=gib))
        print(f"| op | {c} rows per chunk ({-(-N // c)} chunks) | {ms:.2f} ms | {gib:.3f} GiB |", flush=True)
    row_kernel.chunk_rows = real_chunk_rows
    for cfg_name, cfg in (("default", None), ("best", best_cfg)) if "streams" in parts else ():
        fn = two_stream_forward(x, w, y, cfg)
        ms = graph_ms(fn, replays=10)
        ref = op_call(x, w, y, cfg)()
        got = fn()
        same = bool(torch.allclose(got[0], ref[0]) and torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2]))
        rows.append(dict(part="op, two streams", chunk_mib=default // 2**20, row_cfg=cfg_name, ms=ms,
                         extra_beyond_grads_gib=extra_gib(fn, x, w), same_result=same))
        print(f"| two streams | row cfg {cfg_name} | {ms:.2f} ms | same result {same} |", flush=True)

    three = graph_ms(three_matmuls, replays=10)  # again, after the op runs: the clock may have moved
    print(f"three plain matmuls, again: {three:.2f} ms", flush=True)
    rows.append(dict(part="three plain matmuls (again)", ms=three))
    if "profile" not in parts:
        return write(args.out, rows, args.name)
    print_profile(op_call(x, w, y, best_cfg), row_limit=14)
    write(args.out, rows, args.name)


def write(out, rows, name="lce_sweep"):
    cols = ["part", "rows", "BLOCK_V", "num_warps", "programs_per_sm", "num_stages", "chunk_mib", "chunk_rows",
            "row_cfg", "ms", "floor_ms", "extra_beyond_grads_gib", "same_result"]
    write_results(out, name, "lm_head + cross-entropy: row kernel and chunk settings (graph replay)", rows, cols)
    chart(os.path.join(out, f"{name}.json"))


def chart(json_path):
    """<name>.png next to <name>.json: the whole op's ms per setting against the three plain matmuls, and the row
    kernel's ms per tile against its floor (where those were measured)."""
    import json  # noqa: PLC0415

    from common import bar_chart  # noqa: PLC0415

    rows = json.load(open(json_path))["rows"]
    ops = [r for r in rows if r["part"].startswith("op")]
    plain = [r["ms"] for r in rows if r["part"].startswith("three plain")]
    if ops:
        labels = [f"{r.get('chunk_rows') or ''} rows" + (f", {r['chunk_mib']} MiB" if r.get("chunk_mib") else "")
                  + (f", {r['row_cfg']}" if r.get("row_cfg") not in (None, "default") else "")
                  + (", 2 streams" if "streams" in r["part"] else "") for r in ops]
        series = {"op fwd+bwd (ms)": [r["ms"] for r in ops]}
        if plain:
            series["three plain matmuls (ms)"] = [min(plain)] * len(ops)
        bar_chart(json_path[:-5] + ".png", "lm_head + CE, x[16384, 4096] W[128256, 4096] bf16, H200", labels, series,
                  "ms (CUDA-graph replay)")
    kernel = sorted((r for r in rows if r["part"] == "row kernel"), key=lambda r: r["ms"])[:10]
    if kernel:
        labels = [f"{r['BLOCK_V']}/{r['num_warps']}w/{r['programs_per_sm']}/s{r['num_stages']}" for r in kernel]
        bar_chart(json_path[:-5] + "_row_kernel.png", "LCE row kernel on one chunk: 10 fastest (BLOCK_V/warps/"
                  "programs per SM/stages)", labels, {"ms": [r["ms"] for r in kernel],
                                                      "floor": [r["floor_ms"] for r in kernel]}, "ms")


if __name__ == "__main__":
    main()
