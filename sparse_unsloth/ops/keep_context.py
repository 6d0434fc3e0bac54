"""Zero the dropped channels of the context rows, keep the dense rows whole: one pass.

With more than half of a projection's channels kept, its sparse product is the dense product
with ``t[n, c]`` zeroed wherever row ``n`` is a context row and channel ``c`` was dropped, on
the input activations or on the output (``ops.sparse_mm``). In torch that mask takes a
multiply by the column mask, a gather of the dense rows before it, a copy back after and, into
an output, an add: five passes over csr's 80%-kept attention activations that cost a third of
the projection's GEMM time (benchmarks/NOTES.md). Here each element is read once and written
once; added into ``out``, 16-bit values are summed in float32 and rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._register import INTERPRET, register

_BLOCK_N, _BLOCK_C = 32, 128


@triton.jit
def _keep_context_kernel(src_ptr, out_ptr, dense_ptr, kept_ptr, N, C, s_src, s_out,
                         ADD: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok, col_ok = rows < N, cols < C
    dense = tl.load(dense_ptr + rows, mask=row_ok, other=0) != 0
    kept = tl.load(kept_ptr + cols, mask=col_ok, other=0) != 0
    inside = row_ok[:, None] & col_ok[None, :]
    r = rows.to(tl.int64)[:, None]
    v = tl.load(src_ptr + r * s_src + cols[None, :], mask=inside & (dense[:, None] | kept[None, :]), other=0.0)
    if ADD:
        prev = tl.load(out_ptr + r * s_out + cols[None, :], mask=inside, other=0.0)
        v = v.to(tl.float32) + prev.to(tl.float32) if UPCAST else v + prev
    tl.store(out_ptr + r * s_out + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=inside)


def _launch(src: torch.Tensor, out: torch.Tensor, dense: torch.Tensor, kept: torch.Tensor, add: bool) -> None:
    n, c = src.shape
    grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(c, _BLOCK_C))
    wrap_triton(_keep_context_kernel)[grid](
        src, out, dense, kept, n, c, src.stride(0), out.stride(0), ADD=add,
        UPCAST=src.element_size() < 4, BLOCK_N=_BLOCK_N, BLOCK_C=_BLOCK_C, num_warps=4)


def _fake_new(src, dense, kept):
    return torch.empty_like(src)


def _fake_add(out, src, dense, kept):
    return None


@register("sparse_unsloth::keep_context", set(), _fake_new)
def _keep_context(src: torch.Tensor, dense: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(src)
    _launch(src, out, dense, kept, add=False)
    return out


@register("sparse_unsloth::keep_context_add_", {"out"}, _fake_add)
def _keep_context_add_(out: torch.Tensor, src: torch.Tensor, dense: torch.Tensor, kept: torch.Tensor) -> None:
    _launch(src, out, dense, kept, add=True)


def _flags(n: int, idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``[n]`` uint8: 1 at ``idx`` (repeats allowed), 0 elsewhere."""
    flags = torch.zeros(n, dtype=torch.uint8, device=device)
    return flags if idx is None or idx.numel() == 0 else flags.index_fill_(0, idx, 1)


def _reference(src: torch.Tensor, kept_idx: torch.Tensor, dense_idx: torch.Tensor | None) -> torch.Tensor:
    out = src * _flags(src.shape[1], kept_idx, src.device).to(src.dtype)
    if dense_idx is not None and dense_idx.numel():
        out.index_copy_(0, dense_idx, src.index_select(0, dense_idx))
    return out


def keep_context(src: torch.Tensor, kept_idx: torch.Tensor, dense_idx: torch.Tensor | None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``src`` (2-D) with its columns outside ``kept_idx`` zeroed in every row but ``dense_idx``:
    a new tensor, or added into ``out`` (returned). The kernel on the GPU (and for CPU tensors
    under Triton's interpreter), torch ops elsewhere."""
    if src.dim() != 2:
        raise ValueError(f"keep_context takes a 2-D tensor, not one of shape {tuple(src.shape)}")
    src = src if src.stride(1) == 1 else src.contiguous()
    if out is not None and (out.shape != src.shape or out.stride(1) != 1 or out.dtype != src.dtype):
        raise ValueError(f"out of shape {tuple(out.shape)} (strides {out.stride()}, {out.dtype}) for a source of "
                         f"shape {tuple(src.shape)} ({src.dtype}): it needs the same shape and dtype, and contiguous rows")
    if not (src.is_cuda or INTERPRET):
        masked = _reference(src, kept_idx, dense_idx)
        return masked if out is None else out.add_(masked)
    dense = _flags(src.shape[0], dense_idx, src.device)
    kept = _flags(src.shape[1], kept_idx, src.device)
    if out is None:
        return _keep_context(src, dense, kept)
    _keep_context_add_(out, src, dense, kept)
    return out

