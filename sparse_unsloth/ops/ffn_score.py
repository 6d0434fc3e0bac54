"""The FFN channel score of the estimator, fused: ``||silu(x Gr) * (x Ur)||_2`` over rows, per channel.

``Gr = G1 @ G2`` and ``Ur = U1 @ U2`` are the low-rank factors of the gate and up weights
(``G1`` ``[hidden, r]``, ``G2`` ``[r, C]``). The unfused score materializes four ``[rows, C]``
tensors (both estimates, the activation, its float copy) and runs a norm over them, about ten
launches. Here the thin products ``x @ G1`` and ``x @ U1`` (``[rows, r]``) are one torch GEMM
over the concatenated first factors, and one Triton kernel does the rest: each program owns a
``BN``-channel slice, keeps ``G2`` and ``U2``'s slices in registers, and walks the rows in
``BM`` tiles, computing both rank-``r`` estimates, the SwiGLU proxy and the running sum of
squares without writing any ``[rows, C]`` tensor. Top-k stays ``torch.topk``.

Registered as a torch op like ``ops.gather_mm`` (``ops._register``). Rank at most 128 (the
rank block is held whole; configs whose tiles do not fit are dropped by the autotuner); fp32
accumulation; under Triton's interpreter low-precision tiles
are upcast to fp32 before the dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._register import INTERPRET, register

_MAX_RANK = 128          # the estimator uses 8-64; the rank block is held whole


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BM": 16, "BN": 16}, num_warps=1)]
    # 14336 channels / 128 = 112 programs: about one wave on 132 SMs; 64 gives two.
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in ((64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4))]


@triton.autotune(configs=_configs(), key=["C", "RANK"])
@triton.jit
def _ffn_score_kernel(tg_ptr, tu_ptr, g2_ptr, u2_ptr, out_ptr, R, RANK, C,
                      s_tgr, s_tgk, s_tur, s_tuk, s_g2k, s_g2n, s_u2k, s_u2n,
                      UPCAST: tl.constexpr, IEEE: tl.constexpr, BR: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr):
    cols = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)
    col_ok = cols < C
    ks = tl.arange(0, BR)
    k_ok = ks < RANK
    wmask = k_ok[:, None] & col_ok[None, :]
    g2 = tl.load(g2_ptr + ks[:, None] * s_g2k + cols[None, :] * s_g2n, mask=wmask, other=0.0)
    u2 = tl.load(u2_ptr + ks[:, None] * s_u2k + cols[None, :] * s_u2n, mask=wmask, other=0.0)
    if UPCAST:
        g2 = g2.to(tl.float32)
        u2 = u2.to(tl.float32)
    sq = tl.zeros((BN,), dtype=tl.float32)
    for r0 in range(0, R, BM):
        rows = (r0 + tl.arange(0, BM)).to(tl.int64)
        tmask = (rows < R)[:, None] & k_ok[None, :]
        tg = tl.load(tg_ptr + rows[:, None] * s_tgr + ks[None, :] * s_tgk, mask=tmask, other=0.0)
        tu = tl.load(tu_ptr + rows[:, None] * s_tur + ks[None, :] * s_tuk, mask=tmask, other=0.0)
        if UPCAST:
            tg = tg.to(tl.float32)
            tu = tu.to(tl.float32)
        if IEEE:
            e = tl.dot(tg, g2, input_precision="ieee")
            g = tl.dot(tu, u2, input_precision="ieee")
        else:
            e = tl.dot(tg, g2)
            g = tl.dot(tu, u2)
        a = e * tl.sigmoid(e) * g                  # padded rows: e = g = 0, so a = 0
        sq += tl.sum(a * a, axis=0)
    tl.store(out_ptr + cols, tl.sqrt(sq), mask=col_ok)


def _fake(tg: torch.Tensor, tu: torch.Tensor, g2: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    return g2.new_empty(g2.shape[1], dtype=torch.float32)


@register("sparse_unsloth::ffn_score", set(), _fake)
def _ffn_score(tg: torch.Tensor, tu: torch.Tensor, g2: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    rows, rank = tg.shape
    c = g2.shape[1]
    out = g2.new_empty(c, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(c, meta["BN"]),)

    wrap_triton(_ffn_score_kernel)[grid](
        tg, tu, g2, u2, out, rows, rank, c, tg.stride(0), tg.stride(1), tu.stride(0), tu.stride(1),
        g2.stride(0), g2.stride(1), u2.stride(0), u2.stride(1),
        UPCAST=INTERPRET and g2.dtype != torch.float32, IEEE=g2.dtype == torch.float32,
        BR=max(16, triton.next_power_of_2(rank)))
    return out


def ffn_scores(x: torch.Tensor, gate: tuple[torch.Tensor, torch.Tensor],
               up: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """fp32 ``[C]``: the L2 norm over the rows of ``x`` of ``silu(x G1 G2) * (x U1 U2)``.

    ``gate`` = (G1 ``[hidden, r]``, G2 ``[r, C]``), ``up`` likewise, all in one dtype; ``x`` is
    cast to it, as the unfused estimator does.
    """
    (g1, g2), (u1, u2) = gate, up
    if g1.shape != u1.shape or g2.shape != u2.shape or g1.shape[1] != g2.shape[0]:
        raise ValueError(f"gate/up factors must be [hidden, r] and [r, C] alike; got "
                         f"{[tuple(t.shape) for t in (g1, g2, u1, u2)]}")
    if g1.shape[1] > _MAX_RANK:
        raise ValueError(f"rank {g1.shape[1]} > {_MAX_RANK}: the kernel holds the rank block whole")
    rank = g1.shape[1]
    t = x.to(g1.dtype) @ torch.cat([g1, u1], dim=1)          # both thin products in one GEMM
    return _ffn_score(t[:, :rank], t[:, rank:], g2, u2)


def ffn_channels(x: torch.Tensor, gate: tuple[torch.Tensor, torch.Tensor],
                 up: tuple[torch.Tensor, torch.Tensor], keep: int) -> torch.Tensor:
    """The ``keep`` channels of largest :func:`ffn_scores`, sorted (``estimator.select.ffn_channels``)."""
    scores = ffn_scores(x, gate, up)
    return torch.topk(scores, keep, sorted=False).indices.sort().values
