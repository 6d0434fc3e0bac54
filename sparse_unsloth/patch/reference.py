"""The reference backend: sparse frozen linears under plain PEFT LoRA layers.

Each sparse layer's MLP / attention gets a forward pre-hook that picks this forward's channels
and hands them to the frozen base linears under its LoRA layers; each of those gets an instance
``forward`` that runs the pure PyTorch sparse linear when channels were handed to it and its
own forward otherwise. PEFT's LoRA branch (dropout, scaling, several adapters) runs as it
always does, dense.

Hooks and forwards are small objects that find everything through the module they are called
on (``module.__dict__``), never through closures: a deep copy or an unpickled model computes
with its own weights and its own state.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ..ops.reference import sparse_in_linear, sparse_out_linear
from .models import frozen_linear, weight_getter
from .state import LayerSparsity

CTL = "_sparse_unsloth_ctl"          # on the MLP / attention: its layer's LayerSparsity
_SLOT = "_sparse_unsloth_channels"   # on a base linear: (kept channels, record, layer control, kind) or None

# (projection, sparse op, field of the layer's choice holding its channels)
_MLP = (("gate_proj", sparse_out_linear, "idx"), ("up_proj", sparse_out_linear, "idx"),
        ("down_proj", sparse_in_linear, "idx"))
_ATTN = (("q_proj", sparse_out_linear, "q_idx"), ("k_proj", sparse_out_linear, "k_idx"),
         ("v_proj", sparse_out_linear, "v_idx"), ("o_proj", sparse_in_linear, "o_idx"))
_GROUPS = {"mlp": ("mlp", _MLP), "attn": ("self_attn", _ATTN)}     # kind -> (submodule, projections)


class SparseLinearForward:
    """A frozen base linear's instance ``forward``: sparse while its layer handed it channels."""

    def __init__(self, linear: nn.Module, op: Callable, original: Callable | None) -> None:
        self.linear = linear
        self.op = op
        self.original = original     # an instance forward that was there before (e.g. accelerate's)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.linear
        slot = linear.__dict__.get(_SLOT)
        if slot is None:
            return self.original(x) if self.original is not None else type(linear).forward(linear, x)
        idx, record, ctl, kind = slot
        ctl.count(record, kind)
        flat = x.reshape(-1, x.shape[-1])
        out = self.op(flat, weight_getter(linear), linear.bias, idx, record.split.dense_idx)
        return out.view(*x.shape[:-1], out.shape[-1])

    def __deepcopy__(self, memo: dict) -> SparseLinearForward:
        return SparseLinearForward(copy.deepcopy(self.linear, memo), self.op,
                                   copy.deepcopy(self.original, memo))

    def __reduce__(self):
        return SparseLinearForward, (self.linear, self.op, self.original)


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))


class ChooseChannels:
    """Forward pre-hook of a sparse MLP / attention: this forward's channels to its base linears."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ctl: LayerSparsity = module.__dict__[CTL]
        record = ctl.state.record_for_call()
        hidden = _hidden(args, kwargs)
        choice = ctl.choose_now(self.kind, hidden, record)
        for name, _, field in _GROUPS[self.kind][1]:
            linear = frozen_linear(getattr(module, name))
            linear.__dict__[_SLOT] = None if choice is None else (getattr(choice, field), record, ctl, self.kind)


class ClearChannels:
    """Forward hook: the base linears run dense again once their MLP / attention returned."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, module: nn.Module, _args: tuple, _out) -> None:
        for name, _, _ in _GROUPS[self.kind][1]:
            frozen_linear(getattr(module, name)).__dict__.pop(_SLOT, None)


def patch_layer(layer: nn.Module, ctl: LayerSparsity) -> None:
    """Make one decoder layer sparse as ``ctl`` says."""
    for kind, sparsity in (("mlp", ctl.mlp_sparsity), ("attn", ctl.attn_sparsity)):
        if not sparsity:
            continue
        module_name, projs = _GROUPS[kind]
        module = getattr(layer, module_name)
        for name, op, _ in projs:
            linear = frozen_linear(getattr(module, name))
            linear.forward = SparseLinearForward(linear, op, linear.__dict__.get("forward"))
        module.__dict__[CTL] = ctl
        module.register_forward_pre_hook(ChooseChannels(kind), with_kwargs=True)
        module.register_forward_hook(ClearChannels(kind))


def unpatch_layer(layer: nn.Module) -> None:
    """Undo :func:`patch_layer` (a no-op on a layer it did not patch)."""
    for module_name, projs in _GROUPS.values():
        module = getattr(layer, module_name)
        if module.__dict__.pop(CTL, None) is None:
            continue
        remove_hooks(module, (ChooseChannels, ClearChannels))
        for name, _, _ in projs:
            linear = frozen_linear(getattr(module, name))
            linear.__dict__.pop(_SLOT, None)
            forward = linear.__dict__.pop("forward", None)
            if isinstance(forward, SparseLinearForward) and forward.original is not None:
                linear.forward = forward.original


def remove_hooks(module: nn.Module, kinds: tuple[type, ...]) -> None:
    """Remove ``module``'s forward (pre-)hooks that are instances of ``kinds``."""
    for hooks, extras in ((module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
                          (module._forward_hooks, (module._forward_hooks_with_kwargs,
                                                   module._forward_hooks_always_called))):
        for key in [k for k, hook in hooks.items() if isinstance(hook, kinds)]:
            del hooks[key]
            for extra in extras:
                extra.pop(key, None)
