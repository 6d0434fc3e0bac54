#!/usr/bin/env bash
# One device call: execute both GPU notebooks end to end with a small local model, then
# `sparse-unsloth train --unsloth` and `sparse-unsloth bench --unsloth` on it; everything under $OUT.
#
#   bash scripts/run_gpu_notebooks.sh MODEL_DIR [PRESET]
#
# MODEL_DIR: a Hugging Face model folder (config.json + weights), e.g. SmolLM2-135M-Instruct or
# Qwen2.5-Coder-0.5B-Instruct converted from the GGUFs of ../shared/models/ (their READMEs say how
# to carry them to the device). PRESET: a sparsity preset or YAML for that model (default
# smollm2-135m, which fits SmolLM2's 30 layers; the Qwen notebook writes its own from the depth).
# Environment: STEPS (timed pairs, default 10), TRAIN_STEPS (default 20), TIMEOUT (s a cell, 900).
#
# Needs, besides the wheelhouse (see make-wheelhouse.sh; it makes `import unsloth` work):
# nbclient, nbformat, ipykernel and their dependencies (jupyter_client, jupyter_core, pyzmq,
# tornado, traitlets, ipython, ...), and matplotlib for the plots. The install cells of the
# notebooks (tagged "install") are skipped: the device has no network.
#
# Writes: $OUT/notebooks/<name>.ipynb (executed, outputs and plots included; also when a cell
# fails: the error is in the notebook), $OUT/<name>.log, $OUT/train_unsloth/summary.json,
# $OUT/train_unsloth.log, $OUT/bench_unsloth/bench.{json,png}, $OUT/bench_unsloth.log, and a table.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL_DIR=$(realpath "${1:?usage: run_gpu_notebooks.sh MODEL_DIR [PRESET]}")
PRESET=${2:-smollm2-135m}
OUT=${OUT:-/tmp/gpu_notebooks_out}
STEPS=${STEPS:-10}
TRAIN_STEPS=${TRAIN_STEPS:-20}
mkdir -p "$OUT/notebooks"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's sparse_unsloth, in the kernels too
[ -f "$MODEL_DIR/config.json" ] || { echo "no config.json in $MODEL_DIR: give a Hugging Face model folder" >&2; exit 2; }
python3 -c "import nbclient, nbformat, ipykernel, matplotlib, unsloth" \
  || { echo "missing: nbclient / nbformat / ipykernel / matplotlib / unsloth (see this script's header)" >&2; exit 2; }
if [ "$PRESET" != "${PRESET%.yaml}" ] || [ "$PRESET" != "${PRESET%.yml}" ]; then PRESET=$(realpath "$PRESET"); fi

summary=()
run_step() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-26s rc=%-3s %5ss' "$name" "$rc" $((SECONDS - t0)))")
}

execute_notebook() {  # name: notebooks/<name>.ipynb, run in its own folder, saved executed
  mkdir -p "$OUT/work/$1"
  SPARSE_UNSLOTH_NB_MODEL="$MODEL_DIR" SPARSE_UNSLOTH_NB_PRESET="$PRESET" SPARSE_UNSLOTH_NB_STEPS="$STEPS" \
  SPARSE_UNSLOTH_NB_TRAIN_STEPS="$TRAIN_STEPS" python3 - "$1" "$OUT" "${TIMEOUT:-900}" <<'PYEOF'
import sys
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

name, out, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3])
nb = nbformat.read(f"notebooks/{name}.ipynb", as_version=4)
client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                        resources={"metadata": {"path": f"{out}/work/{name}"}})
failed = None
with client.setup_kernel():
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "install" in cell.metadata.get("tags", []):
            continue   # no network on the device; the image and the wheelhouse have the packages
        try:
            client.execute_cell(cell, index)
        except CellExecutionError as err:
            failed = f"cell {index}: {str(err).strip().splitlines()[-1]}"
            break
nbformat.write(nb, f"{out}/notebooks/{name}.ipynb")
print(f"{name}: {'FAILED at ' + failed if failed else 'executed end to end'} -> {out}/notebooks/{name}.ipynb")
sys.exit(1 if failed else 0)
PYEOF
}

run_step llama3_8b_qlora_sparse execute_notebook llama3_8b_qlora_sparse
run_step qwen_bf16_sparse execute_notebook qwen_bf16_sparse
run_step train_unsloth python3 -m sparse_unsloth.cli train --unsloth --model "$MODEL_DIR" --config "$PRESET" \
  --steps "$TRAIN_STEPS" --batch-size 8 --max-length 512 --logging-steps 5 --output-dir "$OUT/train_unsloth"
run_step bench_unsloth python3 -m sparse_unsloth.cli bench --unsloth --model "$MODEL_DIR" --config "$PRESET" \
  --steps "$STEPS" --warmup-steps 2 --batch-size 8 --max-length 512 --out "$OUT/bench_unsloth"
# Adapters, trainer checkpoints and Unsloth's compiled cache: not results, and too large for a device
# call to bring back (the 2026-12-02 run's tarball was refused for its size until they went).
rm -rf "$OUT/work/"*/outputs/adapter "$OUT/train_unsloth/adapter" "$OUT/work/"*/outputs/checkpoint-* \
  "$OUT/train_unsloth/"checkpoint-* "$OUT/work/"*/unsloth_compiled_cache

echo "================ run_gpu_notebooks summary ================"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
echo "model: $MODEL_DIR  preset: $PRESET  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
printf '%s\n' "${summary[@]}"
grep -h -E "^(trained|  sparse:|  held-out)" "$OUT/train_unsloth.log" 2>/dev/null
grep -h -E "^(dense|sparse) |^result:" "$OUT/bench_unsloth.log" 2>/dev/null
