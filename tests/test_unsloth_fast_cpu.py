"""The Unsloth fast backend's plumbing on the CPU (its ops run anywhere; Unsloth's kernels don't).

Unsloth binds its fused functions only on a GPU, so here the backend patches a plain PEFT
model: the MLP through ``mlp.forward`` (which Hugging Face's decoder layer calls too), the
attention's ``apply_qkv`` / ``apply_o`` called directly, as Unsloth's attention forward does.
"""

import copy
import importlib

import pytest
import torch
from helpers import tiny_lora_model

import sparse_unsloth as su
from sparse_unsloth.ops.reference import sparse_in_linear, sparse_out_linear
from sparse_unsloth.patch import unsloth_fast
from sparse_unsloth.patch.models import decoder_layers, frozen_linear

sparsify_module = importlib.import_module("sparse_unsloth.patch.sparsify")
MLP_ONLY = su.SparseConfig(mlp={0: 0.6, 2: 0.9}, estimator_rank=3)
WITH_ATTN = su.SparseConfig(mlp={1: 0.5}, self_attn={1: 0.5, 2: 0.75}, estimator_rank=3)


def _batch(vocab=101, batch=3, seq=11, seed=1, context=6):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[:, :context] = -100
    return ids, labels


def _sparsify(model, config, backend, monkeypatch):
    monkeypatch.setattr(sparsify_module, "_backend", lambda _m: backend)
    model = su.sparsify(model, config, progress=False)
    su.sparse_state(model).callback_attached = True
    return model


def _run(model, ids, labels):
    model.train()
    model.zero_grad()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_mlp_matches_reference_backend(monkeypatch):
    base = tiny_lora_model()
    ids, labels = _batch()
    fast = _sparsify(copy.deepcopy(base), MLP_ONLY, unsloth_fast, monkeypatch)
    ref = _sparsify(copy.deepcopy(base), MLP_ONLY, su.patch.reference, monkeypatch)
    loss, grads = _run(fast, ids, labels)
    ref_loss, ref_grads = _run(ref, ids, labels)
    dense_loss, _ = _run(base, ids, labels)
    assert abs(loss - dense_loss) > 1e-8                 # sparsity changed something
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointed_mlp_matches_reference_backend(reentrant, monkeypatch):
    """With gradient checkpointing the fast MLP's recompute skips its down product (the layer
    only adds the output to its residual); the gradients stay the reference path's."""
    base = tiny_lora_model()
    ids, labels = _batch()
    models = []
    for backend in (unsloth_fast, su.patch.reference):
        model = copy.deepcopy(base)
        model.base_model.model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        model.enable_input_require_grads()
        models.append(_sparsify(model, MLP_ONLY, backend, monkeypatch))
    (loss, grads), (ref_loss, ref_grads) = (_run(m, ids, labels) for m in models)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-10, msg=name)


def test_attention_functions_match_reference_ops(monkeypatch):
    model = _sparsify(tiny_lora_model(), WITH_ATTN, unsloth_fast, monkeypatch)
    ids, labels = _batch()
    _run(model, ids, labels)          # sets this batch's split; the pre-hook filed the layers for the ops
    layer = decoder_layers(model)[2]
    attn = layer.self_attn
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(*ids.shape, 48, dtype=torch.float64, generator=gen, requires_grad=True)
    q, k, v = unsloth_fast._apply_qkv(attn, x)
    state = su.sparse_state(model)
    choice = state.layers[2].choose_now("attn", x, state.current)
    dense_idx = su.sparse_state(model).split.dense_idx
    x2 = x.reshape(-1, 48)
    for out, name, idx in ((q, "q_proj", choice.q_idx), (k, "k_proj", choice.k_idx), (v, "v_proj", choice.v_idx)):
        proj = getattr(attn, name)
        want = sparse_out_linear(x2, frozen_linear(proj).weight, None, idx, dense_idx) + \
            proj.scaling["default"] * proj.lora_B["default"](proj.lora_A["default"](x2))
        torch.testing.assert_close(out.reshape(-1, out.shape[-1]), want, rtol=1e-10, atol=1e-10)
    o = unsloth_fast._apply_o(attn, q)
    proj = attn.o_proj
    q2 = q.reshape(-1, q.shape[-1])
    want = sparse_in_linear(q2, frozen_linear(proj).weight, None, choice.o_idx, dense_idx) + \
        proj.scaling["default"] * proj.lora_B["default"](proj.lora_A["default"](q2))
    torch.testing.assert_close(o.reshape(-1, o.shape[-1]), want, rtol=1e-10, atol=1e-10)


def test_inactive_and_undo_restore_originals(monkeypatch):
    base = tiny_lora_model()
    layer = decoder_layers(base)[1]
    sentinel = layer.self_attn.apply_qkv = lambda self, x: None   # stands in for Unsloth's function
    model = _sparsify(base, WITH_ATTN, unsloth_fast, monkeypatch)
    seen = []                       # what the layer's own forward finds (this hook runs after Flip)
    layer.register_forward_pre_hook(lambda m, _a: seen.append((m.self_attn.apply_qkv, m.mlp.forward.__func__)))
    ids, labels = _batch()
    _run(model, ids, labels)
    assert seen == [(unsloth_fast._apply_qkv, unsloth_fast._mlp_forward)]
    assert layer.self_attn.apply_qkv is sentinel and "forward" not in layer.mlp.__dict__   # back after the call
    seen.clear()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert layer.self_attn.apply_qkv is sentinel
    assert "forward" not in layer.mlp.__dict__ and "apply_o" not in layer.self_attn.__dict__
    su.unsparsify(model)
    assert layer.self_attn.apply_qkv is sentinel
    assert not any(k.startswith("_sparse_unsloth") for k in layer.self_attn.__dict__)
    assert len(layer._forward_pre_hooks) == 1 and not layer._forward_hooks     # only the test's own


def test_applies_needs_unsloth_and_cuda():
    assert not unsloth_fast.applies(tiny_lora_model())


def test_dropout_refused(monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = tiny_lora_model().merge_and_unload()
    model = get_peft_model(model, LoraConfig(r=2, lora_dropout=0.1, target_modules=["gate_proj", "up_proj",
                                                                                   "down_proj"]))
    with pytest.raises(ValueError, match="lora_dropout=0"):
        _sparsify(model, MLP_ONLY, unsloth_fast, monkeypatch)
    assert su.sparse_state(model) is None                # nothing left patched
    assert not any(m._forward_pre_hooks or "forward" in vars(m) for m in model.modules())


def test_padding_free_batch_matches_reference_backend(monkeypatch):
    """A padding-free batch: one flattened row, output tokens scattered through it."""
    base = tiny_lora_model()
    ids, labels = _batch()
    ids, labels = ids.reshape(1, -1), labels.reshape(1, -1)
    # MLP only: Hugging Face's attention does not call apply_qkv / apply_o
    fast = _sparsify(copy.deepcopy(base), MLP_ONLY, unsloth_fast, monkeypatch)
    ref = _sparsify(copy.deepcopy(base), MLP_ONLY, su.patch.reference, monkeypatch)
    loss, grads = _run(fast, ids, labels)
    ref_loss, ref_grads = _run(ref, ids, labels)
    assert su.sparse_state(fast).split.dense_idx.numel() == 3 * 6     # 5 labels + the shift, 3 rows
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-10, msg=name)


def test_unsloth_fused_model_the_fast_path_cannot_take_is_refused(monkeypatch):
    """Unsloth's fused functions bypass the base linears: the reference backend would train dense."""
    import sys
    import types

    fake = types.ModuleType("unsloth.kernels.fast_lora")
    fake.apply_lora_mlp_swiglu = lambda self, x: x
    fake.apply_lora_qkv = fake.apply_lora_o = lambda self, x: x
    monkeypatch.setitem(sys.modules, "unsloth.kernels.fast_lora", fake)
    model = tiny_lora_model()
    for layer in decoder_layers(model):
        layer.mlp.forward = types.MethodType(fake.apply_lora_mlp_swiglu, layer.mlp)
    assert unsloth_fast.fused(model) and not unsloth_fast.applies(model)   # CPU weights
    with pytest.raises(NotImplementedError, match="needs 16-bit or bitsandbytes 4-bit base weights on a CUDA GPU"):
        su.sparsify(model, MLP_ONLY, progress=False)
    assert su.sparse_state(model) is None


def test_what_the_fast_path_cannot_take_is_refused_by_name(monkeypatch):
    """MLP biases and trainable base weights: refused at sparsify, not trained wrong."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=48, intermediate_size=77, num_attention_heads=6,
                                  num_key_value_heads=2, num_hidden_layers=3, vocab_size=101, mlp_bias=True)
    biased = get_peft_model(AutoModelForCausalLM.from_config(config),
                            LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj"]))
    with pytest.raises(ValueError, match="mlp_bias=True"):
        _sparsify(biased, MLP_ONLY, unsloth_fast, monkeypatch)
    assert su.sparse_state(biased) is None
    trainable = tiny_lora_model()
    frozen_linear(decoder_layers(trainable)[0].mlp.up_proj).weight.requires_grad_(True)
    with pytest.raises(ValueError, match="base weight .* is trainable"):
        _sparsify(trainable, MLP_ONLY, unsloth_fast, monkeypatch)
    assert su.sparse_state(trainable) is None


def test_the_removed_mode_variable_is_refused(monkeypatch):
    monkeypatch.setenv("SPARSE_UNSLOTH_MODE", "eager-block")
    with pytest.raises(ValueError, match="SPARSE_UNSLOTH_MODE is set, but the execution modes were removed"):
        _sparsify(tiny_lora_model(), MLP_ONLY, unsloth_fast, monkeypatch)


def test_a_checkpoint_around_several_layers_is_an_error(monkeypatch):
    """The patched MLP's recompute skips its output, which per-layer checkpointing never reads; a
    checkpoint around several layers would feed it to the next layer, so it is refused."""
    from torch.utils.checkpoint import checkpoint

    model = _sparsify(tiny_lora_model(), MLP_ONLY, unsloth_fast, monkeypatch)
    model.train()
    ids, labels = _batch()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss, grads = _run(model, ids, labels)                  # one layer per region: fine
    model.gradient_checkpointing_disable()
    plain_loss, plain_grads = _run(model, ids, labels)
    torch.testing.assert_close(plain_loss, loss, rtol=1e-12, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(plain_grads[name], g, rtol=1e-9, atol=1e-11, msg=name)
    whole = checkpoint(lambda: model(input_ids=ids, labels=labels).loss, use_reentrant=False)
    with pytest.raises(RuntimeError, match="spans several decoder layers"):
        whole.backward()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.testing.assert_close(_run(model, ids, labels)[0], loss, rtol=1e-12, atol=1e-12)   # trains on


def test_sparse_mlp_traces_into_a_compiled_decoder_layer(monkeypatch):
    """The sparse MLP is a torch op: inside a compiled decoder layer (as Unsloth compiles each
    block: the class's forward, hooks outside) it adds no graph break, and the compiled training
    step (checkpointed per layer, so each MLP also runs inside a recompute) gives the eager
    step's loss and gradients."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from sparse_unsloth.ops import fast_mlp

    base = tiny_lora_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    base.enable_input_require_grads()
    ids, labels = _batch()
    eager = _sparsify(copy.deepcopy(base), MLP_ONLY, unsloth_fast, monkeypatch)
    compiled = _sparsify(copy.deepcopy(base), MLP_ONLY, unsloth_fast, monkeypatch)
    want_loss, want = _run(eager, ids, labels)
    passes = []
    forward = fast_mlp._forward
    monkeypatch.setattr(fast_mlp, "_forward", lambda *a, **k: passes.append(1) or forward(*a, **k))
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(LlamaDecoderLayer, "forward", torch.compile(LlamaDecoderLayer.forward, backend="aot_eager"))
    for _ in range(2):
        loss, grads = _run(compiled, ids, labels)
        torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-10)
        for name, g in want.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-10, msg=name)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    # One graph per grad mode for the sparse layers and one for the dense layer: the second sparse
    # layer reuses the first one's (Dynamo guards on our shared function, not a per-layer object).
    assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])
    assert len(passes) == 2 * 2           # two sparse MLPs a step, forward only (the recompute runs none)
    torch._dynamo.reset()


@pytest.mark.parametrize("lora_bias", ["none", "all"])
def test_attention_ops_backward_equals_the_ops_functions(lora_bias, monkeypatch):
    """The attention ops' gradients (x, every LoRA factor, Qwen2's q/k/v biases when trainable)
    are those of ``ops.fast_attn``'s autograd Functions on the same channels and rows."""
    from sparse_unsloth.ops.fast_attn import sparse_lora_o, sparse_lora_qkv

    model = _sparsify(tiny_lora_model("qwen2", lora_bias=lora_bias), WITH_ATTN, unsloth_fast, monkeypatch)
    ids, labels = _batch()
    _run(model, ids, labels)                              # this batch's split and channels; flips layers
    state = su.sparse_state(model)
    record = state.current
    monkeypatch.setattr(state, "record_for_call", lambda: record)     # a backward from the model's outputs
    attn = decoder_layers(model)[2].self_attn
    dense_idx = record.split.dense_rows
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(*ids.shape, 48, dtype=torch.float64, generator=gen, requires_grad=True)
    projs = [getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    params = [x] + [t for p in projs for t in (p.lora_A["default"].weight, p.lora_B["default"].weight)]
    params += [frozen_linear(p).bias for p in projs[:3] if frozen_linear(p).bias.requires_grad]
    assert len(params) == (12 if lora_bias == "all" else 9)

    def loss(q, k, v, o):
        return sum((t * (i + 1)).square().sum() for i, t in enumerate((q, k, v, o)))

    def through_ops(x):
        q, k, v = unsloth_fast._apply_qkv(attn, x)
        return loss(q, k, v, unsloth_fast._apply_o(attn, q))

    got = torch.autograd.grad(through_ops(x), params)       # (chooses this layer's channels)
    # Traced whole, as inside Unsloth's compiled block: fullgraph fails at any graph break.
    compiled = torch.autograd.grad(torch.compile(through_ops, backend="aot_eager", fullgraph=True)(x), params)
    choice = record.choices[2, "attn"]
    lora = [unsloth_fast._lora(p) for p in projs]
    q, k, v = sparse_lora_qkv(x, *lora[:3], choice.q_idx, choice.k_idx, choice.v_idx, dense_idx)
    want = torch.autograd.grad(loss(q, k, v, sparse_lora_o(q, lora[3], choice.o_idx, dense_idx)), params)
    for g, c, w in zip(got, compiled, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c, w, rtol=1e-12, atol=1e-12)


def test_the_projection_lookup_follows_peft_adapter_state():
    """``_lora`` (read from the module registries, for host time) gives what PEFT's own accessors
    give: the active adapter's factors and scale and the base weight and bias, another adapter
    after ``set_adapter``, and None while adapters are disabled or merged."""
    from peft import LoraConfig

    model = tiny_lora_model(model_type="qwen2")        # q/k/v base biases
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"]))
    q = decoder_layers(model)[0].self_attn.q_proj
    assert frozen_linear(q) is q.get_base_layer()
    for name in ("default", "other"):
        model.set_adapter(name)
        got = unsloth_fast._lora(q)
        assert got.weight is q.get_base_layer().weight and got.bias is q.get_base_layer().bias
        assert got.lora_a is q.lora_A[name].weight and got.lora_b is q.lora_B[name].weight
        assert got.scale == q.scaling[name]
    model.set_adapter("default")
    with model.disable_adapter():
        assert unsloth_fast._lora(q) is None
    q.merge()
    assert unsloth_fast._lora(q) is None
    q.unmerge()
    assert unsloth_fast._lora(decoder_layers(model)[0].self_attn.o_proj).bias is None
