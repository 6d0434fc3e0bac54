#!/usr/bin/env bash
# One device call's work for the Unsloth fast backend: install the wheelhouse, then the steps
# named (GPU tests, benchmarks), each logged under $OUT; everything ends up in $OUT/device.tgz
# (a device call brings back only a few files) and a short table is printed last.
#
#   BENCH_COMMIT=<sha> bash scripts/device_check.sh STEP...
#
# Steps (the speed cases take ~2-3 min each; a call has 10 min):
#   tests      tests/test_gpu_graphs.py + tests/test_gpu_fast.py (TESTS_K=expr: pytest -k)
#   a          the paper setting (8 x 512, 128 output tokens), graphs vs eager in one process, and
#              a host-side profile (cProfile) of a dense and a sparse step
#   a-gb       the same with Unsloth's compiled block broken around our functions (graph-break)
#   b          4 x 1024, 256 output tokens
#   c          the llama3-8b-csr preset (little sparsity: the machinery's own cost)
#   nf4        the paper setting in 4-bit NF4, with HF PEFT QLoRA
#   ops        scripts/bench_ops.py; products: its --products; kernels: the gather-GEMM GPU tests
# Speed cases time 10 steps after 3 warm-up steps, without HF PEFT unless said. Their result
# files are written as benchmarks/results expects (copy them from the tarball).
set -uo pipefail
OUT=${OUT:-/tmp/device_out}
W=$(mktemp -d)
if [ ! -d /tmp/site/unsloth ]; then        # a warm machine keeps it from the call before
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > "$W/install.log" 2>&1 || { tail -20 "$W/install.log"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
mkdir -p "$OUT"
summary=()
run_step() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS
  mkdir -p "$W/$name"
  "$@" > "$W/$name/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-8s rc=%-3s %4ss' "$name" "$rc" $((SECONDS - t0)))")
}
speed() {  # name, bench_speed args...
  local name=$1; shift
  run_step "$name" python3 scripts/bench_speed.py --out "$W/$name" --steps 10 --warmup 3 "$@"
}
for s in "$@"; do
  case $s in
    tests) run_step tests python3 -m pytest -q -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} \
             tests/test_gpu_graphs.py tests/test_gpu_fast.py ;;
    a) speed a --skip-peft --eager-too --host-profile ;;
    a-gb) speed a-gb --skip-peft --sparse-mode graph-break ;;
    b) speed b --skip-peft --batch 4 --seq 1024 --output-tokens 256 ;;
    c) speed c --skip-peft --preset llama3-8b-csr ;;
    nf4) speed nf4 --load-in-4bit ;;
    ops) run_step ops python3 scripts/bench_ops.py --out "$W/ops/bench_ops.json" ;;
    products) run_step products python3 scripts/bench_ops.py --products --out "$W/products/bench_products.json" ;;
    kernels) run_step kernels python3 -m pytest -q -p no:cacheprovider tests/test_gather_mm.py ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
tar czf "$OUT/device.tgz" -C "$W" .
echo "================ device_check summary ================"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
printf '%s\n' "${summary[@]}"
grep -h -E "passed|failed|error" "$W"/tests/tests.log "$W"/kernels/kernels.log 2>/dev/null | tail -3
for d in "$W"/*/; do
  grep -h -A12 "^run " "$d"/*.log 2>/dev/null | sed "s|^|$(basename "$d"): |"
done
