"""Rank-r SVD factors of frozen weights: the training-free channel estimator.

For a weight ``W`` of shape ``[out, in]`` with SVD ``U S V^T`` the estimator keeps
``w1 = V_r S_r^{1/2}`` (``[in, r]``) and ``w2 = S_r^{1/2} U_r^T`` (``[r, out]``), so that
``x @ W.T`` is approximated by ``(x @ w1) @ w2`` at ``r * (in + out)`` multiply-adds a token.
Factors are keyed ``"{layer}.{proj}"`` (e.g. ``"3.gate_proj"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from tqdm.auto import tqdm

FORMAT_VERSION = 1
# Projections whose output channels the estimator scores; down/o follow gate-up/v.
ESTIMATED_PROJS = {"mlp": ("gate_proj", "up_proj"), "self_attn": ("q_proj", "k_proj", "v_proj")}


def svd_factors(weight: torch.Tensor, rank: int, dtype: torch.dtype | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1, w2) with ``x @ w1 @ w2`` the best rank-``rank`` approximation of ``x @ weight.T``.

    The SVD runs in float32 on the weight's device; the factors are returned in ``dtype``
    (default: the weight's own dtype).
    """
    if rank > min(weight.shape):
        raise ValueError(f"estimator rank {rank} exceeds the smaller side of a {tuple(weight.shape)} "
                         "weight; lower estimator_rank in the config")
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = s[:rank].sqrt()
    w1 = vh[:rank].T * root
    w2 = root[:, None] * u[:, :rank].T
    out = dtype or weight.dtype
    return w1.to(out).contiguous(), w2.to(out).contiguous()


class EstimatorFactors:
    """The SVD factors of one model at one rank, with the metadata that identifies them.

    ``biases``: the estimated projections' own biases (Qwen2's q/k/v), by the same keys, which the
    estimate adds to ``(x @ w1) @ w2``. They are the model's parameters, not the estimator's: taken
    from the model when it is patched (:meth:`with_biases`), never stored in an estimator file.
    """

    def __init__(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], rank: int,
                 fingerprint: str = "", model_id: str = "", revision: str = "",
                 extra: Mapping[str, str] | None = None, biases: Mapping[str, torch.Tensor] | None = None,
                 ) -> None:
        self.factors = dict(factors)
        self.rank = rank
        self.fingerprint = fingerprint
        self.model_id = model_id
        self.revision = revision
        self.extra = dict(extra or {})
        self.biases = dict(biases or {})

    def __contains__(self, key: str) -> bool:
        return key in self.factors

    def __getitem__(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.factors[key]
        except KeyError:
            raise KeyError(f"no estimator factors for {key!r}; this file holds "
                           f"{len(self.factors)} projections (layers {self.layers()}). Rebuild it "
                           "for the layers your config makes sparse.") from None

    def bias(self, key: str) -> torch.Tensor | None:
        """The bias of projection ``key`` (None: it has none)."""
        return self.biases.get(key)

    def layers(self) -> list[int]:
        return sorted({int(k.split(".", 1)[0]) for k in self.factors})

    def with_biases(self, biases: Mapping[str, torch.Tensor]) -> EstimatorFactors:
        """The same factors with ``biases`` (a projection's bias changes where its estimate lies)."""
        return EstimatorFactors(self.factors, self.rank, self.fingerprint, self.model_id, self.revision,
                                self.extra, biases)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> EstimatorFactors:
        moved = {k: (a.to(device, dtype), b.to(device, dtype)) for k, (a, b) in self.factors.items()}
        return EstimatorFactors(moved, self.rank, self.fingerprint, self.model_id, self.revision,
                                self.extra, {k: b.to(device, dtype) for k, b in self.biases.items()})


def factor_keys(layers: Mapping[str, Iterable[int]]) -> list[str]:
    """The ``"{layer}.{proj}"`` keys needed for the sparse layers of each kind."""
    return [f"{layer}.{proj}" for kind, idx in layers.items() for layer in sorted(idx)
            for proj in ESTIMATED_PROJS[kind]]


def build_factors(weights: Mapping[str, Callable[[], torch.Tensor]], rank: int,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                  progress: bool = True, **meta: str) -> EstimatorFactors:
    """SVD factors for each ``key -> weight getter`` (getters let 4-bit weights dequantize lazily).

    ``device`` is where the SVD runs (default: the weight's own device); the factors stay there.
    """
    factors = {}
    for key, get in tqdm(weights.items(), desc=f"SVD estimator (rank {rank})", disable=not progress,
                         unit="proj"):
        weight = get()
        if device is not None:
            weight = weight.to(device)
        factors[key] = svd_factors(weight, rank, dtype)
    return EstimatorFactors(factors, rank, **meta)
