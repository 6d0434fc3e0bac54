"""Training FLOPs of one step, dense or sparse: what a config saves, before training.

The accounting of the speed bench (``scripts/bench_speed.py``) and of the baseline anchors,
for a decoder of gate/up/down MLPs and q/k/v/o attention with LoRA on all seven projections:

- frozen projections: 3 x forward (forward, gradient checkpointing's recompute, input grad);
  a sparse layer computes its context tokens with the kept fraction of the channels, its
  output tokens with all of them (the fast path also skips a sparse MLP's down projection in
  the recompute, whose output nothing reads; that saving is not the method's and is not
  counted, so a measured speed-up can pass 1 / fraction by a little);
- LoRA: 4 x forward (forward, recompute, input grad, weight grad), always dense;
- attention core (QK^T and PV over causal pairs): 4.5 x forward, dense;
- LM head: forward + input grad on the output tokens only (Unsloth's fused cross entropy);
- estimator: the low-rank scores of the sparse layers, once a step (the channel choice is
  cached for the recompute and the backward pass, and has no gradient).

A FLOP is one multiply or one add (a multiply-add is 2). Every term is linear in ``batch``,
so the fraction depends only on ``seq_len`` and ``output_tokens``.
"""

from __future__ import annotations

from typing import Any

from .config import SparseConfig
from .estimator.select import kept_count

__all__ = ["flop_count", "flop_fraction"]


def _shape(model_or_config: Any) -> dict[str, int]:
    """The sizes the count needs, from a transformers config or a model (PEFT-wrapped or not)."""
    cfg = model_or_config if hasattr(model_or_config, "hidden_size") else getattr(model_or_config, "config", None)
    if cfg is None or not hasattr(cfg, "hidden_size"):
        raise TypeError(f"flop_fraction needs a transformers model config or a model, got "
                        f"{type(model_or_config).__name__}")
    heads = cfg.num_attention_heads
    return {"hidden": cfg.hidden_size, "inter": cfg.intermediate_size, "heads": heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size}


def flop_count(config: SparseConfig | None, model_config: Any, batch: int, seq_len: int,
               output_tokens: int, lora_r: int = 16) -> dict[str, float]:
    """FLOPs of one training step by part (see the module doc), and their ``"total"``.

    ``config`` None counts the dense step. ``output_tokens``: tokens with a label in each row of
    ``seq_len`` tokens; the other ``seq_len - output_tokens`` are context tokens.
    """
    if batch < 1 or seq_len < 1 or not 0 <= output_tokens <= seq_len:
        raise ValueError(f"need batch >= 1, seq_len >= 1 and 0 <= output_tokens <= seq_len; got batch "
                         f"{batch}, seq_len {seq_len}, output_tokens {output_tokens}")
    s = _shape(model_config)
    hid, inter, hd = s["hidden"], s["inter"], s["head_dim"]
    dq, dkv = s["heads"] * hd, s["kv_heads"] * hd
    n_tok = batch * seq_len
    n_ctx = batch * (seq_len - output_tokens)
    projs = {"mlp": ((hid, inter), (hid, inter), (inter, hid)),
             "self_attn": ((hid, dq), (hid, dkv), (hid, dkv), (dq, hid))}
    # Rows the estimator scores, and the (in, out) of the projections it estimates.
    scored = {"mlp": ((hid, inter), (hid, inter)), "self_attn": ((hid, dq), (hid, dkv), (hid, dkv))}
    channels = {"mlp": inter, "self_attn": hd}
    c = {"frozen_attn_proj": 0.0, "frozen_ffn": 0.0, "lora": 0.0, "attn_core": 0.0, "estimator": 0.0}
    for layer in range(s["layers"]):
        for kind, shapes in projs.items():
            sparsity = config.sparsity(kind, layer) if config is not None else 0.0
            keep = kept_count(channels[kind], sparsity) / channels[kind] if sparsity else 1.0
            rows = n_tok - n_ctx + n_ctx * keep
            part = "frozen_ffn" if kind == "mlp" else "frozen_attn_proj"
            for i, o in shapes:
                c[part] += 3 * 2 * rows * i * o
                c["lora"] += 4 * 2 * n_tok * lora_r * (i + o)
            if sparsity:
                est_rows = batch if kind == "mlp" and config.ffn_seq_average else n_ctx
                c["estimator"] += sum(2 * est_rows * config.estimator_rank * (i + o) for i, o in scored[kind])
        c["attn_core"] += 4.5 * 2 * 2 * batch * s["heads"] * seq_len * (seq_len + 1) / 2 * hd
    c["lm_head"] = 2 * 2 * (n_tok - n_ctx) * hid * s["vocab"]
    c["total"] = sum(c.values())
    return c


def flop_fraction(config: SparseConfig, model_config: Any, batch: int, seq_len: int, output_tokens: int,
                  lora_r: int = 16) -> float:
    """The sparse step's training FLOPs over the dense step's, for ``config`` on this model.

    ``model_config``: a transformers config (no weights needed) or a model. Batch geometry:
    ``batch`` rows of ``seq_len`` tokens, ``output_tokens`` of them with labels. E.g. the
    ``llama3-8b-math10k`` preset on Llama-3-8B at 8 x 512 with 128 output tokens: 0.447.
    """
    sparse = flop_count(config, model_config, batch, seq_len, output_tokens, lora_r)
    dense = flop_count(None, model_config, batch, seq_len, output_tokens, lora_r)
    return sparse["total"] / dense["total"]
