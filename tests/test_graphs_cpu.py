"""The CUDA-graph runner's bookkeeping on the CPU (ops/graphs.py).

Only recording and the warm-up's stream need a GPU; here a "graph" is its body called again,
so everything else (when to capture, buffers shared between slots and passes, results copied
out, token rows padded to buckets, eviction) runs in CI, down to a whole training step through
the fast path's functions (float64).
"""

import copy
import importlib

import pytest
import torch
from helpers import cpu_graphs as CPUGraphs
from helpers import tiny_lora_model
from torch.utils.checkpoint import checkpoint

import sparse_unsloth as su
from sparse_unsloth.ops.fast_mlp import sparse_lora_mlp
from sparse_unsloth.ops.graphs import bucket, run_after, run_eager
from sparse_unsloth.ops.sparse_mm import LoRAProj


def _times(x, w, outs=None):
    return (torch.mm(x, w, out=outs and outs[0]),)


def _two(x, w, outs=None):
    return x @ w, x.sum(0)


def _doubled_in_place(x, w, outs=None):
    return (x.mul_(2) @ w,)


def test_captured_at_the_second_sighting_then_replayed():
    w = torch.randn(4, 3, dtype=torch.float64)
    runner = CPUGraphs()
    xs = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    for i, x in enumerate(xs):
        (y,) = runner(_times, (x,), (w,))
        assert torch.equal(y, x @ w)
        assert (runner.captures, runner.replays) == [(0, 0), (1, 1), (1, 2)][i]
    runner(_times, (xs[0],), (w.clone(),))       # other weights: another graph, seen once: eager
    assert runner.captures == 1
    runner(_two, (xs[0],), (w,))
    runner(_two, (xs[0],), (w,))
    assert runner.captured == {"test_graphs_cpu._times": 1, "test_graphs_cpu._two": 1}   # named, for a profile of what a run captures


def test_results_are_fresh_and_inputs_copied():
    w = torch.randn(4, 4, dtype=torch.float64)
    runner = CPUGraphs(capture_at=1)
    x = torch.randn(3, 4, dtype=torch.float64)
    y1, s1 = runner(_two, (x,), (w,))
    y2, _ = runner(_two, (2 * x,), (w,))
    assert torch.equal(y1, x @ w) and torch.equal(s1, x.sum(0))       # not overwritten by the replay
    assert y1.data_ptr() != y2.data_ptr()
    x_before = x.clone()
    (u,) = runner(_doubled_in_place, (x,), (w,))
    (u,) = runner(_doubled_in_place, (x,), (w,))
    assert torch.equal(u, (2 * x_before) @ w) and torch.equal(x, x_before)   # the graph doubled its copy


class _TopColumns:
    """A prologue: the 2 columns of largest ``|x + noise|`` summed over the rows (``noise``: its own
    token-row input) into ``into``; zero padding rows change no sum."""

    def __init__(self, noise, into):
        self.inputs, self.into = (noise,), into
        self.graph_shape, self.graph_key = ("top columns", into.shape), into.data_ptr()

    def __call__(self, x, noise):
        self.into.copy_((x + noise).abs().sum(0).topk(2).indices)


def _columns(x, cols, outs=None):
    return (x.index_select(1, cols),)


@pytest.mark.parametrize("graphs", [False, True])
def test_a_prologue_writes_what_the_pass_reads_in_the_same_pass(graphs):
    """``run_after``: the prologue runs first, on the pass's own copy of ``x`` and its own inputs,
    and writes the const the pass reads. A new prologue object with the same keys (each batch
    makes one) replays the graph the first one was captured in."""
    runner = CPUGraphs() if graphs else run_eager
    cols = torch.zeros(2, dtype=torch.long)
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        x, noise = (torch.randn(7, 5, dtype=torch.float64, generator=gen) for _ in range(2))
        (y,) = run_after(runner, _TopColumns(noise, cols), _columns, x, (cols,), (0,))
        want = (x + noise).abs().sum(0).topk(2).indices
        assert torch.equal(cols, want) and torch.equal(y, x[:, want])
    if graphs:
        assert (runner.captures, runner.replays) == (1, 3)
    (y,) = run_after(runner, None, _columns, x, (cols,), (0,))       # no prologue: the plain pass
    assert torch.equal(y, x[:, cols])


def test_slots_share_scratch_buffers():
    w1, w2 = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    runner = CPUGraphs(capture_at=1)
    x = torch.randn(3, 4, dtype=torch.float64)
    runner(_times, (x,), (w1,))
    runner(_times, (x,), (w2,))                  # another weight shape: another slot, same input buffer
    runner(_two, (x,), (w1,))
    assert len(runner._slots) == 3 and len(runner) == 3
    assert len({id(slot.inputs[0]._base) for slot in runner._slots.values()}) == 1
    assert sum(key[0] == "in" for key in runner._store) == 1


def _product_and_column_sums(x, w, outs=None):
    return x @ w, x.sum(0)


ROWS = ((0,), (0,))       # input 0 and output 0 are token rows


def test_buckets():
    assert [bucket(n) for n in (1, 64, 65, 100, 1000, 4096, 4097, 5000)] == [64, 64, 128, 128, 1024, 4096, 4608, 5120]
    for n in range(1, 20000, 7):
        assert n <= bucket(n) < n + max(n / 8, 64)       # at most 1/8 or 63 rows of padding


def test_token_rows_are_padded_with_zeros_and_cut_back():
    w = torch.randn(4, 3, dtype=torch.float64)
    runner = CPUGraphs(capture_at=1)
    for n in (100, 120, 70):                     # one bucket (128 rows): one graph
        x = torch.randn(n, 4, dtype=torch.float64)
        y, sums = runner(_product_and_column_sums, (x,), (w,), rows=ROWS)
        assert y.shape == (n, 3) and torch.equal(y, x @ w)
        torch.testing.assert_close(sums, x.sum(0), rtol=1e-14, atol=1e-14)   # zero rows add nothing
    assert runner.captures == 1 and runner.replays == 3


def test_least_recently_used_buckets_are_dropped():
    w = torch.randn(4, 4, dtype=torch.float64)
    runner = CPUGraphs(capture_at=1, max_buckets=2)
    for n, captures in ((200, 1), (60, 2), (100, 3), (60, 3), (200, 4)):
        x = torch.randn(n, 4, dtype=torch.float64)
        (y, _) = runner(_product_and_column_sums, (x,), (w,), rows=ROWS)
        assert torch.equal(y, x @ w)
        assert runner.captures == captures, n
    assert len(runner) == 2


def test_calls_without_token_rows_are_bucketed_by_shape_and_dropped_with_their_buffers():
    """A layer graph's inputs cannot be padded: each input shape is a bucket of its own, and the
    buffers of a dropped shape are freed (only the kept graphs' remain)."""
    w = torch.randn(4, 4, dtype=torch.float64)
    runner = CPUGraphs(capture_at=1, max_buckets=2)
    for n, captures in ((5, 1), (6, 2), (5, 2), (7, 3), (6, 4)):
        x = torch.randn(n, 4, dtype=torch.float64)
        (y,) = runner(_times, (x,), (w,))
        assert torch.equal(y, x @ w)
        assert runner.captures == captures, n
    assert len(runner) == 2
    assert sorted(t.shape[0] for t in runner._store.values()) == [6, 6, 7, 7]     # an input and an output each


def _scaled(x, scale, w, outs=None):
    return (x @ w * scale,)


def test_zero_dim_inputs_share_their_buffer_across_shapes():
    """A 0-dim tensor argument (a packed batch's max length) is an input of every shape's graph, in
    one buffer of its own: the second shape's slot reuses it."""
    w = torch.randn(4, 4, dtype=torch.float64)
    runner = CPUGraphs(capture_at=1)
    for n, s in ((5, 2.0), (6, 3.0), (5, 4.0)):
        x, scale = torch.randn(n, 4, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
        (y,) = runner(_scaled, (x, scale), (w,))
        assert torch.equal(y, x @ w * s)
    assert runner.captures == 2
    assert sum(t.dim() == 0 for t in runner._store.values()) == 1


def test_sightings_of_shapes_that_never_come_back_are_forgotten():
    """A padding-free run's layer calls rarely repeat a token count: what the runner remembers of
    them stays bounded, and a shape that does come back is still captured."""
    w = torch.randn(4, 4, dtype=torch.float64)
    runner = CPUGraphs()
    runner.MAX_SEEN = 5
    for n in range(1, 40):
        runner(_times, (torch.randn(n, 4, dtype=torch.float64),), (w,))
        assert len(runner._seen) <= 5
    assert runner.captures == 0
    for _ in range(2):
        runner(_times, (torch.randn(39, 4, dtype=torch.float64),), (w,))
    assert runner.captures == 1


def test_a_bigger_bucket_replaces_the_buffers_and_drops_the_graphs_reading_the_old_ones():
    """A bigger bucket replaces the first buffer (128 rows: 60 padded to 64, and a quarter more)
    with a quarter more rows than it needs (bucket(256 + 64) = 320), so a slightly bigger one after
    it (bucket 320) keeps every graph."""
    w = torch.randn(4, 4, dtype=torch.float64)
    runner = CPUGraphs(capture_at=1)
    for n, captures in ((60, 1), (200, 2), (60, 3), (200, 3), (300, 4), (60, 4), (200, 4)):
        x = torch.randn(n, 4, dtype=torch.float64)
        (y, _) = runner(_product_and_column_sums, (x,), (w,), rows=ROWS)
        assert torch.equal(y, x @ w)
        assert runner.captures == captures, n
    assert all(t.shape[0] in (4, 320) for t in runner._store.values())


def test_padded_rows_leave_headroom_from_the_first_buffer_and_exact_rows_do_not():
    """Rows that needed padding say the batch size varies: the first buffers get a quarter more
    rows than their bucket (60 -> bucket 64 -> 128 rows), so a batch of 100 (bucket 128) keeps the
    first graph. Rows that fill their bucket exactly (a fixed-shape run) get exactly that."""
    w = torch.randn(4, 4, dtype=torch.float64)
    runner = CPUGraphs(capture_at=1)
    for n, captures in ((60, 1), (100, 2), (60, 2), (100, 2)):
        x = torch.randn(n, 4, dtype=torch.float64)
        (y, _) = runner(_product_and_column_sums, (x,), (w,), rows=ROWS)
        assert torch.equal(y, x @ w)
        assert runner.captures == captures, n
    assert {t.shape[0] for t in runner._store.values()} == {4, 128}
    fixed = CPUGraphs(capture_at=1)
    for _ in range(2):
        fixed(_product_and_column_sums, (torch.randn(256, 4, dtype=torch.float64),), (w,), rows=ROWS)
    assert fixed.captures == 1 and {t.shape[0] for t in fixed._store.values()} == {4, 256}


def test_buffers_made_after_a_regrowth_have_its_headroom_too():
    """A padding-free run meets its largest batches one by one. Buffers first made after the
    capacity grew (another pass's outputs) get the grown capacity, so the next slightly bigger
    batch drops no graph; with buffers of their first bucket's size, each new largest batch
    dropped and recaptured every graph again."""
    w4, w6 = (torch.randn(4, k, dtype=torch.float64) for k in (4, 6))
    runner = CPUGraphs(capture_at=1)
    for n, w in ((60, w4), (200, w4), (200, w6), (300, w6), (200, w6), (300, w4)):
        x = torch.randn(n, 4, dtype=torch.float64)
        (y, _) = runner(_product_and_column_sums, (x,), (w,), rows=ROWS)
        assert torch.equal(y, x @ w)
    # 60 and 200 with w4 (a regrowth: capacity bucket(256 + 64) = 320); 200 and 300 with w6 in
    # buffers of 320 rows; the second 200 with w6 replays; 300 with w4 is new
    assert runner.captures == 5
    assert all(t.shape[0] in (4, 320) for t in runner._store.values())


def _proj(gen, fout, fin, rank=3):
    w = torch.randn(fout, fin, dtype=torch.float64, generator=gen) / fin ** 0.5
    a = torch.randn(rank, fin, dtype=torch.float64, generator=gen).requires_grad_()
    b = torch.randn(fout, rank, dtype=torch.float64, generator=gen).requires_grad_()
    return LoRAProj(w, a, b, 0.7)


def _layers(gen, n=2):
    return [[_proj(gen, 29, 12), _proj(gen, 29, 12), _proj(gen, 12, 29)] for _ in range(n)]


@pytest.mark.parametrize("layers_per_checkpoint", [1, 2])
def test_checkpointed_mlp_replays_one_graph_per_pass(layers_per_checkpoint):
    """Per layer, one graph for the forward (without grad, and the recompute's where its output is
    read) and one for the backward, which recomputes from the input: nothing is handed from one
    replay to another, so two layers recomputed before either backward (one checkpoint around
    both, whose recompute must compute the first output) are as right as one per region."""
    gen = torch.Generator().manual_seed(0)
    layers = _layers(gen)
    idx, dense_idx = torch.tensor([1, 4, 5, 11, 20]), torch.tensor([0, 3, 3, 7])
    x = torch.randn(2, 5, 12, dtype=torch.float64, generator=gen, requires_grad=True)
    params = [x] + [t for layer in layers for p in layer for t in (p.lora_a, p.lora_b)]

    def block(h, runner, group):
        for p in group:
            h = h + sparse_lora_mlp(h, *p, idx, dense_idx, run=runner, out_in_recompute=len(group) > 1)
        return h

    def run(runner):
        h = x
        for i in range(0, len(layers), layers_per_checkpoint):
            h = checkpoint(block, h, runner, layers[i:i + layers_per_checkpoint], use_reentrant=True)
        for p in params:
            p.grad = None
        h.square().sum().backward()
        return [p.grad.clone() for p in params]

    want = run(run_eager)
    runner = CPUGraphs(capture_at=1)
    for _ in range(2):                           # capture, then replay
        for g, w in zip(run(runner), want):       # padded to 64 rows: sums in another order
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert runner.captures == 2 * 2 and len(runner._slots) == 2
    forwards = 2 if layers_per_checkpoint > 1 else 1          # per layer and step
    assert runner.replays == 2 * 2 * (forwards + 1)


@pytest.mark.parametrize("graphs", [False, True])
def test_a_recompute_without_the_output_gives_the_same_gradients(graphs, monkeypatch):
    """``out_in_recompute=False`` (the patch's choice for decoder layers ending ``residual +
    mlp(x)``): the recompute runs no forward pass at all, and every gradient stays the same."""
    from sparse_unsloth.ops import fast_mlp

    gen = torch.Generator().manual_seed(5)
    layers = _layers(gen)
    idx, dense_idx = torch.tensor([0, 3, 7, 8, 28]), torch.tensor([1, 2, 2, 6])
    x = torch.randn(2, 5, 12, dtype=torch.float64, generator=gen, requires_grad=True)
    params = [x] + [t for layer in layers for p in layer for t in (p.lora_a, p.lora_b)]
    calls = []
    forward = fast_mlp._forward
    monkeypatch.setattr(fast_mlp, "_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))

    def grads(out_in_recompute):
        runner = CPUGraphs(capture_at=1) if graphs else run_eager
        h = x
        for layer in layers:
            h = h + checkpoint(lambda t, p=layer: sparse_lora_mlp(t, *p, idx, dense_idx, run=runner,
                                                                  out_in_recompute=out_in_recompute),
                               h, use_reentrant=True)
        for p in params:
            p.grad = None
        calls.clear()
        h.square().sum().backward()
        return [p.grad.clone() for p in params], len(calls)

    (want, with_out), (got, without_out) = grads(True), grads(False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    if not graphs:        # (a capture runs a body more than once) forward passes in backward, per layer
        assert (with_out, without_out) == (2, 0)


def test_training_steps_through_the_fast_path_with_graphs_equal_eager(monkeypatch):
    """The fast path's plumbing with the graph runner (its CUDA steps replaced): the same loss and
    gradients as the eager runner over steps of three batch shapes, which share one bucket's
    graphs: captured by the second step, replayed at the third."""
    from sparse_unsloth.patch import state as state_mod
    from sparse_unsloth.patch import unsloth_fast

    sparsify_module = importlib.import_module("sparse_unsloth.patch.sparsify")
    monkeypatch.setattr(sparsify_module, "_backend", lambda _m: unsloth_fast)
    config = su.SparseConfig(mlp={0: 0.6, 1: 0.5, 2: 0.9}, estimator_rank=3)
    base = tiny_lora_model()
    models = [su.sparsify(copy.deepcopy(base), config, progress=False) for _ in range(2)]
    runner = CPUGraphs()
    eager_state, graph_state = (su.sparse_state(m) for m in models)
    for state in (eager_state, graph_state):
        state.callback_attached = True
    monkeypatch.setattr(state_mod.SparseState, "runner",
                        lambda self, t: runner if self is graph_state else state_mod.run_eager)
    monkeypatch.setattr(state_mod, "LAYER_GRAPHS", False)    # each pass through the runner (test_layer_graphs.py)
    for model in models:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
        model.train()
    gen = torch.Generator().manual_seed(2)
    captured = []
    for seq in (11, 13, 12):                          # 33, 39, 36 token rows: one bucket of 64
        ids = torch.randint(0, 101, (3, seq), generator=gen)
        labels = ids.clone()
        labels[:, :6] = -100
        results = []
        for model in models:
            model.zero_grad()
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.requires_grad}))
        (loss_e, grads_e), (loss_g, grads_g) = results
        # equal up to the order of sums over the token rows (padded to 64)
        torch.testing.assert_close(loss_g, loss_e, rtol=1e-12, atol=1e-12)
        for name, g in grads_e.items():
            torch.testing.assert_close(grads_g[name], g, rtol=1e-10, atol=1e-12, msg=name)
        captured.append(runner.captures)
    # 3 MLPs x (forward with its channel choice as prologue, backward; the recompute computes
    # nothing), captured at the second step; nothing new after, though every forward's choice is
    # a new object (the graphs are keyed by its buffer and factors)
    assert captured == [0, 3 * 2, 3 * 2] and runner.replays == 2 * captured[-1]


def test_attention_projections_through_the_runner_equal_eager():
    """QKV with trainable biases and O, forward and backward, through the runner (LoRA and bias
    gradients come out of a replay packed into one tensor)."""
    from sparse_unsloth.ops.fast_attn import sparse_lora_o, sparse_lora_qkv

    gen = torch.Generator().manual_seed(3)
    hidden, dq, dkv = 12, 12, 6
    q, k, v = (_proj(gen, c, hidden)._replace(bias=torch.randn(c, dtype=torch.float64, generator=gen)
                                              .requires_grad_()) for c in (dq, dkv, dkv))
    o = _proj(gen, hidden, dq)
    q_idx, kv_idx = torch.tensor([0, 2, 5, 6, 8, 11]), torch.tensor([1, 2, 4])
    dense_idx = torch.tensor([0, 4, 4, 9])
    params = [t for p in (q, k, v, o) for t in (p.lora_a, p.lora_b)] + [p.bias for p in (q, k, v)]
    runner = CPUGraphs()
    results = []
    for run in (run_eager, runner, runner, runner):     # eager; eager (first sighting), capture, replay
        g2 = torch.Generator().manual_seed(4)
        x = torch.randn(2, 5, hidden, dtype=torch.float64, generator=g2, requires_grad=True)
        a_in = torch.randn(2, 5, dq, dtype=torch.float64, generator=g2, requires_grad=True)
        outs = (*sparse_lora_qkv(x, q, k, v, q_idx, kv_idx, kv_idx, dense_idx, run=run),
                sparse_lora_o(a_in, o, q_idx, dense_idx, run=run))
        grads = [torch.randn(o_.shape, dtype=torch.float64, generator=g2) for o_ in outs]
        results.append([*outs, *torch.autograd.grad(outs, [x, a_in, *params], grads)])
    assert runner.captures == 4 and runner.replays == 8
    for got in results[1:]:
        for g, w in zip(got, results[0]):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
