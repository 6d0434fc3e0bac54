#!/usr/bin/env bash
# The GPU parity of the calibrated presets (issue #12): dense vs calibrated-sparse, GSM8K held-out
# loss and ARC-Easy accuracy, through `sparse-unsloth train --unsloth` (scripts/parity_calibrated.py).
#
#   bash scripts/device_parity_calibrated.sh prepare          # here: data into the ignored .parity_data/
#   bash scripts/device_parity_calibrated.sh smollm2 GGUF [CONFIG NAME]   # device: SmolLM2 from the carried
#                                                             # GGUF (default smollm2-135m-calibrated,
#                                                             # parity_smollm2_calibrated)
#   bash scripts/device_parity_calibrated.sh qwen GGUF        # device: Qwen2.5-Coder-0.5B from its GGUF
#   bash scripts/device_parity_calibrated.sh smollm2-noise GGUF   # device: SmolLM2 dense vs dense, seed 1:
#                                                             # the noise floor of the two differences
#   bash scripts/device_parity_calibrated.sh both SMOLLM2_GGUF QWEN_GGUF [CONFIG NAME]
#                                                             # device: the SmolLM2 chain (CONFIG, NAME as
#                                                             # `smollm2`) and the Qwen one in one call
#
# On the device the wheelhouse is installed and PYTHONPATH set first (as scripts/device_check.sh
# does), .parity_data is carried, and the GGUF was put together from the split folders
# (/work/shared/device/split-smollm2.sh: /tmp/g/m.gguf; /work/shared/models/qwen2.5-coder-0.5b/
# split-for-device.sh: /tmp/q/m.gguf; both need the gguf wheel they carry installed).
# Runs go to /tmp/parity-<model>; a call cut by the time limit resumes there on the same warm
# machine. Each finished run's summary (a few KB, no weights) is also kept as one file
# $OUT/<name>/<run>.json as it finishes (a device call brings back 8 files at most, two folders
# down); copy $OUT/<name>/*.json here into benchmarks/results/parity_runs/<name>/ and commit them
# (a new session starts from a clean checkout: ignored folders are gone): the working tree takes
# them to the next machine and their runs are not trained again. The dense runs do not depend on
# the sparse config, so they serve a recalibrated preset too.
# PARITY_JOBS=N trains N of the four runs at once (default 1): a run leaves the GPU idle most of
# the time (host-bound steps), but their step times then measure nothing.
# PARITY_ARGS: more parity_calibrated.py options, e.g. a CPU dry run of a device command:
#   PARITY_ARGS="--steps 2 --train-rows 32 --eval-rows 8 --arc-train-rows 4 --arc-test-rows 4".
# Result files: $OUT/parity_<model>_calibrated.json (copy to benchmarks/results/).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${PARITY_DATA:-.parity_data}   # a copy on the device: PARITY_DATA=/tmp/pd
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
run_opts() {  # name: --jobs, --keep into $OUT (on the device), --resume-from what an earlier machine kept
  local opts=(--jobs "${PARITY_JOBS:-1}")
  [ -n "${OUT:-}" ] && opts+=(--keep "$OUT/$1")
  [ -d "benchmarks/results/parity_runs/$1" ] && opts+=(--resume-from "benchmarks/results/parity_runs/$1")
  echo "${opts[@]}" ${PARITY_ARGS:-}
}
case ${1:?usage: prepare | smollm2 GGUF | smollm2-noise GGUF | qwen GGUF | both SMOLLM2_GGUF QWEN_GGUF} in
  prepare)
    src=${2:-/work/shared/data}
    rm -rf "$DATA" && mkdir -p "$DATA"
    cp -r "$src/gsm8k" "$DATA/gsm8k" && cp -r "$src/llm_adapters/ARC-Easy" "$DATA/ARC-Easy"
    cp "$src/llm_adapters/DATA_LICENSE" "$src/llm_adapters/README.md" "$DATA/ARC-Easy/"
    du -sh "$DATA" ;;
  smollm2)
    python3 -c "from sparse_unsloth.smollm2 import smollm2_path; print(smollm2_path(gguf='${2:?GGUF}'))"
    name=${4:-parity_smollm2_calibrated}
    python3 scripts/parity_calibrated.py --model smollm2 \
      --config "${3:-smollm2-135m-calibrated}" --reference-config smollm2-135m-safe \
      --gsm8k-dir "$DATA/gsm8k" --arc-dir "$DATA/ARC-Easy" --work "/tmp/parity-$name" \
      --name "$name" --out "${OUT:-benchmarks/results}" $(run_opts "$name") ;;
  smollm2-noise)
    # The seed-0 dense runs are those of the calibrated chain (copied from parity_runs/
    # parity_smollm2_gradient/ into parity_runs/parity_smollm2_noise/): only the seed-1 runs train
    # (~5 min; with PARITY_JOBS=2 at once).
    python3 -c "from sparse_unsloth.smollm2 import smollm2_path; print(smollm2_path(gguf='${2:?GGUF}'))"
    python3 scripts/parity_calibrated.py --model smollm2 --config dense --sparse-seed 1 \
      --gsm8k-dir "$DATA/gsm8k" --arc-dir "$DATA/ARC-Easy" --work /tmp/parity-smollm2 \
      --name parity_smollm2_noise --out "${OUT:-benchmarks/results}" $(run_opts parity_smollm2_noise) ;;
  qwen)
    python3 scripts/parity_calibrated.py --model "${2:?GGUF}" \
      --config "${3:-qwen2.5-coder-0.5b-calibrated}" \
      --gsm8k-dir "$DATA/gsm8k" --arc-dir "$DATA/ARC-Easy" --work /tmp/parity-qwen \
      --name parity_qwen05b_calibrated --out "${OUT:-benchmarks/results}" $(run_opts parity_qwen05b_calibrated) ;;
  both)
    # A device machine held idle for 30 s is given back and the next call gets a bare one, so the
    # carry calls before this one may have landed on another machine: say what is missing first.
    missing=()
    [ -f "${2:?SmolLM2 GGUF}" ] || missing+=("$2 (carry .m1 .m2 .m3, then device_check.sh smollm2)")
    [ -f "${3:?Qwen GGUF}" ] || missing+=("$3 (carry .q1 .. .q9 with device_check.sh qparts)")
    [ -d "$DATA/gsm8k" ] || missing+=("$DATA (carry .parity_data, copy it to \$PARITY_DATA)")
    python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('unsloth') is None)" 2>/dev/null \
      || missing+=("unsloth (carry .whl with device_check.sh; PYTHONPATH=/tmp/site:\$PWD)")
    if [ ${#missing[@]} -gt 0 ]; then
      printf 'both: missing %s\n' "${missing[@]}" >&2; exit 3
    fi
    # Logs: one folder (PARITY_LOGS; a caller may add its own, e.g. GPU tests run beside), tarred
    # into $OUT/logs.tgz every 15 s, so a call cut by its time limit still brings them back.
    logs=${PARITY_LOGS:-/tmp/parity-logs}; mkdir -p "$logs"
    pack() { [ -z "${OUT:-}" ] || { tar czf "$logs.tgz" -C "$logs" . && mv "$logs.tgz" "$OUT/logs.tgz"; }; }
    (while sleep 15; do pack || true; done) & packer=$!
    bash scripts/device_parity_calibrated.sh smollm2 "$2" "${4:-smollm2-135m-calibrated}" \
      "${5:-parity_smollm2_calibrated}" > "$logs/smollm2.log" 2>&1 & smollm2=$!
    rc_qwen=0; bash scripts/device_parity_calibrated.sh qwen "$3" > "$logs/qwen.log" 2>&1 || rc_qwen=$?
    rc_smollm2=0; wait $smollm2 || rc_smollm2=$?
    kill $packer 2>/dev/null || true; pack
    tail -n 12 "$logs/smollm2.log" "$logs/qwen.log"
    echo "both: smollm2 rc=$rc_smollm2, qwen rc=$rc_qwen"
    [ $rc_smollm2 -eq 0 ] && [ $rc_qwen -eq 0 ] ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
