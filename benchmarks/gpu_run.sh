#!/usr/bin/env bash
# One call on a lent GPU machine, within 10 minutes: build the extension there for that GPU only, run the
# `cuda`-marked tests, then every op benchmark. Each phase has its own time limit, capped by what is left of the
# call's budget (BUDGET seconds, default 570), and a phase that fails or runs out of time does not stop the next
# one. The tests run in one pytest-xdist worker when it is installed, so a test that crashes the process is
# reported and the rest still run; the first crashed test is then re-run under cuda-gdb for a native backtrace.
# Each op is timed in its own process, so one slow op cannot take the others' time. Under $OUT (default
# ./gpu-out): gpu.log (everything printed), <device>.csv (every benchmark row, named after the GPU, written op by
# op), trainer_step_cuda.csv (our trainer vs Trainer + PEFT, patched and not), memory_step_cuda.csv (tokens/s and
# peak memory) and bench.tar.gz (the per-op CSVs and plots). Commit the CSVs under benchmarks/results/.
#
#   device run:  OUT=$OUT bash benchmarks/gpu_run.sh        (carry .whl: `make gpu-wheels` prepares it here)
#   dry run:     DRY_RUN=1 bash benchmarks/gpu_run.sh       (on a CPU machine: checks every command and option
#                                                           it would call, without a GPU; part of `make test`)
#   short call:  OPS="fisher_dropout softmax_ce_hessian_vp" BUDGET=240 OUT=$OUT bash benchmarks/gpu_run.sh
#                (only those benchmarks, in that order; for the device time a session has left)
# When the build fails or its kernels do not load, the call stops there: timing the references would spend the
# device time on nothing (run 4 on the H200 did).
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
BUDGET=${BUDGET:-570}
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "gpu_run.sh: BUDGET: expected whole seconds, got '$BUDGET'" >&2; exit 2; }
RESERVE=10 # seconds kept for packing the results

# phase NAME SECONDS CMD...: run CMD with a time limit (capped by the budget left), output into the log; a failure
# is recorded, not fatal.
phase() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS - RESERVE))
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "== $name: skipped, the budget is spent" | tee -a "$log"
    failed=1
    return
  fi
  echo "== $name (limit ${limit}s, at ${SECONDS}s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $name: exit $rc" | tee -a "$log"; failed=1; }
  echo "-- $name took $((SECONDS - t0))s" | tee -a "$log"
}

# The ops with targets in issue 16 first: if the budget runs out, what is cut is the rest. hvp_block (two blocks of
# GPT-2 small, 16 products each) is the longest, so it runs last. Each op has its own limit in seconds.
ops=(fisher_dropout softmax_ce_hessian_vp armijo_step lora_linear ggpo_step armijo_update gaussian_perturb lift_rows
  lp_direction hvp_block)
declare -A op_limit=([fisher_dropout]=40 [softmax_ce_hessian_vp]=40 [armijo_step]=60 [lora_linear]=40 [ggpo_step]=60
  [armijo_update]=30 [gaussian_perturb]=30 [lift_rows]=60 [lp_direction]=60 [hvp_block]=120)
# Errors raised in C++ reach Python on each device: torch's own, then one of our CUDA kernels' checks (run 2 on the
# H200 died with a segmentation fault in the latter; the printed lines say how far it got).
probe='import sys, torch, finetune_ext
for dev in sys.argv[1:]:
    calls = {"torch": lambda: torch.ones(2, device=dev).view(3),
             "finetune_ext": lambda: torch.ops.finetune_ext.armijo_moments_([torch.ones(2, device=dev)], [], [], [5], 1,
                                                                            0.9, 0.999, 1.0, 1e-8, False)}
    for name, call in calls.items():
        try:
            call()
        except RuntimeError as err:
            print(dev, name, "raised:", str(err).splitlines()[0], flush=True)'
for op in "${ops[@]}"; do [ -n "${op_limit[$op]:-}" ] || { echo "gpu_run.sh: no time limit for $op" >&2; exit 2; }; done
if [ -n "${OPS:-}" ]; then
  read -ra ops <<<"$OPS"
  for op in "${ops[@]}"; do
    [ -n "${op_limit[$op]:-}" ] || { echo "gpu_run.sh: OPS: unknown op '$op'; expected some of: ${!op_limit[*]}" >&2; exit 2; }
  done
fi
# The extension loaded with kernels for the device (cpu in the dry run, cuda on the GPU), or exit 1.
loaded='import sys, finetune_ext
info = finetune_ext.build_info()
print(info)
sys.exit(0 if info["extension_loaded"] and info["kernels"].get(sys.argv[1]) else f"no kernels for {sys.argv[1]} loaded")'
# stop_unless_loaded DEVICE: end the call when the previous phase failed or the kernels for DEVICE did not load.
stop_unless_loaded() {
  phase "kernels loaded" 60 "$PY" -c "$loaded" "$1"
  if [ "$failed" != 0 ]; then
    echo "== stopping: the build failed or its kernels did not load (see above)" | tee -a "$log"
    exit 1
  fi
}
bench_args=(--device cuda --out "$OUT/bench" --device-csv "$OUT")
# One LoRA job through our trainer, Trainer + PEFT and Trainer + patched PEFT (issue 40); its tokenizer and SST-2
# travel in .whl/data (`make gpu-wheels` copies them from ../shared, which does not travel).
trainer_args=(--model config:gpt2-small --steps 20 --warmup 5 --rounds 2 --threads 4 --out "$OUT/trainer_step_cuda")
# Tokens/s and peak memory of a LoRA step, fp32 / bf16 / bf16 + checkpointing, ours beside Trainer + PEFT (issue 41)
memory_args=(--steps 8 --warmup 2 --threads 4 --out "$OUT/memory_step_cuda")
# The same at ~1B parameters (TinyLlama's shape, random weights), bf16 beside QLoRA's nf4 base (issue 41)
memory_1b_args=(--model config:llama-1b --settings bf16 nf4 --steps 6 --warmup 2 --batch-size 4 --block-size 512
                --threads 4 --out "$OUT/memory_step_cuda")
if [ "$DRY_RUN" = 1 ]; then
  stop_unless_loaded cpu
  phase "C++ errors raise (dry run: CPU only)" 60 "$PY" -c "$probe" cpu
  phase "cuda tests (dry run: collected)" 300 "$PY" -m pytest -m cuda --collect-only -q -p no:cacheprovider
  phase "benchmarks (dry run: options checked)" 120 "$PY" benchmarks/bench.py "${bench_args[@]}" --ops "${ops[@]}" --dry-run
  phase "profile ggpo_step (dry run: CPU)" 120 "$PY" benchmarks/profile_ggpo_step.py --device cpu --steps 1 --top 3
  phase "trainer step (dry run: inputs checked)" 60 "$PY" benchmarks/trainer_step.py "${trainer_args[@]}" \
    --device cpu --data-root "${TRAINER_DATA:-../shared/data}" --dry-run
  phase "memory step (dry run: inputs checked)" 60 "$PY" benchmarks/memory_step.py "${memory_args[@]}" \
    --device cpu --data-root "${TRAINER_DATA:-../shared/data}" --dry-run
  phase "memory step 1B (dry run: inputs checked)" 60 "$PY" benchmarks/memory_step.py "${memory_1b_args[@]}" \
    --device cpu --data-root "${TRAINER_DATA:-../shared/data}" --dry-run
  exit $failed
fi

if [ -d .whl ]; then  # packages the GPU image lacks (highspy), prepared here by `make gpu-wheels`
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The H200 image sets CXX=/opt/gcc/bin/g++, which linked libstdc++ into _C statically: every error message our
# C++ formatted with a number then crashed the process inside that copy's locale code (the segfaults of the first
# runs, found by cuda-gdb in run 3). The system compiler links libstdc++ dynamically, as torch does.
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}  # this GPU only: a fraction of the default's build time
nvidia-smi | tee -a "$log"
phase build 240 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
stop_unless_loaded cuda
phase "C++ errors raise" 60 "$PY" -c "$probe" cpu cuda
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 1)  # a crash fails its test and the worker is replaced
phase "cuda tests" 180 "$PY" -m pytest -m cuda -q -p no:cacheprovider --timeout 60 --durations=10 "${xdist[@]}"
crashed=$(grep -o "crashed while running '[^']*'" "$log" | head -1 | cut -d"'" -f2)
if [ -n "$crashed" ] && command -v cuda-gdb >/dev/null; then
  phase "native backtrace of $crashed" 90 cuda-gdb -q -batch -ex run -ex bt --args "$PY" -m pytest -q \
    -p no:cacheprovider "$crashed"
fi
for op in "${ops[@]}"; do
  phase "benchmark $op" "${op_limit[$op]}" "$PY" benchmarks/bench.py "${bench_args[@]}" --ops "$op"
  # where ggpo's step time goes (1.15x lora's in run 3, unexplained by our kernels): before the lower-priority ops
  if [ "$op" = ggpo_step ]; then phase "profile ggpo_step" 45 "$PY" benchmarks/profile_ggpo_step.py --device cuda; fi
done
phase "trainer step" 150 "$PY" benchmarks/trainer_step.py "${trainer_args[@]}" --device cuda --data-root .whl/data
phase "memory step" 150 "$PY" benchmarks/memory_step.py "${memory_args[@]}" --device cuda --data-root .whl/data
phase "memory step 1B" 240 "$PY" benchmarks/memory_step.py "${memory_1b_args[@]}" --device cuda --data-root .whl/data
tar czf "$OUT/bench.tar.gz" -C "$OUT" bench && rm -rf "$OUT/bench"
exit $failed
