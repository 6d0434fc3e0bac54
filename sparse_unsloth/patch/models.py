"""What the patching layer needs to know about a model: its decoder layers and their shapes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ..estimator.factors import ESTIMATED_PROJS
from ..gguf_models import recorded_identity

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Each of their decoder layers ends ``residual + mlp(post_attention_layernorm(h))``: nothing
# differentiated reads the MLP's output values (see ops.fast_mlp's out_in_recompute). A model
# type added here must end its layers the same way, or the patch must pass True for it.
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")


class UnsupportedModelError(ValueError):
    """The model's architecture has no sparse patch."""


@dataclasses.dataclass(frozen=True)
class AttentionGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int


def model_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no .config; pass a Hugging Face "
                                    "causal LM (or a PEFT model wrapping one)")
    return config


def model_identity(model: nn.Module) -> tuple[str, str]:
    """(model id, revision) that name the model's estimator: what a folder converted by
    sparse_unsloth records as its real name, else ``config._name_or_path`` (a Hub id or a
    folder) and ``config._commit_hash``."""
    config = model_config(model)
    name = getattr(config, "_name_or_path", "") or ""
    recorded = recorded_identity(name) if name else None
    return recorded or (name, getattr(config, "_commit_hash", None) or "")


def check_supported(model: nn.Module) -> str:
    model_type = getattr(model_config(model), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; sparse_unsloth patches "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} decoder layers (gate/up/down MLP and q/k/v/o "
            "attention). Open an issue with the model id to add it.")
    return model_type


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list, through any PEFT / Unsloth wrapping."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and \
                hasattr(layers[0], "mlp") and hasattr(layers[0], "self_attn"):
            return layers
    raise UnsupportedModelError(f"found no decoder layers with .mlp and .self_attn in "
                                f"{type(model).__name__}")


def attention_geometry(model: nn.Module) -> AttentionGeometry:
    config = model_config(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv_heads:
        raise UnsupportedModelError(f"{heads} attention heads do not split into {kv_heads} KV groups")
    return AttentionGeometry(heads, kv_heads, head_dim)


def frozen_linear(proj: nn.Module) -> nn.Module:
    """The frozen base linear under a PEFT LoRA layer (or the projection itself).

    PEFT's ``get_base_layer`` walks the same ``base_layer`` chain with ``hasattr``, which costs a
    failed ``nn.Module.__getattr__`` (~5 us); the sparse fast path asks for every projection of
    every sparse layer at each forward, on the host path that paces it.
    """
    while "base_layer" in proj._modules:
        proj = proj._modules["base_layer"]
    return proj


class Dequantize:
    """A bitsandbytes 4-bit weight's dequantization ``[out, in]``, computed at each call.

    ``graph_key`` / ``graph_shape`` name what a captured CUDA graph of the call reads and
    makes: the packed weight's storage, and the float weight's shape and dtype.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbf  # only 4-bit models get here

        return bnbf.dequantize_4bit(self.weight.data, self.weight.quant_state)

    @property
    def graph_key(self) -> tuple:
        state = self.weight.quant_state
        return state.quant_type, self.weight.data_ptr(), state.absmax.data_ptr()

    @property
    def graph_shape(self) -> tuple:
        state = self.weight.quant_state
        return state.quant_type, tuple(state.shape), state.dtype


def weight_getter(linear: nn.Module) -> Callable[[], torch.Tensor]:
    """A function that returns the frozen weight ``[out, in]`` in a float dtype.

    bitsandbytes 4-bit weights are dequantized by the call, so nothing large is kept.
    """
    weight = linear.weight
    if getattr(weight, "quant_state", None) is None:
        return lambda: weight
    return Dequantize(weight)


def _estimated_linears(layers: nn.ModuleList, which: Mapping[str, Iterable[int]]) -> dict[str, nn.Module]:
    """``"{layer}.{proj}" -> frozen base linear`` of the projections the estimator scores."""
    return {f"{i}.{p}": frozen_linear(getattr(getattr(layers[i], kind), p))
            for kind, idx in which.items() for i in idx for p in ESTIMATED_PROJS[kind]}


def estimated_biases(layers: nn.ModuleList, which: Mapping[str, Iterable[int]]) -> dict[str, torch.Tensor]:
    """``"{layer}.{proj}" -> bias`` of the projections the estimator scores that have one (Qwen2's
    q/k/v). Detached views of the parameters, not copies: a bias trained with ``bias="all"`` is
    estimated with as it is now (a copy of the model, or one moved to another device, with its
    biases as they were then: that moves the channel choice only, never a gradient)."""
    return {key: linear.bias.detach() for key, linear in _estimated_linears(layers, which).items()
            if linear.bias is not None}


def estimated_weights(layers: nn.ModuleList, which: Mapping[str, Iterable[int]],
                      ) -> dict[str, Callable[[], torch.Tensor]]:
    """``"{layer}.{proj}" -> weight getter`` for the projections the estimator scores."""
    return {key: weight_getter(linear) for key, linear in _estimated_linears(layers, which).items()}
