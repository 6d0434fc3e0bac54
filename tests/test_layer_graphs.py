"""A sparse decoder layer's no-grad forward, and its recompute with its backward, each replayed as
one graph (patch/layer_graphs.py), on the CPU.

The graphs are tapes of the aten ops their capture ran (helpers.cpu_graphs): a replay runs
those ops and no Python, as a CUDA graph does, so a side effect the layer graph does not redo
before a replay, or a per-forward tensor read inside the capture, shows as different gradients,
a choice made again in backward, or different statistics.
"""

import contextlib
import copy
import dataclasses
import importlib

import pytest
import torch
from helpers import assert_same_grads, cpu_graphs, tiny_lora_model, token_batch, train_step

import sparse_unsloth as su
from sparse_unsloth.patch import unsloth_fast
from sparse_unsloth.patch.layer_graphs import LayerGraph, _layout

sparsify_module = importlib.import_module("sparse_unsloth.patch.sparsify")
MLP_ONLY = su.SparseConfig(mlp={0: 0.6, 1: 0.5, 2: 0.8}, estimator_rank=3)   # HF attention skips apply_qkv


def _pair(monkeypatch, config=MLP_ONLY, reentrant=True, dtype=torch.float64):
    """Two copies of one checkpointed sparse model on the fast path, their indices in place as with
    CUDA graphs: the first with layer graphs, the second pass by pass."""
    base = tiny_lora_model("llama", dtype=dtype)
    base.base_model.model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    base.enable_input_require_grads()
    monkeypatch.setattr(sparsify_module, "_backend", lambda _m: unsloth_fast)
    models = [su.sparsify(copy.deepcopy(base), config, progress=False) for _ in range(2)]
    layered, plain = (su.sparse_state(m) for m in models)
    for state in (layered, plain):
        state.callback_attached = True
        runner = cpu_graphs()
        monkeypatch.setattr(state, "runner", lambda _t, runner=runner: runner)
    layered._layer_graphs = cpu_graphs(tape=True, max_buckets=layered._layer_graphs.max_buckets)
    monkeypatch.setattr(plain, "layer_runner", lambda _t: None)
    return models, layered


def _stats(models):
    """Each model's statistics since the last call, but the graph captures (they differ by design)."""
    found = [su.sparse_state(m).pop_stats() for m in models]
    for stats in found:
        stats.pop("sparse/graph_captures", None)
    return found


def _steps_equal(models, seed: int, warns_at: int, match: str) -> None:
    """Three training steps of both models, the one at ``warns_at`` warning ``match``: each gives
    the pass-by-pass model's loss, gradients and statistics."""
    for step in range(3):
        ids, labels = token_batch(seed=seed + step)
        with pytest.warns(UserWarning, match=match) if step == warns_at else contextlib.nullcontext():
            (loss, grads), (want_loss, want) = (train_step(m, input_ids=ids, labels=labels) for m in models)
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
        assert_same_grads(grads, want, rtol=1e-10, atol=1e-12)
        stats, want_stats = _stats(models)
        assert stats == want_stats


@pytest.mark.parametrize("dense_rows", [True, False], ids=["output-tokens-dense", "all-sparse"])
def test_checkpointed_steps_with_layer_graphs_equal_the_passes(dense_rows, monkeypatch):
    """Steps of one shape, their label splits, tokens and so channels differing: the first runs
    pass by pass (a shape seen once), the second captures each layer's forward, and its backward at
    once, and replays them, the rest replay; every step gives the pass-by-pass step's loss,
    gradients and statistics, and no choice is made in backward."""
    models, layered = _pair(monkeypatch, dataclasses.replace(MLP_ONLY, dense_output_tokens=dense_rows))
    bodies = []
    body = LayerGraph.body
    monkeypatch.setattr(LayerGraph, "body", lambda self, *a: bodies.append(self) or body(self, *a))
    for step, context in enumerate((6, 4, 8, 5)):
        ids, labels = token_batch(seed=10 + step, context=context)
        (loss, grads), (want_loss, want) = (train_step(m, input_ids=ids, labels=labels) for m in models)
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
        assert_same_grads(grads, want, rtol=1e-10, atol=1e-12)
        stats, want_stats = _stats(models)
        assert stats == want_stats and stats["sparse/active"] == 1.0
        assert layered.stats["estimator_s"] == 0.0         # no choice was made again in backward
        if step == 0:                                       # no layer's body ran
            assert layered._layer_graphs.captures == 0 and bodies == []
    # A forward and a backward graph per sparse layer, captured at the second step, replayed since
    assert layered._layer_graphs.captures == 2 * 3
    assert layered._layer_graphs.replays == 2 * 3 * 3
    assert layered.captures_by_function() == {"layer layer_graphs._backward_body": 3,
                                                "layer layer_graphs._forward_body": 3}
    for model in models:                                       # a forward that no backward recomputes
        model(input_ids=ids, labels=labels)
    stats, want_stats = _stats(models)
    assert stats == want_stats and stats["sparse/active"] == 1.0 and layered._layer_graphs.replays == 7 * 3
    dense_loss, _ = train_step(tiny_lora_model("llama"), input_ids=ids, labels=labels)
    assert abs(loss - dense_loss) > 1e-6                        # it ran sparse


def test_two_forwards_then_one_backward_through_layer_graphs(monkeypatch):
    """DPO's chosen and rejected forwards replayed, one loss: the second forward's choices take each
    layer's buffer, the first keeps copies (made before the replay that overwrites the buffer)."""
    models, layered = _pair(monkeypatch)
    model = models[0]
    a, la = token_batch(seed=1)
    b, lb = token_batch(seed=2, context=3)
    for _ in range(2):                              # body, then captured: the next forwards replay
        train_step(model, input_ids=a, labels=la)
    _, grads_a = train_step(model, input_ids=a, labels=la)
    _, grads_b = train_step(model, input_ids=b, labels=lb)
    replays = layered._layer_graphs.replays
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=a, labels=la).loss + model(input_ids=b, labels=lb).loss
    loss.backward()
    assert layered._layer_graphs.replays >= replays + 2 * 3        # the forwards; the first backward holds copies
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert_same_grads(got, {n: grads_a[n] + grads_b[n] for n in grads_a}, rtol=1e-10, atol=1e-13)


def test_only_sparse_no_grad_forwards_take_the_layer_graphs(monkeypatch):
    """Without checkpointing the forward keeps its graph (autograd), so layers run pass by pass; a
    patched layer's forward is a LayerGraph, and unsparsify puts the layer's own back."""
    models, layered = _pair(monkeypatch)
    model = models[0]
    model.base_model.model.gradient_checkpointing_disable()
    ids, labels = token_batch()
    for _ in range(3):
        train_step(model, input_ids=ids, labels=labels)
    assert layered._layer_graphs.captures == 0 and len(layered._layer_graphs._seen) == 0
    layers = model.base_model.model.model.layers
    assert all(isinstance(layer.__dict__["forward"], LayerGraph) for layer in layers)
    su.unsparsify(model)
    assert all("forward" not in layer.__dict__ for layer in layers)


def test_a_layer_graph_that_cannot_be_captured_leaves_the_layers_pass_by_pass(monkeypatch):
    """A capture that CUDA refuses (a host sync in some version of Unsloth's block, say) is a
    warning, not a stopped training: that forward and the later ones run pass by pass, with the
    pass-by-pass step's results."""
    models, layered = _pair(monkeypatch)
    runner = layered._layer_graphs

    def refused(body, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runner, "_record", refused)
    _steps_equal(models, seed=20, warns_at=1, match="could not be captured as one CUDA graph")
    assert runner.captures == 0 and "operation not permitted" in layered.layer_graphs_failed
    assert layered.layer_runner(token_batch()[0]) is None


def test_a_copy_of_the_votes_inside_a_layer_graph_is_an_error(monkeypatch):
    """The vote rows are placed before a layer graph runs; a copy asked for inside one would be
    taped with this forward's tensors and read at every replay, so it is refused."""
    _, layered = _pair(monkeypatch)
    ids, labels = token_batch()
    layered.begin_batch(labels, ids.shape, ids.device, training=True)
    record = layered.current
    layered.place_inputs(record, torch.float64)
    votes, sequences = layered.vote_inputs(record, torch.float64)
    assert torch.equal(votes, record.split.vote_rows) and votes is not record.split.vote_rows
    assert torch.equal(sequences, record.split.sequence_matrix(torch.float64))
    layered.in_layer_graph = True
    with pytest.raises(RuntimeError, match="would copy this forward's"):
        layered.vote_inputs(record, torch.float32)


def test_unsparsify_puts_back_an_instance_forward_the_layer_had(monkeypatch):
    model = tiny_lora_model("llama")
    layers = model.base_model.model.model.layers
    own = layers[0].forward
    layers[0].__dict__["forward"] = own            # as accelerate's hooks leave it
    monkeypatch.setattr(sparsify_module, "_backend", lambda _m: unsloth_fast)
    su.sparsify(model, MLP_ONLY, progress=False)
    assert isinstance(layers[0].__dict__["forward"], LayerGraph) and layers[0].__dict__["forward"].original is own
    su.unsparsify(model)
    assert layers[0].__dict__["forward"] is own and "forward" not in layers[1].__dict__


def test_a_backward_graph_that_cannot_be_captured_is_run_as_its_body(monkeypatch):
    """The forward graphs captured, the backward's refused: that backward runs its body (recompute
    and backward, pass by pass) with the same gradients; after it the forwards still replay their
    graphs and the backwards run pass by pass."""
    from sparse_unsloth.ops.graphs import CaptureFailed
    from sparse_unsloth.patch import layer_graphs

    models, layered = _pair(monkeypatch)
    runner = layered._layer_graphs
    capture = runner._capture

    def refused(slot, fn, *args, **kwargs):
        if fn is layer_graphs._backward_body:
            raise CaptureFailed("capturing _backward_body failed: a host sync")
        return capture(slot, fn, *args, **kwargs)

    monkeypatch.setattr(runner, "_capture", refused)
    for step in range(3):
        ids, labels = token_batch(seed=30 + step)
        (loss, grads), (want_loss, want) = (train_step(m, input_ids=ids, labels=labels) for m in models)
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
        assert_same_grads(grads, want, rtol=1e-10, atol=1e-12)
    assert runner.captures == 3 and runner.replays == 2 * 3
    assert "host sync" in layered.backward_graphs_failed and layered.layer_graphs_failed is None


def test_a_tensor_argument_on_another_device_keeps_the_layer_pass_by_pass():
    """What a layer reads of a host tensor at capture (a packed batch's lengths, say) would stay in
    its graph as it was then: such a call has no layout, so the layer runs pass by pass."""
    hidden = torch.zeros(2, 5, 4)
    inputs, consts = [hidden], []
    assert _layout(torch.zeros(2, 5, dtype=torch.long), hidden, inputs, consts) == ("input", 1)
    assert _layout((torch.zeros(3, device="meta"), 1), hidden, inputs, consts) is None
    assert len(inputs) == 2 and consts == []


@pytest.mark.parametrize("reads,captures", [("packed", 0), ("window-8", 0), ("window-11", 2 * 3)])
def test_a_layer_reading_unsloths_caches_runs_pass_by_pass(reads, captures, monkeypatch):
    """Unsloth's attention keeps, outside the layer's arguments, a padding-free batch's sequence
    boundaries (from ``packed_seq_lengths``) and the mask of a sliding window shorter than the
    sequence (11 tokens here); a graph would read them where its capture found them (a replay then
    attends within the captured batch's boundaries: gpu_tests/28). Such calls run pass by pass,
    silently, with the pass-by-pass step's results; a window the sequence fits in changes nothing."""
    models, layered = _pair(monkeypatch)
    lengths = torch.tensor([3, 5])
    for layer in models[0].base_model.model.model.layers:
        if reads == "packed":
            graph = layer.__dict__["forward"]
            layer.__dict__["forward"] = lambda *a, graph=graph, **k: graph(*a, **k, packed_seq_lengths=lengths)
        else:
            layer.self_attn.config.sliding_window = int(reads.split("-")[1])
    for step in range(3):                                   # a shape's first sighting, then capture, replay
        ids, labels = token_batch(seed=50 + step)
        lengths.copy_(torch.tensor([2 + step, 6 - step]))
        (loss, grads), (want_loss, want) = (train_step(m, input_ids=ids, labels=labels) for m in models)
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
        assert_same_grads(grads, want, rtol=1e-10, atol=1e-12)
    assert layered._layer_graphs.captures == captures


def test_a_layer_argument_a_graph_cannot_take_is_a_warning_and_runs_pass_by_pass(monkeypatch):
    """An argument that is neither a tensor on the hidden states' device nor a plain value cannot be
    copied into a graph or key it: a warning says so, and those forwards run pass by pass, with
    the pass-by-pass step's results."""
    models, layered = _pair(monkeypatch)
    for layer in models[0].base_model.model.model.layers:
        graph = layer.__dict__["forward"]
        layer.__dict__["forward"] = lambda *a, graph=graph, **k: graph(*a, **k, opaque=object())
    _steps_equal(models, seed=40, warns_at=0, match="its CUDA graph cannot take")
    assert layered._layer_graphs.captures == 0 and len(layered._layer_graphs._seen) == 0


def test_the_backward_graph_recomputes_under_the_forwards_autocast(monkeypatch):
    """Hugging Face's reentrant checkpoint recomputes a layer under the forward's autocast but runs
    the layer's backward outside it; the backward graph recomputes inside that backward, so it
    must enter the forward's autocast itself, or its recompute computes in another precision."""
    models, layered = _pair(monkeypatch, dtype=torch.bfloat16)
    for model in models:                    # as Unsloth's: 16-bit frozen weights, float32 adapters
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
    for seed in range(20, 23):                              # first sighting, capture, replay
        ids, labels = token_batch(seed=seed)
        (loss, grads), (want_loss, want) = (train_step(m, autocast="cpu", input_ids=ids, labels=labels)
                                            for m in models)
        torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
        assert_same_grads(grads, want, rtol=0, atol=0)
    assert layered._layer_graphs.captures == 2 * 3


def test_a_layer_with_dropout_runs_pass_by_pass(monkeypatch):
    """A checkpoint recomputes a layer's dropout masks from the forward's random state; a graph's
    recompute inside the backward could not: a layer that draws dropout warns and runs pass by
    pass, with the pass-by-pass model's gradients."""
    models, layered = _pair(monkeypatch)
    for model in models:
        for layer in model.base_model.model.model.layers:
            layer.self_attn.attention_dropout = 0.3
    for seed in range(30, 33):
        ids, labels = token_batch(seed=seed)
        torch.manual_seed(seed)
        if seed == 30:
            with pytest.warns(UserWarning, match="dropout"):
                loss, grads = train_step(models[0], input_ids=ids, labels=labels)
        else:
            loss, grads = train_step(models[0], input_ids=ids, labels=labels)
        torch.manual_seed(seed)
        want_loss, want = train_step(models[1], input_ids=ids, labels=labels)
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
        assert_same_grads(grads, want, rtol=1e-10, atol=1e-12)
    assert layered._layer_graphs.captures == 0
