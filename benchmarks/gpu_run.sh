#!/usr/bin/env bash
# One call on a lent GPU machine, within 10 minutes: build the extension there for that GPU only, run the
# `cuda`-marked tests, then every op benchmark. Each phase has its own time limit, and a phase that fails or runs
# out of time does not stop the next one. Under $OUT (default ./gpu-out): gpu.log (everything printed),
# <device>.csv (every benchmark row, named after the GPU, written op by op) and bench.tar.gz (the per-op CSVs
# and plots). Commit <device>.csv under benchmarks/results/.
#
#   device run:  OUT=$OUT bash benchmarks/gpu_run.sh        (carry .whl: `make gpu-wheels` prepares it here)
#   dry run:     DRY_RUN=1 bash benchmarks/gpu_run.sh       (on a CPU machine: checks every command and option
#                                                           it would call, without a GPU; part of `make test`)
# Nothing built here loads there (other Python, other torch): the build runs on the GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT"
log="$OUT/gpu.log"
: >"$log"
export PYTHONUNBUFFERED=1
failed=0

# phase NAME SECONDS CMD...: run CMD with a time limit, output into the log; a failure is recorded, not fatal.
phase() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $name: exit $rc" | tee -a "$log"; failed=1; }
}

# The ops with targets in issue 16 first: if the phase's time runs out, what is cut is the rest (rows are written op by
# op). hvp_block (two blocks of GPT-2 small, 16 products each) is the longest, so it runs last.
ops=(fisher_dropout softmax_ce_hessian_vp armijo_step lora_linear ggpo_step armijo_update gaussian_perturb lift_rows
  lp_direction hvp_block)
bench_args=(bench --device cuda --out "$OUT/bench" --device-csv "$OUT" --ops "${ops[@]}")
if [ "$DRY_RUN" = 1 ]; then
  phase "build (dry run: the package imports)" 120 "$PY" -c "import finetune_ext; print(finetune_ext.build_info())"
  phase "cuda tests (dry run: collected)" 300 "$PY" -m pytest -m cuda --collect-only -q -p no:cacheprovider
  phase "benchmarks (dry run: options checked)" 120 "$PY" -m finetune_ext.cli "${bench_args[@]}" --dry-run
  exit $failed
fi

if [ -d .whl ]; then  # packages the GPU image lacks (highspy), prepared here by `make gpu-wheels`
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}  # this GPU only: a fraction of the default's build time
nvidia-smi | tee -a "$log"
phase build 240 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
phase info 60 "$PY" -m finetune_ext.cli info
phase "cuda tests" 120 "$PY" -m pytest -m cuda -q -p no:cacheprovider --timeout 60
phase benchmarks 200 "$PY" -m finetune_ext.cli "${bench_args[@]}"
tar czf "$OUT/bench.tar.gz" -C "$OUT" bench && rm -rf "$OUT/bench"
exit $failed
