#!/usr/bin/env bash
# Device diagnosis of the Qwen sparse ARC-Easy NaN (parity run at 2b9980d): four variants at once.
# (As it ran at 2b9980d: in diag/, beside diag/arc.jsonl, the ARC-Easy train rows as scripts/parity_calibrated.py
# writes them, and diag/mlp_only.yaml; the four logs are logs.tgz, their losses diag_qwen_nan.json.)
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
L=/tmp/diag; mkdir -p $L
python3 -c "from sparse_unsloth.gguf_models import gguf_model_path as g; print(g('/tmp/q/m.gguf'))" > $L/convert.log 2>&1
(while sleep 15; do tar czf /tmp/d.tgz -C $L . && mv /tmp/d.tgz $OUT/diag.tgz; done) & packer=$!
run() {  # name config env...
  local name=$1 cfg=$2; shift 2
  env "$@" UNSLOTH_COMPILE_LOCATION=/tmp/dw/$name/cc python3 -m sparse_unsloth.cli train --model /tmp/q/m.gguf \
    --dataset diag/arc.jsonl --config "$cfg" --steps 282 --batch-size 16 --lr 0.0002 --lora-r 16 --max-length 512 \
    --eval-rows 0 --seed 0 --output-dir /tmp/dw/$name --logging-steps 1 --no-progress --unsloth > $L/$name.log 2>&1
  echo "$name rc=$?" >> $L/rc.txt
}
pids=()
run A qwen2.5-coder-0.5b-calibrated X=1 & pids+=($!)
run B qwen2.5-coder-0.5b-calibrated SPARSE_UNSLOTH_LAYER_GRAPHS=0 & pids+=($!)
run C qwen2.5-coder-0.5b-calibrated SPARSE_UNSLOTH_CUDA_GRAPHS=0 & pids+=($!)
run D diag/mlp_only.yaml X=1 & pids+=($!)
wait "${pids[@]}"
kill $packer; tar czf $OUT/diag.tgz -C $L .
cat $L/rc.txt
for n in A B C D; do echo "== $n"; grep -a "'loss'" $L/$n.log | grep -an "nan" | head -2; grep -a "'loss'" $L/$n.log | sed -n '135,145p' | cut -c1-90; done
