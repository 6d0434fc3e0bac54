"""Tiny random models for the tests (no downloads)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoConfig, AutoModelForCausalLM

ALL_PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_lora_model(model_type: str = "llama", layers: int = 3, hidden: int = 48, inter: int = 77,
                    heads: int = 6, kv_heads: int = 2, vocab: int = 101, dtype=torch.float64,
                    seed: int = 0, rank: int = 4, lora_bias: str = "none"):
    """A random causal LM with LoRA on all 7 projections; LoRA B is random so its grads matter.

    Base-layer biases (Qwen2's q/k/v) are drawn large, so that dropping one would show.
    """
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, hidden_size=hidden, intermediate_size=inter,
                                  num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  num_hidden_layers=layers, vocab_size=vocab,
                                  max_position_embeddings=128, head_dim=hidden // heads)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_()
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL_PROJS, init_lora_weights=False,
                      bias=lora_bias)
    return get_peft_model(model, lora)


def mask_dropped_channels(model, state) -> None:
    """Zero the frozen weights' channels that the last forward dropped: the masked dense model."""
    from sparse_unsloth.patch.models import decoder_layers, frozen_linear

    layers = decoder_layers(model)
    for i in state.layers:
        mlp, attn = (state.current.choices.get((i, kind)) for kind in ("mlp", "attn"))
        plan = []
        if mlp is not None:
            plan += [("mlp", "gate_proj", 0, mlp.idx), ("mlp", "up_proj", 0, mlp.idx),
                     ("mlp", "down_proj", 1, mlp.idx)]
        if attn is not None:
            plan += [("self_attn", "q_proj", 0, attn.q_idx), ("self_attn", "k_proj", 0, attn.k_idx),
                     ("self_attn", "v_proj", 0, attn.v_idx), ("self_attn", "o_proj", 1, attn.o_idx)]
        for kind, proj, dim, idx in plan:
            w = frozen_linear(getattr(getattr(layers[i], kind), proj)).weight
            keep = torch.zeros(w.shape[dim], dtype=torch.bool)
            keep[idx] = True
            with torch.no_grad():
                w.mul_(keep[:, None] if dim == 0 else keep[None, :])


def tiny_tokenizer(texts: list[str]):
    """A small BPE tokenizer trained on ``texts`` (offline), with pad/eos tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>")


# Prompt-completion rows with a short, learnable answer (the parity of a + b).
ARITHMETIC = [{"prompt": f"Question: is {a} plus {b} even or odd?\nAnswer:",
               "completion": " even" if (a + b) % 2 == 0 else " odd"} for a in range(12) for b in range(12)]


def token_batch(vocab: int = 101, batch: int = 3, seq: int = 11, context: int = 6, seed: int = 1):
    """Random ids and labels with the first ``context`` tokens of each row masked (-100)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[:, :context] = -100
    return ids, labels


def train_step(model, autocast: str | None = None, **inputs):
    """Loss and every trainable parameter's gradient of one training forward/backward;
    ``autocast``: a device type whose bf16 autocast runs the forward only (as the Trainer does)."""
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast(autocast or "cpu", dtype=torch.bfloat16, enabled=autocast is not None):
        loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone()
                           for n, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(got: dict, want: dict, rtol: float = 1e-9, atol: float = 1e-11) -> None:
    assert got.keys() == want.keys()
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=rtol, atol=atol, msg=name)


def cuda_lora_proj(gen, fout, fin, rank=16, bias=False):
    """A bf16 frozen weight on the GPU with float32 LoRA factors (and a trainable bias, large
    enough that dropping it shows: Qwen2's q/k/v with LoRA bias="all")."""
    from sparse_unsloth.ops.sparse_mm import LoRAProj

    w = (torch.randn(fout, fin, device="cuda", generator=gen) / fin ** 0.5).bfloat16()
    a = (torch.randn(rank, fin, device="cuda", generator=gen) / fin ** 0.5).requires_grad_()
    b = (torch.randn(fout, rank, device="cuda", generator=gen) / rank ** 0.5).requires_grad_()
    bb = torch.randn(fout, device="cuda", generator=gen).bfloat16().requires_grad_() if bias else None
    return LoRAProj(w, a, b, 2.0, bb)


def cuda_subset(gen, n, k):
    """``k`` of ``range(n)``, sorted, on the GPU."""
    return torch.randperm(n, device="cuda", generator=gen)[:k].sort().values


def cpu_graphs(tape: bool = False, **kw):
    """A GraphRunner with its two CUDA steps replaced, so that its bookkeeping runs on the CPU;
    ``.replays`` counts the replays.

    Its "graph" calls the body again, or with ``tape`` is a tape of the aten ops its capture ran:
    a replay then runs those ops again on the same tensors and no Python of ours (our ops are
    taped by what they run inside). So, as on a GPU, a replay misses a side effect that the caller
    does not redo, and a copy of a per-call tensor taped at the capture reads that tensor again
    at every replay.
    """
    import types

    from sparse_unsloth.ops.graphs import GraphRunner

    class CPUGraphs(GraphRunner):
        def __init__(self, **kw) -> None:
            super().__init__(**kw)
            self.replays = 0

        def _warm_up(self, fn, inputs, consts, device):
            with torch.no_grad():
                return fn(*inputs, *consts)

        def _record(self, body, device):
            if tape:
                recorded = _Tape()
                with torch.no_grad(), recorded:
                    body()
                body = recorded.replay

            def replay():
                self.replays += 1
                with torch.no_grad():
                    body()
            return types.SimpleNamespace(replay=replay)

    return CPUGraphs(**kw)


class _Tape(TorchDispatchMode):
    """The aten ops run while active, to run again (see :func:`cpu_graphs`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "sparse_unsloth":        # tape what our op runs, as a graph would
            with self:
                return custom_ops.OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError("a host sync inside a CUDA graph capture")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out

    def replay(self) -> None:
        for func, args, kwargs, out in self.ops:
            new = func(*args, **kwargs)
            for o, n in zip(tree_leaves(out), tree_leaves(new)):
                if isinstance(o, torch.Tensor) and o.data_ptr() != n.data_ptr():
                    o.copy_(n)


def unsloth_pad_verdict(tokenizer, config) -> dict:
    """What Unsloth's tokenizer patch (``unsloth_zoo.pad_token.fix_pad_token``, run on a copy of
    ``tokenizer``, never adding a token) makes of its pad token: ``reason`` None (accepted), or
    ``changed`` (an existing token chosen), or neither (Unsloth would add a token and, where the
    embeddings have no room, refuse to load, as it refused Qwen2.5's GGUF tokenizer on the GPU).
    The module is read from its file: importing ``unsloth_zoo`` itself wants a GPU."""
    import copy
    import importlib.util
    from pathlib import Path

    import pytest

    found = importlib.util.find_spec("unsloth_zoo")
    if found is None:
        pytest.skip("unsloth_zoo is not installed")
    path = Path(next(iter(found.submodule_search_locations))) / "pad_token.py"
    spec = importlib.util.spec_from_file_location("_unsloth_zoo_pad_token", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fix_pad_token(copy.deepcopy(tokenizer), model_config=config, allow_add=False)
