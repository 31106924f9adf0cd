#!/usr/bin/env bash
# One call on a lent GPU machine: build the extension there, run the `cuda`-marked tests and the op
# benchmarks, and leave the logs and CSV/PNG under $OUT (default: ./gpu-out). Nothing built here loads there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tee "$OUT/build.log"
python3 -m finetune_ext.cli info | tee "$OUT/info.json"
python3 -m pytest -m cuda -q -p no:cacheprovider 2>&1 | tee "$OUT/test_cuda.log"
python3 -m finetune_ext.cli bench --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.log"
