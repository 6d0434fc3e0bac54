"""4-bit NF4 base weights (bitsandbytes' CPU backend) through the reference path."""

import copy

import pytest
import torch

import sparse_unsloth as su
from sparse_unsloth.patch.models import decoder_layers, frozen_linear, weight_getter

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is needed for 4-bit weights")


def _models(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, vocab_size=97)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    q4 = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32)
    # The same model with its frozen weights replaced by their dequantization: the reference.
    full = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        for (name, mod), (_, ref) in zip(q4.named_modules(), full.named_modules()):
            if isinstance(mod, bnb.nn.Linear4bit):
                ref.weight.copy_(weight_getter(mod)())
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    q4 = get_peft_model(q4, lora)
    torch.manual_seed(1)
    full = get_peft_model(full, copy.deepcopy(lora))
    return q4, full


def _sparse_pair(tmp_path, config):
    """The 4-bit model and its dequantized twin, both sparse with the same estimator, after one
    training step on the same batch: their losses and LoRA gradients."""
    q4, full = _models(tmp_path)
    su.sparsify(q4, config, progress=False)
    su.sparsify(full, config, su.sparse_state(q4).factors, progress=False)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 9), generator=gen)
    labels = ids.clone()
    labels[:, :5] = -100
    results = []
    for model in (q4, full):
        model.train()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
        assert su.sparse_state(model).pop_stats()["sparse/active"] == 1.0        # it ran sparse
    (loss4, grads4), (loss_ref, grads_ref) = results
    torch.testing.assert_close(loss4, loss_ref, rtol=1e-5, atol=1e-5)
    for name, g in grads4.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)
    return q4, full


def test_4bit_sparse_equals_masked_dequantized_model(tmp_path):
    config = su.SparseConfig(mlp={0: 0.5, 1: 0.75}, self_attn={1: 0.5}, estimator_rank=4)
    q4, full = _sparse_pair(tmp_path, config)
    assert isinstance(frozen_linear(decoder_layers(q4)[0].mlp.gate_proj), bnb.nn.Linear4bit)
    # Same channels chosen, from the same (dequantized) weights
    choices, other = su.sparse_state(q4).current.choices, su.sparse_state(full).current.choices
    assert sorted(choices) == sorted(other) == [(0, "mlp"), (1, "attn"), (1, "mlp")]
    for key, choice in choices.items():
        assert all(torch.equal(a, b) for a, b in zip(vars(choice).values(), vars(other[key]).values()))


def test_fast_path_takes_4bit_weights(tmp_path, monkeypatch):
    """The fused sparse Functions on 4-bit weights (dequantized once per pass, nothing kept between
    passes) equal the same Functions on the dequantized 16-bit model (the MLP: Hugging Face's
    attention does not call apply_qkv), and the 4-bit weights stay packed."""
    import importlib

    from sparse_unsloth.patch import unsloth_fast

    monkeypatch.setattr(importlib.import_module("sparse_unsloth.patch.sparsify"), "_backend",
                        lambda _m: unsloth_fast)
    q4, _ = _sparse_pair(tmp_path, su.SparseConfig(mlp={0: 0.5, 1: 0.75}, estimator_rank=4))
    mlp = decoder_layers(q4)[0].mlp
    assert mlp.__dict__["_sparse_unsloth_sparse"]["forward"] is unsloth_fast._mlp_forward   # (installed per call)
    assert isinstance(frozen_linear(mlp.gate_proj), bnb.nn.Linear4bit)
    assert frozen_linear(mlp.gate_proj).weight.dtype == torch.uint8
