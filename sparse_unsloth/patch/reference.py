"""The reference backend: sparse frozen linears under plain PEFT LoRA layers.

Each sparse layer's MLP / attention gets a forward pre-hook that picks this batch's channels,
and the frozen base linears under the LoRA layers get an instance ``forward`` that runs the
pure PyTorch sparse linear when a choice is set and the untouched original otherwise. PEFT's
LoRA branch (dropout, scaling, several adapters) runs as it always does, dense.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..ops.reference import sparse_in_linear, sparse_out_linear
from .models import frozen_linear, weight_getter
from .state import LayerSparsity


class _Slot:
    """The channel indices a base linear uses for the call in flight (None: dense)."""

    def __init__(self) -> None:
        self.idx: torch.Tensor | None = None


def _patch_linear(linear: nn.Module, slot: _Slot, op: Callable, ctl: LayerSparsity) -> Callable:
    original = linear.forward
    get_weight = weight_getter(linear)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if slot.idx is None:
            return original(x)
        flat = x.reshape(-1, x.shape[-1])
        out = op(flat, get_weight, linear.bias, slot.idx, ctl.state.split.dense_idx)
        return out.view(*x.shape[:-1], out.shape[-1])

    linear.forward = forward

    def undo() -> None:
        del linear.forward

    return undo


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))


# (projection, sparse op, field of the layer's choice holding its channels)
_MLP = (("gate_proj", sparse_out_linear, "idx"), ("up_proj", sparse_out_linear, "idx"),
        ("down_proj", sparse_in_linear, "idx"))
_ATTN = (("q_proj", sparse_out_linear, "q_idx"), ("k_proj", sparse_out_linear, "k_idx"),
         ("v_proj", sparse_out_linear, "v_idx"), ("o_proj", sparse_in_linear, "o_idx"))


def patch_layer(layer: nn.Module, ctl: LayerSparsity) -> list[Callable]:
    """Patch one decoder layer; returns the undo callables."""
    undo: list[Callable] = []
    groups = []
    if ctl.mlp_sparsity:
        groups.append((layer.mlp, ctl.mlp_choice, _MLP))
    if ctl.attn_sparsity:
        groups.append((layer.self_attn, ctl.attn_choice, _ATTN))
    for module, choose, projs in groups:
        slots = [(_Slot(), field) for _, _, field in projs]
        for (name, op, _), (slot, _) in zip(projs, slots):
            undo.append(_patch_linear(frozen_linear(getattr(module, name)), slot, op, ctl))

        def pre_hook(_mod, args, kwargs, choose=choose, slots=slots):
            choice = choose(_hidden(args, kwargs))
            for slot, field in slots:
                slot.idx = None if choice is None else getattr(choice, field)

        def post_hook(_mod, _args, _out, slots=slots):
            for slot, _ in slots:
                slot.idx = None

        undo.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True).remove)
        undo.append(module.register_forward_hook(post_hook).remove)
    return undo
