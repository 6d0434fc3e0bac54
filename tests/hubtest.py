"""Shared pieces of the estimator cache tests: a real Hub server on 127.0.0.1 and tiny Llamas.

The Hub client is pointed at the server per test through the environment (HF_ENDPOINT), which
sparse_unsloth reads at call time, so it does not matter who imported huggingface_hub first.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator

import minihub
import torch
from safetensors.torch import save_file

from sparse_unsloth.config import MODULE_KINDS
from sparse_unsloth.estimator.factors import svd_factors
from sparse_unsloth.estimator.store import fingerprint
from sparse_unsloth.patch.models import decoder_layers, estimated_weights

TOKEN = "test-token"
MODEL_ID = "acme/tiny-llama"


@contextlib.contextmanager
def local_hub(data_dir, monkeypatch) -> Iterator[minihub.MiniHub]:
    """A minihub server (writes need TOKEN) with the client environment pointing at it.

    Test modules wrap it in their own ``hub`` fixture (fixtures imported across modules trip ruff).
    """
    import huggingface_hub.constants

    srv = minihub.start(str(data_dir), token=TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # tests/conftest.py turns offline mode on for every test; these tests need the (local) Hub.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def dead_endpoint() -> str:
    """A URL on 127.0.0.1 where nothing listens (the port was just freed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def tiny_llama(seed: int = 0, layers: int = 3):
    """A random Llama: hidden 64, 4 heads over 2 KV heads, intermediate 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def inputs(model, which: list[int] | None = None):
    """(needed weights, fingerprint), as sparsify computes them, for the layers ``which``."""
    layers = decoder_layers(model)
    every = estimated_weights(layers, {kind: range(len(layers)) for kind in MODULE_KINDS})
    if which is None:
        return every, fingerprint(every)
    return estimated_weights(layers, {kind: which for kind in MODULE_KINDS}), fingerprint(every)


def assert_same(a, b) -> None:
    """Two EstimatorFactors hold the same projections and tensors."""
    assert sorted(a.factors) == sorted(b.factors)
    for key in a.factors:
        for x, y in zip(a[key], b[key]):
            torch.testing.assert_close(x.cpu(), y.cpu(), rtol=0, atol=0)


def write_zlab_repo(directory, model, rank: int, layers: list[int], transpose_q: bool = False,
                    base_model: str = MODEL_ID) -> None:
    """A repo in the z-lab SparseLoRA layout: config.json + model.safetensors (bf16 factors).

    Keys ``model.layers.{i}.{mlp|self_attn}.{proj}.w1/w2``; ``transpose_q`` stores q the other
    way round (``[r, in]``, ``[out, r]``) to exercise the converter's orientation handling.
    """
    directory.mkdir(parents=True, exist_ok=True)
    weights, _ = inputs(model, layers)
    tensors = {}
    for key, get in weights.items():
        layer, proj = key.split(".")
        kind = "mlp" if proj in ("gate_proj", "up_proj") else "self_attn"
        w1, w2 = svd_factors(get(), rank, torch.bfloat16)
        if transpose_q and proj == "q_proj":
            w1, w2 = w1.T.contiguous(), w2.T.contiguous()
        tensors[f"model.layers.{layer}.{kind}.{proj}.w1"] = w1
        tensors[f"model.layers.{layer}.{kind}.{proj}.w2"] = w2
    save_file(tensors, str(directory / "model.safetensors"))
    sparsity = {f"model.layers.{i}.{kind}": (0.5 if i in layers else 0) for i in range(3)
                for kind in ("mlp", "self_attn")}
    (directory / "config.json").write_text(json.dumps(
        {"base_model": base_model, "predictor_rank": rank, "modes": {"o1": {"layer_sparsity": sparsity}}}))


def ddp_worker(rank: int, world: int, init_file: str, cache: str, out_dir: str) -> None:
    """One torch.distributed rank resolving an estimator into a shared cache; logs to out_dir."""
    import logging

    import torch.distributed as dist

    from sparse_unsloth.estimator.resolve import resolve_factors

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("sparse_unsloth")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    torch.manual_seed(0)
    weight = torch.randn(32, 16)
    factors = resolve_factors({"0.gate_proj": lambda: weight}, 4, "f" * 32, model_id=MODEL_ID,
                              cache_dir=cache, allow_hub=False, progress=False)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"log": records, "w1": factors["0.gate_proj"][0].tolist()}, f)
    dist.destroy_process_group()
