"""calibrate: a valid config within the budget on its own probe batches, deterministic, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from helpers import ARITHMETIC, tiny_lora_model, tiny_tokenizer

from sparse_unsloth import SparseConfig, calibrate, load_config, sparsify, unsparsify
from sparse_unsloth.calibration import (
    CalibrationError,
    gradient_error,
    lora_gradients,
    probe_batches,
    probe_loss,
    run_calibration,
)
from sparse_unsloth.config import CALIBRATION_LEVELS, config_to_yaml

BUDGET = 5e-4        # binds on the tiny random model: its most sparse configs measure above it
RANKS = (4, 8)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_UNSLOTH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer([r["prompt"] + r["completion"] for r in ARITHMETIC])


def _model(tokenizer):
    return tiny_lora_model(layers=3, vocab=len(tokenizer))


def _run(tokenizer, budget=BUDGET, **kwargs):
    return run_calibration(_model(tokenizer), ARITHMETIC, budget, tokenizer=tokenizer, num_rows=16,
                           batch_size=8, ranks=RANKS, progress=False, **kwargs)


def _measured_again(tokenizer, config, measure):
    """(dense, sparse, the model) of ``measure(model, batches)`` from scratch on calibrate's probe
    batches: a fresh model, and sparsify builds its own SVD factors at the config's rank."""
    model = _model(tokenizer)
    batches = probe_batches(ARITHMETIC, tokenizer, num_rows=16, batch_size=8, pad_id=tokenizer.pad_token_id)
    model.train()
    dense = measure(model, batches)
    sparsify(model, config, progress=False)
    sparse = measure(model, batches)
    unsparsify(model)
    return dense, sparse, model


def test_returns_a_valid_config_that_round_trips_as_yaml(tokenizer):
    config = calibrate(_model(tokenizer), ARITHMETIC, BUDGET, tokenizer=tokenizer, ranks=RANKS,
                       name="tiny-calibrated", progress=False)
    assert isinstance(config, SparseConfig) and config.name == "tiny-calibrated"
    assert config.mlp or config.self_attn
    assert config.estimator_rank in RANKS
    for kind in ("mlp", "self_attn"):
        assert set(getattr(config, kind)) <= {0, 1, 2}
        assert set(getattr(config, kind).values()) <= set(CALIBRATION_LEVELS[kind])
    text = config_to_yaml(config, header="made by a test", description="tiny")
    assert text.startswith("# made by a test\n")
    assert load_config(yaml.safe_load(text)) == config


def test_respects_the_budget_on_its_own_probe_batches(tokenizer):
    cal = _run(tokenizer)
    assert any(t["measured"] > BUDGET for t in cal.trials), "the budget must bind for this test to mean anything"
    assert cal.loss_increase <= BUDGET
    dense, sparse_loss, _ = _measured_again(tokenizer, cal.config, probe_loss)
    assert dense == pytest.approx(cal.dense_loss, rel=1e-12)
    assert sparse_loss == pytest.approx(cal.sparse_loss, rel=1e-9)
    assert sparse_loss / dense - 1 <= BUDGET
    assert cal.flop_fraction < 1


def test_a_larger_budget_saves_at_least_as_much(tokenizer):
    assert _run(tokenizer, budget=0.05).flop_fraction <= _run(tokenizer).flop_fraction


def test_deterministic_for_a_seed(tokenizer):
    a, b = _run(tokenizer, seed=3), _run(tokenizer, seed=3)
    assert a.config == b.config and a.trials == b.trials and a.sparse_loss == b.sparse_loss
    other = probe_batches(ARITHMETIC, tokenizer, num_rows=16, seed=4)
    assert not torch.equal(probe_batches(ARITHMETIC, tokenizer, num_rows=16, seed=3)[0].input_ids, other[0].input_ids)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_changes_nothing(tokenizer, reentrant):
    model = _model(tokenizer)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = run_calibration(model, ARITHMETIC, BUDGET, tokenizer=tokenizer, num_rows=16, batch_size=8,
                                   ranks=RANKS, progress=False)
    plain = _run(tokenizer)
    assert checkpointed.config == plain.config
    assert [t["predicted"] for t in checkpointed.trials] == [t["predicted"] for t in plain.trials]


def test_the_sensitivity_pass_checkpoints_the_layers_and_leaves_the_setting(tokenizer):
    """Its backward holds one layer's activations at a time (an 8B shape peaked at 74.5 GiB on an
    H100 without), and the model comes back as it was."""
    model = _model(tokenizer)
    layer = model.base_model.model.model.layers[0]
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), m.gradient_checkpointing)))
    run_calibration(model, ARITHMETIC, BUDGET, tokenizer=tokenizer, num_rows=16, batch_size=8, ranks=RANKS,
                    progress=False)
    assert (True, True) in seen                     # a recompute inside a checkpoint
    assert not model.base_model.model.is_gradient_checkpointing and not layer.gradient_checkpointing


def test_a_gradient_budget_bounds_the_lora_gradient_error_too(tokenizer):
    """With a loose loss budget, the gradient budget is what binds: the config chosen keeps the
    LoRA gradient on the probe batches within it (measured again from scratch), and saves less
    than the loss budget alone allows."""
    loose, bound = 0.05, 0.2
    cal = _run(tokenizer, budget=loose, gradient_budget=bound)
    assert any(t["gradient_error"] > bound and t["measured"] <= loose for t in cal.trials), \
        "the gradient budget must bind for this test to mean anything"
    assert cal.config.mlp or cal.config.self_attn
    assert cal.gradient_error <= bound and cal.loss_increase <= loose
    assert cal.flop_fraction > _run(tokenizer, budget=loose).flop_fraction

    dense, sparse, model = _measured_again(tokenizer, cal.config, lora_gradients)
    assert gradient_error(sparse, dense) == pytest.approx(cal.gradient_error, rel=1e-9)
    assert all(p.grad is None for p in model.parameters())         # .grad put back as it was


def test_lora_gradients_under_reentrant_checkpointing_are_the_plain_ones_and_keep_grad(tokenizer):
    batches = probe_batches(ARITHMETIC, tokenizer, num_rows=16, batch_size=8, pad_id=tokenizer.pad_token_id)
    plain = _model(tokenizer)
    plain.train()
    checkpointed = _model(tokenizer)
    checkpointed.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    checkpointed.enable_input_require_grads()
    checkpointed.train()
    marker = next(p for p in checkpointed.parameters() if p.requires_grad)
    marker.grad = torch.ones_like(marker)
    want, got = lora_gradients(plain, batches), lora_gradients(checkpointed, batches)
    assert want.keys() == got.keys() and any(g.abs().sum() > 0 for g in want.values())
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-10, atol=1e-12)
    assert torch.equal(marker.grad, torch.ones_like(marker))


def test_gradient_error_is_the_relative_norm_of_the_difference():
    dense = {"a": torch.tensor([3.0, 0.0], dtype=torch.float64), "b": torch.tensor([[4.0]], dtype=torch.float64)}
    assert gradient_error(dense, dense) == 0
    assert gradient_error({k: 2 * v for k, v in dense.items()}, dense) == pytest.approx(1.0)
    assert gradient_error({"a": torch.tensor([3.0, 5.0], dtype=torch.float64), "b": dense["b"]},
                          dense) == pytest.approx(1.0)


@pytest.mark.parametrize("gradient_budget", [0, 1, math.nan, True, "0.2"])
def test_bad_gradient_budgets_are_clear_errors(tokenizer, gradient_budget):
    with pytest.raises(CalibrationError, match=r"gradient_budget must be a fraction in \(0, 1\)"):
        calibrate(_model(tokenizer), ARITHMETIC, 0.01, tokenizer=tokenizer, gradient_budget=gradient_budget,
                  progress=False)


def test_a_gradient_budget_needs_trainable_parameters(tokenizer):
    model = _model(tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(CalibrationError, match="trainable"):
        calibrate(model, ARITHMETIC, 0.01, tokenizer=tokenizer, ranks=RANKS, gradient_budget=0.2, progress=False)


@pytest.mark.parametrize("budget", [0, 1, -0.1, 1.5, math.nan, math.inf, True, "0.01", None])
def test_bad_budgets_are_clear_errors(tokenizer, budget):
    with pytest.raises(CalibrationError, match=r"budget must be a fraction in \(0, 1\)"):
        calibrate(_model(tokenizer), ARITHMETIC, budget, tokenizer=tokenizer, progress=False)


def test_bad_data_are_clear_errors(tokenizer):
    model = _model(tokenizer)
    with pytest.raises(CalibrationError, match="needs rows"):
        calibrate(model, [], 0.01, tokenizer=tokenizer, progress=False)
    with pytest.raises(CalibrationError, match="no context tokens"):
        calibrate(model, [{"text": "1 plus 2 is odd"}] * 4, 0.01, tokenizer=tokenizer, progress=False)
    with pytest.raises(CalibrationError, match="no output tokens"):
        calibrate(model, ARITHMETIC, 0.01, tokenizer=tokenizer, max_length=4, progress=False)
    with pytest.raises(CalibrationError, match="tokenizer="):
        calibrate(model, ARITHMETIC, 0.01, progress=False)
    with pytest.raises(CalibrationError, match="levels"):
        calibrate(model, ARITHMETIC, 0.01, tokenizer=tokenizer, levels={"mlp": (0.5, 1.0)}, progress=False)


def test_token_rows_need_no_tokenizer(tokenizer):
    rows = []
    for r in ARITHMETIC[:16]:
        prompt = tokenizer(r["prompt"])["input_ids"]
        answer = tokenizer(r["completion"])["input_ids"]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    config = calibrate(_model(tokenizer), rows, 0.01, ranks=RANKS, progress=False)
    assert config.mlp or config.self_attn


def test_cli_writes_an_ordinary_config_and_prints_the_flop_fraction(tmp_path, tokenizer, capsys):
    import json

    from sparse_unsloth.cli import main

    model = tiny_lora_model(layers=2, hidden=64, inter=96, heads=4, kv_heads=2, vocab=len(tokenizer),
                            dtype=torch.float32).unload()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ARITHMETIC))
    out = tmp_path / "mine.yaml"
    argv = ["calibrate", "--model", str(tmp_path / "model"), "--dataset", str(data), "--budget", "0.01",
            "--ranks", "4,8", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "flop_fraction:" in printed
    text = out.read_text()
    assert "budget 0.01" in text and "Parity: not yet measured" in text and str(data) in text
    config = load_config(out)
    assert config.name == "mine" and (config.mlp or config.self_attn)
    assert main([*argv[:-3], "--gradient-budget", "0.3", "--out", str(out), "--no-progress"]) == 0
    assert "LoRA gradient error:" in capsys.readouterr().out
    text = out.read_text()
    assert "LoRA gradient error at most 0.3" in text and "--gradient-budget 0.3" in text
    assert main([*argv[:-3], "--out", str(tmp_path / "nowhere" / "x.yaml"), "--no-progress"]) == 2
    with pytest.raises(SystemExit) as exit_:
        main([*argv[:5], "--budget", "1.5", "--out", str(out)])
    assert exit_.value.code == 2
