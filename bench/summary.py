"""One table and one chart over every recorded training-step run: bench/results/{e2e,profile,ablation}_*.json.

    python bench/summary.py [--results bench/results]     -> e2e_summary.md, e2e_summary.png

Each config gets its target for backend="liger" (a row labelled "target") and the reference numbers measured first
(rows whose source is "anchor": an earlier run on the same kind of H200, 2026-11-29, torch 2.11, transformers 5.17,
Liger-Kernel 0.8.5), next to the rows of the recorded runs. Also holds the chart that bench_e2e.py draws per run.
Needs no GPU.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ["eager", "inductor", "liger_kernel", "liger_kernel_inductor", "ours"]

# The targets for backend="liger": (tokens/s at least, peak GiB at most).
TARGETS = {
    "llama-1b 4x4096": (74_000, 26.0),
    "llama-1b 1x32768": (38_000, 45.0),
    "llama-1b 1x65536": (24_000, 80.0),
    "qwen2-1.5b 4x4096": (56_000, 40.0),
}

# The reference runs on one H200 (torch 2.11.0+cu130, transformers 5.17.0, liger-kernel 0.8.5, 2026-11-29):
# (tokens/s, peak GiB), or the error that run recorded.
ANCHORS = {
    "llama-1b 4x4096": {"eager": (49_734, 61.2), "inductor": (49_875, 39.4), "liger_kernel": (64_350, 26.3),
                        "liger_kernel_inductor": "illegal memory access"},
    "llama-1b 1x32768": {"eager": (28_629, 115.3), "inductor": (14_324, 73.5), "liger_kernel": (33_080, 45.2),
                         "liger_kernel_inductor": "illegal memory access"},
    "llama-1b 1x65536": {"eager": "OOM", "inductor": "OOM", "liger_kernel": (21_232, 82.9)},
    "qwen2-1.5b 4x4096": {"eager": (38_157, 85.6), "inductor": (39_941, 56.7), "liger_kernel": (48_738, 40.8)},
}

COLORS = {"eager": "#7f7f7f", "inductor": "#1f77b4", "liger_kernel": "#ff7f0e", "liger_kernel_inductor": "#d4a017",
          "ours": "#2ca02c"}


def config_name(model: str, batch: int, seq: int, mode: str | None = None) -> str:
    return f"{model} {batch}x{seq}" + (f" {mode}" if mode else "")


def base_config(config: str) -> str:
    """'llama-1b 4x4096 max-autotune' -> 'llama-1b 4x4096' (targets and anchors are for the default mode)."""
    return " ".join(config.split()[:2])


def anchor_rows(config: str) -> list[dict]:
    rows = []
    for v, a in ANCHORS.get(config, {}).items():
        r = {"variant": v, "source": "anchor"}
        if isinstance(a, str):
            r["error"] = a
        else:
            r["tokens/s"], r["peak_GiB"] = a
        rows.append(r)
    return rows


def target_check(config: str, row: dict) -> str:
    """'yes', or what misses the config's target; '' when there is no target or no number."""
    t = TARGETS.get(config)
    if not t or "tokens/s" not in row:
        return ""
    miss = []
    if row["tokens/s"] < t[0]:
        miss.append(f"speed {row['tokens/s'] / t[0]:.0%}")
    if row.get("peak_GiB") is not None and row["peak_GiB"] > t[1]:
        miss.append(f"memory {row['peak_GiB']:.1f} > {t[1]:g} GiB")
    return "yes" if not miss else "no: " + ", ".join(miss)


def _short_error(e) -> str:
    e = str(e)
    if e.startswith("OOM"):
        return "OOM"
    if "illegal memory" in e:
        return "illegal\nmem. access"
    return "timeout" if e.startswith("timeout") else "error"


def e2e_chart(path: str, title: str, configs: list[str], rows: dict[str, list[dict]]):
    """Two panels, tokens/s and peak GiB: one group of bars per config, one bar per (variant, source); anchor
    bars hatched, a failed run marked by its error, the config's target a dashed line across its group."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    labels = []  # (variant, is_anchor), in VARIANTS order, anchor first
    for v in VARIANTS + sorted({r["variant"] for c in configs for r in rows[c]} - set(VARIANTS)):
        for anchor in (True, False):
            if any(r["variant"] == v and (r.get("source") == "anchor") == anchor for c in configs for r in rows[c]):
                labels.append((v, anchor))
    n = max(1, len(labels))
    width = 0.8 / n
    fig, axes = plt.subplots(2, 1, figsize=(max(6.5, 0.45 * n * len(configs) + 2.5), 7.5))
    for ax, key, ylabel, fmt, better in (
            (axes[0], "tokens/s", "tokens/s", lambda v: f"{v / 1e3:.1f}k", "higher is better"),
            (axes[1], "peak_GiB", "peak GiB", lambda v: f"{v:.1f}", "lower is better")):
        top = 1.0
        for i, (v, anchor) in enumerate(labels):
            for g, c in enumerate(configs):
                r = next((r for r in rows[c] if r["variant"] == v and (r.get("source") == "anchor") == anchor), None)
                if r is None:
                    continue
                x = g + i * width
                val = r.get(key)
                if r.get("error"):
                    ax.text(x, 0, _short_error(r.get("error", "")), rotation=90, ha="center", va="bottom", fontsize=6,
                            color=COLORS.get(v, "k"))
                    continue
                if val is None:  # not measured (a CPU check has no peak memory)
                    continue
                top = max(top, val)
                ax.bar(x, val, width, color=COLORS.get(v, None), alpha=0.45 if anchor else 1.0,
                       hatch="//" if anchor else None, edgecolor="white" if anchor else None)
                ax.annotate(fmt(val), (x, val), ha="center", va="bottom", fontsize=6)
        ticks = []
        for g, c in enumerate(configs):
            t = TARGETS.get(base_config(c))
            ticks.append(c)
            if t:
                tv = t[0] if key == "tokens/s" else t[1]
                top = max(top, tv)
                ax.hlines(tv, g - width / 2, g + 0.8 - width / 2, colors="k", linestyles="--", linewidth=1)
                ticks[-1] += "\ntarget " + ("≥ " if key == "tokens/s" else "≤ ") + fmt(tv)
        ax.set_ylim(0, top * 1.15)
        ax.set_xlim(-width / 2 - 0.1, len(configs) - 0.2 - width / 2 + 0.1)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(configs))], ticks)
        ax.set_ylabel(f"{ylabel} ({better})")
    handles = [matplotlib.patches.Patch(color=COLORS.get(v, "#999999"), alpha=0.45 if a else 1.0,
                                        hatch="//" if a else None, label=v + (" (anchor)" if a else ""))
               for v, a in labels]
    handles.append(matplotlib.lines.Line2D([], [], color="k", linestyle="--", linewidth=1, label="target (ours)"))
    axes[0].legend(handles=handles, fontsize=7, ncol=2)
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_runs(results: str) -> dict[str, list[dict]]:
    """config -> rows of the e2e_/profile_/ablation_*.json runs there (the config read from the file name); a
    profile run's rows are its timed steps (the profiled step comes after them)."""
    runs = {}
    paths = [p for kind in ("e2e", "profile", "ablation") for p in glob.glob(os.path.join(results, f"{kind}_*.json"))]
    for path in sorted(paths):
        name = os.path.basename(path)[:-5]
        m = re.fullmatch(r"(?:e2e|profile|ablation)_(.+?)_(\d+)x(\d+)(?:_(.+))?", name)
        if not m or name == "e2e_summary":
            continue
        with open(path) as f:
            data = json.load(f)
        config = config_name(m[1], int(m[2]), int(m[3]), m[4])
        date = data.get("env", {}).get("date", "")
        for r in data["rows"]:
            runs.setdefault(config, []).append({**r, "source": f"run {date}".strip(), "file": name + ".json"})
    return runs


def _fmt_row(config, r):
    def num(k, f):
        v = r.get(k)
        return f.format(v) if isinstance(v, (int, float)) else ""

    return {"config": config, "variant": r["variant"], "source": r.get("source", ""),
            "tokens/s": num("tokens/s", "{:,.0f}"), "peak GiB": num("peak_GiB", "{:.1f}"),
            "first step s": num("first_step_s", "{:.1f}"),
            "first step vs inductor": num("first_step_vs_inductor", "{:.2f}x"),
            "meets target": target_check(base_config(config), r) if r["variant"] == "ours" else "",
            "file": r.get("file", ""), "error": str(r.get("error", "")).replace("|", "/").replace("\n", " ")[:120]}


def summarize(results: str) -> str:
    runs = load_runs(results)
    configs = sorted(set(runs) | set(TARGETS),
                     key=lambda c: (c.split()[0], int(c.split()[1].split("x")[0]) * int(c.split()[1].split("x")[1]),
                                    c))
    table, chart_rows = [], {}
    for c in configs:
        base = base_config(c)
        t = TARGETS.get(base)
        if t and c == base:
            table.append({"config": c, "variant": "ours", "source": "target", "tokens/s": f"≥ {t[0]:,}",
                          "peak GiB": f"≤ {t[1]:g}"})
        rows = ([] if c != base else anchor_rows(c)) + runs.get(c, [])
        rows.sort(key=lambda r: (VARIANTS.index(r["variant"]) if r["variant"] in VARIANTS else 99,
                                 r.get("source") != "anchor"))
        table += [_fmt_row(c, r) for r in rows]
        chart_rows[c] = rows
    from common import markdown_table  # noqa: PLC0415

    cols = ["config", "variant", "source", "tokens/s", "peak GiB", "first step s", "first step vs inductor",
            "meets target", "file", "error"]
    files = sorted({r["file"] for rs in runs.values() for r in rs})
    md = ("# Training step: every recorded run, with the reference runs and the targets\n\n"
          "Written by `bench/summary.py` from " + (", ".join(f"`{f}`" for f in files) or "no runs") + ". "
          "`anchor` rows: the reference runs (an H200, torch 2.11.0+cu130, transformers 5.17.0, Liger-Kernel "
          "0.8.5, 2026-11-29). `target` rows: the targets for `backend=\"liger\"` (ours). `meets target` "
          "compares an ours row with its config's target (tokens/s at least, peak GiB at most).\n\n"
          + markdown_table(table, cols) + "\n")
    with open(os.path.join(results, "e2e_summary.md"), "w") as f:
        f.write(md)
    chart_configs = [c for c in configs if chart_rows[c]]
    e2e_chart(os.path.join(results, "e2e_summary.png"), "Training step, one H200: recorded runs, anchors (hatched), "
              "targets (dashed)", chart_configs, chart_rows)
    return md


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    print(summarize(args.results))


if __name__ == "__main__":
    main()
