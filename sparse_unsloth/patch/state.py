"""Per-model and per-layer sparse state: each forward's token split and channel choices.

Every training forward gets a :class:`BatchRecord` (its token split, the channels each layer
chose). A checkpointed layer recomputed in backward must use the record of the forward whose
graph is being differentiated, not the latest forward: TRL's DPO/KTO reference pass, an EMA
teacher or any other forward of the same model may run in between. The model's outputs carry
a tag (a pre-hook on their autograd nodes); when backward reaches one, it names the record
that the recomputes of this backward pass use, until the pass ends.

State lives on objects that the patched modules reach through their own attributes, so that
``copy.deepcopy``, ``.to()`` and pickling of a sparse model behave as on an unpatched one.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import time
import warnings
from typing import Any

import torch

from ..config import SparseConfig
from ..estimator.factors import EstimatorFactors
from ..estimator.select import attn_channels, ffn_channels, kept_count
from ..ops.graphs import GraphRunner, Runner, const_keys, run_eager
from ..ops.sparse_mm import packed, unpacked
from .models import AttentionGeometry

# The sparse work of CUDA tensors runs as replayed CUDA graphs (ops/graphs.py); 0 runs it
# eagerly, kernel by kernel (a debugging aid: slower, same results up to GEMM kernel choice).
CUDA_GRAPHS = os.environ.get("SPARSE_UNSLOTH_CUDA_GRAPHS", "1") != "0"
# With CUDA graphs, a sparse decoder layer's no-grad forward (a checkpointed layer's) is one graph
# of its own (patch/layer_graphs.py); 0 replays its passes one by one (to measure the difference).
LAYER_GRAPHS = os.environ.get("SPARSE_UNSLOTH_LAYER_GRAPHS", "1") != "0"
# Input shapes whose layer graphs are kept (each shape: a graph per sparse layer and two buffers).
LAYER_GRAPH_SHAPES = 4
DENSE_ROWS_STEP = 64


@dataclasses.dataclass
class TokenSplit:
    """Rows of the flattened ``[batch * seq, hidden]`` activations: which stay dense, which vote.

    The row indices' shapes depend on the labels, so the host must learn two counts from the GPU.
    Waiting for them where the split is made (the forward's start, while the GPU still runs the
    previous step's backward) would throw away the lead the host built during that backward, and
    waiting on ``nonzero`` at the first sparse layer would drain the GPU's queue there. So the
    counts are copied to the host asynchronously when the split is made, and the first sparse
    layer waits only for that copy, which the GPU reaches right after the previous step: the
    layers launched since stay queued. The indices then come from ``nonzero_static`` (no wait).
    """

    dense_mask: torch.Tensor     # [rows, tokens]: True at the rows computed with every channel
    sparse_mask: torch.Tensor    # [rows, tokens]: True at the context rows that are real tokens
    # [rows * tokens]: each token's sequence, numbered from 0 (None: one sequence per row). A
    # padding-free batch packs its sequences into one row: its position ids tell them apart.
    sequence_ids: torch.Tensor | None = None
    _sequence_matrices: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        counts = [self.dense_mask.sum(), self.sparse_mask.sum()]
        if self.sequence_ids is not None:         # else one sequence a row: the host knows how many
            counts.append(self.sequence_ids[-1] + 1)
        counts = torch.stack(counts)
        self._copied: torch.cuda.Event | None = None
        if counts.is_cuda:
            self._counts = torch.empty_like(counts, device="cpu", pin_memory=True).copy_(counts, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._counts = counts

    @functools.cached_property
    def _host_counts(self) -> tuple[int, ...]:
        if self._copied is not None:          # waits for their copy to the host the first time
            self._copied.synchronize()
        return tuple(self._counts.tolist())

    @property
    def counts(self) -> tuple[int, int]:
        """(dense rows, voting rows)."""
        return self._host_counts[:2]

    @property
    def sequences(self) -> int:
        """How many sequences the batch holds (packed ones counted apart)."""
        return self.dense_mask.shape[0] if self.sequence_ids is None else self._host_counts[2]

    @functools.cached_property
    def dense_idx(self) -> torch.Tensor:
        """Rows computed with every channel (output tokens)."""
        return torch.nonzero_static(self.dense_mask.reshape(-1), size=self.counts[0]).squeeze(1)

    @functools.cached_property
    def sparse_idx(self) -> torch.Tensor:
        """Context rows that are real tokens: the estimator scores them."""
        return torch.nonzero_static(self.sparse_mask.reshape(-1), size=self.counts[1]).squeeze(1)

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens: every one is dense or votes, and padding is neither."""
        return sum(self.counts)

    @functools.cached_property
    def vote_rows(self) -> torch.Tensor:
        """[tokens]: True at the rows that vote."""
        return self.sparse_mask.reshape(-1)

    def sequence_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """[tokens, sequences]: 1 where the token votes and belongs to the sequence, in ``dtype``.

        One GEMM with it averages each sequence's voting tokens, with no reshape that would tie
        the token count to [sequences, length] (CUDA graphs pad the token rows).
        """
        if dtype not in self._sequence_matrices:
            b, s = self.sparse_mask.shape
            device = self.sparse_mask.device
            seq = self.sequence_ids if self.sequence_ids is not None else torch.arange(b * s, device=device) // s
            # A comparison, not F.one_hot: that checks its indices on the host (a GPU sync).
            member = seq.unsqueeze(1) == torch.arange(self.sequences, device=device)
            self._sequence_matrices[dtype] = (member & self.vote_rows.unsqueeze(1)).to(dtype)
        return self._sequence_matrices[dtype]

    @functools.cached_property
    def dense_rows(self) -> torch.Tensor | None:
        """``dense_idx`` for the fused functions: None without dense rows, else padded to a
        multiple of ``DENSE_ROWS_STEP`` by repeating its first row (a repeated row is computed
        twice and written twice, with the same value), so that a CUDA graph captured for one
        batch serves every batch whose dense-row count rounds to the same size."""
        n = self.dense_idx.numel()
        if n == 0:
            return None
        extra = -n % DENSE_ROWS_STEP
        return torch.cat([self.dense_idx, self.dense_idx[:1].expand(extra)]) if extra else self.dense_idx


def rows(hidden: torch.Tensor) -> torch.Tensor:
    """``[..., hidden]`` as ``[tokens, hidden]`` (the layout the fused functions see too, so that a
    CUDA graph's input buffer serves both)."""
    return hidden.reshape(-1, hidden.shape[-1])


def sequence_means(hidden: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
    """Mean hidden state of each sequence's voting tokens; zero for a sequence without any.

    ``sequences`` [tokens, sequences]: 1 where the token votes and belongs to the sequence (see
    :meth:`TokenSplit.sequence_matrix`). A zero row scores no channel (silu(0) * 0 = 0 under an
    L2 norm over rows), so it needs no filtering, and filtering would make the host wait for the
    GPU in every sparse MLP. A padding-free batch's packed sequences are told apart by its position
    ids (:attr:`TokenSplit.sequence_ids`).
    """
    return (sequences.t() @ hidden) / sequences.sum(0).clamp(min=1).unsqueeze(1)


def voting_rows(hidden: torch.Tensor, votes: torch.Tensor) -> torch.Tensor:
    """``hidden`` [tokens, hidden] zero where the token does not vote (``votes`` [tokens]): the
    same L2 scores as gathering the voting rows, in a shape that does not depend on the labels."""
    return hidden.masked_fill(~votes.unsqueeze(1), 0)


def choose_mlp(hidden, votes, sequences, gate_1, gate_2, up_1, up_2, keep, seq_average, outs=None):
    """(kept intermediate channels,) of one MLP for one batch: a function of its tensors alone, so
    it can run as a CUDA graph (``outs``: that graph's buffers, too small to matter here).

    ``hidden`` [tokens, hidden]; ``votes`` [tokens]; ``sequences``: see :func:`sequence_means`
    (None unless ``seq_average``).
    """
    x = sequence_means(hidden, sequences) if seq_average else voting_rows(hidden, votes)
    return (ffn_channels(x, (gate_1, gate_2), (up_1, up_2), keep),)


def choose_attn(hidden, votes, q_1, q_2, k_1, k_2, v_1, v_2, q_bias, k_bias, v_bias, num_heads, num_kv_heads,
                head_dim, keep, outs=None):
    """(q_idx, k_idx, v_idx, o_idx packed into one tensor,) of one attention layer for one batch
    (see :func:`attn_choice_sizes`; the biases: None where the projection has none)."""
    return (packed(attn_channels(hidden, (q_1, q_2), (k_1, k_2), (v_1, v_2), num_heads, num_kv_heads, head_dim,
                                 keep, votes, (q_bias, k_bias, v_bias))),)


def attn_choice_sizes(num_heads: int, num_kv_heads: int, keep: int) -> list[tuple[int]]:
    """The shapes of q_idx, k_idx, v_idx, o_idx: ``keep`` dims of every query or KV head."""
    return [(num_heads * keep,), (num_kv_heads * keep,), (num_kv_heads * keep,), (num_heads * keep,)]


def token_split(labels: torch.Tensor | None, shape: torch.Size, device: torch.device,
                dense_output_tokens: bool = True, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> TokenSplit:
    """Output tokens dense, context tokens sparse, padding neither dense nor voting.

    A position is an output token when its label is not -100, or when the next position's is
    (its hidden state predicts that label after the causal shift). Works from the masks alone,
    so padding side and padding-free (flattened) batches need nothing special; a boundary
    between two packed sequences at most keeps one extra row dense. ``position_ids`` of a
    padding-free batch tell its packed sequences apart, for the FFN estimator's per-sequence means. Padding (``attention_mask``
    0) is computed sparse, which is cheapest, and never scores channels: no real token attends
    to it, so neither its values nor its count change the result.
    """
    real = torch.ones(shape, dtype=torch.bool, device=device)
    if attention_mask is not None:
        if attention_mask.shape != shape:
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not match the "
                             f"input ids {tuple(shape)}; the sparse patch reads padding from a 2-D mask")
        real = attention_mask.to(device) != 0
    if labels is None or not dense_output_tokens:
        dense = torch.zeros(shape, dtype=torch.bool, device=device)
    else:
        if labels.numel() != shape.numel():
            raise ValueError(f"labels hold {labels.numel()} tokens but the layer sees {shape.numel()}; "
                             "the sparse patch needs labels shaped like input_ids")
        target = (labels != -100).reshape(shape).to(device)
        dense = target.clone()
        dense[..., :-1] |= target[..., 1:]
        dense &= real             # left padding before a labelled first token stays padding
    return TokenSplit(dense, ~dense & real, _sequence_ids(position_ids, shape, real))


def _sequence_ids(position_ids: torch.Tensor | None, shape: torch.Size, real: torch.Tensor) -> torch.Tensor | None:
    """Each token's sequence where a row packs several (a padding-free batch: its position ids
    start again at 0 at each sequence); None where each row is one sequence. Only a real token
    starts one: a collator may give every pad token position 0."""
    if position_ids is None or position_ids.numel() != shape.numel() or shape.numel() == 0:
        return None
    starts = (position_ids.reshape(shape).to(real.device) == 0) & real
    starts[:, 0] = True                           # a row starts a sequence whatever its position ids
    return starts.reshape(-1).cumsum(0) - 1


class PendingChoice:
    """A layer's channel choice for one forward, not made yet: ``fn(hidden rows, *inputs, *consts)``
    returns ``(channels,)``, which go into ``buffer`` (where the sparse passes and the backward
    read them). The first pass that needs them runs it as its prologue, inside its own CUDA
    graph (``ops.graphs.run_after``): one graph call and one load of the hidden states fewer on
    the host's path, which paces the sparse forward. As a const of that graph it is keyed by
    ``fn`` and by its consts' and buffer's shapes and storages, like any const."""

    def __init__(self, fn, inputs: tuple, consts: tuple, buffer: torch.Tensor) -> None:
        self.fn, self.inputs, self.consts, self.buffer = fn, inputs, consts, buffer
        shapes, identities = const_keys((*consts, buffer))
        self.graph_shape, self.graph_key = (fn, shapes), identities

    def __call__(self, hidden_rows: torch.Tensor, *inputs: torch.Tensor | None) -> None:
        self.buffer.copy_(self.fn(hidden_rows, *inputs, *self.consts)[0])

    def now(self, hidden: torch.Tensor, run: Runner) -> None:
        """Make the choice from ``hidden`` in a pass of its own."""
        ins = (rows(hidden), *self.inputs)
        run(self.fn, ins, self.consts, rows=(tuple(range(len(ins))), ()), into=(self.buffer,))


@dataclasses.dataclass
class MLPChoice:
    buffer: torch.Tensor         # where the choice lives (its layer's buffer, a copy, or its own)

    @property
    def idx(self) -> torch.Tensor:
        """Intermediate channels kept (gate/up rows, down columns)."""
        return self.buffer

    def copy(self) -> MLPChoice:
        return MLPChoice(self.buffer.clone())


@dataclasses.dataclass
class AttnChoice:
    buffer: torch.Tensor         # q_idx, k_idx, v_idx, o_idx packed (their views below)
    q_idx: torch.Tensor
    k_idx: torch.Tensor
    v_idx: torch.Tensor
    o_idx: torch.Tensor

    def copy(self) -> AttnChoice:
        buffer = self.buffer.clone()
        return AttnChoice(buffer, *unpacked(buffer, [t.shape for t in (self.q_idx, self.k_idx, self.v_idx,
                                                                       self.o_idx)]))


class BatchRecord:
    """One sparse training forward: its token split and the channels each layer chose for it."""

    def __init__(self, split: TokenSplit) -> None:
        self.split = split
        self.choices: dict[tuple[int, str], MLPChoice | AttnChoice | None] = {}
        self.counted: set[tuple[int, str]] = set()    # (layer, kind) whose sparse work was counted
        # (layer, kind) -> the frozen weights and adapters the fast path's ops use for this forward
        # (None where that module runs dense): found once per forward, kept for its backward.
        self.projections: dict[tuple[int, str], Any] = {}
        # A choice (and the padded dense rows) live in a buffer of the state until a later
        # forward needs it: the buffer's write count (SparseState.writes) when this record's went in.
        self.writes: dict[tuple, int] = {}
        self.finished = False        # a backward through this forward's outputs has ended
        self.dense_rows: torch.Tensor | None = None     # placed by SparseState.dense_rows
        self.inputs: dict[Any, torch.Tensor] = {}        # placed by SparseState.vote_inputs
        self.graphed: set[int] = set()      # layers whose forward ran as a graph (patch/layer_graphs.py)

    def keep_copy(self, key: tuple) -> None:
        """Copy what this record holds in the buffer ``key`` out of it (a later forward takes it)."""
        if key[0] == "dense":
            self.dense_rows = self.dense_rows.clone()
        else:
            self.choices[key] = self.choices[key].copy()
        del self.writes[key]


class IndicesNow:
    """What a sparse function's backward asks for the indices of its forward: the record's as they
    are then (in their buffers, or in the copies a later forward left it), checked intact."""

    def __init__(self, state: SparseState, record: BatchRecord, key: tuple[int, str], fields: tuple[str, ...],
                 ) -> None:
        self.state, self.record, self.key, self.fields = state, record, key, fields

    def __call__(self) -> tuple:
        self.state.check_intact(self.record, self.key)
        if self.key == (self.state.skipped_output, "mlp"):
            self.state.skipped_output = None       # the MLP's backward: its recompute is done with
        choice = self.record.choices[self.key]
        return (*(getattr(choice, f) for f in self.fields), self.state.dense_rows(self.record))


class _EnterBackward:
    """Pre-hook of a model output's autograd node: backward reached this forward's outputs.

    A hook on the node, not an identity Function: the output stays the same tensor, so in-place
    updates like the Trainer's ``loss *= scale`` keep working and nothing is copied.
    """

    def __init__(self, state: SparseState, record: BatchRecord | None) -> None:
        self.state, self.record = state, record

    def __call__(self, _grad_outputs):
        self.state.enter_backward(self.record)


_NO_BACKWARD = object()      # no tagged output reached in the backward pass running now


class SparseState:
    """Everything the patched layers share: config, factors, switch, statistics, the records."""

    def __init__(self, config: SparseConfig, factors: EstimatorFactors, geometry: AttentionGeometry,
                 ) -> None:
        self.config = config
        self.factors = factors
        self.geometry = geometry
        self.enabled = True          # the callback turns this off for the dense warm-up
        self.layers: dict[int, LayerSparsity] = {}
        self.callback_attached = False
        self.fast = False                    # the Unsloth fast path's functions run the layers
        self.sparse_batches_total = 0        # never reset: the callback counts sparse steps by it
        self._transient()
        self.reset_stats()

    def _transient(self) -> None:
        # What no copy or pickle should carry: the forward in flight, the backward's record,
        # factors cast for a device/dtype, the warnings already given, the CUDA graphs (they
        # read this model's weights; a copy captures its own).
        self.current: BatchRecord | None = None
        self._backward: Any = _NO_BACKWARD
        self._cast: dict[tuple[torch.device, torch.dtype], EstimatorFactors] = {}
        self._warned: set[str] = set()
        # Passes pad their token rows to buckets that recur, so a pass is captured at its first
        # sighting: in a padding-free run (a new token count every step) waiting for a second one
        # doubled the steps that ran eagerly, and on SmolLM2 (H100) a step that captures cost
        # about as much as an eager one (benchmarks/NOTES.md). Layer graphs take exact shapes,
        # which rarely recur there: captured at the second.
        self._graphs = GraphRunner(capture_at=1)
        self._layer_graphs = GraphRunner(max_buckets=LAYER_GRAPH_SHAPES)
        self.in_layer_graph = False          # a layer graph's body runs: its passes run eagerly inside
        self.layer_graphs_failed: str | None = None     # why a layer's forward graph could not be captured
        self.backward_graphs_failed: str | None = None  # why a layer's forward or backward one could not
        self.leaves: dict[int, torch.nn.Parameter] = {}   # see layer_graphs._fresh_leaves
        self._captures_logged = 0
        self._buffers: dict[tuple, torch.Tensor] = {}        # see take()
        self._inputs: dict[tuple, torch.Tensor] = {}         # see vote_inputs()
        self.owners: dict[tuple, BatchRecord] = {}           # whose indices each buffer holds
        self.writes: collections.Counter[tuple] = collections.Counter()
        self._entered: list[BatchRecord] = []
        # A checkpointed layer's recompute computes no MLP output (its backward, next, recomputes
        # what it needs): the layer whose skipped output is pending until that backward asks for
        # its indices. Another layer recomputed meanwhile would read it (see unsloth_fast.Guard).
        self.skipped_output: int | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in ("current", "_backward", "_cast", "_warned", "_graphs", "_layer_graphs", "in_layer_graph",
                    "layer_graphs_failed", "backward_graphs_failed", "leaves", "_captures_logged", "_buffers",
                    "_inputs", "owners", "writes", "_entered", "skipped_output"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._transient()

    def __deepcopy__(self, memo: dict) -> SparseState:
        import copy

        clone = SparseState.__new__(SparseState)
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return clone

    @property
    def split(self) -> TokenSplit | None:
        """The token split of the forward in flight (None when it runs dense)."""
        return None if self.current is None else self.current.split

    @property
    def active(self) -> bool:
        return self.current is not None

    def begin_batch(self, labels: torch.Tensor | None, shape: torch.Size, device: torch.device,
                    training: bool, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None) -> None:
        """Start a forward pass over token ids of ``shape`` ([batch, seq])."""
        self.current = None
        self.skipped_output = None         # a backward that failed before its end left it set
        if not training:
            return
        self.stats["forwards"] += 1
        if not self.enabled:
            return
        if labels is None and self.config.dense_output_tokens:
            self._warn_once("no labels reached the model, so every token is treated as a context "
                            "token (sparse). Pass labels to keep output tokens dense.")
        if not self.callback_attached:
            self._warn_once("training without SparsityCallback: sparse from the first step, with no "
                            "dense warm-up and no statistics in the logs. Pass "
                            "callbacks=[sparse_unsloth.SparsityCallback(model)] to the trainer.")
        if attention_mask is not None and attention_mask.shape != shape:
            self._warn_once(f"an attention mask of shape {tuple(attention_mask.shape)} (not [batch, seq]) "
                            "reached the model: padding cannot be told from context tokens, so pad "
                            "tokens vote in the channel choice. Pass a 2-D attention_mask.")
            attention_mask = None
        self.current = BatchRecord(token_split(labels, shape, device, self.config.dense_output_tokens,
                                               attention_mask, position_ids))

    def tag(self, out: torch.Tensor) -> None:
        """Mark ``out`` (a model output with a graph): a backward through it differentiates the
        current forward."""
        out.grad_fn.register_prehook(_EnterBackward(self, self.current))

    def enter_backward(self, record: BatchRecord | None) -> None:
        if self._backward is _NO_BACKWARD:
            torch.autograd.Variable._execution_engine.queue_callback(self._leave_backward)
            self._entered = []
        self._backward = record
        if record is not None:
            self._entered.append(record)

    def _leave_backward(self) -> None:
        self._backward = _NO_BACKWARD
        self.skipped_output = None
        for record in self._entered:
            record.finished = True
        self._entered = []

    def take(self, key: tuple, record: BatchRecord, size: int, device: torch.device) -> torch.Tensor:
        """The buffer ``key`` (``size`` indices), handed to ``record`` to write its own into.

        A layer's channel choice (key ``(layer, kind)``) and a size of padded dense rows (key
        ``("dense", size)``) each have one buffer; the sparse functions' CUDA graphs read it in
        place, as a const. An earlier forward that still holds it and whose backward has not
        run (two forwards, one backward) keeps a copy first.
        """
        owner = self.owners.get(key)
        if owner is not None and owner is not record and not owner.finished and key in owner.writes:
            owner.keep_copy(key)
        where = (key, device)
        if where not in self._buffers or self._buffers[where].numel() != size:
            self._buffers[where] = torch.zeros(size, dtype=torch.long, device=device)
        self.writes[key] += 1
        record.writes[key] = self.writes[key]
        self.owners[key] = record
        return self._buffers[where]

    def check_intact(self, record: BatchRecord, key: tuple) -> None:
        """Refuse to compute with what ``record`` holds in buffer ``key`` if a later forward wrote it."""
        if key in record.writes and self.writes[key] != record.writes[key]:
            raise RuntimeError(
                "sparse_unsloth: the channels this forward chose were overwritten by a later forward "
                "after a backward through it had ended (a second backward with retain_graph=True "
                "after another training forward?). Run each backward before the next forward, or "
                "train this model dense.")

    def dense_rows(self, record: BatchRecord) -> torch.Tensor | None:
        """``record``'s padded dense rows (TokenSplit.dense_rows), in the buffer of their size."""
        rows = record.split.dense_rows
        if rows is None or not self.in_place(rows):
            return rows
        key = ("dense", rows.numel())
        if record.dense_rows is None:
            record.dense_rows = self.take(key, record, rows.numel(), rows.device).copy_(rows)
        self.check_intact(record, key)
        return record.dense_rows

    def vote_inputs(self, record: BatchRecord, dtype: torch.dtype | None = None) -> tuple:
        """(vote rows, the sequence matrix in ``dtype`` or None without one) of ``record``'s split:
        what its channel choices read (TokenSplit.vote_rows, .sequence_matrix).

        Where CUDA graphs read them, they are copied (once per record) into buffers of their
        shape that stay put: a layer graph (patch/layer_graphs.py) reads them where it read them
        at its capture. Only a forward's choices read them, and forwards run one after another on
        one stream, so one buffer per shape serves every record. Such a copy must not be made
        inside a layer graph (it would copy the captured forward's tensors at every replay):
        :meth:`place_inputs` makes it first.
        """
        split, inputs = record.split, record.inputs
        for key in ("votes",) if dtype is None else ("votes", dtype):
            if key not in inputs:
                t = split.vote_rows if key == "votes" else split.sequence_matrix(dtype)
                if self.in_place(t):
                    if self.in_layer_graph:
                        raise RuntimeError(f"sparse_unsloth: a layer graph would copy this forward's {key!r} "
                                           "(placed before it for another dtype?); please report this")
                    where = (t.shape, t.dtype, t.device)
                    if where not in self._inputs:
                        self._inputs[where] = torch.empty_like(t)
                    t = self._inputs[where].copy_(t)
                inputs[key] = t
        return inputs["votes"], None if dtype is None else inputs[dtype]

    def place_inputs(self, record: BatchRecord, dtype: torch.dtype) -> None:
        """Put what ``record``'s choices and passes read per forward into its buffers now, before a
        layer graph is captured or replayed (see :meth:`vote_inputs`)."""
        self.dense_rows(record)
        self.vote_inputs(record, dtype if self.config.ffn_seq_average else None)

    def record_for_call(self) -> BatchRecord | None:
        """The record a patched layer computes with now: in backward (a checkpointed layer's
        recompute, a sparse function's backward), the one of the forward being differentiated;
        else the forward in flight."""
        if torch._C._current_graph_task_id() == -1:
            return self.current
        if self._backward is _NO_BACKWARD:
            raise RuntimeError(
                "sparse_unsloth: a sparse layer's backward (or a checkpointed layer's recompute) runs in a "
                "backward pass that did not start from this model's outputs (loss, logits, hidden states, "
                "log-probs), so the channels its forward used are unknown. Call backward on a tensor computed "
                "from the model's outputs.")
        return self._backward

    def runner(self, t: torch.Tensor) -> Runner:
        """How the sparse work on ``t``'s device is made to run: replayed CUDA graphs on the fast
        path's GPU, eagerly elsewhere (the reference path keeps its indices in autograd's saved
        tensors, so they must not live in buffers that a later forward rewrites)."""
        if self.fast and t.is_cuda and CUDA_GRAPHS:
            return self._graphs
        return run_eager

    def pass_runner(self, t: torch.Tensor) -> Runner:
        """How a sparse pass on ``t`` runs now: eagerly inside a layer graph's body (that graph
        records it; graphs do not nest), else as :meth:`runner` says."""
        return run_eager if self.in_layer_graph else self.runner(t)

    def layer_runner(self, t: torch.Tensor) -> GraphRunner | None:
        """The runner of the layer graphs on ``t``'s device (None: layers run pass by pass)."""
        if not LAYER_GRAPHS or self.layer_graphs_failed is not None:
            return None
        return self._layer_graphs if self.in_place(t) else None

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far, of passes and of layers."""
        return self._graphs.captures + self._layer_graphs.captures

    def captures_by_function(self) -> collections.Counter[str]:
        """:attr:`captures` by what was captured: ``"pass <function>"`` / ``"layer <function>"``
        (a Counter: the difference of two is what was captured between them)."""
        return collections.Counter({f"{half} {name}": n for half, runner in (("pass", self._graphs),
                                                                              ("layer", self._layer_graphs))
                                    for name, n in runner.captured.items()})

    def in_place(self, t: torch.Tensor) -> bool:
        """Whether indices for ``t``'s device go into the shared buffers (:meth:`take`): only for
        the CUDA graphs, which read them there."""
        return isinstance(self.runner(t), GraphRunner)

    def factors_like(self, hidden: torch.Tensor) -> EstimatorFactors:
        """The factors on ``hidden``'s device and dtype (cast once; the model may have moved)."""
        key = (hidden.device, hidden.dtype)
        if key not in self._cast:
            self._cast[key] = self.factors.to(hidden.device, hidden.dtype)
        return self._cast[key]

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"sparse_unsloth: {message}", stacklevel=4)

    def count_sparse(self, record: BatchRecord, layer: int, kind: str, kept: int, total: int) -> None:
        """Count a layer's sparse work for a forward (its caller, :meth:`LayerSparsity.count`, does
        so once per forward, when it really ran sparse)."""
        if not record.counted:
            s = self.stats
            s["batches"] += 1
            s["dense_tokens"] += record.split.dense_idx.numel()
            s["tokens"] += record.split.num_tokens
            self.sparse_batches_total += 1
        record.counted.add((layer, kind))
        self.stats[f"{kind}_kept"] += kept
        self.stats[f"{kind}_total"] += total

    def reset_stats(self) -> None:
        self._captures_logged = self.captures
        self.stats = {"batches": 0, "forwards": 0, "dense_tokens": 0, "tokens": 0, "estimator_s": 0.0,
                      "mlp_kept": 0, "mlp_total": 0, "attn_kept": 0, "attn_total": 0}

    def pop_stats(self) -> dict[str, float]:
        """Averages since the last call, as trainer log entries (only what ran sparse counts)."""
        s = self.stats
        # Share of the training forwards that really ran sparse: 0 in the warm-up, and 0 where
        # nothing could be sparse (every token an output token, adapters disabled on the fast path).
        out = {"sparse/active": s["batches"] / s["forwards"] if s["forwards"] else 0.0}
        if s["batches"]:
            out["sparse/dense_token_frac"] = s["dense_tokens"] / max(s["tokens"], 1)
            if s["estimator_s"]:      # timed where a choice is made in a pass of its own (see choose_now)
                out["sparse/estimator_ms"] = 1e3 * s["estimator_s"] / s["batches"]
            if s["mlp_total"]:
                out["sparse/mlp_kept_frac"] = s["mlp_kept"] / s["mlp_total"]
            if s["attn_total"]:
                out["sparse/attn_kept_frac"] = s["attn_kept"] / s["attn_total"]
            # Captures happen for each new bucket of batch shape: a count that keeps growing means
            # the batches' token counts span more buckets than the runner keeps.
            if self.captures:
                out["sparse/graph_captures"] = self.captures - self._captures_logged
        self.reset_stats()
        return out


class LayerSparsity:
    """How sparse one decoder layer is, and its channel choice for a forward's record."""

    def __init__(self, state: SparseState, layer: int) -> None:
        self.state = state
        self.layer = layer
        self.mlp_sparsity = state.config.sparsity("mlp", layer)
        self.attn_sparsity = state.config.sparsity("self_attn", layer)

    def choice(self, kind: str, hidden: torch.Tensor, record: BatchRecord | None,
               ) -> tuple[MLPChoice | AttnChoice | None, PendingChoice | None]:
        """``record``'s channel choice for this layer's ``kind`` ("mlp" or "attn"; None where it
        runs dense), and the work that makes it if it is not made yet (else None). The choice's
        buffer is ``record``'s from now on; the pass that first uses it runs that work as its
        prologue, or :meth:`choose_now` does."""
        sparsity = self.mlp_sparsity if kind == "mlp" else self.attn_sparsity
        if not sparsity or record is None:
            return None, None
        key = (self.layer, kind)
        if key in record.choices:
            self.state.check_intact(record, key)
            return record.choices[key], None
        if record.split.sparse_idx.numel() == 0:
            record.choices[key] = None      # every real token is an output token: nothing to skip
            return None, None
        # Channel choice is discrete: no gradient flows through it.
        choice, pending = (self._plan_mlp if kind == "mlp" else self._plan_attn)(hidden.detach(), record)
        record.choices[key] = choice
        return choice, pending

    def choose_now(self, kind: str, hidden: torch.Tensor, record: BatchRecord | None,
                   ) -> MLPChoice | AttnChoice | None:
        """:meth:`choice`, made now if it is not yet (its own pass, timed in the statistics)."""
        choice, pending = self.choice(kind, hidden, record)
        if pending is not None:
            start = time.perf_counter()
            with torch.no_grad():
                pending.now(hidden.detach(), self.state.pass_runner(hidden))
            self.state.stats["estimator_s"] += time.perf_counter() - start
        return choice

    def _buffer(self, kind: str, record: BatchRecord, size: int, hidden: torch.Tensor) -> torch.Tensor:
        """Where ``record``'s choice goes: the layer's shared buffer when CUDA graphs read it, else its own."""
        if self.state.in_place(hidden):
            return self.state.take((self.layer, kind), record, size, hidden.device)
        return torch.empty(size, dtype=torch.long, device=hidden.device)

    def _plan_mlp(self, hidden: torch.Tensor, record: BatchRecord) -> tuple[MLPChoice, PendingChoice]:
        state = self.state
        f = state.factors_like(hidden)
        gate, up = f[f"{self.layer}.gate_proj"], f[f"{self.layer}.up_proj"]
        keep = kept_count(gate[1].shape[1], self.mlp_sparsity)
        average = state.config.ffn_seq_average
        buffer = self._buffer("mlp", record, keep, hidden)
        votes = state.vote_inputs(record, hidden.dtype if average else None)
        return MLPChoice(buffer), PendingChoice(choose_mlp, votes, (*gate, *up, keep, average), buffer)

    def attn_kept(self) -> int:
        return kept_count(self.state.geometry.head_dim, self.attn_sparsity)

    def _plan_attn(self, hidden: torch.Tensor, record: BatchRecord) -> tuple[AttnChoice, PendingChoice]:
        state, geo = self.state, self.state.geometry
        f = state.factors_like(hidden)
        projs = [f"{self.layer}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        factors = [t for p in projs for t in f[p]] + [f.bias(p) for p in projs]
        keep = self.attn_kept()
        sizes = attn_choice_sizes(geo.num_heads, geo.num_kv_heads, keep)
        buffer = self._buffer("attn", record, sum(s[0] for s in sizes), hidden)
        return (AttnChoice(buffer, *unpacked(buffer, sizes)),
                PendingChoice(choose_attn, state.vote_inputs(record)[:1],
                              (*factors, geo.num_heads, geo.num_kv_heads, geo.head_dim, keep), buffer))

    def count(self, record: BatchRecord, kind: str) -> None:
        """Record that this layer's ``kind`` ("mlp" or "attn") really ran sparse for ``record``,
        with the channels its choice for ``record`` kept."""
        if (self.layer, kind) in record.counted:
            return
        if kind == "mlp":
            kept = record.choices[self.layer, "mlp"].idx.numel()
            total = self.state.factors[f"{self.layer}.gate_proj"][1].shape[1]   # intermediate channels
        else:
            kept, total = self.attn_kept(), self.state.geometry.head_dim
        self.state.count_sparse(record, self.layer, kind, kept, total)
