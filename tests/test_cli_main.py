"""What every ``sparse-unsloth`` command shares: instant help, one exit-code convention, no
third-party noise, and input checks before any weights load."""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys

import pytest

from sparse_unsloth import cli, preset_names
from sparse_unsloth.cli import EXIT_CODES, build_parser, main

HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes")


def _commands(parser, prefix=()):
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for name, child in action.choices.items():
                yield (*prefix, name)
                yield from _commands(child, (*prefix, name))


def test_help_imports_nothing_heavy_and_is_quick():
    # A fresh interpreter: --help of the top level and of every command, then which modules came in.
    script = f"""
import sys, time
start = time.perf_counter()
from sparse_unsloth.cli import build_parser, main
paths = [()] + {sorted(_commands(build_parser()))!r}
for path in paths:
    try:
        main([*path, "--help"])
    except SystemExit as exit_:
        assert exit_.code == 0, path
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
print(round(time.perf_counter() - start, 2), heavy, file=sys.stderr)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    seconds, loaded = proc.stderr.strip().splitlines()[-1].split(" ", 1)
    assert loaded == "[]", f"--help imported {loaded}"
    assert float(seconds) < 3.0          # a loaded 2-core box: ~0.3 s; importing torch alone takes seconds


def test_exit_codes_are_documented_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert " ".join(EXIT_CODES.split()) in help_text
    assert "2 a usage or input error" in help_text and "1 an unexpected error" in help_text


def test_every_user_error_class_exists():
    for module, names in cli.USER_ERRORS.items():
        for name in names:
            assert issubclass(getattr(importlib.import_module(module), name), Exception), (module, name)


def test_user_errors_exit_2_and_bugs_keep_their_traceback(monkeypatch, capsys):
    from sparse_unsloth.config import ConfigError

    def fails_with(err):
        def run(args):
            raise err
        return run

    parser = build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    info = next(a for a in parser._actions if a.dest == "command").choices["estimator"]
    info = next(a for a in info._actions if a.dest == "action").choices["info"]

    info.set_defaults(func=fails_with(ConfigError("bad thing\n    pip install fix")))
    assert main(["estimator", "info", "x"]) == 2
    err = capsys.readouterr().err
    assert err == "sparse-unsloth estimator info: error: bad thing pip install fix\n"

    assert main(["-v", "estimator", "info", "x"]) == 2           # -v: the same code, with the traceback
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.endswith("sparse-unsloth estimator info: error: bad thing pip install fix\n")

    info.set_defaults(func=fails_with(FileNotFoundError("no such file: x")))
    assert main(["estimator", "info", "x"]) == 2

    info.set_defaults(func=fails_with(KeyError("a bug")))      # not ours: Python's traceback, exit 1
    with pytest.raises(KeyError):
        main(["estimator", "info", "x"])


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--steps", "0"])
    assert exit_.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_bitsandbytes_cpu_kernel_warning_is_dropped_while_a_command_runs(monkeypatch, caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    message = ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
               "already `pip install kernels` and the kernels >= 0.11.1")

    def command(args):
        logger.warning(message, "No module named 'kernels'")
        logger.warning("another bitsandbytes warning")
        return 0

    parser = build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    info = next(a for a in parser._actions if a.dest == "command").choices["estimator"]
    next(a for a in info._actions if a.dest == "action").choices["info"].set_defaults(func=command)
    with caplog.at_level(logging.WARNING):
        assert main(["estimator", "info", "x"]) == 0
        shown = [r.getMessage() for r in caplog.records if r.name == logger.name]
        assert shown == ["another bitsandbytes warning"]            # only that message, only that logger
        caplog.clear()
        assert main(["-v", "estimator", "info", "x"]) == 0           # -v shows it
        assert any("gemm_4bit_forward" in r.getMessage() for r in caplog.records)
        caplog.clear()
        logger.warning(message, "x")                                 # outside a command: untouched
        assert any("gemm_4bit_forward" in r.getMessage() for r in caplog.records)


def test_a_real_command_prints_no_bitsandbytes_noise(tmp_path):
    plain = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True,
                           timeout=300, check=False)
    if "gemm_4bit_forward" not in plain.stderr:
        pytest.skip("bitsandbytes does not emit the CPU-kernel warning on this machine")
    proc = subprocess.run([sys.executable, "-m", "sparse_unsloth.cli", "train", "--config", "nope"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
    assert proc.returncode == 2
    assert "gemm_4bit_forward" not in proc.stderr, proc.stderr
    expected = (f"sparse-unsloth train: error: unknown preset 'nope'; presets are {preset_names()}, "
                "or give a YAML path")
    assert proc.stderr.strip().splitlines() == [expected]


def test_a_config_beyond_the_model_is_refused_before_the_weights_load(tiny_model_dir, tmp_path, monkeypatch,
                                                                       capsys):
    from transformers import AutoModelForCausalLM

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the config was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    deep = tmp_path / "deep.yaml"
    deep.write_text("sparsity:\n  self_attn: {'2-3': 0.5}\n")
    for command in (["train"], ["bench"], ["estimator", "build"]):
        assert main([*command, "--model", tiny_model_dir, "--config", str(deep)]) == 2, command
        err = capsys.readouterr().err
        assert "layer(s) [2, 3] sparse, but the model has 2 decoder layers" in err, err


def test_shipped_model_config_is_checked_without_converting_it(tmp_path, monkeypatch, capsys):
    from sparse_unsloth import smollm2

    monkeypatch.setattr(smollm2, "smollm2_path", lambda *a, **k: pytest.fail("converted the shipped model"))
    deep = tmp_path / "deep.yaml"
    deep.write_text("sparsity:\n  mlp: {'30': 0.5}\n")
    assert main(["train", "--config", str(deep)]) == 2
    assert "layer(s) [30] sparse, but the model has 30 decoder layers" in capsys.readouterr().err
