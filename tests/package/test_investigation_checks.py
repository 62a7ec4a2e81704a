"""The GPU investigations' own checks run on CPU: the variants each one times compute the same thing (so a script
left for the next GPU run has not rotted)."""
import subprocess
import sys
from pathlib import Path

import pytest

INVESTIGATIONS = Path(__file__).parents[2] / "bench" / "investigations"


@pytest.mark.parametrize("script", ["bench_horizontal_gemm.py", "bench_sdpa_backends.py"])
def test_variants_agree(script):
    out = subprocess.run([sys.executable, str(INVESTIGATIONS / script), "--check"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] in ("variants agree", "backends agree"), out.stdout
