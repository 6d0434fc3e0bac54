"""Column gather and column scatter-add of a row-major matrix: ``x[:, idx]`` and ``out[:, idx] += src``.

The sparse attention passes read and write the kept channels of row-major activations and
weights. PyTorch's ``index_select`` / ``index_add_`` along dim 1 of a CUDA tensor walk it one
column index at a time: at 80% kept (the ``llama3-8b-csr`` preset) they took 70-170 us for a
``[4096, 3277]`` bf16 slice on an H100, the time of the GEMM beside them (benchmarks/NOTES.md).
Here each program copies a ``[BM, BN]`` tile: ``BN`` column indices loaded once, the rows read
along the (sorted) indices, so neighbouring lanes read neighbouring addresses.

``add_cols_`` needs unique indices (a sorted kept set is): there are no atomics. It rounds once
(16-bit: ``out + src`` in float32, then stored), as ``index_add_`` does. On CPU tensors without
Triton's interpreter both are the torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._register import INTERPRET, register

_BM, _BN = 32, 128


@triton.jit
def _gather_cols_kernel(x_ptr, idx_ptr, out_ptr, N, K, s_xn, s_on, BM: tl.constexpr, BN: tl.constexpr):
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    c_ok = cols < K
    src = tl.load(idx_ptr + cols, mask=c_ok, other=0)
    ok = (rows < N)[:, None] & c_ok[None, :]
    v = tl.load(x_ptr + rows[:, None] * s_xn + src[None, :], mask=ok)
    tl.store(out_ptr + rows[:, None] * s_on + cols[None, :], v, mask=ok)


@triton.jit
def _add_cols_kernel(out_ptr, idx_ptr, src_ptr, N, K, s_on, s_sn, UPCAST: tl.constexpr, BF16_BY_HAND: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr):
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    c_ok = cols < K
    dst = tl.load(idx_ptr + cols, mask=c_ok, other=0)
    ok = (rows < N)[:, None] & c_ok[None, :]
    where = out_ptr + rows[:, None] * s_on + dst[None, :]
    o = tl.load(where, mask=ok)
    s = tl.load(src_ptr + rows[:, None] * s_sn + cols[None, :], mask=ok)
    if BF16_BY_HAND:
        # Triton's interpreter truncates float32 -> bfloat16; round to nearest even as the GPU does.
        bits = (o.to(tl.float32) + s.to(tl.float32)).to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        o = bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif UPCAST:
        o = (o.to(tl.float32) + s.to(tl.float32)).to(o.dtype)
    else:
        o = o + s
    tl.store(where, o, mask=ok)


def _grid(n: int, k: int) -> tuple[int, int]:
    return triton.cdiv(n, _BM), triton.cdiv(k, _BN)


def _gather_fake(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], idx.numel())


@register("sparse_unsloth::gather_cols", set(), _gather_fake)
def _gather_cols(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0], idx.numel())
    if out.numel():
        wrap_triton(_gather_cols_kernel)[_grid(*out.shape)](x, idx, out, out.shape[0], out.shape[1], x.stride(0),
                                                            out.stride(0), BM=_BM, BN=_BN)
    return out


def _add_fake(out: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    return None


@register("sparse_unsloth::add_cols_", {"out"}, _add_fake)
def _add_cols(out: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    if src.numel():
        wrap_triton(_add_cols_kernel)[_grid(*src.shape)](out, idx, src, src.shape[0], src.shape[1], out.stride(0),
                                                         src.stride(0), UPCAST=out.element_size() < 4,
                                                         BF16_BY_HAND=INTERPRET and out.dtype == torch.bfloat16,
                                                         BM=_BM, BN=_BN)


def _check(x: torch.Tensor, idx: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"a 2-D tensor with contiguous rows is needed (got shape {tuple(x.shape)}, "
                         f"strides {x.stride()})")
    if idx.dim() != 1 or idx.dtype != torch.long:
        raise ValueError(f"indices must be 1-D int64 (got {idx.dtype}, shape {tuple(idx.shape)})")


def _triton(t: torch.Tensor) -> bool:
    return t.is_cuda or INTERPRET


def gather_cols(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[:, idx]`` (``x`` 2-D, ``idx`` int64 in range) as a new row-major tensor."""
    if x.dim() == 2 and x.stride(1) != 1:
        x = x.contiguous()
    _check(x, idx)
    return _gather_cols(x, idx) if _triton(x) else x.index_select(1, idx)


def add_cols_(out: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``out[:, idx] += src`` in place, for unique ``idx``; returns ``out``."""
    _check(out, idx)
    if src.shape != (out.shape[0], idx.numel()) or src.stride(1) != 1:
        raise ValueError(f"src of shape {tuple(src.shape)} (contiguous rows) must be [rows of out, len(idx)] = "
                         f"{[out.shape[0], idx.numel()]}")
    if _triton(out):
        _add_cols(out, idx, src)
        return out
    return out.index_add_(1, idx, src)
