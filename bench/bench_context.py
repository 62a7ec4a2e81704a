"""Longest context that trains on one GPU: batch 1, one full fwd+bwd+AdamW step, without activation checkpointing
(or with it: --checkpointing, results named context_<model>_checkpointing).

    python bench/bench_context.py --variants ours,liger_kernel [--model llama-1b] [--start 32768] [--max 524288]
                                  [--budget-s 540] [--trial-timeout 240] [--out bench/results]
    python bench/bench_context.py --variants ours --resume --merge bench/results/context_llama-1b.json ...

Per variant: doubles the sequence from --start until a trial fails (or --max passes), then bisects the bracket
down to --granularity (4096). A trial is `bench_e2e.py --one VARIANT --batch 1 --seq T --warmup 1 --steps 1
--no-phases` in its own process (the model shape and settings of bench_e2e.py), killed after --trial-timeout.
It fails on torch.OutOfMemoryError, a CUDA error, the timeout, or any other error (an error in the very first trial
stops that variant: it is not a size limit). If the first trial fails, the search halves downwards instead.

--budget-s bounds the whole run: no trial starts that the remaining time cannot hold, and the run reports the
bracket found so far (`complete` false). Results are rewritten after every trial (context_<model>.md/.json/.png in
--out), so a run killed from outside keeps what it measured. Rows of variants not run now are kept from --merge
(default: the existing file in --out); --resume continues each variant from the bracket recorded there.
Record per variant: longest passing T, smallest failing T (and why it failed), peak GiB and tokens/s at the
longest (one timed step after one warm-up: a cheap figure, not bench_e2e's median), and every trial.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_e2e  # noqa: E402

COLS = ["variant", "longest_pass", "smallest_fail", "peak_GiB", "tokens/s", "first_step_s", "fail_reason",
        "complete", "trials"]


def next_seq(lo: int | None, hi: int | None, start: int, cap: int, gran: int) -> int | None:
    """The next length to try given the longest pass `lo` and the shortest failure `hi` so far; None when done."""
    if hi is None:  # still doubling
        if lo is not None and lo >= cap:
            return None
        return start if lo is None else min(2 * lo, cap)
    if lo is None:  # even the first trial failed: halve down
        t = (hi // 2) // gran * gran
        return t if t >= gran else None
    if hi - lo <= gran:
        return None
    return lo + max(1, (hi - lo) // gran // 2) * gran


def trial_summary(t: dict) -> str:
    return f"{t['seq']}:{'ok' if t['ok'] else t.get('error_kind', 'fail')}"


def make_row(variant: str, trials: list[dict], cap: int, gran: int, note: str = "") -> dict:
    passed = [t for t in trials if t["ok"]]
    failed = [t for t in trials if not t["ok"]]
    best = max(passed, key=lambda t: t["seq"], default=None)
    worst = min(failed, key=lambda t: t["seq"], default=None)
    lo, hi = best and best["seq"], worst and worst["seq"]
    complete = (lo, hi) != (None, None) and next_seq(lo, hi, gran, cap, gran) is None  # nothing left to try
    row = {"variant": variant, "longest_pass": lo, "smallest_fail": hi, "complete": bool(complete),
           "trials": " ".join(trial_summary(t) for t in sorted(trials, key=lambda t: t["seq"])), "trial_log": trials}
    if best:
        row.update({k: best.get(k) for k in ("peak_GiB", "tokens/s", "step_ms", "first_step_s", "first_loss")})
    if worst:
        row["fail_reason"] = worst.get("error", "")[:160]
    if hi is None and lo is not None and lo >= cap:
        row["fail_reason"] = f"none up to --max {cap}"
    if note:
        row["note"] = note
    return row


def search(args, variant: str, prior: list[dict], deadline: float, save) -> dict:
    """Runs trials for `variant` until its bracket is --granularity wide or the time runs out."""
    trials = list(prior)
    note = ""
    while True:
        lo = max((t["seq"] for t in trials if t["ok"]), default=None)
        hi = min((t["seq"] for t in trials if not t["ok"]), default=None)
        seq = next_seq(lo, hi, args.start, args.max, args.granularity)
        if seq is None:
            break
        left = deadline - time.time()
        # a trial needs at least its startup + compile; the longest trial so far is the best guess of that
        need = max([args.min_trial_s] + [t["wall_s"] for t in trials if t["ok"] and "wall_s" in t])
        if left < min(need, args.trial_timeout):
            note = f"stopped: {left:.0f} s of --budget-s left, a trial takes ~{need:.0f} s"
            break
        timeout = min(args.trial_timeout, left)
        argv = bench_e2e.one_argv(args, variant, 1, seq)
        res = bench_e2e.run_variant(argv, timeout)
        res.pop("stderr")
        if res.get("error_kind") == "timeout" and timeout < args.trial_timeout:
            note = f"stopped: the budget cut the trial at {seq} short ({timeout:.0f} s)"
            print(f"{variant} T={seq}: cut short by the budget, not counted", flush=True)
            break
        t = {"seq": seq, "ok": "error" not in res, **res}
        trials.append(t)
        print(f"{variant} T={seq}: " + ("ok, %.1f GiB, %.0f tok/s" % (t.get("peak_GiB") or 0, t["tokens/s"])
                                        if t["ok"] else t["error"][:200]) + f" ({t['wall_s']:.0f} s)", flush=True)
        save(make_row(variant, trials, args.max, args.granularity))
        if not t["ok"] and t.get("error_kind") == "error" and len(trials) == 1:
            note = "stopped: the first trial failed with an error that is not a size limit"
            break
    return make_row(variant, trials, args.max, args.granularity, note)


def write(args, rows: dict[str, dict], name: str):
    from common import write_results  # noqa: PLC0415

    ordered = [rows[v] for v in bench_e2e.VARIANTS + sorted(set(rows) - set(bench_e2e.VARIANTS)) if v in rows]
    title = (f"Longest trainable context, {args.model} shape, batch 1, bf16, one GPU, "
             + ("gradient checkpointing" if args.checkpointing else "no activation checkpointing"))
    notes = (f"Doubling from --start, then bisecting to {args.granularity}; each trial one process "
             "(`bench_e2e.py --one V --batch 1 --seq T --warmup 1 --steps 1 --no-phases`): one warm-up and one timed "
             "fwd+bwd+AdamW(fused) step. peak_GiB and tokens/s are at longest_pass (one timed step). A trial fails on "
             "OOM, a CUDA error, its timeout or another error (fail_reason). complete: the bracket is "
             f"{args.granularity} wide (or --max passed). trials: every length tried, ok or why not."
             + ("" if not args.tiny else "\n\nTINY model on CPU: a check of the search, not a measurement."))
    write_results(args.out, name, title, ordered, COLS, notes)
    try:
        chart(os.path.join(args.out, name + ".png"), title, ordered)
    except Exception as e:  # the chart never costs the results
        print(f"chart not written: {e!r}")


def chart(path: str, title: str, rows: list[dict]):
    """One bar per variant: the longest passing length, the unresolved bracket above it lighter, with peak GiB and
    tokens/s at the longest written beside it."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from summary import COLORS  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.7 * max(1, len(rows))))
    top = 1
    for i, r in enumerate(rows):
        lo, hi = r.get("longest_pass") or 0, r.get("smallest_fail")
        c = COLORS.get(r["variant"], "#999999")
        ax.barh(i, lo / 1024, color=c)
        if hi:
            ax.barh(i, (hi - lo) / 1024, left=lo / 1024, color=c, alpha=0.25, hatch="..")
        top = max(top, (hi or lo) / 1024)
        label = (f"{lo / 1024:g}k" if lo else "none") + (f" (fails at {hi / 1024:g}k)" if hi else "")
        if lo and r.get("tokens/s"):
            label += f", {r['peak_GiB']:.1f} GiB, {r['tokens/s'] / 1e3:.1f}k tok/s" if r.get("peak_GiB") else \
                f", {r['tokens/s'] / 1e3:.1f}k tok/s"
        if not r.get("complete"):
            label += " [search incomplete]"
        ax.annotate(label, ((hi or lo) / 1024, i), xytext=(4, 0), textcoords="offset points", va="center",
                    fontsize=8)
    for t in (32, 64, 128):
        if t < top * 1.6:
            ax.axvline(t, color="k", linestyle=":", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [r["variant"] for r in rows])
    ax.set_xlim(0, top * 1.6)
    ax.invert_yaxis()
    ax.set_xlabel("sequence length, k tokens (batch 1): longest that trains; lighter: the bracket left unresolved")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-1b", choices=list(bench_e2e.MODELS))
    ap.add_argument("--variants", default="liger_kernel,ours", help=f"comma list of {bench_e2e.VARIANTS}")
    ap.add_argument("--start", type=int, default=32768, help="first length tried (a multiple of --granularity)")
    ap.add_argument("--max", type=int, default=524288, help="never try longer than this")
    ap.add_argument("--granularity", type=int, default=4096)
    ap.add_argument("--budget-s", type=float, default=540, help="total seconds for the whole run")
    ap.add_argument("--trial-timeout", type=float, default=240, help="seconds per trial (its process is killed)")
    ap.add_argument("--min-trial-s", type=float, default=60,
                    help="no trial starts with less time left than this (or the longest passing trial so far)")
    ap.add_argument("--mode", default=None, help="torch.compile mode for the compiled variants")
    ap.add_argument("--checkpointing", action="store_true", help="HF gradient checkpointing in every variant")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--merge", default=None, help="earlier context_<model>.json whose other variants' rows are kept "
                                                  "(default: the one in --out, if any)")
    ap.add_argument("--resume", action="store_true", help="continue each variant from its trials in --merge")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fake-oom-tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.start % args.granularity or args.max < args.start:
        ap.error("--start must be a multiple of --granularity and at most --max")
    args.steps, args.warmup, args.no_phases, args.profile = 1, 1, True, None  # what bench_e2e.one_argv reads
    deadline = time.time() + args.budget_s
    name = f"context_{args.model}" + ("_checkpointing" if args.checkpointing else "") + ("_tiny" if args.tiny else "")
    merge = args.merge or os.path.join(args.out, name + ".json")
    rows = {}
    if os.path.exists(merge):
        with open(merge) as f:
            rows = {r["variant"]: r for r in json.load(f)["rows"]}
        print(f"kept from {merge}: {sorted(rows)}")
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        prior = rows.get(v, {}).get("trial_log", []) if args.resume else []
        rows[v] = search(args, v, prior, deadline, lambda row: (rows.__setitem__(row["variant"], row),
                                                               write(args, rows, name)))
        write(args, rows, name)
        r = rows[v]
        print(f"== {v}: longest {r['longest_pass']}, fails at {r['smallest_fail']}, complete {r['complete']}"
              + (f" ({r['note']})" if r.get("note") else ""), flush=True)
    write(args, rows, name)
    with open(os.path.join(args.out, name + ".md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
