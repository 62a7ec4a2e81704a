#!/usr/bin/env bash
# Everything the H200 runs, in stages (one device call each; each stays under the 10-minute call limit):
#   bash bench/on_device.sh tests      GPU tests (tests/test_gpu.py and the kernel tests on CUDA)
#   bash bench/on_device.sh kernels    kernel table (eager, Inductor, Liger-Kernel, ours) with event and GPU-busy times
#   bash bench/on_device.sh e2e4k      Llama-3.2-1B 4x4096, all variants side by side, one process each
#   bash bench/on_device.sh e2e32k     Llama-3.2-1B 1x32768, all variants
# Carry the Liger-Kernel wheel in .whl (see the device tool's README). Results and logs go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . >/dev/null 2>&1
export PYTHONPATH=/tmp/site
case "${1:-tests}" in
  tests) timeout 540 python3 -m pytest -q -p no:logging --tb=short tests/test_gpu.py tests/test_kernel_rms_norm.py \
           tests/test_kernel_rotary.py tests/test_kernel_gated_mlp.py tests/test_kernel_linear_cross_entropy.py 2>&1 \
           | tee $OUT/gpu_tests.log | tail -30 ;;
  kernels) timeout 540 python3 bench/bench_kernels.py --out $OUT 2>&1 | tee $OUT/bench_kernels.log | grep "^| " ;;
  e2e4k) timeout 560 python3 bench/bench_e2e.py --out $OUT --timeout 150 2>&1 | tail -12 ;;
  e2e32k) timeout 560 python3 bench/bench_e2e.py --batch 1 --seq 32768 --out $OUT --timeout 150 2>&1 | tail -12 ;;
esac
