"""A sparse decoder layer's checkpointed forward, and its recompute with its backward, each as one CUDA graph.

Unsloth's offloaded checkpointing (and Hugging Face's reentrant one) runs each layer's forward
without grad, then in backward runs it again with grad and backpropagates through that
recompute. Issuing a sparse layer's work costs the host more than the GPU needs to run it
(Unsloth's compiled block, our ops, their graph replays: benchmarks/NOTES.md, 2026-12-06), so
the step waits on the host. Here both halves are captured, once per layer and input shape, the
second time the layer sees that shape (the first runs pass by pass; ``ops.graphs.GraphRunner``:
inputs copied into its buffers, one replay, the outputs copied out):

- the forward: the layer's outputs;
- the recompute: its output is an autograd node (:class:`_Recomputed`, no values: the checkpoint
  only backpropagates through it) whose backward replays "recompute with grad, then the gradients
  of the hidden states and of the layer's parameters" (as ``torch.cuda.make_graphed_callables``
  does); autograd accumulates them as usual.

A replay runs no Python, so what the layer's Python does per forward is done before it: each
sparse kind's channel choice is planned (its buffer taken: the forward graph's prologue writes
it) and counted, and what the graph reads of the forward (dense rows, vote rows) is put where it
read it at its capture (``SparseState.place_inputs``). The recompute and backward only read the
choices (checked intact first). Whenever a body itself runs (first call, warm-up, capture), the
sparse passes in it run eagerly (graphs do not nest), and the forward's choices are made there
again, so that the capture records them.

The recompute runs where a checkpoint runs the layer's backward, not where it recomputes: outside
the forward's autocast (Hugging Face's reentrant checkpoint), which the backward graph enters
itself, and without the forward's random state, so a layer that draws dropout is not graphed.

Arguments: the hidden states, and every integer tensor or tensor with the sequence axis (position
ids, masks, per-forward RoPE), are inputs copied at each replay; other floating tensors (Unsloth's
cached RoPE tables) are read in place, keyed by their storage; plain values key the graph. A call
whose attention reads what Unsloth caches outside its arguments (a padding-free batch's sequence
boundaries, a sliding window's mask: ``_reads_unowned_cache``) runs pass by pass.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..ops.graphs import CaptureFailed
from .state import LayerSparsity

_PLAIN = (type(None), bool, int, float, str)


def _reads_unowned_cache(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> bool:
    """Whether this layer call reads tensors that Unsloth's attention keeps in a module-level cache of
    one entry, not in its arguments: a graph would read them where its capture found them, in memory
    that the cache frees when another batch or shape replaces the entry. Such calls run pass by pass.

    - A padding-free batch's ``packed_seq_lengths``: turned into cu_seqlens and max_seqlen through a
      cache keyed by the tensor's identity. A graph's copy of the argument is one object for every
      replay, so the capture kept the warm-up batch's max_seqlen and read its cu_seqlens from memory
      freed after that forward; a replay for another batch of the same token count then attended
      across the wrong boundaries, or over garbage (Qwen2.5-0.5B's sparse ARC-Easy run went NaN at
      step 136, benchmarks/NOTES.md). Such token counts rarely come back, so graphs saved nothing there.
    - The banded mask of a sliding window shorter than the sequence (Mistral), built once per shape.
    """
    if kwargs.get("packed_seq_lengths") is not None:
        return True
    config = getattr(getattr(layer, "self_attn", None), "config", None)
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return isinstance(window, int) and 0 < window < hidden.shape[-2]


def _layout(value: Any, hidden: torch.Tensor, inputs: list, consts: list):
    """Where ``value`` (an argument of the layer call) goes: a hashable spec, its tensors appended to
    ``inputs`` (copied in) or ``consts`` (read in place); None for a value that cannot."""
    if isinstance(value, torch.Tensor):
        if value is hidden:
            return ("hidden",)
        if value.device != hidden.device:
            return None          # a host tensor that the layer reads at capture would stay as it was then
        if not value.is_floating_point() or (value.dim() >= 2 and value.shape[-2] == hidden.shape[-2]):
            inputs.append(value)
            return ("input", len(inputs) - 1)
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


class _Call:
    """One layer call as a graph's function sees it: ``(hidden, *inputs[, dy], *consts, *keys, *params,
    spec, graph)``, ``spec`` = (kinds, count of inputs, of consts, of params, args' and kwargs' specs,
    the recompute's autocast or None)."""

    def __init__(self, args: tuple) -> None:
        *flat, spec, self.graph = args
        self.kinds, n_inputs, n_consts, n_params, self.args_spec, self.kwargs_spec, self.autocast = spec
        self.inputs, self.consts = flat[:n_inputs], flat[n_inputs:n_inputs + n_consts]
        self.params = flat[len(flat) - n_params:] if n_params else []

    def arguments(self, hidden: torch.Tensor) -> tuple[tuple, dict]:
        inputs = (hidden, *self.inputs[1:])
        return (tuple(_rebuild(s, inputs, self.consts) for s in self.args_spec),
                {name: _rebuild(s, inputs, self.consts) for name, s in self.kwargs_spec})


def _forward_body(*args, outs=None):
    """A forward graph's function: the layer's outputs."""
    call = _Call(args)
    return call.graph.body(call.kinds, *call.arguments(call.inputs[0]))


def _backward_body(*args, outs=None):
    """A backward graph's function (its last input ``dy``): the gradients of the hidden states and params."""
    call = _Call(args)
    return call.graph.backward_body(call)


class _Recomputed(torch.autograd.Function):
    """The output of a checkpointed layer's recompute, whose backward is the layer's backward graph.

    Its values are never computed: a reentrant checkpoint (Unsloth's, Hugging Face's) only
    backpropagates through its recompute's output (``Guard``: one layer per checkpoint). The
    backward graph recomputes what it needs, with grad, inside.
    """

    @staticmethod
    def forward(ctx, run, hidden, *params):
        ctx.run = run
        ctx.save_for_backward(hidden)
        return hidden.new_empty(hidden.shape)

    @staticmethod
    def backward(ctx, dy):
        (hidden,) = ctx.saved_tensors
        return None, *ctx.run(hidden, dy)


class LayerGraph:
    """A patched decoder layer's ``forward`` (an instance attribute; its hooks run around it): a
    sparse forward without grad, and its recompute in backward, through the layer graphs; anything
    else as the layer's own forward."""

    def __init__(self, layer: nn.Module, ctl: LayerSparsity, kinds: tuple[str, ...], original: Any) -> None:
        self.layer = layer
        self.ctl = ctl
        self.kinds = kinds                  # what can run sparse here: "mlp", "attn"
        self.original = original            # an instance forward there was, or None: the class's
        self.returns_tensor = False         # the layer returned a tensor, not a tuple (set by the body)
        self.dropout: bool | None = None    # it has dropout (found at its first sparse call)

    def forward(self, *args, **kwargs):
        if self.original is not None:
            return self.original(*args, **kwargs)
        return type(self.layer).forward(self.layer, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        state = self.ctl.state
        hidden = args[0] if args else None
        if state.in_layer_graph or not isinstance(hidden, torch.Tensor):
            return self.forward(*args, **kwargs)
        if torch._C._current_graph_task_id() == -1:
            if not torch.is_grad_enabled() and state.current is not None:
                return self._forward_graph(state.current, args, kwargs)
        elif torch.is_grad_enabled():
            record = state.record_for_call()
            if record is not None and self.ctl.layer in record.graphed:
                return self._backward_graph(record, args, kwargs)
        return self.forward(*args, **kwargs)

    def _plan(self, record, args: tuple, kwargs: dict):
        """(runner, sparse kinds, inputs, consts, the args' and kwargs' specs) of this call, or None
        where it runs as the layer's own forward."""
        state, layer, hidden = self.ctl.state, self.ctl.layer, args[0]
        runner = state.layer_runner(hidden)
        kinds = tuple(k for k in self.kinds if record.projections.get((layer, k)) is not None)
        if runner is None or not kinds or _reads_unowned_cache(self.layer, hidden, kwargs):
            return None
        if self.dropout is None:
            self.dropout = any(getattr(m, "attention_dropout", 0) or (isinstance(m, nn.Dropout) and m.p > 0)
                               for m in self.layer.modules())
        if self.dropout and self.layer.training:
            # A checkpoint recomputes the forward's masks from its saved random state; the backward
            # graph recomputes inside the backward, where that state is gone.
            state._warn_once("a sparse decoder layer draws dropout (attention_dropout or a Dropout module); "
                             "its forwards run pass by pass, not as one CUDA graph (slower, same results)")
            return None
        inputs, consts = [hidden], []
        args_spec = tuple(_layout(a, hidden, inputs, consts) for a in args)
        kwargs_spec = tuple((name, _layout(v, hidden, inputs, consts)) for name, v in kwargs.items())
        if None in args_spec or any(s is None for _, s in kwargs_spec):
            state._warn_once("a decoder layer got an argument that its CUDA graph cannot take (not a tensor on "
                             "the hidden states' device or a plain value); such forwards run pass by pass "
                             "(slower, same results)")
            return None
        return runner, kinds, inputs, consts, args_spec, kwargs_spec

    def _keys(self, record, kinds: tuple[str, ...]) -> list:
        # What a graph reads besides its inputs keys it too: the buffers of this forward's choices
        # (or the copies a later forward left it), dense rows and votes, and the weights and
        # adapters of the sparse projections (another adapter, or a moved model, is another graph).
        layer = self.ctl.layer
        return [record.dense_rows, *record.inputs.values(), *(record.choices[layer, k].buffer for k in kinds),
                *(field for k in kinds for proj in record.projections[layer, k].values() for field in proj)]

    def _forward_graph(self, record, args: tuple, kwargs: dict):
        plan = self._plan(record, args, kwargs)
        if plan is None:
            return self.forward(*args, **kwargs)
        runner, kinds, inputs, consts, args_spec, kwargs_spec = plan
        state, layer, hidden = self.ctl.state, self.ctl.layer, args[0]
        state.place_inputs(record, hidden.dtype)
        for kind in kinds:
            self.ctl.choice(kind, hidden, record)       # its buffer: the graph's prologue writes it
            self.ctl.count(record, kind)
        spec = (kinds, len(inputs), len(consts), 0, args_spec, kwargs_spec, None)
        try:
            # An input shape seen for the first time runs pass by pass, whose passes replay graphs of
            # padded shapes (a padding-free batch's token count rarely comes back).
            out = runner(_forward_body, inputs, (*consts, *self._keys(record, kinds), spec, self), defer=True)
        except CaptureFailed as e:
            self._failed(e, "forward")
            out = None
        if out is None:
            for kind in kinds:                          # made again, pass by pass
                record.choices.pop((layer, kind), None)
            return self.forward(*args, **kwargs)
        record.graphed.add(layer)
        return out[0] if self.returns_tensor else out

    def _backward_graph(self, record, args: tuple, kwargs: dict):
        """The recompute of a layer whose forward ran as a graph: an output whose backward replays the
        graph of the layer's recompute and backward together."""
        plan = None if self.ctl.state.backward_graphs_failed else self._plan(record, args, kwargs)
        if plan is None:
            return self.forward(*args, **kwargs)
        runner, kinds, inputs, consts, args_spec, kwargs_spec = plan
        if any(t.requires_grad for t in (*inputs[1:], *consts)):
            return self.forward(*args, **kwargs)        # a gradient the graph would not return
        state, layer = self.ctl.state, self.ctl.layer
        state.dense_rows(record)                        # checks that no later forward took the buffers
        for kind in kinds:
            state.check_intact(record, (layer, kind))
        params = [p for p in self.layer.parameters() if p.requires_grad]
        # The recompute runs inside the layer's backward, which a reentrant checkpoint (Hugging
        # Face's) calls outside the forward's autocast: the graph enters it itself (and is keyed by it).
        device = args[0].device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        spec = (kinds, len(inputs) + 1, len(consts), len(params), args_spec, kwargs_spec, autocast)
        graph_consts = (*consts, *self._keys(record, kinds), *params, spec, self)

        def run(hidden: torch.Tensor, dy: torch.Tensor) -> tuple:
            try:   # its forward's graph was captured: this shape comes back
                return runner(_backward_body, (hidden, *inputs[1:], dy), graph_consts, capture_at=1)
            except CaptureFailed as e:
                self._failed(e, "backward")
                return _backward_body(hidden, *inputs[1:], dy, *graph_consts)

        out = _Recomputed.apply(run, args[0], *params)
        return out if self.returns_tensor else (out,)

    def _failed(self, error: CaptureFailed, half: str) -> None:
        # A speed-up that cannot be had must not stop the training: from now on that half of every
        # sparse layer (a forward failing: all of it, as with SPARSE_UNSLOTH_LAYER_GRAPHS=0) runs
        # pass by pass, this call too.
        state = self.ctl.state
        if half == "forward":
            state.layer_graphs_failed = str(error)
        state.backward_graphs_failed = str(error)
        state._warn_once(f"a sparse decoder layer's {half} could not be captured as one CUDA graph ({error}); "
                         f"the sparse layers' {'forward and backward' if half == 'forward' else 'backward'} now "
                         "run pass by pass (slower, the same results). Please report this")

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

    def backward_body(self, call: _Call) -> tuple:
        """The layer's recompute with grad and its backward, passes eager: (d hidden, d params)."""
        state = self.ctl.state
        dy = call.inputs[-1]
        state.in_layer_graph = True
        try:
            with torch.enable_grad():
                hidden = call.inputs[0].detach().requires_grad_()
                args, kwargs = call.arguments(hidden)
                enabled, dtype = call.autocast
                with _fresh_leaves(self.layer, call.params, state.leaves) as leaves:
                    # With the layer's hooks, which install our sparse functions for this call (this
                    # runs in backward, after the recompute's call has put the originals back); not
                    # through the layer's __call__, which would checkpoint it again.
                    with torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled):
                        out = self.layer._call_impl(*args, **kwargs)
                    out = out if isinstance(out, torch.Tensor) else out[0]
                    return torch.autograd.grad(out, (hidden, *leaves), dy, allow_unused=True)
        finally:
            state.in_layer_graph = False


@contextlib.contextmanager
def _fresh_leaves(layer: nn.Module, params: list[torch.Tensor], cache: dict):
    """``layer``'s trainable ``params`` replaced, while active, by other leaves on the same storage.

    A parameter's gradient accumulator is one autograd node, alive while a graph through the
    parameter is (the training step's is, around this backward), and it keeps the stream it was
    made on: the training stream, outside any capture. A backward captured on the runner's stream
    would wait on that stream, which CUDA refuses inside a capture (torch 2.11; later versions can
    override it: ``set_override_stale_capture_stream``). The other leaves' accumulators live only
    as long as this backward's graph, so a capture makes its own. They are kept in ``cache`` (by
    the parameter's id, checked against its storage): the same objects each time, so that no
    guard of a compiled block sees a new parameter.
    """
    wanted = {id(p) for p in params}
    where = [(m, name) for m in layer.modules() for name, p in m._parameters.items() if id(p) in wanted]
    originals = [m._parameters[name] for m, name in where]
    by_id = {}
    for p in originals:
        leaf = cache.get(id(p))
        if leaf is None or leaf.data_ptr() != p.data_ptr() or leaf.shape != p.shape or leaf.dtype != p.dtype:
            leaf = cache[id(p)] = nn.Parameter(p.detach())
        by_id[id(p)] = leaf
    try:
        for (m, name), p in zip(where, originals):
            m._parameters[name] = by_id[id(p)]
        yield [by_id[id(p)] for p in params]
    finally:
        for (m, name), p in zip(where, originals):
            m._parameters[name] = p
