#!/usr/bin/env bash
# Fourth device call: GPU tests, all kernel benchmarks, a one-step profile of the 4x4096 training step.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . >/dev/null 2>&1
export PYTHONPATH=/tmp/site
timeout 70 python3 -m pytest -q -x -p no:logging --tb=line tests/test_gpu.py -k "not qwen3 and not gemma" 2>&1 | tail -3 | tee $OUT/gpu_tests.log
timeout 110 python3 bench/bench_e2e.py --variants ours --steps 3 --profile $OUT --out /tmp/e2e 2>&1 | grep "^| ours"
timeout 150 python3 bench/bench_kernels.py --out $OUT 2>&1 | grep "^| "
head -c 6000 $OUT/profile_ours.txt
