"""Base-layer biases: Qwen2's q/k/v biases on the fast path, and trainable biases (PEFT's
``bias="all"``) on both paths get exactly the masked dense model's gradients."""

import copy
import importlib

import pytest
import torch
from helpers import assert_same_grads, mask_dropped_channels, tiny_lora_model, token_batch, train_step

import sparse_unsloth as su
from sparse_unsloth.ops.reference import sparse_in_linear, sparse_out_linear
from sparse_unsloth.patch import reference, unsloth_fast
from sparse_unsloth.patch.models import decoder_layers, frozen_linear

ATTN = su.SparseConfig(self_attn={0: 0.5, 2: 0.75}, mlp={1: 0.6}, estimator_rank=3)
ALL_KEPT = su.SparseConfig(self_attn=dict.fromkeys(range(3), 0.001), estimator_rank=3)   # 8 of 8 dims a head


def _fast(model, config, monkeypatch):
    monkeypatch.setattr(importlib.import_module("sparse_unsloth.patch.sparsify"), "_backend",
                        lambda _m: unsloth_fast)
    su.sparsify(model, config, progress=False)
    su.sparse_state(model).callback_attached = True
    return model


def _qkv_after_a_sparse_forward(model, layer=2, seed=5):
    """Run one training forward (it sets the split, and the layers' pre-hook installs the sparse
    functions for it), then call the sparse ``apply_qkv`` as Unsloth's attention forward does,
    on fresh inputs (Hugging Face's attention does not call it)."""
    ids, labels = token_batch()
    model.train()
    installed = []
    attn = decoder_layers(model)[layer].self_attn
    decoder_layers(model)[layer].register_forward_pre_hook(lambda m, _a: installed.append(vars(attn).get("apply_qkv")))
    model(input_ids=ids, labels=labels)
    assert installed == [unsloth_fast._apply_qkv]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*ids.shape, 48, dtype=torch.float64, generator=gen, requires_grad=True)
    return attn, x


def test_fast_qkv_keeps_qwen2_biases(monkeypatch):
    model = _fast(tiny_lora_model("qwen2"), ALL_KEPT, monkeypatch)
    attn, x = _qkv_after_a_sparse_forward(model)
    assert frozen_linear(attn.q_proj).bias.abs().sum() > 1
    for got, proj in zip(unsloth_fast._apply_qkv(attn, x), (attn.q_proj, attn.k_proj, attn.v_proj)):
        torch.testing.assert_close(got, proj(x), rtol=1e-12, atol=1e-12)      # PEFT's dense layer


@pytest.mark.parametrize("lora_bias", ["none", "all"])
def test_fast_attention_functions_match_reference_ops_with_biases(lora_bias, monkeypatch):
    model = _fast(tiny_lora_model("qwen2", lora_bias=lora_bias), ATTN, monkeypatch)
    attn, x = _qkv_after_a_sparse_forward(model)
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    q, k, v = unsloth_fast._apply_qkv(attn, x)
    o = unsloth_fast._apply_o(attn, q)
    state = su.sparse_state(model)
    choice, dense_idx = state.current.choices[2, "attn"], state.split.dense_idx
    x2, q2 = x.reshape(-1, 48), q.reshape(-1, q.shape[-1])

    def lora(proj, t):
        return proj.scaling["default"] * proj.lora_B["default"](proj.lora_A["default"](t))

    want = [sparse_out_linear(x2, frozen_linear(p).weight, frozen_linear(p).bias, idx, dense_idx) + lora(p, x2)
            for p, idx in zip(projs, (choice.q_idx, choice.k_idx, choice.v_idx))]
    want_o = sparse_in_linear(q2, frozen_linear(attn.o_proj).weight, None, choice.o_idx, dense_idx) + \
        lora(attn.o_proj, q2)
    for got, ref in zip((q, k, v, o), (*want, want_o)):
        torch.testing.assert_close(got.reshape(ref.shape), ref, rtol=1e-10, atol=1e-10)
    biases = [frozen_linear(p).bias for p in projs]
    if lora_bias == "all":
        # The ops' backward takes the channels from the record of the backward in flight, which a
        # backward from the model's outputs names; this one starts from the ops' own outputs.
        record = state.current
        monkeypatch.setattr(state, "record_for_call", lambda: record)
        got_g = torch.autograd.grad((q.sum() + k.square().sum() + v.sum() + o.square().sum()), biases,
                                    retain_graph=True)
        ref_o = sparse_in_linear(want[0], frozen_linear(attn.o_proj).weight, None, choice.o_idx, dense_idx) + \
            lora(attn.o_proj, want[0])
        ref_g = torch.autograd.grad(want[0].sum() + want[1].square().sum() + want[2].sum()
                                    + ref_o.square().sum(), biases)
        for g, r in zip(got_g, ref_g):
            assert r.abs().sum() > 0
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    else:
        assert not any(b.requires_grad for b in biases)


@pytest.mark.parametrize("backend", [reference, unsloth_fast], ids=["reference", "fast"])
def test_trainable_biases_get_the_masked_models_gradients(backend, monkeypatch):
    """bias="all": every base bias trains; sparse layers' biases exactly like the masked model's."""
    base = tiny_lora_model("qwen2", lora_bias="all")
    # every row sparse: the masked dense model is then the whole definition
    config = (su.SparseConfig(self_attn={0: 0.5, 2: 0.75}, mlp={1: 0.6}, estimator_rank=3, dense_output_tokens=False)
              if backend is reference else
              su.SparseConfig(mlp={0: 0.6, 2: 0.8}, estimator_rank=3, dense_output_tokens=False))
    monkeypatch.setattr(importlib.import_module("sparse_unsloth.patch.sparsify"), "_backend",
                        lambda _m: backend)
    sparse = su.sparsify(copy.deepcopy(base), config, progress=False)
    su.sparse_state(sparse).callback_attached = True
    ids, labels = token_batch()
    loss, grads = train_step(sparse, input_ids=ids, labels=labels)
    bias_grads = {n: g for n, g in grads.items() if n.endswith(".bias")}
    assert len(bias_grads) == 3 * 3 and all(g is not None for g in bias_grads.values())   # q/k/v, 3 layers
    masked = copy.deepcopy(base)
    mask_dropped_channels(masked, su.sparse_state(sparse))
    want_loss, want = train_step(masked, input_ids=ids, labels=labels)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-10)
    assert_same_grads(grads, want)


@pytest.mark.parametrize("backend", ["reference", "unsloth_fast"])
def test_attention_channels_count_the_projections_biases(backend, monkeypatch):
    """Qwen2's k biases reach 150 in its first layers: a dim they dominate is among the attention's
    largest whatever the input, so the estimate of ``x W^T`` alone would drop it. Here dim 3 of
    every head has no weight at all (its estimate is 0) and a large q and k bias: it is kept."""
    model = tiny_lora_model("qwen2")
    if backend == "unsloth_fast":
        _fast(model, su.SparseConfig(self_attn={2: 0.75}, estimator_rank=3), monkeypatch)
    attn = decoder_layers(model)[2].self_attn
    head_dim = 48 // 6
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj):
            linear = frozen_linear(proj)
            linear.weight.view(-1, head_dim, 48)[:, 3] = 0
            linear.bias.view(-1, head_dim)[:, 3] = 40.0
    if backend == "reference":
        su.sparsify(model, su.SparseConfig(self_attn={2: 0.75}, estimator_rank=3), progress=False)
        su.sparse_state(model).callback_attached = True
        ids, labels = token_batch()
        model.train()
        model(input_ids=ids, labels=labels)
    else:                   # the choice is made where Unsloth's attention calls apply_qkv
        unsloth_fast._apply_qkv(*_qkv_after_a_sparse_forward(model))
    choice = su.sparse_state(model).current.choices[2, "attn"]
    assert choice.k_idx.numel() == 2 * 2                       # 2 of 8 dims of each of 2 KV heads
    assert set((choice.k_idx % head_dim).tolist()) >= {3}
    assert set((choice.q_idx % head_dim).tolist()) >= {3}
