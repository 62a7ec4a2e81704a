"""bench/bench_kernels.py finds its cases in bench/kernel_cases/ (one module per kernel): each is importable without
a GPU, declares its place in the table, and times a kernel module the op registry knows."""
import os
import sys

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "bench")


def test_every_kernel_case_is_found_and_names_a_registered_kernel(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import bench_kernels
    from liger_compile.kernels._op import all_ops

    cases = bench_kernels.cases()
    modules = {op.module.split(".")[2] for op in all_ops().values()}
    assert {"rms_norm", "rotary", "gated_mlp", "linear_cross_entropy", "layer_norm"} <= set(cases)
    assert set(cases) <= modules, set(cases) - modules
    assert set(bench_kernels.untimed_kernels()) == modules - set(cases)
    assert all(callable(case) for case in cases.values())
    sys.modules.pop("bench_kernels", None)


def test_trainer_summary_reads_every_recorded_run(tmp_path, monkeypatch):
    """bench/summary_trainers.py over the recorded runs: one row per variant of each, ratios to use_liger_kernel."""
    monkeypatch.syspath_prepend(BENCH)
    import summary_trainers

    runs = summary_trainers.load(os.path.join(BENCH, "results"))
    rows = summary_trainers.rows(runs)
    assert {name.split("_")[0] for name, _ in runs} >= {"sft", "dpo"}
    assert len(rows) == sum(len(data["rows"]) for _, data in runs)
    assert all(r["vs use_liger_kernel"] == 1.0 for r in rows if r["variant"] == "use_liger_kernel=True")
    summary_trainers.main(["--out", str(tmp_path)])
    assert (tmp_path / "trainers_summary.png").stat().st_size > 0
    sys.modules.pop("summary_trainers", None)


def test_trainer_bench_reads_the_fused_variants_from_the_backends_log(monkeypatch):
    """bench/bench_trainers.py records, per pattern and variant, the sites the backend's DEBUG report lists."""
    import logging

    import torch

    import liger_compile

    monkeypatch.syspath_prepend(BENCH)
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), os.pardir))
    import bench_trainers
    from models import batch, tiny

    log = logging.getLogger("liger_compile")
    fusions, level = bench_trainers.FusionLog(), log.level
    log.addHandler(fusions)
    log.setLevel(logging.DEBUG)
    try:
        report = liger_compile.explain(tiny("llama"), **batch())
    finally:
        log.removeHandler(fusions)
        log.setLevel(level)
    want: dict[str, int] = {}
    for site in (s for g in report.graphs for s in g.fused):
        key = f"{site.pattern} [{site.variant}]"
        want[key] = want.get(key, 0) + 1
    assert fusions.variants == want and sum(want.values()) == sum(report.counts.values()) > 5, fusions.variants
    assert fusions.counts() == {k: v for k, v in report.counts.items() if v}
    sys.modules.pop("bench_trainers", None)
    torch._dynamo.reset()


def test_gpu_idle_finds_the_gaps_their_phase_and_the_sync_before_them(monkeypatch):
    """bench/common.py's gpu_idle on a made-up timeline: kernels on two streams (overlapping), a host read that
    drains the queue, then a backward the host launches slowly."""
    from types import SimpleNamespace as Event

    monkeypatch.syspath_prepend(BENCH)
    from common import gpu_idle

    def event(name, device, start, end, annotation=False):
        return Event(name=name, device_type=Event(name=device), time_range=Event(start=start, end=end),
                     is_user_annotation=annotation)

    events = [event("k1", "CUDA", 0, 100), event("k2", "CUDA", 90, 200),  # overlapping: no gap between them
              event("phase:backward", "CUDA", 0, 1700, annotation=True),  # a label's GPU span: covers the gaps
              event("k3", "CUDA", 1200, 1300), event("k4", "CUDA", 1320, 1400), event("k5", "CUDA", 1600, 1700),
              event("step", "CPU", 0, 2000), event("phase:compute_loss", "CPU", 0, 400),
              event("aten::item", "CPU", 150, 210), event("phase:backward", "CPU", 400, 1900),
              event("aten::mm", "CPU", 650, 750)]
    idle = gpu_idle(events)
    assert idle["idle_ms"] == 1.2 and idle["idle_gaps"] == 2  # 200-1200 and 1400-1600; 1300-1320 is under 50 us
    assert idle["idle_by_phase"] == {"phase:backward": 1.2}  # both gaps' middles fall in the backward
    assert idle["host_ms_by_phase"] == {"phase:backward": 1.5, "phase:compute_loss": 0.4}
    longest = idle["longest_idle"][0]
    assert longest["ms"] == 1.0 and longest["after"] == "aten::item" and longest["host"] == ["step", "phase:backward",
                                                                                               "aten::mm"]
    sys.modules.pop("common", None)
