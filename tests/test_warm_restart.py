"""A second process with the same model and shapes reuses the first one's compile: every graph we hand Inductor hits
its FX graph cache, and the joint graph AOTAutograd's cache (so our rewritten graphs, our ops and their options make
stable cache keys). Both processes share a fresh cache directory; a training step each, backend="liger"."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent
STEP = """
import json, os, sys
sys.path.insert(0, {tests!r})
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch
import liger_compile
from torch._dynamo.utils import counters
from models import batch, tiny
report = liger_compile.Report()
model = tiny("llama", layers=1)
torch.compile(model, backend="liger", options={{"report": report}})(**batch()).loss.backward()
print(json.dumps({{"inductor": dict(counters["inductor"]), "aot": dict(counters["aot_autograd"]),
                  "fused": report.counts}}))
"""


def run_step(cache_dir: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
    out = subprocess.run([sys.executable, "-c", STEP.format(tests=str(TESTS))], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_hits_every_cache(tmp_path):
    first, second = run_step(tmp_path), run_step(tmp_path)
    assert first["fused"]["rms_norm"] == 3 and second["fused"] == first["fused"]  # the rewrite ran both times
    graphs = first["inductor"].get("fxgraph_cache_miss", 0)
    assert graphs >= 2 and not first["inductor"].get("fxgraph_cache_hit"), first  # forward and backward compiled
    assert second["inductor"].get("fxgraph_cache_hit") == graphs, second
    assert not second["inductor"].get("fxgraph_cache_miss") and not second["inductor"].get("fxgraph_cache_bypass")
    assert second["aot"].get("autograd_cache_hit") == first["aot"].get("autograd_cache_miss") == 1, (first, second)
