#!/usr/bin/env bash
# One call on a lent GPU machine: build the extension there, run the `cuda`-marked tests and the op
# benchmarks. Everything lands under $OUT (default ./gpu-out): one log and bench.tar.gz with a CSV and a PNG
# per op (the device tool returns at most 8 files). Nothing built here loads there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log="$OUT/gpu.log"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tee "$log"
python3 -m finetune_ext.cli info | tee -a "$log"
python3 -m pytest -m cuda -q -p no:cacheprovider 2>&1 | tee -a "$log"
bench=$(mktemp -d)/bench
python3 -m finetune_ext.cli bench --device cuda --out "$bench" 2>&1 | tee -a "$log"
tar czf "$OUT/bench.tar.gz" -C "$(dirname "$bench")" bench
