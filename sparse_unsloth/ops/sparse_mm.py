"""The frozen products of a sparse layer, in the "no split" form, plus the dense LoRA terms.

A sparse frozen product lets the context rows of ``X @ M`` see only the kept channels of
``M`` while the dense rows (output tokens) see all of it. Instead of splitting the tokens,
every row is computed over the kept channels (one skinny GEMM written straight into the
output) and the few dense rows are recomputed over the full matrix and copied over theirs.
That costs ``N * k + D * C`` multiply-adds per column instead of the split's
``(N - D) * k + D * C`` (``k`` kept of ``C`` channels, ``D`` dense of ``N`` rows), and needs
no token gather/scatter of the big activations and no copy of the dropped part of a weight:
only the kept slice of ``M`` (a few percent of it) and the dense rows of ``X`` are gathered.
With more than half of the channels kept, the skinny form saves little and its column gathers
cost much: there every row runs the dense product, and the context rows' dropped channels are
zeroed in the activations (input channels before, output channels after), the dense rows'
left alone, so the dense rows need no second product.

``M`` is the right operand as used (``W.T`` for a forward product, ``W`` for an input
gradient); a transposed view is fine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .keep_context import keep_context

Weight = torch.Tensor | Callable[[], torch.Tensor]


class LoRAProj(NamedTuple):
    """A frozen weight ``[out, in]``, its LoRA branch ``s * B @ A`` (A ``[r, in]``, B ``[out, r]``)
    and the base layer's bias (None, frozen, or trainable: it is never masked).

    ``weight`` is a tensor or a function returning one: a 4-bit weight's dequantization, which
    the Functions call once in forward and once in backward, keeping nothing between the passes.
    """

    weight: Weight
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    bias: torch.Tensor | None = None


Term = tuple[torch.Tensor, torch.Tensor, "Kept"]           # (X [N, K], M [K, C], kept channels)
# cuBLAS takes its fast (tensor-core, 16-byte) kernels only when leading dimensions are
# multiples of 8 bf16 elements; a kept count like 143 fell back to sm75 align-1 kernels.
_ALIGN = 8


def cast_like(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``w`` in ``like``'s dtype (a copy only when they differ).

    A model stored in another dtype than its activations (an fp32 LoRA run of a bf16 model)
    computes in the activations' dtype, as F.linear under autocast would.
    """
    return w if w.dtype == like.dtype else w.to(like.dtype)


def weight_like(w: Weight, like: torch.Tensor) -> torch.Tensor:
    """The frozen weight for this pass (dequantized if it is a function) in ``like``'s dtype."""
    return cast_like(w() if callable(w) else w, like)


def has_rows(dense_idx: torch.Tensor | None) -> bool:
    return dense_idx is not None and dense_idx.numel() > 0


class Kept(NamedTuple):
    """Kept channels: sorted ``idx``, the same padded to a multiple of ``_ALIGN`` (repeating its
    first entry, so that the gathered operands keep 16-byte leading dimensions), and their count."""

    idx: torch.Tensor
    padded: torch.Tensor
    k: int


def kept_channels(idx: torch.Tensor) -> Kept:
    """``Kept`` for ``idx``."""
    extra = -idx.numel() % _ALIGN
    padded = torch.cat([idx, idx[:1].expand(extra)]) if extra else idx
    return Kept(idx, padded, idx.numel())


def add_bias_(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``out += bias`` in place (no-op without a bias)."""
    return out if bias is None else out.add_(bias.to(out.dtype))


def packed(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors (of one dtype) flattened into one: a CUDA graph's small results come out in one
    copy instead of one each (each copy is a launch on the host)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unpacked(flat: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Views of ``flat`` (from :func:`packed`) in ``shapes``."""
    sizes = [math.prod(s) for s in shapes]
    return [t.view(s) for t, s in zip(flat.split(sizes), shapes)]


def lora_grads_unpacked(flat: torch.Tensor, factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
                        bias_grads: Sequence[bool]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(dA, dB, d_bias or None) per projection from a backward pass's packed gradients: each
    projection's A and B (shapes of ``factors``' (A, B)), then its bias's ``[out]`` where
    ``bias_grads`` says so."""
    shapes = [s for (a, b), need in zip(factors, bias_grads)
              for s in ((a.shape, b.shape, b.shape[:1]) if need else (a.shape, b.shape))]
    grads = iter(unpacked(flat, shapes))
    return [(next(grads), next(grads), next(grads) if need else None) for need in bias_grads]


def lora_ins(x: torch.Tensor, a_all: torch.Tensor, ranks: Sequence[int], scales: Sequence[float],
             ) -> list[torch.Tensor]:
    """``s_i * x @ A_i.T`` of LoRA branches that read the same ``x``, from one product over ``x``
    with their A factors stacked (``a_all``: ``[sum ranks, in]``): column views of one tensor."""
    parts = (x @ a_all.t()).split(list(ranks), dim=1)
    for t, s in zip(parts, scales):
        t.mul_(s)
    return list(parts)


def add_lora_(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float,
              ) -> torch.Tensor:
    """``out += s * (x @ a.T) @ b.T`` in place."""
    return out.addmm_(x @ a.t(), b.t(), alpha=s)


def lora_grads(x: torch.Tensor, dys: Sequence[torch.Tensor], pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
               scales: Sequence[float]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(dA per branch, dB per branch, ``[s_i * dy_i @ B_i]`` stacked, the A factors stacked) of LoRA
    branches ``y_i = s_i * (x @ A_i.T) @ B_i.T`` reading the same ``x``; the last two's product is
    their input gradient. Each product over ``x`` (and that one) is done once for all branches."""
    ranks = [a.shape[0] for a, _ in pairs]
    a_all = torch.cat([a for a, _ in pairs]) if len(pairs) > 1 else pairs[0][0]
    ins = lora_ins(x, a_all, ranks, scales)
    dy_b = torch.cat([(dy @ b).mul_(s) for dy, (_, b), s in zip(dys, pairs, scales)], dim=1)   # [N, sum r]
    d_a = list((dy_b.t() @ x).split(ranks))
    d_b = [dy.t() @ t for dy, t in zip(dys, ins)]
    return d_a, d_b, dy_b, a_all


def _cols(m: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``m[:, idx]``; for a transposed view (``W.T``) gathered as rows of ``W``, which reads whole
    rows (coalesced) instead of one element per row, and returned transposed (cuBLAS takes it)."""
    if m.dim() == 2 and m.stride(0) == 1 and m.stride(1) == m.shape[0]:
        return m.t().index_select(0, idx).t()
    return m.index_select(1, idx)


def _mostly_kept(kept: Kept, channels: int) -> bool:
    """Whether more than half of ``channels`` are kept. Then every row runs over every channel
    (the dense product, no gathered operand) and the dropped channels are zeroed in the context
    rows' activations: the skinny GEMM over the kept ones needs a column gather or scatter of
    the activations, which at 80% kept took as long as the GEMM itself (benchmarks/NOTES.md,
    2026-12-06), and the dense rows need no second product."""
    return 2 * kept.k > channels


def keep_cols_(out: torch.Tensor, x: torch.Tensor, m: torch.Tensor, kept: Kept,
               dense_idx: torch.Tensor | None, x_rows: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """``out += x @ m`` where non-dense rows get only the output columns ``kept`` (in place).

    ``x_rows``: gives ``x``'s dense rows, for callers whose several products share them (asked
    only by a product that needs them).
    """
    if _mostly_kept(kept, m.shape[1]):
        # The dense product, its dropped columns zeroed in the context rows on the way into ``out``.
        return keep_context(x @ m, kept.idx, dense_idx, out=out)
    if has_rows(dense_idx):
        rows = torch.addmm(out.index_select(0, dense_idx), x.index_select(0, dense_idx) if x_rows is None else x_rows(),
                           m)
    out.index_add_(1, kept.idx, (x @ _cols(m, kept.padded))[:, :kept.k])
    if has_rows(dense_idx):
        out.index_copy_(0, dense_idx, rows)
    return out


def keep_rows(terms: Sequence[Term], dense_idx: torch.Tensor | None, out: torch.Tensor | None = None,
              ) -> torch.Tensor:
    """``sum x @ m`` over the terms, non-dense rows reading only the input channels kept.

    A fresh tensor (or ``out``). A mostly kept term multiplies ``x`` with its dropped channels
    zeroed in the context rows by all of ``m``; any other adds ``x[:, idx] @ m[idx]`` for every
    row, and then the dense rows are replaced by their full products (over every term).
    """
    first, skinny = True, False
    for x, m, kept in terms:
        if _mostly_kept(kept, m.shape[0]):
            x_kept, m_kept = keep_context(x, kept.idx, dense_idx), m
        else:
            skinny = True
            m_kept = m.index_select(0, kept.padded)
            m_kept[kept.k:] = 0                    # the padding columns of x contribute nothing
            x_kept = x.index_select(1, kept.padded)
        out = torch.mm(x_kept, m_kept, out=out) if first else out.addmm_(x_kept, m_kept)
        first = False
    if skinny and has_rows(dense_idx):
        rows = None
        for x, m, _ in terms:
            x_rows = x.index_select(0, dense_idx)
            rows = x_rows @ m if rows is None else rows.addmm_(x_rows, m)
        out.index_copy_(0, dense_idx, rows)
    return out
