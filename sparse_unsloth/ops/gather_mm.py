"""Fused gather GEMMs for the sparse frozen products: one Triton launch per product.

The two products of ``ops.sparse_mm`` ("no split" form: every row over the kept channels, the
dense rows over all of ``M``), each as one kernel that reads the kept channels and the dense
rows by index inside the GEMM instead of copying slices and scattering results:

* :func:`keep_cols` ``out[r, c] = x[r] @ m[:, c]`` for every row at a kept output column ``c``,
  for every column at a dense row ``r``, else 0 (or ``out`` unchanged, accumulating).
* :func:`keep_rows` ``out[r] = x[r, kept] @ m[kept]`` at the non-dense rows, ``x[r] @ m`` at the
  dense rows (fresh, or added to ``out``).

One 1-D grid holds two tile sets. The first ``cdiv(D, BM) * cdiv(C, BN)`` programs are the
dense tiles: ``BM`` dense rows of ``x`` gathered through ``dense_idx`` times a contiguous
``BN``-column panel of ``m``, over the full reduction. They come first in the grid because
they are the heavy ones (longest work first), and within a column panel the row tiles run
consecutively so the panel of ``m`` is read from DRAM about once. The remaining programs are
the kept tiles over contiguous rows of ``x``: for ``keep_cols`` a panel of kept columns of
``m`` gathered by index; for ``keep_rows`` contiguous columns, the reduction running over the
kept channels (``x[r, kept[j]]`` and ``m[kept[j], c]`` loaded by index in the K loop). A kept
tile does not store its dense rows (``dense_mask``), so every output element has exactly one
writer and the accumulating variants need no atomics.

Indices: int32 or int64, any order, each unique (a repeated dense row would be written twice).
Sorted kept indices give better-coalesced gathers; order never changes the result.
``dense_mask`` (bool ``[N]``, True at the dense rows) must agree with ``dense_idx``; it is built
from it when not given (two small launches), or passed in once per step by a caller that has
the token split's mask anyway. ``m`` may be any strided 2-D view (``W.T`` of an ``[out, in]``
weight, or ``W``); ``x`` and ``m`` share a dtype (bf16, fp16, fp32), accumulation is fp32,
fp32 inputs multiply in IEEE fp32 (not TF32, like torch's default matmul).

Each product is a torch op (``ops._register``), so ``torch.compile(fullgraph=True)`` keeps it in
the graph: a ``triton_op`` on the GPU (Inductor launches the kernel from its generated code), an
opaque ``custom_op`` with a fake under Triton's interpreter (``TRITON_INTERPRET=1``, CPU
tensors), which runs the same kernel: there is no separate CPU implementation. The interpreter
computes bf16 ``tl.dot`` wrongly (triton 3.9), so when interpreting the tiles are upcast to fp32
before the dot. Launches: one per product (a fresh ``keep_cols`` adds the zero fill of its
output; the in-place form, which the callers use on their LoRA output, does not).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._register import INTERPRET, register

_COLS, _ROWS = 0, 1           # which product the kept tiles compute (the kernel's MODE)


def _configs() -> list[triton.Config]:
    if INTERPRET:
        # Small fixed tiles: the interpreter's cost grows with the tile, and tests want several
        # tiles and K steps at tens of rows/channels.
        return [triton.Config({"BM": 16, "BN": 16, "BK": 16}, num_warps=1)]
    # Hopper: 128 x 128 x 64 bf16 tiles fill a warpgroup's MMA; smaller N tiles help the skinny
    # kept-column panels (1% of 14336 is 143 columns), deeper pipelines the long dense reductions.
    # Six configs: each is compiled per specialization, and a device call has minutes, not hours.
    shapes = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
              (64, 64, 64, 4, 4), (128, 256, 64, 8, 3)]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


@triton.jit
def _tile_dot(x_ptr, m_ptr, rows, row_ok, cols, col_ok, kept_ptr, k_len, sxr, sxk, smk, smn,
              GATHER_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """fp32 ``x[rows, kk] @ m[kk, cols]`` over ``kk`` = ``range(k_len)`` or ``kept[:k_len]``."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    x_rows = x_ptr + rows[:, None] * sxr
    m_cols = m_ptr + cols[None, :] * smn
    for k0 in range(0, k_len, BK):
        offs = k0 + tl.arange(0, BK)
        k_ok = offs < k_len
        if GATHER_K:
            kk = tl.load(kept_ptr + offs, mask=k_ok, other=0).to(tl.int64)
        else:
            kk = offs.to(tl.int64)
        a = tl.load(x_rows + kk[None, :] * sxk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(m_cols + kk[:, None] * smk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.autotune(configs=_configs(), key=["K", "C", "KEPT", "MODE", "ACCUMULATE"], restore_value=["out_ptr"])
@triton.jit
def _gather_mm_kernel(x_ptr, m_ptr, out_ptr, kept_ptr, dense_ptr, mask_ptr,
                      N, K, C, KEPT, D, sxr, sxk, smk, smn, sor, soc,
                      MODE: tl.constexpr, ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr,
                      IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    dense_m = tl.cdiv(D, BM)
    dense_tiles = dense_m * tl.cdiv(C, BN)
    if pid < dense_tiles:
        # Dense rows (gathered) x a contiguous column panel, full reduction.
        pm = pid % dense_m
        pn = pid // dense_m
        slot = pm * BM + tl.arange(0, BM)
        row_ok = slot < D
        rows = tl.load(dense_ptr + slot, mask=row_ok, other=0).to(tl.int64)
        cols = (pn * BN + tl.arange(0, BN)).to(tl.int64)
        col_ok = cols < C
        acc = _tile_dot(x_ptr, m_ptr, rows, row_ok, cols, col_ok, kept_ptr, K, sxr, sxk, smk, smn,
                        False, UPCAST, IEEE, BM, BN, BK)
        store_ok = row_ok[:, None] & col_ok[None, :]
    else:
        # Contiguous rows; kept output columns (MODE 0) or kept reduction channels (MODE 1).
        t = pid - dense_tiles
        kept_m = tl.cdiv(N, BM)
        pm = t % kept_m
        pn = t // kept_m
        rows = (pm * BM + tl.arange(0, BM)).to(tl.int64)
        row_ok = rows < N
        if MODE == 0:
            # Not named like the dense branch's `slot` ([BM]): Triton types a name across branches.
            kslot = pn * BN + tl.arange(0, BN)
            col_ok = kslot < KEPT
            cols = tl.load(kept_ptr + kslot, mask=col_ok, other=0).to(tl.int64)
            acc = _tile_dot(x_ptr, m_ptr, rows, row_ok, cols, col_ok, kept_ptr, K, sxr, sxk, smk, smn,
                            False, UPCAST, IEEE, BM, BN, BK)
        else:
            cols = (pn * BN + tl.arange(0, BN)).to(tl.int64)
            col_ok = cols < C
            acc = _tile_dot(x_ptr, m_ptr, rows, row_ok, cols, col_ok, kept_ptr, KEPT, sxr, sxk, smk, smn,
                            True, UPCAST, IEEE, BM, BN, BK)
        # The dense rows of this tile belong to the dense tiles.
        is_dense = tl.load(mask_ptr + rows, mask=row_ok, other=1).to(tl.int1)
        store_ok = (row_ok & ~is_dense)[:, None] & col_ok[None, :]
    out_ptrs = out_ptr + rows[:, None] * sor + cols[None, :] * soc
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=store_ok, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=store_ok)


def _launch(mode: int, accumulate: bool, out: torch.Tensor, x: torch.Tensor, m: torch.Tensor,
            kept_idx: torch.Tensor, dense_idx: torch.Tensor, dense_mask: torch.Tensor) -> None:
    n, k = x.shape
    c = m.shape[1]
    kept, d = kept_idx.shape[0], dense_idx.shape[0]
    kept_n = kept if mode == _COLS else c          # column extent of the kept tiles

    def grid(meta):
        bm, bn = meta["BM"], meta["BN"]
        return (triton.cdiv(d, bm) * triton.cdiv(c, bn) + triton.cdiv(n, bm) * triton.cdiv(kept_n, bn),)

    wrap_triton(_gather_mm_kernel)[grid](
        x, m, out, kept_idx, dense_idx, dense_mask, n, k, c, kept, d,
        x.stride(0), x.stride(1), m.stride(0), m.stride(1), out.stride(0), out.stride(1),
        MODE=mode, ACCUMULATE=accumulate, UPCAST=INTERPRET and x.dtype != torch.float32,
        IEEE=x.dtype == torch.float32)


def _fake_new(x: torch.Tensor, m: torch.Tensor, *_) -> torch.Tensor:
    return x.new_empty(x.shape[0], m.shape[1])


def _fake_inplace(*_) -> None:
    return None


@register("sparse_unsloth::keep_cols", set(), _fake_new)
def _keep_cols(x: torch.Tensor, m: torch.Tensor, kept_idx: torch.Tensor, dense_idx: torch.Tensor,
               dense_mask: torch.Tensor) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], m.shape[1])      # untouched (context row, dropped column): 0
    _launch(_COLS, False, out, x, m, kept_idx, dense_idx, dense_mask)
    return out


@register("sparse_unsloth::keep_cols_", {"out"}, _fake_inplace)
def _keep_cols_(out: torch.Tensor, x: torch.Tensor, m: torch.Tensor, kept_idx: torch.Tensor,
                dense_idx: torch.Tensor, dense_mask: torch.Tensor) -> None:
    _launch(_COLS, True, out, x, m, kept_idx, dense_idx, dense_mask)


@register("sparse_unsloth::keep_rows", set(), _fake_new)
def _keep_rows(x: torch.Tensor, m: torch.Tensor, kept_idx: torch.Tensor, dense_idx: torch.Tensor,
               dense_mask: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0], m.shape[1])      # every element has a writer
    _launch(_ROWS, False, out, x, m, kept_idx, dense_idx, dense_mask)
    return out


@register("sparse_unsloth::keep_rows_", {"out"}, _fake_inplace)
def _keep_rows_(out: torch.Tensor, x: torch.Tensor, m: torch.Tensor, kept_idx: torch.Tensor,
                dense_idx: torch.Tensor, dense_mask: torch.Tensor) -> None:
    _launch(_ROWS, True, out, x, m, kept_idx, dense_idx, dense_mask)


def dense_row_mask(dense_idx: torch.Tensor | None, n_rows: int, device: torch.device) -> torch.Tensor:
    """Bool ``[n_rows]``, True at ``dense_idx``: build once per batch and pass to every product."""
    mask = torch.zeros(n_rows, dtype=torch.bool, device=device)
    if dense_idx is not None:
        mask[dense_idx] = True
    return mask


def _prepare(x: torch.Tensor, m: torch.Tensor, kept_idx: torch.Tensor, dense_idx: torch.Tensor | None,
             dense_mask: torch.Tensor | None, out: torch.Tensor | None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2 or m.dim() != 2 or x.shape[1] != m.shape[0]:
        raise ValueError(f"need x [N, K] and m [K, C]; got {tuple(x.shape)} and {tuple(m.shape)}")
    if x.dtype != m.dtype:
        raise ValueError(f"x and m must share a dtype; got {x.dtype} and {m.dtype}")
    if kept_idx.dim() != 1 or kept_idx.numel() == 0:
        raise ValueError("kept_idx must be a non-empty 1-D index tensor")
    if out is not None and out.shape != (x.shape[0], m.shape[1]):
        raise ValueError(f"out must be {(x.shape[0], m.shape[1])}; got {tuple(out.shape)}")
    if dense_idx is None:
        dense_idx = kept_idx.new_empty(0)
    if dense_mask is None:
        dense_mask = dense_row_mask(dense_idx, x.shape[0], x.device)
    return dense_idx, dense_mask


def keep_cols(x: torch.Tensor, m: torch.Tensor, kept_idx: torch.Tensor, dense_idx: torch.Tensor | None = None,
              out: torch.Tensor | None = None, dense_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ m`` at the kept output columns for every row, at all columns for the dense rows.

    Fresh (other entries 0), or added into ``out`` in place and returned (``out += ...``,
    touching only the entries the product defines).
    """
    dense_idx, dense_mask = _prepare(x, m, kept_idx, dense_idx, dense_mask, out)
    if out is None:
        return _keep_cols(x, m, kept_idx, dense_idx, dense_mask)
    _keep_cols_(out, x, m, kept_idx, dense_idx, dense_mask)
    return out


def keep_rows(x: torch.Tensor, m: torch.Tensor, kept_idx: torch.Tensor, dense_idx: torch.Tensor | None = None,
              out: torch.Tensor | None = None, dense_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``x[:, kept] @ m[kept]`` for the non-dense rows, ``x @ m`` for the dense rows.

    Fresh, or added into ``out`` in place and returned (a sum of several products).
    """
    dense_idx, dense_mask = _prepare(x, m, kept_idx, dense_idx, dense_mask, out)
    if out is None:
        return _keep_rows(x, m, kept_idx, dense_idx, dense_mask)
    _keep_rows_(out, x, m, kept_idx, dense_idx, dense_mask)
    return out
