"""A sparse decoder layer's no-grad forward as one CUDA graph: one replay for the whole layer.

Unsloth's offloaded checkpointing (and Hugging Face's reentrant one) runs each layer's forward
without grad, then again with grad in backward. Issuing a sparse layer's forward costs the host
more than the GPU needs to run it (Unsloth's compiled block, our ops, their graph replays:
benchmarks/NOTES.md, 2026-12-06), so the forward waits on the host. Here that forward is
captured once per layer and input shape (``ops.graphs.GraphRunner``: inputs copied into its
buffers, one replay, the output copied out); the recompute and the backward run as before.

A replay runs no Python, so what the layer's Python does per forward is done before it: each
sparse kind's channel choice is planned (its buffer taken: the graph's prologue writes it) and
counted, and what the graph reads of the forward (dense rows, vote rows) is put where it read
it at its capture (``SparseState.place_inputs``). Whenever the body itself runs (first call,
warm-up, capture), the sparse passes in it run eagerly (graphs do not nest) and each choice is
made there again, so that the capture records it.

Arguments: the hidden states, and every integer tensor or tensor with the sequence axis (position
ids, masks, per-forward RoPE), are inputs copied at each replay; other floating tensors (Unsloth's
cached RoPE tables) are read in place, keyed by their storage; plain values key the graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops.graphs import CaptureFailed
from .state import LayerSparsity

_PLAIN = (type(None), bool, int, float, str)


def _layout(value: Any, hidden: torch.Tensor, inputs: list, consts: list):
    """Where ``value`` (an argument of the layer call) goes: a hashable spec, its tensors appended to
    ``inputs`` (copied in) or ``consts`` (read in place); None for a value that cannot."""
    if isinstance(value, torch.Tensor):
        if value is hidden:
            return ("hidden",)
        if not value.is_floating_point() or (value.dim() >= 2 and value.shape[-2] == hidden.shape[-2]):
            inputs.append(value)
            return ("input", len(inputs))            # 0 is the hidden states
        consts.append(value)
        return ("const", len(consts) - 1)
    if isinstance(value, (tuple, list)):
        items = tuple(_layout(v, hidden, inputs, consts) for v in value)
        return None if None in items else ("seq", type(value), items)
    return ("value", value) if isinstance(value, _PLAIN) else None


def _rebuild(spec: tuple, inputs: tuple, consts: tuple) -> Any:
    kind = spec[0]
    if kind == "hidden":
        return inputs[0]
    if kind == "input":
        return inputs[spec[1]]
    if kind == "const":
        return consts[spec[1]]
    if kind == "seq":
        return spec[1](_rebuild(s, inputs, consts) for s in spec[2])
    return spec[1]


def _layer_body(*args, outs=None):
    """The graphs' function: ``(hidden, *inputs, *consts, *keys, spec, graph)`` -> the layer's outputs."""
    *flat, spec, graph = args
    kinds, n_inputs, n_consts, args_spec, kwargs_spec = spec
    inputs, consts = flat[:1 + n_inputs], flat[1 + n_inputs:1 + n_inputs + n_consts]
    call_args = tuple(_rebuild(s, inputs, consts) for s in args_spec)
    call_kwargs = {name: _rebuild(s, inputs, consts) for name, s in kwargs_spec}
    return graph.body(kinds, call_args, call_kwargs)


class LayerGraph:
    """A patched decoder layer's ``forward`` (an instance attribute; its hooks run around it): a
    sparse forward without grad through the layer graphs, anything else as the layer's own."""

    def __init__(self, layer: nn.Module, ctl: LayerSparsity, kinds: tuple[str, ...], original: Any) -> None:
        self.layer = layer
        self.ctl = ctl
        self.kinds = kinds                  # what can run sparse here: "mlp", "attn"
        self.original = original            # an instance forward there was, or None: the class's
        self.returns_tensor = False         # the layer returned a tensor, not a tuple (set by the body)

    def forward(self, *args, **kwargs):
        if self.original is not None:
            return self.original(*args, **kwargs)
        return type(self.layer).forward(self.layer, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        state = self.ctl.state
        record = state.current
        hidden = args[0] if args else None
        if (torch.is_grad_enabled() or record is None or state.in_layer_graph or not isinstance(hidden, torch.Tensor)
                or torch._C._current_graph_task_id() != -1):
            return self.forward(*args, **kwargs)
        runner = state.layer_runner(hidden)
        layer = self.ctl.layer
        kinds = tuple(k for k in self.kinds if record.projections.get((layer, k)) is not None)
        if runner is None or not kinds:
            return self.forward(*args, **kwargs)
        inputs, consts = [], []
        args_spec = tuple(_layout(a, hidden, inputs, consts) for a in args)
        kwargs_spec = tuple((name, _layout(v, hidden, inputs, consts)) for name, v in kwargs.items())
        if None in args_spec or any(s is None for _, s in kwargs_spec):
            state._warn_once("a decoder layer got an argument that its CUDA graph cannot take (not a tensor "
                             "or plain value); such forwards run pass by pass (slower, same results)")
            return self.forward(*args, **kwargs)
        state.place_inputs(record, hidden.dtype)
        for kind in kinds:
            self.ctl.choice(kind, hidden, record)       # its buffer: the graph's prologue writes it
            self.ctl.count(record, kind)
        # What the graph reads besides its inputs keys it too: the buffers of this forward's
        # choices, dense rows and votes, and the weights and adapters of the sparse projections
        # (another adapter, or a moved model, is another graph).
        keys = [record.dense_rows, *record.inputs.values(), *(record.choices[layer, k].buffer for k in kinds),
                *(field for k in kinds for proj in record.projections[layer, k].values() for field in proj)]
        spec = (kinds, len(inputs), len(consts), args_spec, kwargs_spec)
        try:
            out = runner(_layer_body, (hidden, *inputs), (*consts, *keys, spec, self))
        except CaptureFailed as e:
            # A speed-up that cannot be had must not stop the training: from now on the layers run
            # pass by pass (as with SPARSE_UNSLOTH_LAYER_GRAPHS=0), this one too, its choices made
            # again there.
            state.layer_graphs_failed = str(e)
            state._warn_once(f"a sparse decoder layer's forward could not be captured as one CUDA graph ({e}); "
                             "sparse layers now run pass by pass (slower, the same results). Please report this")
            for kind in kinds:
                record.choices.pop((layer, kind), None)
            return self.forward(*args, **kwargs)
        return out[0] if self.returns_tensor else out

    def body(self, kinds: tuple[str, ...], args: tuple, kwargs: dict) -> tuple:
        """The layer's forward, its passes eager and its choices made in it (what a capture records)."""
        state, layer = self.ctl.state, self.ctl.layer
        record = state.current
        for kind in kinds:
            record.choices.pop((layer, kind), None)
        state.in_layer_graph = True
        try:
            out = self.forward(*args, **kwargs)
        finally:
            state.in_layer_graph = False
        self.returns_tensor = isinstance(out, torch.Tensor)
        return (out,) if self.returns_tensor else tuple(out)
