"""The patched model against the definition: the dense model with dropped frozen channels masked."""

import copy

import pytest
import torch
from helpers import mask_dropped_channels, tiny_lora_model

import sparse_unsloth as su
from sparse_unsloth.ops import reference as ops
from sparse_unsloth.patch import reference as backend
from sparse_unsloth.patch.models import UnsupportedModelError

CONFIG = su.SparseConfig(mlp={0: 0.6, 2: 0.9}, self_attn={1: 0.5, 2: 0.75}, estimator_rank=3,
                         dense_output_tokens=False)


def _batch(vocab=101, batch=3, seq=11, hidden=48, seed=1, context=6):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[:, :context] = -100
    embeds = torch.randn(batch, seq, hidden, dtype=torch.float64, generator=gen)
    return embeds, labels


def _run(model, embeds, labels):
    """Loss, input grad and every LoRA grad of one training forward/backward."""
    model.train()
    model.zero_grad()
    x = embeds.clone().requires_grad_(True)
    loss = model(inputs_embeds=x, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    return loss.detach(), x.grad, grads


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_sparse_model_equals_masked_dense_model(model_type):
    base = tiny_lora_model(model_type)
    sparse = su.sparsify(copy.deepcopy(base), CONFIG, progress=False)
    su.sparse_state(sparse).callback_attached = True
    embeds, labels = _batch()
    loss, gx, grads = _run(sparse, embeds, labels)
    state = su.sparse_state(sparse)
    assert sorted(state.layers) == [0, 1, 2]
    assert len(state.current.choices[2, "mlp"].idx) == 8          # round(77 * 0.1)

    masked = copy.deepcopy(base)
    mask_dropped_channels(masked, state)
    ref_loss, ref_gx, ref_grads = _run(masked, embeds, labels)
    _, dense_gx, _ = _run(base, embeds, labels)
    assert (gx - dense_gx).abs().max() > 1e-4 * dense_gx.abs().max()   # sparsity changed something
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-9, atol=1e-10)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-10, msg=name)


def test_dense_output_tokens_follow_the_definition(monkeypatch):
    """Output rows see the full weight: compare with the per-row masked definition."""
    base = tiny_lora_model("llama")
    config = su.SparseConfig(mlp={1: 0.7}, self_attn={0: 0.5, 1: 0.5}, estimator_rank=3)
    sparse = su.sparsify(copy.deepcopy(base), config, progress=False)
    embeds, labels = _batch(seed=3, context=7)
    result = _run(sparse, embeds, labels)

    def definition(dim):
        return lambda x, w, b, idx, dense_idx: ops.masked_linear(x, w, b, idx, dense_idx, dim)

    monkeypatch.setattr(backend, "_MLP", tuple((n, definition(1 if n == "down_proj" else 0), f)
                                               for n, _, f in backend._MLP))
    monkeypatch.setattr(backend, "_ATTN", tuple((n, definition(1 if n == "o_proj" else 0), f)
                                                for n, _, f in backend._ATTN))
    ref_model = su.sparsify(copy.deepcopy(base), config, su.sparse_state(sparse).factors, progress=False)
    expected = _run(ref_model, embeds, labels)
    split = su.sparse_state(sparse).split
    assert split.dense_idx.numel() == 3 * 5                      # 4 labelled + the one predicting the first
    torch.testing.assert_close(result[0], expected[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result[1], expected[1], rtol=1e-9, atol=1e-10)
    for name, g in result[2].items():
        torch.testing.assert_close(g, expected[2][name], rtol=1e-9, atol=1e-10, msg=name)


def test_zero_sparsity_and_warmup_are_bitwise_dense():
    base = tiny_lora_model("qwen2", dtype=torch.float32)
    embeds, labels = _batch()
    embeds = embeds.float()
    dense = _run(base, embeds, labels)
    zero = su.sparsify(copy.deepcopy(base), su.SparseConfig(mlp={0: 0.0}), progress=False)
    warm = su.sparsify(copy.deepcopy(base), CONFIG, progress=False)
    su.sparse_state(warm).enabled = False                        # what the callback does in warm-up
    for model in (zero, warm):
        loss, gx, grads = _run(model, embeds, labels)
        assert torch.equal(loss, dense[0]) and torch.equal(gx, dense[1])
        assert all(torch.equal(g, dense[2][n]) for n, g in grads.items())


def test_eval_mode_is_dense_and_unsparsify_restores():
    base = tiny_lora_model("llama", dtype=torch.float32)
    embeds, labels = _batch()
    embeds = embeds.float()
    model = copy.deepcopy(base)
    su.sparsify(model, CONFIG, progress=False)
    model.eval()
    base.eval()
    with torch.no_grad():
        assert torch.equal(model(inputs_embeds=embeds).logits, base(inputs_embeds=embeds).logits)
    su.unsparsify(model)
    assert su.sparse_state(model) is None
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.equal(_run(model, embeds, labels)[0], _run(base, embeds, labels)[0])
    su.sparsify(model, CONFIG, progress=False)                   # and it can be sparsified again


def test_gradient_checkpointing_uses_the_forward_channels():
    base = tiny_lora_model("llama")
    embeds, labels = _batch()
    plain = su.sparsify(copy.deepcopy(base), CONFIG, progress=False)
    ckpt = copy.deepcopy(base)
    ckpt.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
    ckpt.enable_input_require_grads()
    su.sparsify(ckpt, CONFIG, su.sparse_state(plain).factors, progress=False)
    a, b = _run(plain, embeds, labels), _run(ckpt, embeds, labels)
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
    for name, g in a[2].items():
        torch.testing.assert_close(g, b[2][name], rtol=1e-10, atol=1e-12, msg=name)


def test_errors_name_the_problem():
    model = tiny_lora_model("llama")
    with pytest.raises(su.ConfigError, match=r"layer\(s\) \[5\].*3 decoder layers"):
        su.sparsify(model, su.SparseConfig(mlp={5: 0.5}), progress=False)
    su.sparsify(model, CONFIG, progress=False)
    with pytest.raises(RuntimeError, match="already sparsified"):
        su.sparsify(model, CONFIG, progress=False)
    with pytest.raises(su.ConfigError, match="unknown preset"):
        su.sparsify(tiny_lora_model("llama"), "no-such-preset", progress=False)
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        su.sparsify(gpt2, CONFIG, progress=False)
