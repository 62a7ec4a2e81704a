#!/usr/bin/env bash
# Second device call: the failing dynamic test's error, RMSNorm tile sweep, kernel benchmarks, one e2e run.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . >/dev/null 2>&1
export PYTHONPATH=/tmp/site
timeout 90 python3 -m pytest -q -x -p no:logging --tb=short "tests/test_gpu.py::test_backend_on_cuda_bf16_matches_eager[True-llama]" > $OUT/dyn.log 2>&1; grep -E "Error|error|assert" $OUT/dyn.log | head -8
timeout 100 python3 bench/tune_rms_norm.py 2>&1 | tee $OUT/tune.log
timeout 200 python3 bench/bench_kernels.py --out $OUT 2>&1 | grep -v -i "warn\|backend impl" | tee $OUT/bench_kernels.log | grep "^|"
timeout 220 python3 bench/bench_e2e.py --variants ours --out $OUT 2>&1 | tee $OUT/e2e.log | tail -30
