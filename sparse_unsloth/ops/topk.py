"""The ``k`` largest entries of each row, as their indices in ascending order: one kernel.

The estimator keeps the channels of the ``k`` highest scores and wants them sorted (the sparse
GEMMs gather rows in that order). ``torch.topk`` then ``sort`` is two launches, and for one row
of 14,336 scores they take 58 and 27 us on an H100 (benchmarks/NOTES.md): a third of a channel
choice. Here one program per row holds the whole row in registers, finds the ``k``-th largest
value by bisecting its order-preserving integer key (32 counting passes over registers), and
writes the selected indices in index order through a prefix sum, so no sort is needed.

Exactly ``k`` indices per row: every entry above the ``k``-th largest value, then the lowest
indices among those equal to it. NaN counts as the largest value, as in ``torch.topk``.
Rows of up to 65,536 entries (one program holds a row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._register import register

MAX_ROW = 1 << 16


@triton.jit
def _topk_sorted_kernel(x_ptr, out_ptr, N, K, s_xr, s_or, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    bits = tl.load(x_ptr + row * s_xr + cols, mask=ok, other=0.0).to(tl.float32).to(tl.int32, bitcast=True)
    # Order-preserving key in [0, 2**32): negative floats have their magnitude bits flipped, then
    # the sign bit is flipped so that every key is non-negative; padding lanes get key -1.
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648
    key = tl.where(ok, key, -1)
    # The largest t with at least K keys >= t is the K-th largest key.
    lo = tl.zeros((), dtype=tl.int64)
    hi = tl.full((), 4294967295, dtype=tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) // 2
        enough = tl.sum((key >= mid).to(tl.int32), axis=0) >= K
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    above = key > lo
    tie = key == lo
    need = K - tl.sum(above.to(tl.int32), axis=0)
    take = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + row * s_or + pos, cols.to(tl.int64), mask=take)


def _fake(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], k, dtype=torch.long)


@register("sparse_unsloth::topk_sorted", set(), _fake)
def _topk_sorted(x: torch.Tensor, k: int) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape[0], k, dtype=torch.long, device=x.device)
    n = rows.shape[1]
    block = triton.next_power_of_2(n)
    wrap_triton(_topk_sorted_kernel)[(rows.shape[0],)](
        rows, out, n, k, rows.stride(0), out.stride(0), BLOCK=block, num_warps=max(1, min(16, block // 1024)))
    return out.view(*x.shape[:-1], k)


def topk_sorted(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, ascending) of the ``k`` largest entries of each row of ``x`` (``[..., n]``):
    the set ``torch.topk(x, k).indices`` holds, up to the choice among tied values."""
    n = x.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the row length {n}")
    if n > MAX_ROW:
        raise ValueError(f"rows of {n} entries: at most {MAX_ROW} (one program holds a row)")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _topk_sorted(x, k)
