"""Run a fixed-shape tensor function as a replayed CUDA graph: one launch for its dozens of kernels.

A sparse layer pass is 30-50 small kernels (gathers, skinny GEMMs, scatters, LoRA products)
whose launch cost on the host exceeds their GPU time, so an eagerly run sparse step waits on
the CPU (benchmarks/NOTES.md). Captured once per shape and layer, the pass costs the host a
few input copies, one replay and the output copies.

Memory stays close to eager's: the graphs of one :class:`GraphRunner` share one memory pool
for their temporaries, and the graphs of one *slot* (the same function over inputs and
operands of the same shapes: the same op of every layer) share one set of input and output
buffers. That is safe because replays run one after another on one stream, and because
:meth:`GraphRunner.__call__` copies the outputs out before it returns, except those the caller
asks to *share*: a checkpointed layer's activations, which its backward (the next user of the
slot's buffers) reads in place, checking with :meth:`GraphRunner.writes` that no other replay
wrote them in between.

Functions run this way must be functions of their tensor inputs (no host sync, no
data-dependent shapes, no Python state read per call; they may overwrite their inputs, as
Unsloth's SwiGLU backward does); their other operands (``consts``: weights, LoRA factors,
scales, flags) are baked into the graph and name it: a tensor by its storage, so a parameter
updated in place by the optimizer is read fresh at every replay.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import torch

Inputs = Sequence[torch.Tensor | None]
Outputs = tuple[torch.Tensor | None, ...]
Runner = Callable[..., Outputs]


def run_eager(fn: Callable[..., Outputs], inputs: Inputs, consts: Sequence[Any], share: Sequence[int] = (),
              adopt: Sequence[int] = ()) -> Outputs:
    """``fn(*inputs, *consts)``: the contract of a :class:`GraphRunner`, without graphs (the
    results are the function's own tensors, so nothing needs sharing or adopting)."""
    return fn(*inputs, *consts)


def _tensor_shape(t: torch.Tensor) -> tuple:
    # No strides: inputs are copied into contiguous buffers, whatever their layout.
    return tuple(t.shape), t.dtype, t.device


def _shape_key(value: Any) -> Any:
    """What a slot's buffers depend on: shapes of tensors, the value of anything else."""
    if isinstance(value, torch.Tensor):
        return _tensor_shape(value)
    shape = getattr(value, "graph_shape", None)      # e.g. a 4-bit weight's dequantizer
    return shape if shape is not None else value


def _identity_key(value: Any) -> Any:
    """What a graph reads: a tensor's storage, or a dequantizer's packed weight."""
    if isinstance(value, torch.Tensor):
        return value.data_ptr()
    key = getattr(value, "graph_key", None)
    return key if key is not None else value


def _ordinals(tensors: Sequence[torch.Tensor | None]) -> list[tuple | None]:
    """Each tensor's (shape, n): the n-th of its shape in ``tensors`` (a scratch buffer's name)."""
    seen: collections.Counter[tuple] = collections.Counter()
    names: list[tuple | None] = []
    for t in tensors:
        if t is None:
            names.append(None)
            continue
        sig = _tensor_shape(t)
        names.append((sig, seen[sig]))
        seen[sig] += 1
    return names


class _Slot:
    """The buffers every graph of one function over one shape reads and writes.

    Inputs and outputs that live only for one call (copied in before the replay, copied out
    right after it) are scratch tensors of the runner, shared by every slot; adopted inputs
    and shared outputs are the slot's own.
    """

    def __init__(self, inputs: Inputs, adopt: Sequence[int], scratch: Callable[[tuple], torch.Tensor]) -> None:
        self.inputs = [t if t is None or i in adopt else scratch(("in", *name))
                       for i, (t, name) in enumerate(zip(inputs, _ordinals(inputs)))]
        self.adopted = [t for i, t in enumerate(self.inputs) if i in adopt and t is not None]
        self.outputs: Outputs | None = None
        self.graphs: dict[Any, torch.cuda.CUDAGraph] = {}

    def load(self, inputs: Inputs) -> list[torch.Tensor]:
        """Copy ``inputs`` into the buffers (not those passed in as the buffer itself); the
        adopted buffers written."""
        written = []
        for buf, t in zip(self.inputs, inputs):
            if buf is not None and buf is not t:
                buf.copy_(t)
                written.append(buf)
        return [b for b in written if any(b is a for a in self.adopted)]


class GraphRunner:
    """``runner(fn, inputs, consts)`` computes ``fn(*inputs, *consts)`` by replaying a CUDA graph.

    A graph is captured the first time a (function, shapes, consts) combination is seen, after
    one eager warm-up run (Triton compiles, cuBLAS workspaces); at most ``max_graphs`` are kept,
    the least recently used dropped first. ``captures`` counts the captures made.

    While captured, ``fn`` gets ``outs=`` the slot's output buffers and may write its results
    straight into them (returning them); anything else it returns is copied in. The results
    come back as fresh tensors, except the positions in ``share``: those are the slot's buffers,
    valid until the slot's next replay. ``adopt``: input positions whose first tensor becomes
    the slot's buffer itself (a shared result of another slot, read without a copy).
    """

    def __init__(self, max_graphs: int = 4096) -> None:
        self.max_graphs = max_graphs
        self.captures = 0
        self._slots: dict[Any, _Slot] = {}
        self._lru: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, Any]] = {}   # capture stream, pool
        self._writes: collections.Counter[int] = collections.Counter()
        self._scratch: dict[tuple, torch.Tensor] = {}

    def __call__(self, fn: Callable[..., Outputs], inputs: Inputs, consts: Sequence[Any], share: Sequence[int] = (),
                 adopt: Sequence[int] = ()) -> Outputs:
        slot_key = (fn, tuple(None if t is None else _tensor_shape(t) for t in inputs),
                    tuple(_shape_key(c) for c in consts), tuple(share), tuple(adopt),
                    torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        graph_key = tuple(_identity_key(c) for c in consts)
        slot = self._slots.get(slot_key)
        if slot is None:
            slot = self._slots[slot_key] = _Slot(inputs, adopt, self._buffer)
        self._wrote(slot.load(inputs))
        graph = slot.graphs.get(graph_key)
        if graph is None:
            device = next(t.device for t in inputs if t is not None)
            with torch.cuda.device(device):     # a model split over GPUs: capture on the layer's own
                graph = slot.graphs[graph_key] = self._capture(slot, fn, inputs, consts, share)
            self._lru[slot_key, graph_key] = None
            self._evict()
        else:
            self._lru.move_to_end((slot_key, graph_key))
        graph.replay()
        # The function may have written over its inputs (Unsloth's SwiGLU backward does).
        self._wrote([*slot.adopted, *(o for o in slot.outputs if o is not None)])
        return tuple(o if o is None or i in share else o.clone() for i, o in enumerate(slot.outputs))

    def writes(self, t: torch.Tensor) -> int:
        """How many times a replay wrote the buffer ``t`` (to check that a shared result is intact)."""
        return self._writes[t.data_ptr()]

    def _wrote(self, bufs: Sequence[torch.Tensor]) -> None:
        for b in bufs:
            self._writes[b.data_ptr()] += 1

    def _buffer(self, name: tuple) -> torch.Tensor:
        """The scratch tensor ``name`` = (role, (shape, dtype, device), n)."""
        if name not in self._scratch:
            shape, dtype, device = name[1]
            self._scratch[name] = torch.empty(shape, dtype=dtype, device=device)
        return self._scratch[name]

    def _capture(self, slot: _Slot, fn: Callable[..., Outputs], inputs: Inputs, consts: Sequence[Any],
                 share: Sequence[int]) -> torch.cuda.CUDAGraph:
        current = torch.cuda.current_stream()
        if current.device not in self._streams:
            self._streams[current.device] = (torch.cuda.Stream(), torch.cuda.graph_pool_handle())
        stream, pool = self._streams[current.device]
        # Warm-up, eager: lazy initialisations happen here. It may write over its inputs: the
        # adopted ones (another slot's results, still needed) go in as copies.
        warm = [t.clone() if any(t is a for a in slot.adopted) else t for t in slot.inputs]
        stream.wait_stream(current)
        with torch.cuda.stream(stream), torch.no_grad():
            outs = fn(*warm, *consts)
        current.wait_stream(stream)
        if slot.outputs is None:                     # on the stream that will read them
            slot.outputs = tuple(None if o is None else torch.empty(o.shape, dtype=o.dtype, device=o.device)
                                 if i in share
                                 else self._buffer(("out", *name))
                                 for i, (o, name) in enumerate(zip(outs, _ordinals(outs))))
        del outs, warm
        self._wrote(slot.load(inputs))
        stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.no_grad():
            # The low-level capture calls: torch.cuda.graph() would also empty the allocator's
            # cache and run the garbage collector at every capture.
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                for buf, out in zip(slot.outputs, fn(*slot.inputs, *consts, outs=slot.outputs)):
                    if buf is not None and out.data_ptr() != buf.data_ptr():
                        buf.copy_(out)
            finally:
                graph.capture_end()
        current.wait_stream(stream)
        self.captures += 1
        return graph

    def _evict(self) -> None:
        while len(self._lru) > self.max_graphs:
            slot_key, graph_key = self._lru.popitem(last=False)[0]
            slot = self._slots[slot_key]
            del slot.graphs[graph_key]
            if not slot.graphs:
                del self._slots[slot_key]

    def __len__(self) -> int:
        return len(self._lru)
