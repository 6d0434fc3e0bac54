"""TRL's SFTTrainer on the sparse tiny model under ``accelerate launch`` (tests/test_ddp.py).

``sft.py OUT``: the main process writes ``OUT/log_history.json``; every rank writes
``OUT/rank{r}.json`` with its own, unreduced counters at each log step and the sparse switch of
each step, so the test can check the logged values against the sum over the ranks.
"""

from __future__ import annotations

import json
import sys

import torch
from datasets import Dataset
from helpers import ARITHMETIC, tiny_lora_model, tiny_tokenizer
from transformers import TrainerCallback
from trl import SFTConfig

import sparse_unsloth as su
from sparse_unsloth.finetune import sft_trainer_class

CONFIG = su.SparseConfig(mlp={0: 0.5, 1: 0.75}, self_attn={1: 0.5}, estimator_rank=4, dense_warmup_steps=4)
# Prompts of varied length, so each rank's batches have their own share of dense (output) tokens.
ROWS = [{"prompt": "Note:" + " ok" * (i % 7) + " " + r["prompt"], "completion": r["completion"]}
        for i, r in enumerate(ARITHMETIC)]


class RankRecorder(TrainerCallback):
    """Listed before SparsityCallback: sees this rank's counters before they are summed."""

    def __init__(self, model) -> None:
        self.sparse = su.sparse_state(model)
        self.counters: list[dict] = []
        self.enabled: list[bool] = []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.enabled.append(self.sparse.enabled)

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs is not None and "loss" in logs:
            self.counters.append({"step": state.global_step, **self.sparse.stats})


def main(out: str) -> None:
    # SFTConfig first: its constructor starts the process group that sparsify's estimator uses.
    args = SFTConfig(output_dir=out, max_steps=16, per_device_train_batch_size=4, learning_rate=3e-2,
                     lr_scheduler_type="constant", logging_steps=4, report_to=[], save_strategy="no",
                     use_cpu=True, bf16=False, seed=0, max_length=32, disable_tqdm=True,
                     dataloader_num_workers=0)
    tokenizer = tiny_tokenizer([r["prompt"] + r["completion"] for r in ROWS])
    model = tiny_lora_model(layers=2, hidden=64, inter=96, heads=4, kv_heads=2, vocab=len(tokenizer),
                            dtype=torch.float32, rank=8)
    su.sparsify(model, CONFIG, model_id="tiny/ddp-sft", progress=False)  # cached: rank 0 builds
    recorder = RankRecorder(model)
    trainer = sft_trainer_class(on_gpu=False)(
        model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer,
        callbacks=[recorder, su.SparsityCallback(model)])
    trainer.train()
    rank = trainer.args.process_index
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"counters": recorder.counters, "enabled": recorder.enabled,
                   "log_history": trainer.state.log_history, "world_size": trainer.args.world_size}, f)
    if trainer.is_world_process_zero():
        with open(f"{out}/log_history.json", "w") as f:
            json.dump(trainer.state.log_history, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
