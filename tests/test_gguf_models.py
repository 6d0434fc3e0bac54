"""A GGUF-converted tokenizer takes its eos and pad from the model config (Qwen2.5 instruct GGUFs
give the tokenizer eos = pad = <|endoftext|>, which Unsloth refuses to train with)."""

import pytest
from helpers import unsloth_pad_verdict
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PretrainedConfig, PreTrainedTokenizerFast

from sparse_unsloth.gguf_models import special_tokens_as_config

VOCAB = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "hi": 3}


def gguf_like_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(WordLevel(VOCAB, unk_token="<|endoftext|>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.mark.parametrize("eos", [2, [2, 0]])
def test_eos_and_pad_become_the_configs(eos, tmp_path):
    tok = gguf_like_tokenizer()
    special_tokens_as_config(tok, PretrainedConfig(eos_token_id=eos, pad_token_id=0))
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    tok.save_pretrained(tmp_path)
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert (again.eos_token_id, again.pad_token_id) == (2, 0)


def test_unsloth_accepts_the_tokenizer_only_once_it_is_the_configs():
    config = PretrainedConfig(eos_token_id=2, pad_token_id=0, vocab_size=len(VOCAB))
    tok = gguf_like_tokenizer()
    before = unsloth_pad_verdict(tok, config)
    assert before["reason"] == "equals_eos" and not before["changed"]      # Unsloth would add a token
    special_tokens_as_config(tok, config)
    assert unsloth_pad_verdict(tok, config)["reason"] is None


@pytest.mark.parametrize("ids", [{}, {"eos_token_id": None, "pad_token_id": None}, {"eos_token_id": 99},
                                 {"eos_token_id": []}])
def test_tokens_the_config_does_not_name_stay(ids):
    tok = gguf_like_tokenizer()
    special_tokens_as_config(tok, PretrainedConfig(**ids))
    assert (tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|endoftext|>")
