#!/usr/bin/env bash
# One device call: install (carried wheels + this repo), GPU tests, kernel benchmarks. Logs under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . >/dev/null 2>&1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -x tests/test_gpu.py tests/test_kernel_rms_norm.py tests/test_kernel_rotary.py \
  tests/test_kernel_gated_mlp.py tests/test_kernel_linear_cross_entropy.py 2>&1 | tail -25 | tee $OUT/gpu_tests.log
timeout ${BENCH_TIMEOUT:-300} python3 bench/bench_kernels.py --out $OUT 2>&1 | grep -v Warning | tee $OUT/bench_kernels.log | tail -40
