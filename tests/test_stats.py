"""The statistics count only what ran sparse: not a fallback to dense, not a batch whose every
token carries loss, and the run summary says so."""

import importlib

import pytest
import torch
from datasets import Dataset
from helpers import ARITHMETIC, tiny_lora_model, tiny_tokenizer, token_batch

import sparse_unsloth as su
from sparse_unsloth.cli_train import format_summary
from sparse_unsloth.finetune import FinetuneResult, sft_trainer_class
from sparse_unsloth.patch import unsloth_fast

MLP = su.SparseConfig(mlp={0: 0.5, 2: 0.75}, estimator_rank=3)


def _forward(model, **inputs):
    model.train()
    with torch.no_grad():
        model(**inputs)


def test_fast_path_fallback_counts_nothing(monkeypatch):
    monkeypatch.setattr(importlib.import_module("sparse_unsloth.patch.sparsify"), "_backend",
                        lambda _m: unsloth_fast)
    model = su.sparsify(tiny_lora_model(), MLP, progress=False)
    state = su.sparse_state(model)
    state.callback_attached = True
    ids, labels = token_batch()
    with model.disable_adapter():                    # the fast path runs Unsloth's dense original
        _forward(model, input_ids=ids, labels=labels)
    assert state.pop_stats() == {"sparse/active": 0.0}
    _forward(model, input_ids=ids, labels=labels)
    stats = state.pop_stats()
    assert stats["sparse/active"] == 1.0
    assert stats["sparse/mlp_kept_frac"] == pytest.approx((38 + 19) / (2 * 77))


def test_every_token_a_loss_token_is_not_sparse():
    model = su.sparsify(tiny_lora_model(), MLP, progress=False)
    state = su.sparse_state(model)
    state.callback_attached = True
    ids, _ = token_batch()
    _forward(model, input_ids=ids, labels=ids)
    assert state.pop_stats() == {"sparse/active": 0.0}


def test_text_rows_train_zero_sparse_steps(tmp_path):
    from trl import SFTConfig

    tokenizer = tiny_tokenizer([r["prompt"] + r["completion"] for r in ARITHMETIC])
    model = tiny_lora_model(layers=2, hidden=64, inter=96, heads=4, kv_heads=2, vocab=len(tokenizer),
                            dtype=torch.float32)
    su.sparsify(model, su.SparseConfig(mlp={0: 0.5}, estimator_rank=4), progress=False)
    callback = su.SparsityCallback(model)
    rows = [{"text": r["prompt"] + r["completion"]} for r in ARITHMETIC[:32]]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                     report_to=[], save_strategy="no", use_cpu=True, max_length=32, disable_tqdm=True)
    trainer = sft_trainer_class(on_gpu=False)(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                              processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["sparse/active"] for h in logs] == [0.0] * 3
    assert not any("sparse/mlp_kept_frac" in h for h in logs)
    assert callback.sparse_steps == 0


def test_summary_of_a_sparse_run_that_never_ran_sparse():
    result = FinetuneResult(steps=4, train_s=1.0, step_s=[0.25] * 4, losses=[(1, 2.0), (4, 1.5)], tokens=400,
                            sparse=True, sparse_steps=0, warmup_steps=1, eval_loss=None, adapter_dir=None,
                            sparse_logs=[{"sparse/active": 0.0}])
    text = format_summary(result, 0)
    assert "0 of 4 steps ran sparse" in text and "no batch had context tokens" in text
    dense = FinetuneResult(**{**result.__dict__, "sparse": False, "warmup_steps": 0})
    assert "0 steps (dense run)" in format_summary(dense, 0)


def test_summary_says_when_sparse_steps_were_slower_than_the_warmup():
    result = FinetuneResult(steps=40, train_s=10.0, step_s=[0.25] * 40, losses=[(1, 2.0), (40, 1.5)], tokens=400,
                            sparse=True, sparse_steps=36, warmup_steps=4, eval_loss=None, adapter_dir=None,
                            sparse_logs=[{"sparse/active": 1.0, "sparse/step_time_vs_warmup": 1.56}])
    assert "1.56x the time of a dense warm-up step (medians): SLOWER" in format_summary(result, 0)
    result.sparse_logs[-1]["sparse/step_time_vs_warmup"] = 0.64
    text = format_summary(result, 0)
    assert "0.64x the time of a dense warm-up step (medians)" in text and "SLOWER" not in text
