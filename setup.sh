#!/usr/bin/env bash
# Creates .venv with everything the demo, the tests and the benchmarks need. Safe to run again.
# On a machine that already has torch (a CUDA image), the venv sees it through --system-site-packages;
# elsewhere the CPU build of torch 2.13.0 is installed.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv --system-site-packages .venv
PY=.venv/bin/python
$PY -m pip install -q --upgrade pip >/dev/null
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q -c constraints.txt torch
$PY -c "import triton" 2>/dev/null || $PY -m pip install -q -c constraints.txt triton
$PY -m pip install -q -c constraints.txt -e ".[test,bench]"
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
