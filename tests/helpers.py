"""Tiny random models for the tests (no downloads)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

ALL_PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_lora_model(model_type: str = "llama", layers: int = 3, hidden: int = 48, inter: int = 77,
                    heads: int = 6, kv_heads: int = 2, vocab: int = 101, dtype=torch.float64,
                    seed: int = 0, rank: int = 4):
    """A random causal LM with LoRA on all 7 projections; LoRA B is random so its grads matter."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, hidden_size=hidden, intermediate_size=inter,
                                  num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  num_hidden_layers=layers, vocab_size=vocab,
                                  max_position_embeddings=128, head_dim=hidden // heads)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL_PROJS, init_lora_weights=False)
    return get_peft_model(model, lora)


def tiny_tokenizer(texts: list[str]):
    """A small BPE tokenizer trained on ``texts`` (offline), with pad/eos tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>")


# Prompt-completion rows with a short, learnable answer (the parity of a + b).
ARITHMETIC = [{"prompt": f"Question: is {a} plus {b} even or odd?\nAnswer:",
               "completion": " even" if (a + b) % 2 == 0 else " odd"} for a in range(12) for b in range(12)]
