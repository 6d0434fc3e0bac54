"""A forward between a checkpointed forward and its backward must not change the recompute.

TRL's DPO/KTO reference pass does exactly that (adapters disabled, no_grad, train mode), as do
EMA or teacher forwards. Both backends, both checkpointing flavours.
"""

import copy
import importlib

import pytest
import torch
from helpers import assert_same_grads, cpu_graphs, tiny_lora_model, token_batch, train_step

import sparse_unsloth as su
from sparse_unsloth.patch import reference, unsloth_fast

sparsify_module = importlib.import_module("sparse_unsloth.patch.sparsify")
CONFIG = su.SparseConfig(mlp={0: 0.6, 2: 0.8}, self_attn={1: 0.5, 2: 0.75}, estimator_rank=3)
MLP_ONLY = su.SparseConfig(mlp={0: 0.6, 1: 0.5, 2: 0.8}, estimator_rank=3)   # HF attention skips apply_qkv


def _checkpointed(backend, config, reentrant, monkeypatch):
    model = tiny_lora_model("llama")
    model.base_model.model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    model.enable_input_require_grads()
    monkeypatch.setattr(sparsify_module, "_backend", lambda _m: backend)
    su.sparsify(model, config, progress=False)
    su.sparse_state(model).callback_attached = True
    return model


def _reference_pass(model):
    """Another batch, another shape: its split and channels differ from the training batch's."""
    ids, labels = token_batch(batch=2, seq=7, context=2, seed=9)
    with torch.no_grad(), model.disable_adapter():
        model(input_ids=ids, labels=labels)


@pytest.mark.parametrize("backend,config", [(reference, CONFIG), (unsloth_fast, MLP_ONLY)],
                         ids=["reference", "fast"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_interleaved_forward_leaves_gradients_unchanged(backend, config, reentrant, monkeypatch):
    model = _checkpointed(backend, config, reentrant, monkeypatch)
    ids, labels = token_batch()
    want_loss, want = train_step(model, input_ids=ids, labels=labels)
    dense_loss, _ = train_step(tiny_lora_model("llama"), input_ids=ids, labels=labels)
    assert abs(want_loss - dense_loss) > 1e-6                         # it ran sparse

    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    _reference_pass(model)
    loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert torch.equal(loss.detach(), want_loss)
    assert_same_grads(got, want, rtol=1e-12, atol=1e-14)


def _in_place(model, monkeypatch):
    """The fast path's indices in the shared buffers, as with CUDA graphs (their CPU stand-in)."""
    state = su.sparse_state(model)
    runner = cpu_graphs()
    monkeypatch.setattr(state, "runner", lambda _t: runner)
    return state


@pytest.mark.parametrize("backend,config,in_place", [(reference, CONFIG, False), (unsloth_fast, MLP_ONLY, False),
                                                     (unsloth_fast, MLP_ONLY, True)],
                         ids=["reference", "fast", "fast-in-place"])
@pytest.mark.parametrize("checkpointed", [True, False], ids=["checkpointed", "not-checkpointed"])
def test_two_forwards_then_one_backward(backend, config, in_place, checkpointed, monkeypatch):
    """DPO's chosen and rejected forwards, one loss: each backward uses its own forward's
    channels, though (in place) the second forward's choice took each layer's index buffer."""
    if checkpointed:
        model = _checkpointed(backend, config, False, monkeypatch)
    else:
        model = tiny_lora_model("llama")
        monkeypatch.setattr(sparsify_module, "_backend", lambda _m: backend)
        su.sparsify(model, config, progress=False)
        su.sparse_state(model).callback_attached = True
    state = _in_place(model, monkeypatch) if in_place else su.sparse_state(model)
    (a, la), (b, lb) = token_batch(seed=1), token_batch(batch=2, seq=9, context=3, seed=2)
    _, grads_a = train_step(model, input_ids=a, labels=la)
    _, grads_b = train_step(model, input_ids=b, labels=lb)
    model.zero_grad(set_to_none=True)
    loss_a = model(input_ids=a, labels=la).loss
    first = state.current
    loss_b = model(input_ids=b, labels=lb).loss
    if in_place:
        chosen = [key for key, choice in first.choices.items() if choice is not None]
        assert chosen and not first.writes          # the first forward kept copies of its indices
        assert all(first.choices[key].buffer is not state.owners[key].choices[key].buffer for key in chosen)
    (loss_a + loss_b).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert_same_grads(got, {n: grads_a[n] + grads_b[n] for n in grads_a}, rtol=1e-10, atol=1e-13)


def test_one_forward_at_a_time_keeps_the_choices_in_place(monkeypatch):
    """The usual loop (forward, backward, next forward) copies no index: each layer's choice and
    the dense rows stay in their buffers, which the CUDA graphs read in place."""
    model = _checkpointed(unsloth_fast, MLP_ONLY, False, monkeypatch)
    state = _in_place(model, monkeypatch)
    for seed in (1, 2):
        ids, labels = token_batch(seed=seed)
        train_step(model, input_ids=ids, labels=labels)
        record = state.owners[0, "mlp"]
        assert record.finished and record.writes
        for key, choice in record.choices.items():
            assert choice.buffer is state._buffers[key, choice.buffer.device]
        assert record.dense_rows is state._buffers[("dense", record.dense_rows.numel()), record.dense_rows.device]


def test_a_choice_overwritten_before_a_second_backward_is_an_error(monkeypatch):
    model = _checkpointed(unsloth_fast, MLP_ONLY, False, monkeypatch)
    _in_place(model, monkeypatch)
    (a, la), (b, lb) = token_batch(seed=1), token_batch(seed=2)
    model.train()
    loss_a = model(input_ids=a, labels=la).loss
    loss_a.backward(retain_graph=True)
    model(input_ids=b, labels=lb).loss.backward()
    with pytest.raises(RuntimeError, match="chose were overwritten by a later forward"):
        loss_a.backward()


def test_recompute_outside_the_models_outputs_is_an_error(monkeypatch):
    model = _checkpointed(reference, CONFIG, False, monkeypatch)
    ids, labels = token_batch()
    inner = {}
    handle = su.patch.models.decoder_layers(model)[2].register_forward_hook(
        lambda _m, _a, out: inner.setdefault("h", out[0] if isinstance(out, tuple) else out))
    model.train()
    model(input_ids=ids, labels=labels)
    handle.remove()
    with pytest.raises(RuntimeError, match="did not start from this model's outputs"):
        inner["h"].sum().backward()


def test_copy_keeps_its_own_records():
    model = su.sparsify(tiny_lora_model("llama"), CONFIG, progress=False)
    twin = copy.deepcopy(model)
    ids, labels = token_batch()
    model.train()
    model(input_ids=ids, labels=labels)
    assert su.sparse_state(model).current is not None
    assert su.sparse_state(twin).current is None
