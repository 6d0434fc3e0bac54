"""Find the estimator factors a sparse model needs: given, from a file, or built."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch

from .factors import EstimatorFactors, build_factors
from .store import EstimatorFileError, load_factors


def _check(factors: EstimatorFactors, keys: list[str], rank: int, fingerprint: str, where: str) -> None:
    if factors.rank != rank:
        raise EstimatorFileError(f"{where} holds rank-{factors.rank} factors but the config asks for "
                                 f"rank {rank}")
    if factors.fingerprint and fingerprint and factors.fingerprint != fingerprint:
        raise EstimatorFileError(f"{where} was built for another model (fingerprint "
                                 f"{factors.fingerprint}) than this one ({fingerprint})")
    missing = [k for k in keys if k not in factors]
    if missing:
        raise EstimatorFileError(f"{where} lacks factors for {missing[:4]}{'...' if len(missing) > 4 else ''}"
                                 " that the config needs; rebuild it for these layers")


def resolve_factors(weights: Mapping[str, Callable[[], torch.Tensor]], rank: int, fingerprint: str,
                    source: str | Path | EstimatorFactors | None = None, model_id: str = "",
                    progress: bool = True) -> EstimatorFactors:
    """Factors for the projections in ``weights`` at ``rank``, checked against ``fingerprint``."""
    keys = sorted(weights)
    if isinstance(source, EstimatorFactors):
        _check(source, keys, rank, fingerprint, "the given estimator")
        return source
    if source is not None:
        factors = load_factors(source, rank, fingerprint or None)
        _check(factors, keys, rank, fingerprint, str(source))
        return factors
    return build_factors(weights, rank, progress=progress, fingerprint=fingerprint, model_id=model_id)
