"""``sparsify`` / ``unsparsify``: the one call that makes a LoRA model sparse, and its undo."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import MODULE_KINDS, SparseConfig, load_config
from ..distributed import refuse_fsdp
from ..estimator.factors import EstimatorFactors
from ..estimator.resolve import resolve_factors
from ..estimator.store import fingerprint
from . import reference, unsloth_fast
from .models import (
    attention_geometry,
    check_supported,
    decoder_layers,
    estimated_biases,
    estimated_weights,
    frozen_linear,
    model_identity,
)
from .state import LayerSparsity, SparseState

STATE_ATTR = "_sparse_unsloth"


def sparse_state(model: nn.Module) -> SparseState | None:
    """The sparse state of a sparsified model, or None."""
    return getattr(model, STATE_ATTR, None)


class BeginBatch:
    """Model forward pre-hook: the token split (and the record) of each forward."""

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        state: SparseState = model.__dict__[STATE_ATTR]
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            state.begin_batch(None, torch.Size([0, 0]), torch.device("cpu"), False)
            return
        shape = ref.shape if ids is not None else ref.shape[:-1]
        state.begin_batch(kwargs.get("labels"), shape, ref.device, model.training,
                          kwargs.get("attention_mask"), kwargs.get("position_ids"))


class TagOutputs:
    """Model forward hook: the outputs a backward may start from name their forward's record."""

    def __call__(self, model: nn.Module, _args: tuple, _kwargs: dict, output) -> None:
        state: SparseState = model.__dict__[STATE_ATTR]
        # Every tensor: the loss, logits and hidden states, and whatever else a trainer computes
        # its loss from (TRL's fused LM head returns log_probs).
        values = list(output.values()) if isinstance(output, Mapping) else [output]
        while values:
            value = values.pop()
            if isinstance(value, tuple):
                values += value
            elif isinstance(value, torch.Tensor) and value.grad_fn is not None:
                state.tag(value)


def _backend(model: nn.Module):
    """Unsloth's fused GPU path when Unsloth patched this model on a GPU, else the reference."""
    if unsloth_fast.applies(model):
        return unsloth_fast
    if unsloth_fast.fused(model):
        # Unsloth's fused functions never call the base linears the reference backend patches:
        # going on would train dense while reporting sparse.
        weight = frozen_linear(decoder_layers(model)[0].mlp.down_proj).weight
        raise NotImplementedError(
            "Unsloth's fused LoRA kernels run this model, but the sparse fast path needs 16-bit or "
            f"bitsandbytes 4-bit base weights on a CUDA GPU (these are {weight.dtype} on {weight.device}); "
            "move the model to the GPU, or train dense")
    return reference


def sparsify(model: nn.Module, config: str | Path | Mapping[str, Any] | SparseConfig,
             estimator: str | Path | EstimatorFactors | None = None, *,
             model_id: str | None = None, progress: bool = True) -> nn.Module:
    """Make the LoRA model ``model`` sparse as ``config`` says (a preset name, YAML path or config).

    ``estimator``: the SVD factors (an :class:`EstimatorFactors`, a file, or None to find them in
    the cache / on the Hub or build them). Returns the same model, patched in place; undo with
    :func:`unsparsify`. Sparsity runs only in training mode, after the dense warm-up that
    :class:`~sparse_unsloth.SparsityCallback` schedules.
    """
    if sparse_state(model) is not None:
        raise RuntimeError("this model is already sparsified; call sparse_unsloth.unsparsify(model) "
                           "first to change its config")
    refuse_fsdp(model)
    check_supported(model)
    layers = decoder_layers(model)
    config = load_config(config, num_layers=len(layers))
    backend = _backend(model)
    every = estimated_weights(layers, {kind: range(len(layers)) for kind in MODULE_KINDS})
    sparse = {kind: config.sparse_layers(kind) for kind in MODULE_KINDS}
    needed = estimated_weights(layers, sparse)
    name, revision = model_identity(model)
    factors = resolve_factors(needed, config.estimator_rank, fingerprint(every), source=estimator,
                              model_id=model_id or name, progress=progress, revision=revision)
    factors = factors.with_biases(estimated_biases(layers, sparse))
    state = SparseState(config, factors, attention_geometry(model))
    state.fast = backend is unsloth_fast
    try:
        for i, layer in enumerate(layers):
            ctl = LayerSparsity(state, i)
            if ctl.mlp_sparsity or ctl.attn_sparsity:
                state.layers[i] = ctl
                backend.patch_layer(layer, ctl)
            if state.fast:
                unsloth_fast.guard_layer(layer, state)
    except Exception:
        _unpatch_layers(layers)                   # a layer refused: leave the model as it was
        raise
    model.register_forward_pre_hook(BeginBatch(), with_kwargs=True)
    model.register_forward_hook(TagOutputs(), with_kwargs=True)
    setattr(model, STATE_ATTR, state)
    return model


def _unpatch_layers(layers: nn.ModuleList) -> None:
    for layer in layers:
        reference.unpatch_layer(layer)
        unsloth_fast.unpatch_layer(layer)


def unsparsify(model: nn.Module) -> nn.Module:
    """Undo :func:`sparsify`: the model computes exactly as before it."""
    if sparse_state(model) is None:
        raise RuntimeError("this model is not sparsified")
    _unpatch_layers(decoder_layers(model))
    reference.remove_hooks(model, (BeginBatch, TagOutputs))
    delattr(model, STATE_ATTR)
    return model
