#!/usr/bin/env bash
# One device call's work for the Unsloth fast backend: GPU tests, the op micro-benchmark and the
# training-step benchmark, each logged under $OUT, a short table printed last.
#
#   bash scripts/device_check.sh [tests] [ops] [kernels] [products] [speed] [speed-args...]
#
# kernels: the gather-GEMM kernels' gpu tests; products: the frozen products alone (torch
# composition vs the gather_mm kernels vs dense cuBLAS, bench_ops.py --products). Neither is
# in the default set. TESTS_K=expr selects GPU tests by name (pytest -k).
#
# Expects the wheelhouse installed and PYTHONPATH set (see the device call's preamble):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -uo pipefail
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests ops speed)
summary=()
run_step() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-6s rc=%-3s %4ss' "$name" "$rc" $((SECONDS - t0)))")
}
speed_args=()
for s in "${steps[@]}"; do
  case $s in
    tests) run_step tests python3 -m pytest -q -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} \
             tests/test_gpu_graphs.py tests/test_gpu_fast.py ;;
    ops) run_step ops python3 scripts/bench_ops.py --out "$OUT/bench_ops.json" ;;
    kernels) run_step kernels python3 -m pytest -q -x -p no:cacheprovider tests/test_gather_mm.py ;;
    products) run_step products python3 scripts/bench_ops.py --products --out "$OUT/bench_products.json" ;;
    speed) ;;
    *) speed_args+=("$s") ;;
  esac
done
for s in "${steps[@]}"; do
  [ "$s" = speed ] && run_step speed python3 scripts/bench_speed.py --out "$OUT" "${speed_args[@]}"
done
echo "================ device_check summary ================"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
printf '%s\n' "${summary[@]}"
grep -h -E "passed|failed|error" "$OUT/tests.log" "$OUT/kernels.log" 2>/dev/null | tail -3
grep -h -A22 "^product" "$OUT/products.log" 2>/dev/null
grep -h -A4 "^block" "$OUT/ops.log" 2>/dev/null
grep -h -A12 "^run " "$OUT/speed.log" 2>/dev/null
