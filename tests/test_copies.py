"""A sparse model copies, casts and pickles like an unpatched one: each copy computes with its
own weights and its own sparse state (what TRL's create_reference_model, EMA and teacher
copies, checkpoint-by-pickle and `.to()` rely on)."""

import copy
import importlib
import io

import pytest
import torch
from helpers import assert_same_grads, tiny_lora_model, token_batch, train_step

import sparse_unsloth as su
from sparse_unsloth.patch import reference, unsloth_fast
from sparse_unsloth.patch.models import decoder_layers, frozen_linear

# The fast backend's MLP runs on CPU too (Hugging Face's attention does not call apply_qkv).
CONFIGS = {reference: su.SparseConfig(mlp={0: 0.6, 2: 0.8}, self_attn={1: 0.5, 2: 0.75}, estimator_rank=3),
           unsloth_fast: su.SparseConfig(mlp={0: 0.6, 2: 0.8}, estimator_rank=3)}


@pytest.fixture(params=[reference, unsloth_fast], ids=["reference", "fast"])
def backend(request, monkeypatch):
    sparsify = importlib.import_module("sparse_unsloth.patch.sparsify")
    monkeypatch.setattr(sparsify, "_backend", lambda _m: request.param)
    return request.param


def _pair(backend=reference, dtype=torch.float64):
    """A sparse model and the unpatched model it came from (same weights)."""
    base = tiny_lora_model("llama", dtype=dtype)
    sparse = su.sparsify(copy.deepcopy(base), CONFIGS[backend], progress=False)
    su.sparse_state(sparse).callback_attached = True
    return sparse, base


def _zero_gate(model):
    for layer in decoder_layers(model):
        with torch.no_grad():
            frozen_linear(layer.mlp.gate_proj).weight.zero_()


def _sparse_like(base, sparse):
    """``base`` sparsified with ``sparse``'s estimator: what a copy of ``sparse`` must equal.

    The factors without their fingerprint: ``base``'s weights may have been changed on purpose.
    """
    state = su.sparse_state(sparse)
    factors = su.EstimatorFactors(state.factors.factors, state.factors.rank)
    model = su.sparsify(base, state.config, factors, progress=False)
    su.sparse_state(model).callback_attached = True
    return model


def test_deepcopy_computes_with_its_own_weights(backend):
    sparse, base = _pair(backend)
    ids, labels = token_batch()
    before = train_step(sparse, input_ids=ids, labels=labels)
    twin = copy.deepcopy(sparse)
    _zero_gate(twin)
    got = train_step(twin, input_ids=ids, labels=labels)
    assert not torch.equal(got[0], before[0])                          # the copy's weights count
    after = train_step(sparse, input_ids=ids, labels=labels)
    assert torch.equal(after[0], before[0])                            # the original's are untouched
    want_model = copy.deepcopy(base)
    _zero_gate(want_model)
    want = train_step(_sparse_like(want_model, sparse), input_ids=ids, labels=labels)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    assert_same_grads(got[1], want[1])
    su.unsparsify(twin)                                                # undoing the copy ...
    assert su.sparse_state(sparse) is not None                         # ... leaves the original sparse
    assert torch.equal(train_step(sparse, input_ids=ids, labels=labels)[0], before[0])


def test_to_dtype_follows_the_model(backend):
    sparse, base = _pair(backend, torch.float32)
    ids, labels = token_batch()
    sparse.to(torch.float64)
    got = train_step(sparse, input_ids=ids, labels=labels)
    assert all(g.dtype == torch.float64 for g in got[1].values())
    want = train_step(_sparse_like(base.to(torch.float64), sparse), input_ids=ids, labels=labels)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    assert_same_grads(got[1], want[1])


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_round_trip(how, backend):
    import pickle

    sparse, _ = _pair(backend)
    ids, labels = token_batch()
    want = train_step(sparse, input_ids=ids, labels=labels)
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(sparse))
    else:
        buf = io.BytesIO()
        torch.save(sparse, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
    got = train_step(loaded, input_ids=ids, labels=labels)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    assert_same_grads(got[1], want[1])
    _zero_gate(loaded)
    assert not torch.equal(train_step(loaded, input_ids=ids, labels=labels)[0], want[0])
    assert torch.equal(train_step(sparse, input_ids=ids, labels=labels)[0], want[0])


def test_state_dict_is_the_unpatched_models():
    sparse, base = _pair()
    assert sparse.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in sparse.state_dict().items())


def test_trl_create_reference_model():
    from trl.experimental.utils import create_reference_model

    sparse, base = _pair()
    ids, _ = token_batch()
    ref = create_reference_model(sparse)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    base.eval()
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, base(input_ids=ids).logits)
        _zero_gate(ref)
        sparse.eval()
        assert torch.equal(sparse(input_ids=ids).logits, base(input_ids=ids).logits)
        assert not torch.equal(ref(input_ids=ids).logits, base(input_ids=ids).logits)
