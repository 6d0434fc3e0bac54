"""The README's first command runs this demo: dense vs sparse LoRA on the real SmolLM2-135M.

Here at a tiny size (3 steps of 2 rows x 64 tokens, 3 timed pairs) so that it stays a few seconds a run.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest

from sparse_unsloth import demo
from sparse_unsloth.cli import main


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.slow
def test_demo_trains_dense_then_sparse_times_them_interleaved_and_saves_the_adapter(tmp_path, capsys):
    args = _args("--steps", "3", "--batch-size", "2", "--max-length", "64", "--train-rows", "16",
                 "--eval-rows", "2", "--timing-steps", "3", "--output-dir", str(tmp_path), "--no-progress")
    results = demo.run_demo(args)
    out = capsys.readouterr().out

    dense, sparse, speed = results["dense"], results["sparse"], results["speed"]
    assert (dense.steps, dense.sparse_steps, dense.adapter_dir) == (3, 0, None)
    assert (sparse.steps, sparse.sparse_steps) == (3, 3)           # round(0.1 x 3) = 0 warm-up steps
    assert sparse.sparse_logs and all(log["sparse/active"] == 1.0 for log in sparse.sparse_logs)
    assert all(log["sparse/mlp_kept_frac"] == 0.5 for log in sparse.sparse_logs)   # the preset's 50% FFN
    for result in (dense, sparse):
        assert math.isfinite(result.eval_loss) and 0 < result.eval_loss < 5
    # three steps at lr 2e-4 move the held-out loss a little, whichever way the layers compute
    assert abs(sparse.eval_loss / dense.eval_loss - 1) < 0.2

    adapter = tmp_path / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16
    assert (adapter / "adapter_model.safetensors").is_file()
    lines = out.splitlines()
    dense_row = next(line for line in lines if line.startswith("dense "))
    sparse_row = next(line for line in lines if line.startswith("sparse "))
    assert f"{dense.eval_loss:.4f}" in dense_row and f"{sparse.eval_loss:.4f}" in sparse_row
    assert "x" not in dense_row + sparse_row                       # no speed-up from the sequential runs
    assert f"held-out loss, sparse vs dense: {100 * (sparse.eval_loss / dense.eval_loss - 1):+.2f}%" in out
    # the speed comes from interleaved pairs, with a verdict the spread supports
    assert speed.comparison.pairs == 3 and len(speed.dense_step_s) == len(speed.sparse_step_s) == 3
    assert "3 dense + 3 sparse steps timed, interleaved in pairs on the same batches" in out
    assert f"result:    {speed.comparison.describe()}" in out
    assert "reference path" in out
    assert f"adapter: {adapter.resolve()}" in out


@pytest.mark.parametrize("flag", ["--steps", "--batch-size", "--max-length", "--timing-steps"])
def test_zero_steps_is_refused(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", flag, "0"])
    assert exit_.value.code == 2
    assert f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err


def test_python_m_demo_is_the_demo_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--steps", "0"])                      # python -m sparse_unsloth.demo --steps 0
    assert exit_.value.code == 2 and "sparse-unsloth demo: error: argument --steps" in capsys.readouterr().err
