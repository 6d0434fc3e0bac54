"""Read the SparseLoRA authors' published estimators (``z-lab/<Model>-SparseLoRA`` on the Hub).

What such a repo holds (read from z-lab/sparselora on GitHub, commit c371c83: the loader
``sparselora/modules/svd.py``, ``sparselora/config.py``, the predictors, and copies of three
repos' ``config.json`` under ``z-lab/``):

- ``config.json``: ``{"base_model": "NousResearch/Meta-Llama-3-8B-Instruct", "predictor_rank": 8,
  "modes": {"o1": {"layer_sparsity": {"model.layers.17.mlp": 0.97, ...}}, "o2": {...}}}``.
  ``modes`` are per-layer sparsity presets (``o1`` conservative, ``o2`` aggressive); keys are
  module paths ``model.layers.{i}.mlp`` / ``model.layers.{i}.self_attn``.
- ``model.safetensors``: tensors ``{module path}.{proj}.w1`` and ``.w2``, e.g.
  ``model.layers.17.mlp.gate_proj.w1``, for ``gate_proj``/``up_proj`` (MLP) and
  ``q_proj``/``k_proj``/``v_proj`` (attention). ``w1 = U_r S_r^{1/2}`` is ``[in, r]`` and
  ``w2 = S_r^{1/2} V_r^T`` is ``[r, out]``, from the SVD of the transposed Hugging Face weight
  ``W.T`` (``[in, out]``); the predictor computes ``x @ w1 @ w2``. That is exactly our
  convention, so no transpose is needed; pairs stored the other way round (``[r, in]``,
  ``[out, r]``, as the authors' GQA predictor keeps q internally) are transposed on load.

Verified from their code: the config keys, the tensor key pattern, the orientation above, and
that the loader casts to the model's dtype (so the stored dtype does not matter). Not verified
(no download was possible): the stored dtype, whether every layer or only the sparse ones are
present, and that the published files were made from the unmodified Hugging Face weights of
``base_model``. The last point is why :func:`verify_against` checks the factors against the
weights the model actually has before they are used: the files carry no fingerprint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .factors import ESTIMATED_PROJS, EstimatorFactors
from .store import EstimatorFileError, check_shapes, read_safetensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_TAG = "z-lab/sparselora"
_PROJS = {p for projs in ESTIMATED_PROJS.values() for p in projs}
# "model.layers.17.mlp.gate_proj.w1" (or any prefix, or none: "17.gate_proj.w1").
_KEY = re.compile(r"^(?:.*?\.)?(?:layers\.)?(\d+)\.(?:(?:mlp|self_attn)\.)?(\w+)\.(w1|w2)$")
# Rows checked per projection by verify_against: enough to tell another model from this one.
_CHECK_ROWS = 64


def is_zlab_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory in the z-lab layout."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def read_config(path: str | Path) -> dict:
    """The ``config.json`` of a z-lab repo, checked for the keys we use."""
    try:
        config = json.loads(Path(path).read_text())
        rank = config["predictor_rank"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EstimatorFileError(f"{path} is not a z-lab SparseLoRA config.json (needs predictor_rank): "
                                 f"{err}") from None
    if not isinstance(rank, int) or rank < 1:
        raise EstimatorFileError(f"{path}: predictor_rank {rank!r} is not a positive integer")
    return config


def load_zlab(directory: str | Path, rank: int | None = None, source: str = "",
              revision: str = "") -> EstimatorFactors:
    """The factors of a z-lab repo (``config.json`` + ``model.safetensors`` in ``directory``).

    ``source``/``revision`` (the repo and commit they came from) are recorded in the metadata.
    The result has no fingerprint: check it with :func:`verify_against` before use.
    """
    directory = Path(directory)
    config = read_config(directory / CONFIG_FILE)
    file_rank = config["predictor_rank"]
    if rank is not None and file_rank != rank:
        raise EstimatorFileError(f"{source or directory} holds rank-{file_rank} z-lab factors but the config "
                                 f"asks for rank {rank}; set estimator_rank: {file_rank} or build locally")
    _, tensors = read_safetensors(directory / WEIGHTS_FILE)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _KEY.match(name)
        if match and match[2] in _PROJS:
            pairs.setdefault(f"{int(match[1])}.{match[2]}", {})[match[3]] = tensor
    if not pairs:
        raise EstimatorFileError(f"{directory / WEIGHTS_FILE} has no '<layer>.<proj>.w1/w2' tensors; it is "
                                 "not a z-lab SparseLoRA estimator")
    factors = {}
    for key, pair in sorted(pairs.items()):
        if set(pair) != {"w1", "w2"}:
            raise EstimatorFileError(f"{directory / WEIGHTS_FILE} is truncated: {key} lacks "
                                     f"{({'w1', 'w2'} - set(pair)).pop()}")
        factors[key] = _orient(pair["w1"], pair["w2"], file_rank)
    check_shapes(factors, file_rank, str(directory / WEIGHTS_FILE))
    extra = {"converted_from": FORMAT_TAG, "source_repo": source, "source_revision": revision,
             "base_model": str(config.get("base_model", ""))}
    return EstimatorFactors(factors, file_rank, model_id=str(config.get("base_model", "")), extra=extra)


def _orient(w1: torch.Tensor, w2: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w1 [in, r], w2 [r, out])``, transposing a pair stored as ``[r, in]``, ``[out, r]``."""
    if w1.dim() == 2 and w2.dim() == 2 and w1.shape[1] != rank and w1.shape[0] == rank \
            and w2.shape[1] == rank:
        return w1.T.contiguous(), w2.T.contiguous()
    return w1, w2


def verify_against(factors: EstimatorFactors, weights: Mapping[str, Callable[[], torch.Tensor]],
                   where: str, fingerprint: str = "") -> None:
    """Refuse factors that are not the rank-r SVD of these weights; else stamp ``fingerprint``.

    Projections that ``weights`` does not cover cannot be checked and are dropped (the resolver
    builds what is missing). Once stamped, a cached copy is checked by the cheap fingerprint
    comparison like our own files.

    For the truncated SVD ``A = W V_r V_r^T`` each row ``a_j`` is the orthogonal projection of
    the row ``w_j`` of ``W``, so ``<w_j, a_j> = ||a_j||^2`` exactly; factors of another model (or
    the wrong orientation) give a ratio near 0. Only a few rows of each weight are checked.
    """
    checked = sorted(set(weights) & set(factors.factors))
    for key in checked:
        weight = weights[key]().detach()
        w1, w2 = factors[key]
        out_dim, in_dim = weight.shape
        if w1.shape[0] != in_dim or w2.shape[1] != out_dim:
            raise EstimatorFileError(
                f"{where}: factors of {key} are {tuple(w1.shape)} x {tuple(w2.shape)} but the model's "
                f"weight is [{out_dim}, {in_dim}]; these factors belong to another model, build them locally")
        rows = torch.linspace(0, out_dim - 1, min(_CHECK_ROWS, out_dim)).long().to(weight.device)
        approx = w1.to(weight.device, torch.float32) @ w2.to(weight.device, torch.float32)[:, rows]  # [in, k]
        exact = weight[rows].float().T
        ratio = float((exact * approx).sum() / (approx * approx).sum().clamp_min(1e-30))
        if not 0.8 < ratio < 1.25:
            raise EstimatorFileError(
                f"{where}: factors of {key} are not the rank-{factors.rank} SVD of this model's weight "
                f"(projection ratio {ratio:.3f}, expected 1); they were made from other weights. Build "
                "the estimator locally (allow_build=True) instead")
    factors.factors = {key: factors.factors[key] for key in checked}
    factors.fingerprint = fingerprint
