"""Timing, memory and reporting helpers shared by the benchmarks (CUDA only)."""
from __future__ import annotations

import datetime
import json
import os
import platform

import torch


def env_info() -> dict:
    import triton  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    info = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
    }
    try:
        import liger_kernel  # noqa: PLC0415, F401
        from importlib.metadata import version  # noqa: PLC0415

        info["liger_kernel"] = version("liger-kernel")
    except Exception:
        info["liger_kernel"] = "not installed"
    return info


def recompiles() -> tuple[int, dict[str, int]]:
    """Dynamo's recompiles in this process so far, and the guards that caused them (first line, with how often).
    Each recompile of a frame records the failed guard of every version compiled before it ("1/0: ...", "1/1: ..."),
    so frame f's recompiles are one more than the highest version that failed."""
    import re  # noqa: PLC0415
    from collections import Counter  # noqa: PLC0415

    from torch._dynamo.utils import guard_failures  # noqa: PLC0415

    count, reasons = 0, Counter()
    for failures in guard_failures.values():
        versions = {}
        for reason in failures:
            m = re.match(r"\s*(\d+)/(\d+): (.*)", reason.split("\n")[0])
            if m:
                versions.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
                reasons[m.group(3)[:160]] += 1
        count += sum(max(v) + 1 for v in versions.values())
    return count, dict(reasons)


# Dynamo's compile-time metrics (torch._dynamo.utils.compile_times) shown as columns, as (column, key). Nested phases
# are each counted (AOTAutograd's time holds Inductor's) and C++ builds run in parallel: the columns do not add up.
COMPILE_PHASES = [
    ("dynamo_s", "bytecode_tracing"),
    ("rewrite_s", "liger_compile.rewrite"),
    ("backend_s", "OutputGraph.call_user_compiler"),
    ("aot_s", "create_aot_dispatcher_function"),
    ("lowering_s", "GraphLowering.run"),
    ("codegen_s", "GraphLowering.codegen"),
    ("triton_wait_s", "async_compile.wait"),
    ("cpp_s", "compile_file"),
    ("autotune_s", "CachingAutotuner.benchmark_all_configs"),
]


def compile_phases() -> dict:
    """This process's compile seconds so far: one entry per COMPILE_PHASES column, and every metric Dynamo keeps
    under "compile_times"."""
    from torch._dynamo.utils import compile_times  # noqa: PLC0415

    keys, values = compile_times(repr="csv", aggregate=True)
    metrics = {k: float(v) for k, v in zip(keys, values)}
    return {**{column: metrics.get(key, 0.0) for column, key in COMPILE_PHASES}, "compile_times": metrics}


def median_ms(fn, warmup_ms: int = 25, rep_ms: int = 200, grad_to_none=None) -> float:
    import triton.testing  # noqa: PLC0415

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                   return_mode="median")


def extra_peak_gib(fn) -> float:
    """Peak memory one call allocates beyond what was allocated before it (outputs included)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: str, name: str, title: str, rows: list[dict], columns: list[str], notes: str = "") -> str:
    """Writes <name>.md (table + environment) and <name>.json; returns the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    info = env_info()
    env = ", ".join(f"{k} {v}" for k, v in info.items())
    md = f"# {title}\n\n{env}\n\n{markdown_table(rows, columns)}\n"
    if notes:
        md += f"\n{notes}\n"
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"env": info, "rows": rows}, f, indent=1)
    return md


def bar_chart(path: str, title: str, groups: list[str], series: dict[str, list[float]], ylabel: str):
    """Grouped bars: one group per kernel/config, one bar per variant."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(groups) + 2), 4))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + i * width for g in range(len(groups))]
        bars = ax.bar(xs, [v if v == v else 0 for v in values], width, label=label)
        for b, v in zip(bars, values):
            if v == v:
                ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=7)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def kernel_ms(fn, iters: int = 20) -> float:
    """GPU time of one call: the sum of the durations of the kernels it launches (torch.profiler), so launch gaps
    and Python overhead, which dominate event timing of sub-millisecond work, are left out."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0)
    return total_us / iters / 1e3


def graph_ms(fn, replays: int = 50) -> float:
    """Median ms of one call replayed from a CUDA graph: no Python or launch overhead, as inside a captured
    training step. NaN when fn cannot be captured (e.g. it synchronises with the host)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # not capturable: say so, keep the other measurements
        print(f"  (no CUDA graph: {type(e).__name__}: {str(e)[:120]})", flush=True)
        torch.cuda.synchronize()
        return float("nan")
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    times.sort()
    return times[len(times) // 2]


def print_profile(fn, row_limit: int = 16) -> None:
    """Runs fn once (after a warm-up call) under torch.profiler and prints device time per op and input shape."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=row_limit,
                                                             max_name_column_width=40, max_shapes_column_width=60))


def is_gpu_work(e) -> bool:
    """A profiler event (or key average) that is work on the GPU: a kernel, copy or memset. A record_function label
    also has a span on the GPU's timeline, from its first kernel to its last, gaps included: not work."""
    return e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)


def gpu_idle(events, min_gap_us: float = 50.0, top: int = 8) -> dict:
    """Where a profiled step leaves the GPU without work: the gaps of at least `min_gap_us` between the union of
    its kernels' intervals, their total, their sum by the step's phase (the outermost `phase:` host event at the
    gap's middle: record_function labels the benchmark puts on the trainer's methods), and for the longest ones the
    host's state: the host-blocking call that ended inside the gap, if one did (a read of a GPU value makes the host
    wait, then the queue starts empty), and the outermost and innermost host events running at the gap's middle;
    and the host's wall time in each phase. `events`: torch.profiler's `prof.events()`."""
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                     if is_gpu_work(e) and e.time_range.end > e.time_range.start)
    host = [e for e in events if e.device_type.name == "CPU"]
    phases = [e for e in host if e.name.startswith("phase:")]
    gaps, end = [], None
    for start, stop in kernels:
        if end is not None and start - end >= min_gap_us:
            gaps.append((end, start))
        end = stop if end is None else max(end, stop)
    gaps.sort(key=lambda g: g[0] - g[1])  # longest first

    def running(at, among):
        return sorted((e for e in among if e.time_range.start <= at <= e.time_range.end),
                      key=lambda e: e.time_range.start)

    def phase(gap):
        outer = running((gap[0] + gap[1]) / 2, phases)
        return outer[0].name if outer else "other"

    blocking = sorted((e.time_range.end, e.name) for e in host if e.name in HOST_BLOCKING)

    def detail(gap):
        inside = running((gap[0] + gap[1]) / 2, host)
        # a sync returns just after the last kernel before it ends: one ending inside the gap caused it
        synced = [name for t, name in blocking if gap[0] - 50 <= t <= gap[1]]
        return {"ms": round((gap[1] - gap[0]) / 1e3, 2), "phase": phase(gap), "after": synced[-1] if synced else None,
                "host": [e.name[:60] for e in (inside if len(inside) <= 4 else inside[:2] + inside[-2:])]}

    by_phase: dict[str, float] = {}
    for gap in gaps:
        name = phase(gap)
        by_phase[name] = by_phase.get(name, 0.0) + (gap[1] - gap[0]) / 1e3
    host_ms: dict[str, float] = {}  # the host's time in each phase (outermost calls of it only)
    for e in phases:
        if not any(o is not e and o.name == e.name and o.time_range.start <= e.time_range.start
                   and e.time_range.end <= o.time_range.end for o in phases):
            host_ms[e.name] = host_ms.get(e.name, 0.0) + (e.time_range.end - e.time_range.start) / 1e3
    return {"idle_ms": round(sum(b - a for a, b in gaps) / 1e3, 1), "idle_gaps": len(gaps),
            "idle_by_phase": {k: round(v, 1) for k, v in sorted(by_phase.items(), key=lambda kv: -kv[1])},
            "host_ms_by_phase": {k: round(v, 2) for k, v in sorted(host_ms.items(), key=lambda kv: -kv[1])},
            "longest_idle": [detail(g) for g in gaps[:top]]}


# host calls that wait for the GPU: after one returns the GPU has nothing queued
HOST_BLOCKING = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "cudaStreamSynchronize",
                 "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "aten::equal", "aten::is_nonzero")
