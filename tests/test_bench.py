"""``sparse-unsloth bench`` on a tiny random Llama on CPU: interleaved pairs on the same batches,
the report, the JSON and the plot, and the FLOP fraction hook."""

from __future__ import annotations

import json
import re

import pytest

from sparse_unsloth import bench
from sparse_unsloth.cli import main

CONFIG_YAML = """\
name: tiny
estimator_rank: 4
sparsity:
  mlp: {"0-1": 0.5}
  self_attn: {"1": 0.5}
"""


def test_pair_indices_repeat_each_batch_once():
    assert bench.pair_indices(5, batch_size=2, pairs=3) == [0, 1, 0, 1, 2, 3, 2, 3, 4, 0, 4, 0]
    # timed pairs going round the warm-up's two batches
    assert bench.pair_indices(5, batch_size=2, pairs=5, distinct=2) == [0, 1, 0, 1, 2, 3, 2, 3] * 2 + [0, 1, 0, 1]
    with pytest.raises(ValueError, match="at least one row"):
        bench.pair_indices(0, 2, 1)


@pytest.fixture
def tiny_sparse(tiny_model_dir, tmp_path):
    from sparse_unsloth.finetune import LoraSettings, load_model
    from sparse_unsloth.patch import sparsify

    (tmp_path / "tiny.yaml").write_text(CONFIG_YAML)
    model, tokenizer = load_model(tiny_model_dir, LoraSettings(r=4, alpha=8), progress=False)
    sparsify(model, str(tmp_path / "tiny.yaml"), progress=False)
    return model, tokenizer


def test_measure_interleaves_dense_and_sparse_steps(tiny_sparse, monkeypatch):
    from helpers import ARITHMETIC

    from sparse_unsloth.patch import sparse_state

    model, tokenizer = tiny_sparse
    seen = []        # (sparse enabled, estimator seconds, MLP channels chosen) per step
    original_end = bench._Alternate.on_step_end

    def spy(self, args, state, control, **kwargs):
        seen.append((self.sparse.enabled, self.sparse.stats["estimator_s"] - self._estimator_start,
                     self.sparse.stats["mlp_total"]))
        self.sparse.stats["mlp_total"] = 0
        return original_end(self, args, state, control, **kwargs)

    trainers, build_trainer = [], bench.build_trainer

    def keep_trainer(*args, **kwargs):
        trainers.append(build_trainer(*args, **kwargs))
        return trainers[-1]

    monkeypatch.setattr(bench._Alternate, "on_step_end", spy)
    monkeypatch.setattr(bench, "build_trainer", keep_trainer)
    # Rows whose prompt fills max_length keep no labelled token: TRL drops them. The pairs must not shift.
    long_rows = [{"prompt": "one two three four five six seven eight nine ten " * 8, "completion": " odd"}]
    result = bench.measure(model, tokenizer, ARITHMETIC[:40] + 40 * long_rows, steps=3, warmup_steps=2,
                           batch_size=4, max_length=32, progress=False)
    ids = trainers[0].train_dataset["input_ids"]
    assert len(ids) == 2 * 5 * 4
    batches = [ids[8 * k:8 * k + 4] for k in range(5)]
    for k in range(5):                                      # both steps of a pair train the same batch
        assert ids[8 * k + 4:8 * k + 8] == batches[k]
    # the two warm-up batches differ; the timed pairs go round them again
    assert batches[0] != batches[1] and batches[2:] == [batches[0], batches[1], batches[0]]
    assert any("rows drawn had no labelled token within max_length 32" in note for note in result.notes)
    assert [enabled for enabled, _, _ in seen] == [False, True, True, False] * 2 + [False, True]
    for enabled, estimator_s, mlp_total in seen:           # dense steps really ran dense, sparse ones sparse
        assert (estimator_s > 0, mlp_total > 0) == (enabled, enabled)
    assert sparse_state(model).enabled is True              # left as it was
    assert len(result.dense_step_s) == len(result.sparse_step_s) == 3 == result.comparison.pairs
    assert all(t > 0 for t in result.dense_step_s + result.sparse_step_s)
    assert len(result.tokens_per_step) == 3 and all(t > 4 for t in result.tokens_per_step)
    assert 1 <= result.output_tokens < result.seq_len <= 32
    assert 0 < result.estimator_share < 1
    assert result.tokens_per_s(True) == pytest.approx(sum(result.tokens_per_step) / sum(result.sparse_step_s))
    assert result.memory["process_peak_rss_gib"] > 0 and "CPU" in result.memory["note"]
    assert result.device == "cpu"
    assert any("reference path" in note for note in result.notes)

    report = bench.format_report(result)
    assert "3 dense + 3 sparse steps timed, interleaved in pairs on the same batches" in report
    assert "the timed pairs on the warm-up's batches again: the steady state" in report
    assert report.count(" s") >= 2 and "tokens/s" in report and "estimator:" in report
    assert f"result:    {result.comparison.describe()}" in report


def test_bench_command_writes_json_and_plot(tiny_model_dir, arithmetic_jsonl, tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text(CONFIG_YAML)
    out = tmp_path / "bench"
    code = main(["bench", "--model", tiny_model_dir, "--dataset", arithmetic_jsonl, "--config",
                 str(tmp_path / "tiny.yaml"), "--steps", "3", "--batch-size", "4", "--max-length", "32",
                 "--lora-r", "4", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    data = json.loads((out / "bench.json").read_text())
    assert data["settings"]["steps"] == 3 and data["settings"]["config"].endswith("tiny.yaml")
    assert data["comparison"]["pairs"] == 3 and len(data["dense_step_s"]) == 3
    assert data["verdict"] == data["verdict"].strip() and set(data["tokens_per_s"]) == {"dense", "sparse"}
    assert 0 < data["flop_fraction"] < 1 and "estimator_share" in data and "memory" in data
    assert f"json:  {out / 'bench.json'}" in printed.out
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        assert "plot:  skipped (matplotlib is not installed" in printed.out
    else:
        assert (out / "bench.png").stat().st_size > 1000 and f"plot:  {out / 'bench.png'}" in printed.out


@pytest.mark.parametrize("argv, message", [
    (["--config", "dense"], "this command compares dense with sparse steps"),
    (["--model", "{tiny}"], "--config is required for --model"),
    (["--model", "{tiny}", "--config", "{deep}"], r"layer\(s\) \[7\] sparse, but the model has 2"),
])
def test_bench_user_errors_exit_2(argv, message, tiny_model_dir, tmp_path, capsys):
    deep = tmp_path / "deep.yaml"
    deep.write_text("sparsity:\n  mlp: {'7': 0.5}\n")
    argv = [a.format(tiny=tiny_model_dir, deep=deep) for a in argv]
    assert main(["bench", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("sparse-unsloth bench: error: ")
    assert re.search(message, err), err


def test_measure_needs_a_sparsified_model(tiny_model_dir):
    from sparse_unsloth.finetune import LoraSettings, load_model

    model, tokenizer = load_model(tiny_model_dir, LoraSettings(r=4, alpha=8), progress=False)
    with pytest.raises(ValueError, match="bench needs a sparsified model"):
        bench.measure(model, tokenizer, [{"prompt": "a", "completion": "b"}], steps=1)


def test_measure_captures_graphs_in_the_warm_up(tiny_sparse, monkeypatch):
    """On a GPU the warm-up must capture the CUDA graphs of the batches the timed pairs replay:
    the runners (passes, layers) capture at the first sighting while bench runs, and as before
    afterwards."""
    from helpers import ARITHMETIC, cpu_graphs

    from sparse_unsloth.patch import sparse_state
    from sparse_unsloth.patch import state as state_mod

    model, tokenizer = tiny_sparse
    runner, layers = cpu_graphs(capture_at=2), cpu_graphs(capture_at=2)
    monkeypatch.setattr(state_mod.SparseState, "runner", lambda self, t: runner)
    monkeypatch.setattr(state_mod.SparseState, "layer_runner", lambda self, t: layers)
    during = []
    original_end = bench._Alternate.on_step_end

    def spy(self, *args, **kwargs):
        during.append((runner.capture_at, layers.capture_at))
        return original_end(self, *args, **kwargs)

    monkeypatch.setattr(bench._Alternate, "on_step_end", spy)
    bench.measure(model, tokenizer, ARITHMETIC[:20], steps=1, warmup_steps=1, batch_size=2, max_length=32,
                  progress=False)
    assert during == [(1, 1)] * 4 and runner.capture_at == layers.capture_at == 2
    assert sparse_state(model).enabled is True


def test_fresh_batches_time_each_pair_on_a_new_batch_and_capture_as_training_does(tiny_sparse, monkeypatch):
    """--fresh-batches: every timed pair trains a batch the run has not seen, and the runners keep
    their capture rules, as in a padding-free training run."""
    from helpers import ARITHMETIC, cpu_graphs

    from sparse_unsloth.patch import state as state_mod

    model, tokenizer = tiny_sparse
    runner, layers = cpu_graphs(capture_at=2), cpu_graphs(capture_at=2)
    monkeypatch.setattr(state_mod.SparseState, "runner", lambda self, t: runner)
    monkeypatch.setattr(state_mod.SparseState, "layer_runner", lambda self, t: layers)
    during, trainers, build_trainer = [], [], bench.build_trainer
    original_end = bench._Alternate.on_step_end

    def spy(self, *args, **kwargs):
        during.append((runner.capture_at, layers.capture_at))
        return original_end(self, *args, **kwargs)

    def keep_trainer(*args, **kwargs):
        trainers.append(build_trainer(*args, **kwargs))
        return trainers[-1]

    monkeypatch.setattr(bench._Alternate, "on_step_end", spy)
    monkeypatch.setattr(bench, "build_trainer", keep_trainer)
    result = bench.measure(model, tokenizer, ARITHMETIC[:40], steps=3, warmup_steps=1, batch_size=4,
                           max_length=32, fresh_batches=True, progress=False)
    ids = trainers[0].train_dataset["input_ids"]
    batches = [ids[8 * k:8 * k + 4] for k in range(4)]
    assert all(ids[8 * k + 4:8 * k + 8] == batches[k] for k in range(4))     # a pair: one batch twice
    assert all(batches[i] != batches[j] for i in range(4) for j in range(i))   # no batch comes back
    assert during == [(2, 2)] * 8
    assert result.fresh_batches and "each timed pair on a batch not seen before" in bench.format_report(result)
