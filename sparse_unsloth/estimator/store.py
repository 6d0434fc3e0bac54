"""One safetensors file per (model, rank): the estimator factors and what they were built from."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .factors import FORMAT_VERSION, EstimatorFactors

FORMAT_NAME = "sparse_unsloth.estimator"
# Rows sampled per weight for the fingerprint: enough to tell two checkpoints apart, cheap on 70B.
_SAMPLE_ROWS = 4
_SAMPLE_COLS = 256


class EstimatorFileError(ValueError):
    """An estimator file that is corrupt, of another format, or built for another model/rank."""


def fingerprint(weights: Mapping[str, Callable[[], torch.Tensor]]) -> str:
    """A short hash of the frozen weights: every shape plus a few sampled rows of each."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        weight = weights[key]()
        rows = torch.linspace(0, weight.shape[0] - 1, _SAMPLE_ROWS).long().to(weight.device)
        sample = weight[rows, :_SAMPLE_COLS].float().cpu().contiguous()
        digest.update(f"{key}:{tuple(weight.shape)};".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def save_factors(factors: EstimatorFactors, path: str | Path) -> Path:
    """Write ``factors`` as one safetensors file (tensors ``{layer}.{proj}.w1/w2``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, (w1, w2) in factors.factors.items():
        tensors[f"{key}.w1"] = w1.detach().cpu().contiguous()
        tensors[f"{key}.w2"] = w2.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "rank": str(factors.rank),
        "fingerprint": factors.fingerprint, "model_id": factors.model_id,
        "revision": factors.revision, "layers": json.dumps(factors.layers()),
        "projections": json.dumps(sorted(factors.factors)), **factors.extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)            # never leave a half-written file under the final name
    return path


def load_factors(path: str | Path, rank: int | None = None, fingerprint: str | None = None,
                 device: str | torch.device = "cpu") -> EstimatorFactors:
    """Read an estimator file, refusing one that is corrupt or built for another model or rank."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"estimator file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise EstimatorFileError(f"{path} is not a readable safetensors file ({err}); delete it and "
                                 "rebuild or pull the estimator") from None
    if meta.get("format") != FORMAT_NAME:
        raise EstimatorFileError(f"{path} is not a sparse_unsloth estimator file (format "
                                 f"{meta.get('format')!r}); convert it or rebuild")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise EstimatorFileError(f"{path} has estimator format {meta.get('format_version')}, this "
                                 f"sparse_unsloth reads {FORMAT_VERSION}; rebuild the estimator")
    file_rank = int(meta["rank"])
    if rank is not None and file_rank != rank:
        raise EstimatorFileError(f"{path} holds rank-{file_rank} factors but the config asks for rank "
                                 f"{rank}; rebuild at rank {rank} or set estimator_rank: {file_rank}")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise EstimatorFileError(
            f"{path} was built for another model (fingerprint {meta.get('fingerprint')}, model "
            f"{meta.get('model_id') or '?'}) than this one (fingerprint {fingerprint}); rebuild it "
            "for this model")
    keys = json.loads(meta.get("projections", "[]"))
    missing = [k for k in keys if f"{k}.w1" not in tensors or f"{k}.w2" not in tensors]
    if missing:
        raise EstimatorFileError(f"{path} is truncated: factors of {missing[:4]} are missing")
    factors = {k: (tensors[f"{k}.w1"], tensors[f"{k}.w2"]) for k in keys}
    reserved = {"format", "format_version", "rank", "fingerprint", "model_id", "revision", "layers",
                "projections"}
    return EstimatorFactors(factors, file_rank, meta.get("fingerprint", ""), meta.get("model_id", ""),
                            meta.get("revision", ""), {k: v for k, v in meta.items() if k not in reserved})
