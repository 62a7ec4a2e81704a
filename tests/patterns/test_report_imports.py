"""A Report is cheap: making one (or importing liger_compile.report) imports no kernel module."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CODE = """
import sys
import liger_compile.report as report
report.Report()
print(sorted(m for m in sys.modules if m.startswith(("liger_compile.kernels", "liger_compile.patterns"))))
"""


def test_a_report_imports_no_kernel():
    # a fresh interpreter: in this one the other tests have imported every kernel already
    out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
