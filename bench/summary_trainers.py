"""One table and one chart over every recorded trainer run: bench/results/{sft,dpo,kto,grpo,gkd}_*.json (written by
bench_trainers.py), each variant's tokens/s as a multiple of use_liger_kernel=True's in the same run.

    python bench/summary_trainers.py [--results bench/results]     -> trainers_summary.md, trainers_summary.png

The target for backend="liger" is 1.15x use_liger_kernel=True's tokens/s at no more peak memory. Needs no GPU.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TRAINERS = ("sft", "dpo", "kto", "grpo", "gkd")
VARIANTS = {"plain": "no compile", "liger_kernel": "use_liger_kernel=True", "inductor": "Inductor",
            "liger": 'backend "liger"', "unsloth": "Unsloth",
            "liger_offload": 'backend "liger", offload_activations',
            "liger_cudagraphs": 'backend "liger", mode="reduce-overhead"',
            "liger_gcfreeze": 'backend "liger", gc.freeze() after step 1'}
COLORS = {VARIANTS[v]: color for v, color in {  # by label, each label written once (VARIANTS)
    "plain": "tab:gray", "liger_kernel": "tab:orange", "inductor": "tab:blue", "liger": "tab:green",
    "unsloth": "tab:purple", "liger_offload": "tab:olive", "liger_cudagraphs": "tab:cyan",
    "liger_gcfreeze": "tab:brown"}.items()}
TARGET = 1.15


def load(results: str) -> list[tuple[str, dict]]:
    """(run name, its json) for every trainer run, sorted by name."""
    runs = []
    pattern = re.compile(rf"^({'|'.join(TRAINERS)})_.*\.json$")
    for path in sorted(glob.glob(os.path.join(results, "*.json"))):
        name = os.path.basename(path)
        if pattern.match(name):
            with open(path) as f:
                runs.append((name[: -len(".json")], json.load(f)))
    return runs


def rows(runs) -> list[dict]:
    out = []
    for name, data in runs:
        by_variant = {r["variant"]: r for r in data["rows"]}
        base = by_variant.get("liger_kernel", {})
        for variant, label in VARIANTS.items():
            r = by_variant.get(variant)
            if r is None:
                continue
            tps, base_tps = r.get("tokens/s"), base.get("tokens/s")
            ratio = tps / base_tps if tps and base_tps else None
            memory_ok = None if not (r.get("peak_GiB") and base.get("peak_GiB")) else r["peak_GiB"] <= base["peak_GiB"]
            ours = label.startswith('backend "liger"')  # every variant of ours, whatever its options
            met = "" if not ours else ("yes" if ratio and ratio >= TARGET and memory_ok else "no")
            out.append({"run": name, "date": data.get("env", {}).get("date", ""), "variant": label,
                        "tokens/s": tps, "vs use_liger_kernel": ratio, "peak_GiB": r.get("peak_GiB"),
                        "target met": met, "error": r.get("error", "")})
    return out


def table(summary: list[dict]) -> str:
    from common import markdown_table  # noqa: PLC0415

    cols = ["run", "date", "variant", "tokens/s", "vs use_liger_kernel", "peak_GiB", "target met", "error"]
    shown = [{**r, "tokens/s": "" if r["tokens/s"] is None else f"{r['tokens/s']:,.0f}",
              "vs use_liger_kernel": "" if r["vs use_liger_kernel"] is None else f"{r['vs use_liger_kernel']:.2f}",
              "peak_GiB": "" if r["peak_GiB"] is None else f"{r['peak_GiB']:.2f}"} for r in summary]
    return markdown_table(shown, cols)


def chart(path: str, summary: list[dict]) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    runs = list(dict.fromkeys(r["run"] for r in summary))
    labels = list(VARIANTS.values())
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(runs)), 3.8))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        values = [next((r["vs use_liger_kernel"] or 0 for r in summary if r["run"] == run and r["variant"] == label),
                       0) for run in runs]
        bars = ax.bar([j + i * width for j in range(len(runs))], values, width, label=label, color=COLORS[label])
        for b, v in zip(bars, values):
            if v:
                ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=7)
    ax.axhline(TARGET, color="tab:red", linestyle="--", linewidth=1, label=f"target {TARGET}x")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(runs))], runs, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("tokens/s / use_liger_kernel=True's")
    ax.set_title("TRL trainers on one H200, Llama-3.2-1B shape (0: not run or not finished)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--out", default=None, help="where to write (default: --results)")
    args = ap.parse_args(argv)
    out = args.out or args.results
    summary = rows(load(args.results))
    text = ("# TRL trainers: every recorded run against use_liger_kernel=True\n\n"
            "From the bench_trainers.py results in this folder (GPU, versions and date in each run's own file). "
            f"Target for backend \"liger\": {TARGET}x use_liger_kernel=True's tokens/s at no more peak memory.\n\n"
            + table(summary) + "\n")
    with open(os.path.join(out, "trainers_summary.md"), "w") as f:
        f.write(text)
    chart(os.path.join(out, "trainers_summary.png"), summary)
    print(text)


if __name__ == "__main__":
    main()
