"""``sparse-unsloth estimator build | pull | push | info`` on a tiny saved Llama and a local Hub."""

from __future__ import annotations

import json

import pytest
from hubtest import TOKEN, assert_same, inputs, local_hub, tiny_llama, write_zlab_repo

from sparse_unsloth.cli import build_parser, main
from sparse_unsloth.estimator.store import load_factors

RANK = 4


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with local_hub(tmp_path / "hub-data", monkeypatch) as srv:
        yield srv


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    model = tiny_llama()
    path = tmp_path_factory.mktemp("model") / "tiny-llama"
    model.save_pretrained(path)
    return model, str(path)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out.strip(), out.err.strip()


@pytest.mark.parametrize("argv", [[], ["estimator"], ["estimator", "build"], ["estimator", "pull"],
                                  ["estimator", "push"], ["estimator", "info"]])
def test_help_is_complete(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*argv, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    expected = {(): ["estimator", "--verbose"], ("estimator",): ["build", "pull", "push", "info"],
                ("estimator", "build"): ["--model", "--rank", "--config", "--out", "--cache", "--device"],
                ("estimator", "pull"): ["--model", "--repo", "--rank", "--cache", "--verify", "--token"],
                ("estimator", "push"): ["file", "--repo", "--private", "--token"],
                ("estimator", "info"): ["file", "--json"]}[tuple(argv)]
    for word in expected:
        assert word in text


def test_build_info_push_pull_round_trip(hub, saved_model, tmp_path, capsys):
    model, path = saved_model
    out_file = tmp_path / "est.safetensors"
    code, out, _ = _run(capsys, "estimator", "build", "--model", path, "--rank", str(RANK),
                        "--out", str(out_file), "--device", "cpu")
    assert code == 0 and out == str(out_file)
    built = load_factors(out_file, RANK, inputs(model)[1])
    assert built.layers() == [0, 1, 2] and built.model_id == path

    code, out, _ = _run(capsys, "estimator", "info", str(out_file))
    assert code == 0 and "rank: 4" in out and "fingerprint: " + built.fingerprint in out
    code, out, _ = _run(capsys, "estimator", "info", str(out_file), "--json")
    assert json.loads(out)["layers"] == "[0, 1, 2]"

    code, _, err = _run(capsys, "estimator", "push", str(out_file))  # a local path names no Hub repo
    assert code == 2 and "pass --repo" in err
    code, out, _ = _run(capsys, "estimator", "push", str(out_file), "--repo", "acme/tiny-est")
    assert code == 0 and out.startswith("acme/tiny-est@")

    cache = tmp_path / "cache"
    code, out, _ = _run(capsys, "estimator", "pull", "--model", "acme/tiny-llama", "--repo", "acme/tiny-est",
                        "--rank", str(RANK), "--cache", str(cache))
    assert code == 0 and out.startswith(str(cache / "estimators" / "acme--tiny-llama" / "rank4-"))
    assert_same(load_factors(out, RANK, built.fingerprint), built)


def test_build_with_config_writes_the_cache(saved_model, tmp_path, capsys):
    model, path = saved_model
    config = tmp_path / "cfg.yaml"
    config.write_text("estimator_rank: 4\nsparsity:\n  mlp: {'1': 0.5}\n  self_attn: {'2': 0.5}\n")
    code, out, _ = _run(capsys, "estimator", "build", "--model", path, "--config", str(config),
                        "--cache", str(tmp_path / "cache"))
    assert code == 0
    factors = load_factors(out, RANK, inputs(model)[1])
    assert sorted(factors.factors) == ["1.gate_proj", "1.up_proj", "2.k_proj", "2.q_proj", "2.v_proj"]


def test_pull_errors_name_the_fix(hub, tmp_path, capsys):
    code, _, err = _run(capsys, "estimator", "pull", "--model", "acme/nothing", "--cache", str(tmp_path))
    assert code == 2 and "acme/nothing-sparse-unsloth-estimator does not exist" in err
    code, _, err = _run(capsys, "estimator", "push", str(tmp_path / "missing.safetensors"), "--repo", "a/b")
    assert code == 2 and "does not exist" in err


def test_push_with_a_wrong_token_fails_cleanly(hub, saved_model, tmp_path, capsys):
    _, path = saved_model
    out_file = tmp_path / "est.safetensors"
    assert _run(capsys, "estimator", "build", "--model", path, "--rank", "2", "--out", str(out_file))[0] == 0
    code, _, err = _run(capsys, "estimator", "push", str(out_file), "--repo", "acme/x", "--token", "bad")
    assert code == 2 and "HTTP 401" in err and TOKEN not in err


def test_pull_zlab_needs_and_uses_verify(hub, saved_model, tmp_path, capsys):
    from huggingface_hub import HfApi

    model, path = saved_model
    write_zlab_repo(tmp_path / "z", model, RANK, layers=[0, 1, 2])
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("z-lab/tiny-llama-SparseLoRA")
    api.upload_folder(folder_path=str(tmp_path / "z"), repo_id="z-lab/tiny-llama-SparseLoRA")
    args = ["estimator", "pull", "--model", path, "--repo", "z-lab/tiny-llama-SparseLoRA", "--rank", str(RANK),
            "--cache", str(tmp_path / "cache")]
    code, _, err = _run(capsys, *args)
    assert code == 2 and "no model fingerprint" in err
    code, out, _ = _run(capsys, *args, "--verify")
    assert code == 0
    factors = load_factors(out, RANK, inputs(model)[1])
    assert factors.extra["converted_from"] == "z-lab/sparselora" and factors.layers() == [0, 1, 2]
    code, out, _ = _run(capsys, "estimator", "info", str(tmp_path / "z"))
    assert code == 0 and "z-lab/sparselora" in out and "rank: 4" in out
