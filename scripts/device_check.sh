#!/usr/bin/env bash
# One device call's work for the Unsloth fast backend: install the wheelhouse, then the steps
# named (GPU tests, benchmarks), each logged under $OUT; everything ends up in $OUT/device.tgz
# (a device call brings back only a few files) and a short table is printed last.
#
#   BENCH_COMMIT=<sha> bash scripts/device_check.sh STEP...
#
# Steps (the speed cases take ~2-3 min each; a call has 10 min):
#   tests      tests/test_gpu_graphs.py and test_gpu_fast.py (TESTS_K=expr: pytest -k); the fused MLP's
#              Triton kernels are compiled there (test_lora_swiglu.py would autotune each odd shape)
#   a          the paper setting (8 x 512, 128 output tokens); a-peft: also HF PEFT LoRA (~40 s more); a-host: with a host-side profile
#              (cProfile) of a dense and a sparse step; a-eager: also the sparse step without CUDA graphs;
#              a-gc: also the sparse step with the objects alive before it frozen out of the GC (gc.freeze);
#              a-probe: both of the last two; a-passes: also the sparse step without layer graphs (each
#              layer's passes replayed one by one, SPARSE_UNSLOTH_LAYER_GRAPHS=0)
#   b          4 x 1024, 256 output tokens
#   c          the llama3-8b-csr preset (little sparsity: the machinery's own cost)
#   nf4        the paper setting in 4-bit NF4, with HF PEFT QLoRA
#   probe      scripts/probe_graph_launch.py: host time of a graph replay by its kernel count
#   ops        scripts/bench_ops.py; kernels: the top-k, context-mask and SwiGLU (8B sizes) kernel tests
#   calib8b    scripts/time_calibrate.py: how long `calibrate` takes for a Llama-3-8B shape (~5 min?)
#   parts      keep what this call carries for the notebooks: SmolLM2's GGUF parts (.m1 .m2 .m3, from
#              /work/shared/device/split-smollm2.sh) into /tmp/g, and the wheels of .nb1 .nb2 .m3
#              (nbclient, ipykernel, matplotlib, gguf, ...) into /tmp/site. A call carries 64 MiB at
#              most: three calls in a row on the warm machine, e.g. [".m1", ".nb1"], [".m2", ".nb2"],
#              [".m3", ".whl"]; the last one goes on with `smollm2 notebooks`
#   qparts     keep what this call carries of Qwen2.5-Coder-0.5B's GGUF (.q1 .. .q9, 53 MB each, from
#              /work/shared/models/qwen2.5-coder-0.5b/split-for-device.sh) in /tmp/q; the call that
#              completes the nine puts /tmp/q/m.gguf together, checks its sha256 and installs the gguf
#              wheel of .q9: nine calls in a row on the warm machine, carry [".qN"] each (the wheelhouse
#              goes in a call before: .whl and a part together are over 64 MiB); then
#              `bash scripts/device_parity_calibrated.sh qwen /tmp/q/m.gguf`
#   smollm2    put the GGUF together and convert it (sparse_unsloth.smollm2): the notebooks' model
#   notebooks  scripts/run_gpu_notebooks.sh on it (NB_STEPS timed pairs, NB_TRAIN_STEPS; 6 and 10)
#   profile    scripts/profile_train.py on it through Unsloth (padding-free batches), dense then sparse
#              (PROFILE_CONFIG, default smollm2-135m-calibrated; PROFILE_STEPS, default 40; 10 of them
#              the sparse run's warm-up), with TORCH_LOGS=recompiles: step time by phase, captures by
#              function, a host profile per phase (~3 min)
# Speed cases time 10 steps after 3 warm-up steps, without HF PEFT unless said. Their result
# files are written as benchmarks/results expects (copy them from the tarball).
set -uo pipefail
OUT=${OUT:-/tmp/device_out}
W=$(mktemp -d)
if [ ! -d /tmp/site/unsloth ] && [ -d .whl ]; then   # a warm machine keeps it from the call before
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
  tar czf "$OUT/device.tgz" -C "$W" .      # after every step: a call cut off at its limit keeps the rest
}
speed() {  # name, bench_speed args...
  local name=$1; shift
  run_step "$name" python3 scripts/bench_speed.py --out "$W/$name" --steps 10 --warmup 3 "$@"
}
for s in "$@"; do
  case $s in
    tests) run_step tests python3 -m pytest -q -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} \
             tests/test_gpu_graphs.py tests/test_gpu_fast.py ;;
    a) speed a --skip-peft ;;
    a-peft) speed a-peft ;;
    a-host) speed a-host --skip-peft --host-profile ;;
    a-eager) speed a-eager --skip-peft --eager-too ;;
    a-passes) speed a-passes --skip-peft --passes-too ;;
    a-gc) speed a-gc --skip-peft --gc-frozen-too ;;
    a-probe) speed a-probe --skip-peft --eager-too --gc-frozen-too ;;
    b) speed b --skip-peft --batch 4 --seq 1024 --output-tokens 256 ;;
    c) speed c --skip-peft --preset llama3-8b-csr ;;
    nf4) speed nf4 --load-in-4bit ;;
    probe) run_step probe python3 scripts/probe_graph_launch.py ;;
    ops) run_step ops python3 scripts/bench_ops.py --out "$W/ops/bench_ops.json" ;;
    kernels) run_step kernels python3 -m pytest -q -p no:cacheprovider tests/test_topk.py tests/test_keep_context.py \
               tests/test_lora_swiglu.py::test_llama3_8b_sizes_with_the_autotuned_split ;;
    calib8b) run_step calib8b python3 scripts/time_calibrate.py --out "$W/calib8b" ;;
    qparts) mkdir -p /tmp/q
            for d in .q1 .q2 .q3 .q4 .q5 .q6 .q7 .q8 .q9; do [ -d "$d" ] && cp "$d"/p? /tmp/q/; done
            [ -d .q9 ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .q9/*.whl
            if [ ! -f /tmp/q/m.gguf ] && [ "$(ls /tmp/q/p? | wc -l)" -eq 9 ]; then
              cat /tmp/q/p? > /tmp/q/m.gguf && rm /tmp/q/p?
              echo "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32  /tmp/q/m.gguf" | sha256sum -c \
                || { rm -f /tmp/q/m.gguf; echo "qparts: the GGUF put together is not the model; carry the parts again"; }
            fi
            ls /tmp/q ;;
    parts) mkdir -p /tmp/g
           for d in .m1 .m2 .m3; do [ -d "$d" ] && cp "$d"/gpart* /tmp/g/; done
           wheels=$(ls .nb1/*.whl .nb2/*.whl .m3/*.whl 2>/dev/null)
           [ -z "$wheels" ] || run_step parts python3 -m pip install -q --no-index --no-deps --no-compile \
             --no-cache-dir --upgrade --target /tmp/site $wheels
           ls -l /tmp/g ;;
    smollm2) [ -f /tmp/g/m.gguf ] || cat /tmp/g/gpart0? > /tmp/g/m.gguf
             run_step smollm2 python3 -c "from sparse_unsloth.smollm2 import smollm2_path; print(smollm2_path(gguf='/tmp/g/m.gguf'))"
             tail -1 "$W/smollm2/smollm2.log" > /tmp/smollm2_dir ;;
    notebooks) OUT="$W/notebooks" STEPS=${NB_STEPS:-6} TRAIN_STEPS=${NB_TRAIN_STEPS:-10} \
                 run_step notebooks bash scripts/run_gpu_notebooks.sh "$(cat /tmp/smollm2_dir)" ;;
    profile) run_step profile env TORCH_LOGS=recompiles python3 scripts/profile_train.py \
               --model "$(cat /tmp/smollm2_dir)" --unsloth --config "${PROFILE_CONFIG:-smollm2-135m-calibrated}" \
               --steps "${PROFILE_STEPS:-40}" --out "$W/profile" ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
tar czf "$OUT/device.tgz" -C "$W" .
echo "================ device_check summary ================"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
printf '%s\n' "${summary[@]}"
[ -f "$W/probe/probe.log" ] && sed 's|^|probe: |' "$W/probe/probe.log"
grep -h -E "passed|failed|error" "$W"/tests/tests.log "$W"/kernels/kernels.log 2>/dev/null | tail -3
for d in "$W"/*/; do
  grep -h -A40 "^run " "$d"/*.log 2>/dev/null | sed "s|^|$(basename "$d"): |"
done
[ -f "$W/calib8b/calibrate_llama3-8b.json" ] && sed 's|^|calib8b: |' "$W/calib8b/calibrate_llama3-8b.json"
[ -f "$W/notebooks/notebooks.log" ] && tail -14 "$W/notebooks/notebooks.log" | sed 's|^|notebooks: |'
[ -f "$W/profile/profile.log" ] && grep -A12 "^mode" "$W/profile/profile.log" | sed 's|^|profile: |'
exit 0
