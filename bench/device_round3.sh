#!/usr/bin/env bash
# Third device call: e2e (4x4096 with profile and per-phase peaks, then 1x32768), GPU tests, RMSNorm kernels.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . >/dev/null 2>&1
export PYTHONPATH=/tmp/site
timeout 150 python3 bench/bench_e2e.py --variants ours --profile $OUT --out $OUT 2>&1 | grep -v -i warn | tail -4
timeout 80 python3 -m pytest -q -x -p no:logging --tb=short tests/test_gpu.py -k "llama or rms_norm or cross_entropy" 2>&1 | tail -4 | tee $OUT/gpu_tests.log
timeout 60 python3 bench/bench_kernels.py --only rms_norm --out $OUT 2>&1 | grep "^| rms"
timeout 120 python3 bench/bench_e2e.py --variants ours --batch 1 --seq 32768 --out $OUT 2>&1 | grep -v -i warn | tail -3
