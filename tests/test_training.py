"""Training glue: the callback's schedule and logs, and a short SFTTrainer run with the patch."""

import warnings

import pytest
import torch
from datasets import Dataset
from helpers import ARITHMETIC, tiny_lora_model, tiny_tokenizer, token_batch
from transformers import TrainerControl, TrainerState, TrainingArguments

import sparse_unsloth as su

CONFIG = su.SparseConfig(mlp={0: 0.5, 1: 0.75}, self_attn={1: 0.5}, estimator_rank=4,
                         dense_warmup_steps=4)


def _callback(tmp_path):
    """(model, callback, args, state, control): a sparse model of 20 steps, 5 of them dense warm-up."""
    model = su.sparsify(tiny_lora_model(), su.SparseConfig(mlp={0: 0.5}, dense_warmup_ratio=0.25),
                        progress=False)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    return model, su.SparsityCallback(model), args, TrainerState(max_steps=20), TrainerControl()


def test_callback_switches_at_the_warmup_step(tmp_path):
    model, callback, args, state, control = _callback(tmp_path)
    callback.on_train_begin(args, state, control)
    seen = []
    for step in range(8):
        state.global_step = step
        callback.on_step_begin(args, state, control)
        seen.append(su.sparse_state(model).enabled)
    assert seen == [False] * 5 + [True] * 3                      # round(0.25 * 20) = 5 dense steps


def test_callback_logs_the_step_time_against_the_warmup_and_warns_once_when_slower(tmp_path, monkeypatch):
    from sparse_unsloth import timing

    model, callback, args, state, control = _callback(tmp_path)
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    ids, labels = token_batch()
    callback.on_train_begin(args, state, control)
    logged = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(20):
            state.global_step = step
            callback.on_step_begin(args, state, control)
            model.train()
            with torch.no_grad():
                model(input_ids=ids, labels=labels)
            now[0] += 2.0 if su.sparse_state(model).enabled else 1.0    # sparse twice as slow
            callback.on_step_end(args, state, control)
            logs = {"loss": 1.0}
            callback.on_log(args, state, control, logs=logs)
            logged.append(logs.get("sparse/step_time_vs_warmup"))
    # 5 warm-up steps, 2 of each mode not timed: the ratio once 10 sparse steps are timed (step 16).
    assert logged[:16] == [None] * 16 and logged[16:] == [pytest.approx(2.0)] * 4
    assert callback.step_ratio == pytest.approx(2.0)
    slower = [w for w in caught if "slower than this run's dense warm-up" in str(w.message)]
    assert len(slower) == 1 and "2.00x slower" in str(slower[0].message)


@pytest.mark.parametrize("logs,step,says", [
    ({"loss": float("nan"), "grad_norm": 1.0}, 7, "loss nan in the logs of step 7.*steps since 5 ran sparse"),
    ({"loss": 2.0, "grad_norm": float("inf")}, 9, "grad_norm inf in the logs of step 9"),
    ({"loss": float("nan")}, 3, "in the dense warm-up.*lower the learning rate")])
def test_callback_stops_at_a_non_finite_loss_or_gradient_norm(tmp_path, logs, step, says):
    _, callback, args, state, control = _callback(tmp_path)
    callback.on_train_begin(args, state, control)
    state.global_step = 4
    callback.on_step_begin(args, state, control)
    callback.on_log(args, state, control, logs={"loss": 1.5, "grad_norm": 0.5})    # finite: goes on
    state.global_step = step
    callback.on_step_begin(args, state, control)
    with pytest.raises(FloatingPointError, match=says):
        callback.on_log(args, state, control, logs=dict(logs))


def test_callback_needs_a_sparse_model():
    with pytest.raises(ValueError, match="call sparse_unsloth.sparsify"):
        su.SparsityCallback(tiny_lora_model())


def test_sft_trainer_trains_sparse_with_falling_loss(tmp_path):
    from trl import SFTConfig, SFTTrainer

    tokenizer = tiny_tokenizer([r["prompt"] + r["completion"] for r in ARITHMETIC])
    model = tiny_lora_model(layers=2, hidden=64, inter=96, heads=4, kv_heads=2, vocab=len(tokenizer),
                            dtype=torch.float32, rank=8)
    su.sparsify(model, CONFIG, progress=False)
    seen_labels = []
    model.register_forward_pre_hook(lambda m, a, kw: seen_labels.append(kw.get("labels") is not None),
                                    with_kwargs=True)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=8,
                     learning_rate=1e-2, logging_steps=2, report_to=[], save_strategy="no",
                     use_cpu=True, bf16=False, seed=0, max_length=32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(ARITHMETIC),
                         processing_class=tokenizer, callbacks=[su.SparsityCallback(model)])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logs]
    assert all(seen_labels)
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:2]) / 2, losses
    assert losses[-1] < logs[2]["loss"]                            # and it keeps falling once sparse
    assert [h["sparse/active"] for h in logs[:2]] == [0.0, 0.0]     # steps 2 and 4: warm-up (4 steps)
    sparse_logs = logs[3:]
    assert all(h["sparse/active"] == 1.0 for h in sparse_logs)
    assert all(h["sparse/mlp_kept_frac"] == pytest.approx((48 + 24) / 192) for h in sparse_logs)
    assert all(h["sparse/attn_kept_frac"] == 0.5 for h in sparse_logs)
    assert all(0 < h["sparse/dense_token_frac"] < 1 for h in sparse_logs)


def test_trainer_settings_do_not_follow_a_patched_config_class(tmp_path, monkeypatch):
    """Importing Unsloth swaps TRL's SFTConfig for one with other defaults (gradient accumulation 2,
    8-bit AdamW, weight decay 0.001): the CLI's runs must be the batch and optimizer they say."""
    import dataclasses

    import trl

    from sparse_unsloth.finetune import build_trainer

    @dataclasses.dataclass
    class UnslothLike(trl.SFTConfig):
        gradient_accumulation_steps: int = 2
        optim: str = "adamw_8bit"
        weight_decay: float = 0.001

    monkeypatch.setattr(trl, "SFTConfig", UnslothLike)
    rows = ARITHMETIC[:8]
    trainer = build_trainer(tiny_lora_model(dtype=torch.float32), tiny_tokenizer([r["prompt"] + r["completion"]
                                                                                   for r in rows]),
                            rows, output_dir=str(tmp_path), max_steps=1, batch_size=4, learning_rate=1e-3,
                            max_length=32, seed=0, logging_steps=1, callbacks=[], progress=False)
    assert isinstance(trainer.args, UnslothLike)
    assert trainer.args.gradient_accumulation_steps == 1
    assert trainer.args.optim == "adamw_torch" and trainer.args.weight_decay == 0.0
