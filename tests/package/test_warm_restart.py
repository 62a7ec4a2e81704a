"""A second process with the same model and shapes reuses the first one's compile: every graph we hand Inductor hits
its FX graph cache, and the joint graph AOTAutograd's cache (so our rewritten graphs, our ops and their options make
stable cache keys). Both processes share a fresh cache directory; a training step each, backend="liger". The same
holds for a job moved to another machine with PyTorch's portable cache artifacts: the first process saves them
(torch.compiler.save_cache_artifacts), the second loads them into an empty cache directory before compiling."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent.parent  # tests/models.py
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
if {stamp!r}:  # another version of our sources
    liger_compile.cache_key.package_hash = lambda: {stamp!r}
model = tiny("llama", layers=1)
artifacts = {artifacts!r}
if artifacts and os.path.exists(artifacts):
    torch.compiler.load_cache_artifacts(open(artifacts, "rb").read())
torch.compile(model, backend="liger", options={{"report": report}})(**batch()).loss.backward()
if artifacts and not os.path.exists(artifacts):
    open(artifacts, "wb").write(torch.compiler.save_cache_artifacts()[0])
print(json.dumps({{"inductor": dict(counters["inductor"]), "aot": dict(counters["aot_autograd"]),
                  "fused": report.counts}}))
"""


def run_step(cache_dir: Path, artifacts: Path | None = None, stamp: bytes = b"") -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
    out = subprocess.run([sys.executable, "-c", STEP.format(tests=str(TESTS), artifacts=str(artifacts) if artifacts else "", stamp=stamp)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """One cold process for both tests (each compile in a fresh process costs most of a minute on CPU): it fills
    machine_a's cache directory and saves the portable artifacts."""
    root = tmp_path_factory.mktemp("warm_restart")
    first = run_step(root / "machine_a", root / "liger_cache.bin")
    assert first["fused"]["rms_norm"] == 3, first
    graphs = first["inductor"].get("fxgraph_cache_miss", 0)
    assert graphs == 2 and not first["inductor"].get("fxgraph_cache_hit"), first  # forward and backward compiled
    assert first["aot"].get("autograd_cache_miss") == 1, first
    return root, first


def test_second_process_hits_every_cache(cold):
    root, first = cold
    second = run_step(root / "machine_a")  # the same cache directory, no artifacts
    assert second["fused"] == first["fused"]  # the rewrite ran both times
    assert second["inductor"].get("fxgraph_cache_hit") == 2, second
    assert not second["inductor"].get("fxgraph_cache_miss") and not second["inductor"].get("fxgraph_cache_bypass")
    assert second["aot"].get("autograd_cache_hit") == 1, second


def test_another_version_of_our_sources_compiles_anew(cold):
    """Compiled graphs contain the code of our triton_ops, which neither cache keys by itself: our sources' hash
    is in the key (liger_compile/cache_key.py), so an upgraded package does not get the old version's code."""
    root, first = cold
    second = run_step(root / "machine_a", stamp=b"another version")
    assert second["fused"] == first["fused"]
    assert second["inductor"].get("fxgraph_cache_miss") == 2 and not second["inductor"].get("fxgraph_cache_hit")
    assert second["aot"].get("autograd_cache_miss") == 1 and not second["aot"].get("autograd_cache_hit"), second


def test_portable_cache_artifacts_warm_an_empty_cache(cold):
    root, first = cold
    artifacts = root / "liger_cache.bin"
    assert artifacts.stat().st_size > 0
    second = run_step(root / "machine_b", artifacts)  # nothing in its cache directory but what it loads
    assert second["fused"] == first["fused"], (first, second)
    assert second["inductor"].get("fxgraph_cache_hit") == 2 and not second["inductor"].get("fxgraph_cache_miss")
    assert second["aot"].get("autograd_cache_hit") == 1, second


def test_triton_cache_directory_and_ptxas_are_inductors_from_the_first_compile(monkeypatch, tmp_path):
    """On a GPU the backend points TRITON_CACHE_DIR and TRITON_PTXAS_PATH where Inductor would, before anything
    compiles, so the kernels our ops launch themselves find their cache in the same directory under the same key in
    every process, whatever runs first; a user's own settings are left alone."""
    from pathlib import Path

    import torch
    from torch._inductor.runtime import compile_tasks
    from torch._inductor.runtime.cache_dir_utils import triton_cache_dir

    from liger_compile import backend

    for name in ("TRITON_CACHE_DIR", "TRITON_PTXAS_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    backend._triton_set_up_as_inductor()
    assert os.environ["TRITON_CACHE_DIR"] == triton_cache_dir(0) == os.path.join(str(tmp_path), "triton", "0")
    torch_ptxas = Path(compile_tasks.__file__).absolute().parents[1] / "bin" / "ptxas"  # absent from CPU builds
    assert os.environ.get("TRITON_PTXAS_PATH") == (str(torch_ptxas) if torch_ptxas.is_file() else None)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/else")
    monkeypatch.setenv("TRITON_PTXAS_PATH", "/my/ptxas")
    backend._triton_set_up_as_inductor()
    assert os.environ["TRITON_CACHE_DIR"] == "/somewhere/else" and os.environ["TRITON_PTXAS_PATH"] == "/my/ptxas"
