"""flop_fraction: a hand-counted tiny model, and the Llama-3-8B numbers the README and issues quote."""

import types

import pytest

from sparse_unsloth import SparseConfig, flop_fraction, load_config
from sparse_unsloth.flops import flop_count

TINY = types.SimpleNamespace(hidden_size=4, intermediate_size=8, num_attention_heads=2, num_key_value_heads=1,
                             head_dim=2, num_hidden_layers=1, vocab_size=10)


def test_tiny_model_counted_by_hand():
    # batch 1 x 2 tokens, 1 output token, LoRA r 1. Dense:
    #   frozen FFN 3 x 2 x 2 rows x (4*8 + 4*8 + 8*4) = 1152; attention q/k/v/o (16+8+8+16): 576
    #   LoRA 4 x 2 x 2 rows x 1 x (36 + 28) = 1024; attention core 4.5 x 2*2*1*2 heads*2*3/2*2 = 216
    #   LM head 2 x 2 x 1 output row x 4 x 10 = 160                               total 3128
    dense = flop_count(None, TINY, 1, 2, 1, lora_r=1)
    assert dense == {"frozen_ffn": 1152, "frozen_attn_proj": 576, "lora": 1024, "attn_core": 216,
                     "estimator": 0, "lm_head": 160, "total": 3128}
    # FFN 50% sparse: the context row keeps 4 of 8 channels -> 1.5 rows' worth: 864 (-288);
    # rank-2 estimator on the one sequence mean: 2 x 1 x 2 x (12 + 12) = 96.
    config = SparseConfig(mlp={0: 0.5}, estimator_rank=2)
    sparse = flop_count(config, TINY, 1, 2, 1, lora_r=1)
    assert sparse["frozen_ffn"] == 864 and sparse["estimator"] == 96 and sparse["total"] == 2936
    assert flop_fraction(config, TINY, 1, 2, 1, lora_r=1) == pytest.approx(2936 / 3128)
    # Attention 50%: each head keeps 1 of 2 dims; the estimator scores every context token.
    attn = flop_count(SparseConfig(self_attn={0: 0.5}, estimator_rank=2), TINY, 1, 2, 1, lora_r=1)
    assert attn["frozen_attn_proj"] == 3 * 2 * 1.5 * 48
    assert attn["estimator"] == 2 * 1 * 2 * ((4 + 4) + (4 + 2) + (4 + 2))


def test_batch_cancels_and_dense_config_is_one():
    config = SparseConfig(mlp={0: 0.9})
    assert flop_fraction(config, TINY, 3, 8, 2) == pytest.approx(flop_fraction(config, TINY, 1, 8, 2))
    assert flop_fraction(SparseConfig(), TINY, 2, 8, 2) == 1.0
    assert flop_fraction(config, TINY, 1, 8, 8) > flop_fraction(config, TINY, 1, 8, 2)  # fewer context tokens


LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256}


@pytest.mark.parametrize(("preset", "batch", "seq", "out", "fraction", "bound"), [
    ("llama3-8b-math10k", 8, 512, 128, 0.447, 2.24),   # README: keeps 44.7% (bound 2.24x)
    ("llama3-8b-math10k", 4, 1024, 256, None, 2.20),
    ("llama3-8b-csr", 8, 512, 128, None, 1.35),
])
def test_llama3_8b_presets_from_a_config_without_weights(preset, batch, seq, out, fraction, bound):
    from transformers import LlamaConfig

    got = flop_fraction(load_config(preset), LlamaConfig(**LLAMA3_8B), batch, seq, out)
    assert 1 / got == pytest.approx(bound, abs=0.005)
    if fraction is not None:
        assert got == pytest.approx(fraction, abs=5e-4)


def test_a_model_works_as_its_config():
    from helpers import tiny_lora_model

    model = tiny_lora_model()
    config = SparseConfig(mlp={1: 0.5})
    assert flop_fraction(config, model, 2, 16, 4) == flop_fraction(config, model.config, 2, 16, 4)


def test_bad_geometry_is_a_clear_error():
    with pytest.raises(ValueError, match="output_tokens"):
        flop_fraction(SparseConfig(), TINY, 1, 8, 9)
    with pytest.raises(TypeError, match="model config"):
        flop_fraction(SparseConfig(), object(), 1, 8, 2)
