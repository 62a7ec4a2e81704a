"""bench/bench_trainers.py end to end on CPU: TRL SFT with a LoRA adapter on a tiny bf16 Llama under the Trainer's
bf16 autocast (the setting where the adapters once went unfused), no compile against backend "liger", one process
each. The recorded rows must count the rows each step really took, agree on the first loss, and list the fused
adapter projections."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_lora_sft_rows_record_the_fusions_and_the_real_batch(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_trainers.py"), "--tiny", "--lora", "4", "--cpu-bf16",
           "--variants", "plain,liger", "--steps", "3", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = {r["variant"]: r for r in json.load(open(tmp_path / "sft_tiny-llama_4x64_lora4.json"))["rows"]}
    assert set(rows) == {"plain", "liger"} and not any("error" in r for r in rows.values())
    assert all(r["rows_per_step"] == 4 for r in rows.values())
    assert abs(rows["plain"]["first_loss"] - rows["liger"]["first_loss"]) < 1e-2 * abs(rows["plain"]["first_loss"])
    sites = rows["liger"]["fused_variants"]
    layers = 2  # the tiny Llama's: q, k, v, o, gate and up through lora_projection, down_proj inside the MLP op
    assert sum(n for k, n in sites.items() if k.startswith("lora_projection")) == 6 * layers, sites
    assert sum(n for k, n in sites.items() if "down_proj with LoRA" in k) == layers, sites
