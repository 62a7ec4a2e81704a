#!/usr/bin/env bash
# Builds .whl/: the packages a GPU machine with no network lacks for bench/on_device.sh (its CUDA 13 image has torch,
# transformers, accelerate, pandas; not TRL, datasets, Liger-Kernel, Unsloth). Run here, with network, then carry .whl.
#   bash bench/carry_wheels.sh            TRL 1.16, datasets, PEFT, Liger-Kernel wheels; pyarrow unpacked and trimmed
#   UNSLOTH=1 bash bench/carry_wheels.sh  also .whl/unsloth.txz: Unsloth and the versions it pins (TRL <= 1.15,
#                                         datasets < 5), bitsandbytes with its CUDA 13 library only
# pyarrow and bitsandbytes wheels are mostly libraries the benchmarks never load; their trimmed folders keep the
# upload small.
set -euo pipefail
cd "$(dirname "$0")/.."
W=.whl
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
get() {  # get DEST SPEC...: wheels for the GPU machine's Python (3.12, x86-64), no dependencies
  local dest=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$dest" "$@" 2>&1 | grep -v "^WARNING: Location" || true
}
unpack() {  # unpack DIR WHEEL...: each wheel's files into DIR (what pip install --target would put there)
  local dir=$1; shift
  for w in "$@"; do python3 -m zipfile -e "$w" "$dir"; done
}
mkdir -p "$W"
get "$W" trl==1.16.0 datasets==5.2.0 peft==0.21.2 liger-kernel==0.8.5 dill==0.4.1 multiprocess==0.70.19

get "$TMP/arrow" pyarrow==26.0.1
unpack "$TMP/arrow/site" "$TMP"/arrow/*.whl
rm -f "$TMP"/arrow/site/pyarrow/libarrow_flight* "$TMP"/arrow/site/pyarrow/_flight* \
  "$TMP"/arrow/site/pyarrow/_s3fs* "$TMP"/arrow/site/pyarrow/_azurefs* "$TMP"/arrow/site/pyarrow/_gcsfs* \
  "$TMP"/arrow/site/pyarrow/_hdfs*
rm -rf "$TMP"/arrow/site/pyarrow/include "$TMP"/arrow/site/pyarrow/tests
tar cJf "$W/pyarrow.site.txz" -C "$TMP/arrow/site" .

if [ "${UNSLOTH:-0}" = 1 ]; then
  get "$TMP/uns" unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 cut_cross_entropy tyro \
    docstring_parser shtab typeguard msgspec structlog torchao bitsandbytes==0.50.2
  unpack "$TMP/uns/site" "$TMP"/uns/*.whl
  rm -rf "$TMP"/uns/site/studio
  find "$TMP/uns/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cuda130.so' ! -name '*_cpu.so' -delete
  tar cJf "$W/unsloth.txz" -C "$TMP/uns/site" .
fi
du -sh "$W"/*
