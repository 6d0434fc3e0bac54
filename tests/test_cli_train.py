"""``sparse-unsloth train``: help, one-line errors with exit code 2, and a run whose adapter
loads and merges with plain PEFT."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from helpers import ARITHMETIC

from sparse_unsloth.cli import build_parser, main

CONFIG_YAML = """\
name: tiny
estimator_rank: 4
dense_warmup_steps: 1
sparsity:
  mlp: {"0-1": 0.5}
  self_attn: {"1": 0.5}
"""


def _subcommands(parser, prefix=()):
    """Every command path of the parser tree, e.g. ('estimator', 'build')."""
    yield prefix
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for name, child in action.choices.items():
                yield from _subcommands(child, (*prefix, name))


def test_every_help_completes(capsys):
    paths = list(_subcommands(build_parser()))
    assert {("train",), ("demo",), ("estimator", "build")} <= set(paths)
    for path in paths:
        with pytest.raises(SystemExit) as exit_:
            main([*path, "--help"])
        assert exit_.value.code == 0, path
        assert "usage: sparse-unsloth" in capsys.readouterr().out


def _train(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["train", "--no-progress", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_saves_an_adapter_that_plain_peft_loads_and_merges(tmp_path, tiny_model_dir, arithmetic_jsonl,
                                                                 capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    (tmp_path / "tiny.yaml").write_text(CONFIG_YAML)
    out_dir = tmp_path / "run"
    code, out, err = _train(capsys, "--model", tiny_model_dir, "--dataset", arithmetic_jsonl,
                            "--config", str(tmp_path / "tiny.yaml"), "--steps", "4", "--batch-size", "8",
                            "--lr", "1e-2", "--max-length", "32", "--lora-r", "4", "--eval-rows", "8",
                            "--logging-steps", "1", "--output-dir", str(out_dir))
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert (summary["steps"], summary["sparse_steps"], summary["eval_rows"]) == (4, 3, 8)
    assert summary["train_rows"] == len(ARITHMETIC) - 8
    assert summary["eval_loss"] > 0 and summary["tokens_per_s"] > 0
    assert all(log["sparse/mlp_kept_frac"] == 0.5 for log in summary["sparse_logs"][1:])
    assert "3 of 4 steps (75%) after 1 dense warm-up steps" in out
    assert f"adapter:  {out_dir / 'adapter'}" in out

    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 12))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, str(out_dir / "adapter"))
    assert peft_model.peft_config["default"].r == 4
    with torch.no_grad():
        adapted = peft_model(ids).logits
        merged = peft_model.merge_and_unload()(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-4)     # the adapter learned something
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_dense_run_has_no_sparse_steps(tmp_path, tiny_model_dir, arithmetic_jsonl, capsys):
    code, out, err = _train(capsys, "--model", tiny_model_dir, "--dataset", arithmetic_jsonl, "--config", "dense",
                            "--steps", "2", "--batch-size", "4", "--max-length", "32", "--eval-rows", "0",
                            "--output-dir", str(tmp_path))
    assert code == 0, err
    assert "sparse:   0 steps (dense run)" in out and "held-out" not in out
    assert json.loads((tmp_path / "summary.json").read_text())["config"] == "dense"


@pytest.mark.parametrize("argv, message", [
    (["--model", "./no/such/model"], "model folder ./no/such/model does not exist"),
    (["--model", "nobody/no-such-model", "--config", "dense"], "could not load model 'nobody/no-such-model'.*HF_HUB_OFFLINE"),
    (["--config", "no-such-preset"], "unknown preset 'no-such-preset'; presets are"),
    (["--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["--model", "{tiny}"], "--config is required for --model"),
    (["--dataset", "nothing/here/rows.jsonl"], "dataset file nothing/here/rows.jsonl does not exist"),
    (["--dataset", "{bad}"], "row 1: 'prompt' and 'completion' must both be"),
    (["--model", "{tiny}", "--config", "dense", "--unsloth"], "--unsloth needs a CUDA GPU"),
    (["--model", "{tiny}", "--config", "{deep}"], r"layer\(s\) \[40\] sparse, but the model has 2"),
    (["--model", "{tiny}", "--config", "{ok}", "--estimator", "none.safetensors"],
     "estimator file none.safetensors does not exist"),
])
def test_user_errors_exit_2_with_one_line(argv, message, tmp_path, tiny_model_dir, capsys):
    if "--unsloth" in argv and torch.cuda.is_available():
        pytest.skip("with a GPU --unsloth is not an error")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ARITHMETIC[0]) + "\n" + json.dumps({"prompt": "x", "completion": 3}) + "\n")
    deep = tmp_path / "deep.yaml"
    deep.write_text("sparsity:\n  mlp: {'40': 0.5}\n")      # the tiny model has 2 layers
    ok = tmp_path / "ok.yaml"
    ok.write_text(CONFIG_YAML)
    argv = [a.format(tiny=tiny_model_dir, bad=bad, deep=deep, ok=ok) for a in argv]
    code, _out, err = _train(capsys, *argv, "--output-dir", str(tmp_path / "out"))
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("sparse-unsloth train: error: ")
    assert re.search(message, err), err


def test_error_from_the_shell_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparse_unsloth.cli", "train", "--config", "nope"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("sparse-unsloth train: error: unknown preset 'nope'")
