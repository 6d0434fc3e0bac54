"""Run a fixed-shape tensor function as a replayed CUDA graph: one launch for its dozens of kernels.

A sparse layer pass is 30-50 small kernels (gathers, skinny GEMMs, scatters, LoRA products)
whose launch cost on the host exceeds their GPU time, so an eagerly run sparse step waits on
the CPU (benchmarks/NOTES.md). Captured once per shape and layer, the pass costs the host a
few input copies, one replay and the output copies.

Token counts vary from batch to batch (dynamic padding, padding-free packing), so the token
rows of a call are padded to a bucket (at most 1/8 more rows, zeros below the real ones) and
the graphs of a bucket serve every batch that rounds to it. A caller names which inputs and
outputs are token rows; rows are independent in everything run here except sums over rows
(LoRA and bias gradients, channel scores), which zero rows leave unchanged.

Memory stays close to eager's: all graphs share one memory pool for their temporaries, every
token-row buffer is a view of one growing tensor per (role, trailing shape, dtype), and every
other buffer one tensor per shape, each shared by every op of every layer and every bucket
(results asked ``into`` the caller's own tensors are the exception). That is safe because replays run
one after another on one stream, and because :meth:`GraphRunner.__call__` copies the outputs
out before it returns.

Functions run this way must be functions of their tensor inputs (no host sync, no
data-dependent shapes, no Python state read per call; they may overwrite their inputs); their
other operands (``consts``: weights, LoRA factors,
scales, flags) are baked into the graph and name it: a tensor by its storage, so a parameter
updated in place by the optimizer is read fresh at every replay.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

Inputs = Sequence[torch.Tensor | None]
Outputs = tuple[torch.Tensor | None, ...]
Runner = Callable[..., Outputs]
Rows = tuple[Sequence[int], Sequence[int]]       # (input positions, output positions) of token rows


def run_eager(fn: Callable[..., Outputs], inputs: Inputs, consts: Sequence[Any], rows: Rows = ((), ()),
              into: Sequence[torch.Tensor] = ()) -> Outputs:
    """``fn(*inputs, *consts)``: the contract of a :class:`GraphRunner`, without graphs (the
    results are the function's own tensors, nothing is padded; results asked ``into`` the
    caller's tensors are copied there)."""
    res = fn(*inputs, *consts)
    for t, r in zip(into, res):
        t.copy_(r)
    return tuple(into) or res


def run_after(run: Runner, prologue: Any, fn: Callable[..., Outputs], x: torch.Tensor, consts: Sequence[Any],
              row_out: Sequence[int]) -> Outputs:
    """``fn(x, *consts)`` through ``run`` (``x``: token rows; ``row_out``: the outputs that are), with
    ``prologue`` run first in the same pass, so in the same CUDA graph (None: no prologue).

    A prologue is work whose result ``fn`` reads from a const tensor it writes (a layer's channel
    choice, made in the pass that first uses it): a callable ``prologue(x, *inputs)``, where
    ``prologue.inputs`` are token-row tensors of its own (or None) loaded like ``x``, and a const
    of the graph by its ``graph_shape`` and ``graph_key``. Fusing it saves a graph call, and the
    load of ``x`` it would make, on the host's path.
    """
    if prologue is None:
        return run(fn, (x,), consts, rows=((0,), row_out))
    inputs = (x, *prologue.inputs)
    return run(_after_prologue(fn), inputs, (*consts, prologue), rows=(tuple(range(len(inputs))), row_out))


@functools.cache
def _after_prologue(fn: Callable[..., Outputs]) -> Callable[..., Outputs]:
    # One function per ``fn`` (cached): the runner keys its graphs by the function.
    def body(x, *args, outs=None):
        prologue = args[-1]
        own = len(prologue.inputs)
        prologue(x, *args[:own])
        return fn(x, *args[own:-1], outs=outs)
    body.__name__ = body.__qualname__ = f"prologue+{fn.__name__}"     # as profiles name the pass
    return body


def bucket(n: int) -> int:
    """``n`` token rows rounded up to a bucket: a multiple of 1/8 of the power of two below it
    (of 64 at least), so at most 1/8 (or 63 rows) of padding and 8 buckets per doubling."""
    step = max(64, (1 << (max(n, 1).bit_length() - 1)) // 8)
    return -(-n // step) * step


def const_keys(consts: Sequence[Any]) -> tuple[tuple, tuple]:
    """(what a slot's buffers depend on, what a graph reads) of the consts: a tensor's shape and
    its storage, a dequantizer's float shape and its packed weight, any other value itself.

    One loop: it runs at every call, and its host time is what the graphs are there to save.
    """
    shapes, identities = [], []
    for c in consts:
        if isinstance(c, torch.Tensor):
            shapes.append((c.shape, c.dtype, c.device))
            identities.append(c.data_ptr())
        elif hasattr(c, "graph_key"):                  # e.g. a 4-bit weight's dequantizer
            shapes.append(c.graph_shape)
            identities.append(c.graph_key)
        else:
            shapes.append(c)
            identities.append(c)
    return tuple(shapes), tuple(identities)


def _name(fn: Callable) -> str:
    """``module.function`` (our passes' functions share short names: ``fast_mlp._forward``)."""
    module = getattr(fn, "__module__", None) or ""
    return f"{module.rsplit('.', 1)[-1]}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _padded_shape(t: torch.Tensor, n: int | None) -> tuple:
    return ((n, *t.shape[1:]) if n is not None else tuple(t.shape)), t.dtype, t.device


class CaptureFailed(RuntimeError):
    """A function could not be recorded as a CUDA graph (nothing of it was kept)."""


class _Slot:
    """The buffers that every graph of one function over one shape reads and writes (views of
    the runner's shared tensors), and those graphs by their consts."""

    def __init__(self, inputs: list[torch.Tensor | None], row_inputs: Sequence[int], n: int) -> None:
        self.inputs = inputs
        self.row_inputs = row_inputs
        self.n = n                          # the bucket: rows of every row buffer
        self.outputs: Outputs | None = None
        self.graphs: dict[Any, Any] = {}

    def load(self, inputs: Inputs) -> None:
        """Copy the row inputs into their buffers' first rows (zeros below) and the other inputs into
        theirs."""
        for i, (buf, t) in enumerate(zip(self.inputs, inputs)):
            if buf is None:
                continue
            if i in self.row_inputs and t.shape[0] != self.n:
                buf[:t.shape[0]].copy_(t)
                buf[t.shape[0]:].zero_()
            else:
                buf.copy_(t)


class _Recorded:
    """A body recorded as a CUDA graph (replayed on the current stream), and the buffers it writes."""

    def __init__(self, graph: torch.cuda.CUDAGraph) -> None:
        self.replay = graph.replay
        self.outputs: Outputs = ()


class GraphRunner:
    """``runner(fn, inputs, consts)`` computes ``fn(*inputs, *consts)`` by replaying a CUDA graph.

    A (function, shapes, consts) combination runs eagerly the first ``capture_at - 1`` times it
    is seen (a batch shape that never comes back costs no capture), then is captured after one
    eager warm-up (Triton compiles, cuBLAS workspaces) and replayed. ``rows`` names the token-row
    inputs and outputs: those are padded to :func:`bucket` rows (and the outputs cut back). The
    graphs of at most ``max_buckets`` buckets are kept, the least recently used dropped first (a
    call without token rows cannot be padded: its inputs' exact shapes are its bucket), with the
    buffers no kept graph reads. ``captured`` counts the captures made, by the function's name
    (``captures``: all of them).

    While captured, ``fn`` gets ``outs=`` the slot's output buffers and may write its results
    straight into them (returning them); anything else it returns is copied in. The results
    come back as fresh tensors. ``into``: the caller's own tensors to write the results into
    (each graph writes its own: per-layer results that live on), returned themselves. A call's
    ``capture_at`` overrides the runner's; ``defer``: a sighting before it runs nothing and returns
    None (the caller has a cheaper way to run it than ``fn`` without a graph).
    """

    MAX_SEEN = 4096      # sightings of combinations not captured yet, remembered at most

    def __init__(self, capture_at: int = 2, max_buckets: int = 16) -> None:
        self.capture_at = capture_at
        self.max_buckets = max_buckets
        self.captured: collections.Counter[str] = collections.Counter()
        self._slots: dict[Any, _Slot] = {}
        self._buckets: collections.OrderedDict[Any, list] = collections.OrderedDict()   # bucket -> slot keys
        self._seen: collections.Counter[tuple] = collections.Counter()
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, Any]] = {}   # capture stream, pool
        self._store: dict[tuple, torch.Tensor] = {}     # every buffer is the first rows of one of these
        self._rows = 0                                   # rows of the token-row tensors in it
        self._padded = False                             # a call's token rows were padded: sizes vary
        self._regrown = False

    def __call__(self, fn: Callable[..., Outputs], inputs: Inputs, consts: Sequence[Any], rows: Rows = ((), ()),
                 into: Sequence[torch.Tensor] = (), *, capture_at: int | None = None,
                 defer: bool = False) -> Outputs | None:
        row_in, row_out = rows
        real = inputs[row_in[0]].shape[0] if row_in else None
        n = bucket(real) if row_in else None
        self._padded |= n != real
        shapes, graph_key = const_keys((*consts, *into))
        slot_key = (fn, tuple(None if t is None else _padded_shape(t, n if i in row_in else None)
                              for i, t in enumerate(inputs)),
                    shapes, tuple(row_in), tuple(row_out),
                    torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        group = n if row_in else slot_key[1]
        slot = self._slots.get(slot_key)
        graph = None if slot is None else slot.graphs.get(graph_key)
        if graph is None:
            if len(self._seen) >= self.MAX_SEEN:       # shapes that never came back (padding-free batches)
                self._seen.clear()
            self._seen[slot_key, graph_key] += 1
            if self._seen[slot_key, graph_key] < (capture_at or self.capture_at):
                return None if defer else run_eager(fn, inputs, consts, into=into)
            if slot is None:
                slot = self._slots[slot_key] = self._slot(inputs, row_in, n or 0)
                self._buckets.setdefault(group, []).append(slot_key)
            slot.load(inputs)
            graph = slot.graphs[graph_key] = self._capture(slot, fn, inputs, consts, row_out, into)
            self.captured[_name(fn)] += 1
        else:
            slot.load(inputs)
        self._buckets.move_to_end(group)
        graph.replay()
        if self._regrown:
            self._prune()
        if into:
            self._evict()
            return tuple(into)
        out = tuple(None if o is None else (o[:real] if i in row_out else o).clone()
                    for i, o in enumerate(graph.outputs))
        self._evict()
        return out

    @property
    def captures(self) -> int:
        return sum(self.captured.values())

    def _slot(self, inputs: Inputs, row_in: Sequence[int], n: int) -> _Slot:
        taken: collections.Counter[tuple] = collections.Counter()
        bufs = [None if t is None else self._buffer("in", _padded_shape(t, n if i in row_in else None), taken,
                                                    i in row_in)
                for i, t in enumerate(inputs)]
        return _Slot(bufs, row_in, n)

    def _buffer(self, role: str, sig: tuple, taken: collections.Counter, token_rows: bool) -> torch.Tensor:
        """A buffer of shape/dtype/device ``sig`` that every slot shares: for token rows, the first
        rows of one tensor per (role, trailing shape, dtype, device, n-th such buffer of the call),
        so that every bucket shares it too; else one tensor of exactly that shape.

        Token-row tensors have the runner's row capacity: a quarter more rows than the biggest
        bucket seen, or exactly the first bucket while no call's rows needed padding (a
        fixed-shape run keeps its memory). A tensor with fewer rows than the call needs is
        replaced, and the graphs that read the old one are dropped at the end of the call.
        Without the headroom, or with tensors of their first bucket's size, batches of varying
        size (padding-free packing) replaced them at each new largest batch, and every graph was
        captured again each time (``scripts/simulate_captures.py``).
        """
        shape, dtype, device = sig
        family = (role, tuple(shape[1:]) if token_rows else tuple(shape), dtype, device)
        key = (*family, taken[family])
        taken[family] += 1
        old = self._store.get(key)
        if token_rows and shape[0] > self._rows:
            grows = self._rows or self._padded
            self._rows = bucket(shape[0] + shape[0] // 4) if grows else shape[0]
        if old is None or (token_rows and old.shape[0] < shape[0]):   # else its family is its exact shape
            size = (self._rows, *shape[1:]) if token_rows else shape
            self._store[key] = torch.empty(size, dtype=dtype, device=device)
            self._regrown |= old is not None
        store = self._store[key]
        return store[:shape[0]] if token_rows else store

    def _capture(self, slot: _Slot, fn: Callable[..., Outputs], inputs: Inputs, consts: Sequence[Any],
                 row_out: Sequence[int], into: Sequence[torch.Tensor]):
        # Warm-up, eager: lazy initialisations (Triton's autotuning among them) happen here. It may
        # write over its inputs, so they are loaded again after it.
        device = next(t.device for t in inputs if t is not None)
        outs = self._warm_up(fn, slot.inputs, consts, device)
        if slot.outputs is None and not into:
            taken: collections.Counter[tuple] = collections.Counter()
            slot.outputs = tuple(None if o is None else self._buffer("out", _padded_shape(o, None), taken, i in row_out)
                                 for i, o in enumerate(outs))
        del outs
        slot.load(inputs)

        outputs = tuple(into) or slot.outputs

        def body() -> None:
            for buf, out in zip(outputs, fn(*slot.inputs, *consts, outs=outputs)):
                if buf is not None and out.data_ptr() != buf.data_ptr():
                    buf.copy_(out)

        try:
            graph = self._record(body, device)
        except RuntimeError as e:       # e.g. a host sync in fn: CUDA refuses it while capturing
            raise CaptureFailed(f"capturing {fn.__name__} failed: {e}") from e
        graph.outputs = outputs
        return graph

    # The two CUDA-specific steps (a CPU test replaces them to check the bookkeeping in CI).
    def _warm_up(self, fn: Callable[..., Outputs], inputs: Inputs, consts: Sequence[Any],
                 device: torch.device) -> Outputs:
        with torch.cuda.device(device):
            current = torch.cuda.current_stream()
            stream = self._stream(current.device)
            stream.wait_stream(current)
            with torch.cuda.stream(stream), torch.no_grad():
                outs = fn(*inputs, *consts)
            current.wait_stream(stream)      # the outputs' buffers are made on the stream that reads them
        return outs

    def _record(self, body: Callable[[], None], device: torch.device) -> _Recorded:
        with torch.cuda.device(device):      # a model split over GPUs: capture on the layer's own
            current = torch.cuda.current_stream()
            stream = self._stream(current.device)
            stream.wait_stream(current)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream), torch.no_grad():
                # The low-level capture calls: torch.cuda.graph() would also empty the allocator's
                # cache and run the garbage collector at every capture.
                graph.capture_begin(pool=self._streams[current.device][1], capture_error_mode="thread_local")
                try:
                    body()
                except BaseException:
                    # End the capture, but raise the body's error: capture_end's own ("operation
                    # failed due to a previous error during capture") would hide what failed.
                    try:
                        graph.capture_end()
                    except RuntimeError:
                        pass
                    raise
                graph.capture_end()
            current.wait_stream(stream)
        return _Recorded(graph)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.graph_pool_handle())
        return self._streams[device][0]

    def _evict(self) -> None:
        if len(self._buckets) > self.max_buckets:
            self._drop(list(self._buckets)[:len(self._buckets) - self.max_buckets])

    def _prune(self) -> None:
        """Drop the slots whose buffers are views of replaced (smaller) tensors."""
        live = {id(t) for t in self._store.values()}
        for n, keys in list(self._buckets.items()):
            for key in list(keys):
                slot = self._slots[key]
                if any(b is not None and b._base is not None and id(b._base) not in live
                       for b in self._buffers_of(slot)):
                    del self._slots[key]
                    keys.remove(key)
            if not keys:
                del self._buckets[n]
        self._regrown = False

    def _drop(self, buckets: Sequence[Any]) -> None:
        for n in buckets:
            for key in self._buckets.pop(n):
                del self._slots[key]
        self._seen.clear()
        # Free the tensors that no kept slot reads (exact-shape buffers of a dropped shape).
        read = {id(b if b._base is None else b._base) for slot in self._slots.values() for b in self._buffers_of(slot)}
        self._store = {key: t for key, t in self._store.items() if id(t) in read}

    @staticmethod
    def _buffers_of(slot: _Slot) -> list[torch.Tensor]:
        return [b for b in (*slot.inputs, *(slot.outputs or ())) if b is not None]

    def __len__(self) -> int:
        return sum(len(slot.graphs) for slot in self._slots.values())
