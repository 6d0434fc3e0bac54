"""The Unsloth fast backend on a GPU: fused sparse Functions vs the oracle, the dense path
bit-identical to Unsloth, and a short SFTTrainer run through FastLanguageModel.

bf16 tolerance: the sparse Function's error against a float32 masked-dense oracle must be
close to the error of Unsloth's own dense bf16 Function against a float32 dense oracle.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from helpers import cuda_lora_proj as _proj
from helpers import cuda_subset as _choose
from helpers import train_step

from sparse_unsloth.ops.fast_attn import sparse_lora_o, sparse_lora_qkv
from sparse_unsloth.ops.fast_mlp import sparse_lora_mlp
from sparse_unsloth.ops.reference import masked_linear
from sparse_unsloth.ops.sparse_mm import LoRAProj

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _rel(a, b):
    # Unsloth starts LoRA B at zero, so some gradients are exactly zero: 0 against 0 is no error.
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def _oracle_linear(x, p, idx, dense_idx, dim):
    """float32 masked dense LoRA linear (the definition)."""
    bias = None if p.bias is None else p.bias.float()
    return (masked_linear(x, p.weight.float(), bias, idx, dense_idx, dim)
            + p.scale * (x @ p.lora_a.float().T) @ p.lora_b.float().T)


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


def _check(got, want, label, bound):
    for i, (g, w) in enumerate(zip(got, want)):
        err = _rel(g, w)
        assert err < bound, f"{label}[{i}]: rel err {err:.2e} >= {bound:.2e}"


def _unsloth_dense_mlp_error(x, gate, up, down, dy):
    """Unsloth's dense bf16 LoRA_MLP against float32: the error level bf16 itself costs."""
    from unsloth.kernels import fast_lora
    from unsloth.kernels.swiglu import swiglu_DWf_DW_dfg_kernel, swiglu_fg_kernel

    xb = x.detach().clone().requires_grad_()
    args = []
    for p in (gate, up, down):
        args += [p.weight, None, p.lora_a, p.lora_b, p.scale]
    out = fast_lora.LoRA_MLP.apply(xb, *args, swiglu_fg_kernel, swiglu_DWf_DW_dfg_kernel, False)
    (gx,) = _grads(out, [xb], dy)
    xf = x.detach().float().requires_grad_()
    lin = [lambda t, p=p: F.linear(t, p.weight.float()) + p.scale * (t @ p.lora_a.float().T) @ p.lora_b.float().T
           for p in (gate, up, down)]
    ref = lin[2](F.silu(lin[0](xf)) * lin[1](xf))
    (rx,) = _grads(ref, [xf], dy.float())
    return max(_rel(out, ref), _rel(gx, rx))


@pytest.mark.parametrize("batch,seq,hidden,inter,keep,dense", [
    (2, 512, 4096, 14336, 143, 258), (3, 200, 1024, 2811, 29, 61), (1, 333, 512, 1377, 1377, 0)])
def test_mlp_vs_oracle_bf16(batch, seq, hidden, inter, keep, dense):
    gen = torch.Generator(device=DEV).manual_seed(inter + keep)
    x = torch.randn(batch, seq, hidden, device=DEV, generator=gen).bfloat16().requires_grad_()
    gate, up, down = _proj(gen, inter, hidden), _proj(gen, inter, hidden), _proj(gen, hidden, inter)
    idx, dense_idx = _choose(gen, inter, keep), _choose(gen, batch * seq, dense)
    dy = torch.randn(batch, seq, hidden, device=DEV, generator=gen).bfloat16()
    loras = [t for p in (gate, up, down) for t in (p.lora_a, p.lora_b)]

    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = sparse_lora_mlp(x, gate, up, down, idx, dense_idx)
    got = [out, *_grads(out, [x, *loras], dy)]
    xf = x.detach().float().reshape(-1, hidden).requires_grad_()
    h = F.silu(_oracle_linear(xf, gate, idx, dense_idx, 0)) * _oracle_linear(xf, up, idx, dense_idx, 0)
    ref = _oracle_linear(h, down, idx, dense_idx, 1)
    want = [ref, *_grads(ref, [xf, *loras], dy.float().reshape(-1, hidden))]
    bound = 3 * _unsloth_dense_mlp_error(x, gate, up, down, dy) + 2e-3
    _check(got, [w.view_as(g) for g, w in zip(got, want)], "mlp", bound)


@pytest.mark.parametrize("heads,kv_heads,head_dim,keep,bias", [
    (32, 8, 128, 32, False), (12, 4, 64, 17, False), (8, 8, 32, 32, False), (14, 2, 64, 16, True),
    (32, 8, 128, 102, False)])          # 80% kept (llama3-8b-csr): the masked full GEMMs
def test_attention_projections_vs_oracle_bf16(heads, kv_heads, head_dim, keep, bias):
    gen = torch.Generator(device=DEV).manual_seed(heads * kv_heads + keep)
    batch, seq = 2, 384
    hidden, dq, dkv, n = heads * head_dim, heads * head_dim, kv_heads * head_dim, batch * seq
    x = torch.randn(batch, seq, hidden, device=DEV, generator=gen).bfloat16().requires_grad_()
    a_in = torch.randn(batch, seq, dq, device=DEV, generator=gen).bfloat16().requires_grad_()
    q, k, v = _proj(gen, dq, hidden, bias=bias), _proj(gen, dkv, hidden, bias=bias), _proj(gen, dkv, hidden, bias=bias)
    o = _proj(gen, hidden, dq)
    # the estimator's layout: the same count of dims kept in every head
    per_head = torch.stack([_choose(gen, head_dim, keep) for _ in range(kv_heads)])
    kv_idx = (torch.arange(kv_heads, device=DEV)[:, None] * head_dim + per_head).flatten()
    from sparse_unsloth.estimator.select import kv_to_q_channels
    q_idx = kv_to_q_channels(kv_idx, heads, kv_heads, head_dim)
    dense_idx = _choose(gen, n, n // 4)
    grads = [torch.randn(batch, seq, c, device=DEV, generator=gen).bfloat16() for c in (dq, dkv, dkv, hidden)]
    loras = [t for p in (q, k, v, o) for t in (p.lora_a, p.lora_b)]
    loras += [p.bias for p in (q, k, v) if p.bias is not None]

    with torch.autocast("cuda", dtype=torch.bfloat16):
        outs = (*sparse_lora_qkv(x, q, k, v, q_idx, kv_idx, kv_idx, dense_idx),
                sparse_lora_o(a_in, o, q_idx, dense_idx))
    got = [*outs, *_grads(outs, [x, a_in, *loras], grads)]
    xf = x.detach().float().reshape(n, -1).requires_grad_()
    af = a_in.detach().float().reshape(n, -1).requires_grad_()
    refs = [_oracle_linear(xf, p, i, dense_idx, 0) for p, i in ((q, q_idx), (k, kv_idx), (v, kv_idx))]
    refs.append(_oracle_linear(af, o, q_idx, dense_idx, 1))
    want = [*refs, *_grads(refs, [xf, af, *loras], [g.float().reshape(n, -1) for g in grads])]
    _check(got, [w.view_as(g) for g, w in zip(got, want)], "attn", 2e-2)


# ------------------------------ through Unsloth ------------------------------------------
def _save_tiny(path, model_type: str, **shape) -> str:
    """A random bf16 model of ``model_type`` with the arithmetic tokenizer, saved to ``path``.

    Biases (Qwen2's q/k/v) are drawn large, so that dropping one would show.
    """
    import unsloth  # noqa: F401  (before transformers' models are used)
    from helpers import ARITHMETIC, tiny_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny_tokenizer([r["prompt"] + r["completion"] for r in ARITHMETIC])
    tok.save_pretrained(path)
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), max_position_embeddings=512,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_()
    model.to(torch.bfloat16).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("tiny_llama"), "llama", hidden_size=256, intermediate_size=689,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory):
    """A Qwen2-shaped model: q/k/v biases, GQA 14/2."""
    return _save_tiny(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", hidden_size=448, intermediate_size=1200,
                      num_hidden_layers=3, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)


TINY_CONFIG = {"name": "tiny-gpu", "estimator_rank": 8, "dense_output_tokens": True,
               "sparsity": {"mlp": {"1-3": 0.9}, "self_attn": {"2-3": 0.5}}}


def _unsloth_model(path, load_in_4bit=False):
    from unsloth import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(path, max_seq_length=256, load_in_4bit=load_in_4bit,
                                                   dtype=torch.bfloat16, local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=16, lora_dropout=0, bias="none", random_state=0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth")
    return model, tok


def _step(model, ids, labels):
    return train_step(model, autocast="cuda", input_ids=ids, labels=labels)


def test_inactive_is_bit_identical_and_active_is_sparse(tiny_dir):
    import sparse_unsloth as su
    from sparse_unsloth.patch import unsloth_fast

    model, _ = _unsloth_model(tiny_dir)
    assert unsloth_fast.applies(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 200, (4, 128), generator=gen).to(DEV)
    labels = ids.clone()
    labels[:, :96] = -100
    dense_loss, dense_grads = _step(model, ids, labels)
    su.sparsify(model, TINY_CONFIG, progress=False)
    state = su.sparse_state(model)
    state.callback_attached = True
    state.enabled = False
    off_loss, off_grads = _step(model, ids, labels)
    assert torch.equal(off_loss, dense_loss)
    for name, g in dense_grads.items():
        assert torch.equal(off_grads[name], g), name
    state.enabled = True
    sparse_loss, sparse_grads = _step(model, ids, labels)
    assert state.stats["mlp_kept"] > 0 and state.stats["attn_kept"] > 0
    assert not torch.equal(sparse_loss, dense_loss)
    assert all(torch.isfinite(g).all() for g in sparse_grads.values())
    su.unsparsify(model)
    # Unsloth's originals again; Dynamo may have recompiled the blocks with dynamic shapes by
    # now (another kernel choice), so equal to rounding, not to the bit.
    again_loss, _ = _step(model, ids, labels)
    torch.testing.assert_close(again_loss, dense_loss, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["bf16", "nf4"])
def test_sft_trainer_loss_falls_with_sparse_patch(tiny_dir, tmp_path, load_in_4bit):
    from datasets import Dataset
    from helpers import ARITHMETIC
    from trl import SFTConfig, SFTTrainer

    import sparse_unsloth as su
    from sparse_unsloth.patch import unsloth_fast

    model, tok = _unsloth_model(tiny_dir, load_in_4bit)
    assert unsloth_fast.applies(model)
    su.sparsify(model, {**TINY_CONFIG, "dense_warmup_ratio": 0.1}, progress=False)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=30, learning_rate=3e-3,
                     logging_steps=1, report_to="none", save_strategy="no", bf16=True, max_length=64,
                     disable_tqdm=True, seed=0, dataset_num_proc=1)
    callback = su.SparsityCallback(model)
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=Dataset.from_list(ARITHMETIC),
                         args=args, callbacks=[callback])
    state = su.sparse_state(model)
    sequences = []                                  # each sparse forward's count of sequences
    model.register_forward_hook(lambda *_: state.current and sequences.append(state.current.split.sequences))
    trainer.train()
    # 8 rows a batch, whether padded or packed by Unsloth's padding-free collator (position ids)
    assert sequences and max(sequences) == 8, sequences
    logs = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logs]
    assert any(h.get("sparse/mlp_kept_frac", 0) > 0 for h in logs), logs[-1]
    torch.cuda.synchronize()
    callback.clock.collect()                        # the steps' CUDA events, timed on the GPU
    assert len(callback.clock.times[True]) == callback.sparse_steps - callback.clock.skip
    assert all(0 < t < 5 for t in callback.clock.times[True] + callback.clock.times[False])
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, losses


def test_qwen2_biases_kept_on_the_fast_path(tiny_qwen2_dir):
    """Every channel kept: the sparse attention must equal Unsloth's dense one, biases included."""
    import sparse_unsloth as su
    from sparse_unsloth.patch import unsloth_fast

    model, _ = _unsloth_model(tiny_qwen2_dir)
    assert unsloth_fast.applies(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 200, (2, 96), generator=gen).to(DEV)
    labels = ids.clone()
    labels[:, :64] = -100
    dense_loss, dense_grads = _step(model, ids, labels)
    # sparsity 1e-3 keeps all 64 dims of every head: sparse machinery, dense result
    su.sparsify(model, {"name": "all-kept", "estimator_rank": 8, "sparsity": {"self_attn": {"all": 0.001}}},
                progress=False)
    state = su.sparse_state(model)
    state.callback_attached = True
    loss, grads = _step(model, ids, labels)
    assert state.stats["attn_kept"] == state.stats["attn_total"] > 0        # it ran sparse
    # A dropped bias moves q by ~90% of its norm (CPU emulation of the old path): the loss shows it.
    torch.testing.assert_close(loss, dense_loss, rtol=2e-2, atol=2e-2)
    # All LoRA gradients as one vector: single rows of LoRA B at init (B = 0) sum many tokens'
    # bf16 products that nearly cancel, so a row alone can differ by tens of percent.
    names = sorted(dense_grads)
    flat = torch.cat([grads[n].float().flatten() for n in names])
    dense_flat = torch.cat([dense_grads[n].float().flatten() for n in names])
    assert _rel(flat, dense_flat) < 5e-2


def test_interleaved_forward_does_not_change_the_recompute(tiny_dir):
    """A DPO-style reference pass (adapters off, no_grad, train mode) between forward and backward."""
    import sparse_unsloth as su

    model, _ = _unsloth_model(tiny_dir)
    su.sparsify(model, TINY_CONFIG, progress=False)
    su.sparse_state(model).callback_attached = True
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 200, (4, 128), generator=gen).to(DEV)
    labels = ids.clone()
    labels[:, :96] = -100
    other = torch.randint(4, 200, (2, 64), generator=gen).to(DEV)
    _, plain = _step(model, ids, labels)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=labels).loss
        with torch.no_grad(), model.disable_adapter():
            model(input_ids=other, labels=other)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert _rel(p.grad, plain[name]) < 1e-2, name


def test_4bit_weights_through_the_fused_functions_equal_their_dequantization():
    """A 4-bit weight given as its dequantization gives the bits that the dequantized 16-bit
    weight gives, forward and backward, dequantized once per pass (twice in all)."""
    import bitsandbytes.functional as bnbf

    gen = torch.Generator(device=DEV).manual_seed(4)
    hidden, inter, n = 1024, 2816, 2 * 300
    calls = []
    projs, fns = [], []
    for fout, fin in ((inter, hidden), (inter, hidden), (hidden, inter)):
        p = _proj(gen, fout, fin)
        packed, state = bnbf.quantize_4bit(p.weight, quant_type="nf4", compress_statistics=True)

        def dequant(packed=packed, state=state):
            calls.append(1)
            return bnbf.dequantize_4bit(packed, state)

        projs.append(LoRAProj(dequant(), p.lora_a, p.lora_b, p.scale))
        fns.append(LoRAProj(dequant, p.lora_a, p.lora_b, p.scale))
    x = torch.randn(2, 300, hidden, device=DEV, generator=gen).bfloat16().requires_grad_()
    idx, dense_idx = _choose(gen, inter, 29), _choose(gen, n, 77)
    dy = torch.randn(2, 300, hidden, device=DEV, generator=gen).bfloat16()
    results = []
    for ps in (projs, fns):
        calls.clear()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sparse_lora_mlp(x, *ps, idx, dense_idx)
        loras = [t for p in ps for t in (p.lora_a, p.lora_b)]
        results.append([out, *_grads(out, [x, *loras], dy)])
    assert len(calls) == 2 * 3
    for got, want in zip(*results):
        assert torch.equal(got, want)


def _mismatch_report(model, ids, labels, step, state, grads, eager_grads, monkeypatch) -> str:
    """What a mismatch of the graphed step (``grads``) against the eager one needs to be told apart
    (runs 20 and 23 saw one only with the whole GPU suite before it): the worst parameters, the
    worst per layer, the eager step's own run-to-run difference, whether a second graphed step
    (replays, no new capture of these shapes) still differs, and whether the graphed steps equal
    the layers run without torch.compile."""
    from sparse_unsloth.patch import state as state_mod

    def worst_off(grads):
        return max(_rel(grads[n], g) for n, g in eager_grads.items())

    off = {n: _rel(grads[n], g) for n, g in eager_grads.items()}
    per_layer = {}
    for name, value in off.items():
        layer = re.search(r"layers\.(\d+)\.", name)
        key = int(layer.group(1)) if layer else -1
        per_layer[key] = max(per_layer.get(key, 0.0), value)
    captures = state.captures
    monkeypatch.setattr(state_mod, "CUDA_GRAPHS", False)
    eager_again = worst_off(_step(model, ids, labels)[1])
    # Unsloth's block without torch.compile: does the graphed step match the uncompiled layers (a
    # compiled frame that fell back to eager, e.g. at Dynamo's recompile limit, in one step only)?
    with torch.compiler.set_stance("force_eager"):
        uncompiled = _step(model, ids, labels)[1]
    monkeypatch.setattr(state_mod, "CUDA_GRAPHS", True)
    graphed = _step(model, ids, labels)[1]
    replayed = worst_off(graphed)
    vs_uncompiled = [max(_rel(g[n], uncompiled[n]) for n in uncompiled) for g in (grads, graphed)]
    stats = dict(torch._dynamo.utils.counters["stats"])
    worst = sorted(off, key=off.get)[-3:]
    return (f"step {step}: graphed gradients off the eager ones (captures {captures}); worst "
            f"{[(n, off[n]) for n in worst]}; worst per layer {dict(sorted(per_layer.items()))}; "
            f"eager vs eager again {eager_again:.2e}; a second graphed step vs eager {replayed:.2e} "
            f"(captures after it {state.captures}); the first and second graphed steps vs eager without "
            f"torch.compile {vs_uncompiled[0]:.2e}, {vs_uncompiled[1]:.2e}; Dynamo stats {stats}")


# The passes of the tiny model's sparse layers, each captured once: 3 MLPs x (forward without grad,
# its channel choice the prologue; backward; the recompute runs none), 2 attention layers x (QKV
# with the choice as prologue, QKV in the recompute (the choice made), QKV backward, O (forward =
# recompute), O backward).
PASSES = 3 * 2 + 2 * 5


@pytest.mark.parametrize("layer_graphs", [True, False], ids=["layer-graphs", "passes"])
def test_training_step_through_unsloth_equals_the_eager_one(tiny_dir, layer_graphs, monkeypatch):
    """Unsloth's offloaded checkpointing runs each layer without grad, then recomputes it inside
    backward: the graphs (each sparse layer's forward as one and its recompute and backward as
    another, or pass by pass) are captured and replayed, and every step, its tokens and label split
    new, gives the eager step's gradients."""
    import sparse_unsloth as su
    from sparse_unsloth.patch import state as state_mod

    model, _ = _unsloth_model(tiny_dir)
    su.sparsify(model, TINY_CONFIG, progress=False)
    state = su.sparse_state(model)
    state.callback_attached = True
    monkeypatch.setattr(state_mod, "LAYER_GRAPHS", layer_graphs)
    gen = torch.Generator().manual_seed(0)
    for step, context in enumerate((96, 90, 93, 96, 91)):   # 132-156 dense rows: one padded size; captures, then replays
        ids = torch.randint(4, 200, (4, 128), generator=gen).to(DEV)
        labels = ids.clone()
        labels[:, :context] = -100
        monkeypatch.setattr(state_mod, "CUDA_GRAPHS", False)
        captured = state.captures
        eager_loss, eager_grads = _step(model, ids, labels)
        assert state.captures == captured
        monkeypatch.setattr(state_mod, "CUDA_GRAPHS", True)
        loss, grads = _step(model, ids, labels)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
        off = {name: _rel(grads[name], g) for name, g in eager_grads.items()}
        if max(off.values()) >= 1e-4:
            pytest.fail(_mismatch_report(model, ids, labels, step, state, grads, eager_grads, monkeypatch))
        assert state.stats["estimator_s"] == 0.0         # every choice made in its forward's graphs
    if layer_graphs:
        # Two graphs per sparse layer (1-3): its forward, its recompute and backward; the passes run
        # inside them. The first step, a layer shape seen once, ran pass by pass, capturing each
        # pass at its first sighting (below).
        assert (state._layer_graphs.captures, state._graphs.captures) == (2 * 3, PASSES)
    else:
        assert (state._layer_graphs.captures, state._graphs.captures) == (0, PASSES)


def test_padding_free_batches_run_pass_by_pass_and_equal_the_eager_step(tiny_dir, monkeypatch):
    """A padding-free batch (sequences packed in one row, position ids restarting at each) whose
    token count and sequence count come back with other boundaries: Unsloth's attention derives
    cu_seqlens and max_seqlen on the host from the sequence lengths, which a layer graph would
    freeze (Qwen2.5-0.5B's sparse ARC-Easy run went NaN at its first such replay). Those layers run
    pass by pass, and every step gives the eager step's gradients."""
    import sparse_unsloth as su
    from sparse_unsloth.patch import state as state_mod

    model, _ = _unsloth_model(tiny_dir)
    su.sparsify(model, TINY_CONFIG, progress=False)
    state = su.sparse_state(model)
    state.callback_attached = True
    gen = torch.Generator().manual_seed(0)
    for step, lengths in enumerate(((100, 60, 96), (40, 120, 96), (150, 50, 56), (30, 30, 196))):
        ids = torch.randint(4, 200, (1, sum(lengths)), generator=gen).to(DEV)
        pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(DEV)
        labels = ids.clone()
        start = 0
        for n in lengths:                     # the first three quarters of each sequence: context
            labels[0, start:start + 3 * n // 4] = -100
            start += n
        monkeypatch.setattr(state_mod, "CUDA_GRAPHS", False)
        eager_loss, eager_grads = train_step(model, autocast="cuda", input_ids=ids, labels=labels, position_ids=pos)
        monkeypatch.setattr(state_mod, "CUDA_GRAPHS", True)
        loss, grads = train_step(model, autocast="cuda", input_ids=ids, labels=labels, position_ids=pos)
        assert torch.isfinite(loss), f"step {step}"
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
        off = {name: _rel(grads[name], g) for name, g in eager_grads.items()}
        assert max(off.values()) < 1e-4, f"step {step}: {sorted(off.items(), key=lambda kv: kv[1])[-3:]}"
    assert state._layer_graphs.captures == 0 and state._graphs.captures > 0
