"""One safetensors file per (model, rank): the estimator factors and what they were built from.

Reading is defensive because the file may come from the Hub or a shared cache: the header is
checked against the file size before safetensors parses it, pickle-based files (``.bin``,
``.pt``) are refused without being unpickled, and every factor's shape must agree with the rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .factors import FORMAT_VERSION, EstimatorFactors

FORMAT_NAME = "sparse_unsloth.estimator"
# Rows sampled per weight for the fingerprint: enough to tell two checkpoints apart, cheap on 70B.
_SAMPLE_ROWS = 4
_SAMPLE_COLS = 256
# A safetensors header is JSON naming each tensor; even a 70B model's full checkpoint stays far
# below this, so a larger value means a corrupt or hostile file, not a big estimator.
_MAX_HEADER_BYTES = 64 << 20
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
_RESERVED_META = {"format", "format_version", "rank", "fingerprint", "model_id", "revision", "layers",
                  "projections"}


class EstimatorFileError(ValueError):
    """An estimator file that is corrupt, of another format, or built for another model/rank."""


def fingerprint(weights: Mapping[str, Callable[[], torch.Tensor]]) -> str:
    """A short hash of the frozen weights: every shape plus a few sampled rows of each."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        weight = weights[key]()
        rows = torch.linspace(0, weight.shape[0] - 1, _SAMPLE_ROWS).long().to(weight.device)
        sample = weight.detach()[rows, :_SAMPLE_COLS].float().cpu().contiguous()
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
    extra = {k: str(v) for k, v in factors.extra.items() if k not in _RESERVED_META}
    metadata = {
        **extra, "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "rank": str(factors.rank),
        "fingerprint": factors.fingerprint, "model_id": factors.model_id,
        "revision": factors.revision, "layers": json.dumps(factors.layers()),
        "projections": json.dumps(sorted(factors.factors)),
    }
    # Never a half-written file under the final name, and a temporary file of this writer's own:
    # processes building the same estimator at once (DDP ranks, runs side by side) must not write
    # into one file. Named by process and thread, not by mkstemp, whose 0600 file would lock a
    # shared cache's other users out.
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _looks_pickled(head: bytes) -> bool:
    # torch.save writes a zip archive; older torch / pickle.dump start with PROTO (0x80, 2..5).
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03",
                                                                              b"\x04", b"\x05"))


def _check_header(path: Path) -> None:
    """Refuse pickles and files whose safetensors header does not fit the file."""
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise EstimatorFileError(f"{path} is a pickle-based checkpoint ({path.suffix}); sparse_unsloth "
                                 "never unpickles estimator files. Use a .safetensors estimator")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        fits = 2 <= header_len <= min(size - 8, _MAX_HEADER_BYTES)
        header = None
        if fits:
            try:
                header = json.loads(f.read(header_len))
            except ValueError:
                pass
    if not isinstance(header, dict):
        if _looks_pickled(head):
            raise EstimatorFileError(f"{path} is a pickle / torch.save file, not safetensors; "
                                     "sparse_unsloth never unpickles estimator files. Rebuild or pull it")
        what = "has a corrupt safetensors header" if fits else \
            f"is truncated or not safetensors (header length {header_len}, file size {size})"
        raise EstimatorFileError(f"{path} {what}; delete it and rebuild or pull the estimator")
    try:
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError):
        raise EstimatorFileError(f"{path} has a corrupt safetensors header; delete it and rebuild or "
                                 "pull the estimator") from None
    if 8 + header_len + end != size:
        raise EstimatorFileError(f"{path} is truncated: its header needs {8 + header_len + end} bytes, the "
                                 f"file has {size}; delete it and rebuild or pull the estimator")


def read_safetensors(path: str | Path, device: str | torch.device = "cpu",
                     ) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file, after the header and size checks."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"estimator file {path} does not exist")
    _check_header(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not iterable)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise EstimatorFileError(f"{path} is not a readable safetensors file ({err}); delete it and "
                                 "rebuild or pull the estimator") from None
    return meta, tensors


def check_shapes(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], rank: int, where: str) -> None:
    """Every factor pair must be ``w1 [in, rank]``, ``w2 [rank, out]``."""
    for key, (w1, w2) in factors.items():
        if w1.dim() != 2 or w2.dim() != 2 or w1.shape[1] != rank or w2.shape[0] != rank:
            raise EstimatorFileError(
                f"{where}: factors of {key} have shapes {tuple(w1.shape)} and {tuple(w2.shape)}, expected "
                f"[in, {rank}] and [{rank}, out]; the file is corrupt, delete it and rebuild")


def load_factors(path: str | Path, rank: int | None = None, fingerprint: str | None = None,
                 device: str | torch.device = "cpu") -> EstimatorFactors:
    """Read an estimator file, refusing one that is corrupt or built for another model or rank."""
    path = Path(path)
    meta, tensors = read_safetensors(path, device)
    if meta.get("format") != FORMAT_NAME:
        raise EstimatorFileError(f"{path} is not a sparse_unsloth estimator file (format "
                                 f"{meta.get('format')!r}); convert it or rebuild")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise EstimatorFileError(f"{path} has estimator format {meta.get('format_version')}, this "
                                 f"sparse_unsloth reads {FORMAT_VERSION}; rebuild the estimator")
    try:
        file_rank = int(meta["rank"])
        keys = json.loads(meta.get("projections", "[]"))
    except (KeyError, ValueError):
        raise EstimatorFileError(f"{path} has corrupt metadata (rank / projections); delete it and "
                                 "rebuild") from None
    if rank is not None and file_rank != rank:
        raise EstimatorFileError(f"{path} holds rank-{file_rank} factors but the config asks for rank "
                                 f"{rank}; rebuild at rank {rank} or set estimator_rank: {file_rank}")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise EstimatorFileError(
            f"{path} was built for another model (fingerprint {meta.get('fingerprint')}, model "
            f"{meta.get('model_id') or '?'}) than this one (fingerprint {fingerprint}); rebuild it "
            "for this model")
    missing = [k for k in keys if f"{k}.w1" not in tensors or f"{k}.w2" not in tensors]
    if missing:
        raise EstimatorFileError(f"{path} is truncated: factors of {missing[:4]} are missing")
    factors = {k: (tensors[f"{k}.w1"], tensors[f"{k}.w2"]) for k in keys}
    check_shapes(factors, file_rank, str(path))
    return EstimatorFactors(factors, file_rank, meta.get("fingerprint", ""), meta.get("model_id", ""),
                            meta.get("revision", ""),
                            {k: v for k, v in meta.items() if k not in _RESERVED_META})


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an estimator file, without reading its tensors (for ``estimator info``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"estimator file {path} does not exist")
    _check_header(path)
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
