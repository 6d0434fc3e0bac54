"""SwiGLU, and the LoRA-only channels of a sparse SwiGLU MLP reduced to rank r in registers.

In a sparse MLP a context row's dropped intermediate channel ``c`` has no frozen part: its gate
and up values are LoRA alone, ``e = t_g . gb_c`` and ``g = t_u . ub_c`` (``t_* = s * x @ A.T``,
the row's rank-r LoRA input; ``gb_c``, ``ub_c`` rows of the LoRA B factors), and so is the down
projection's gradient there, ``dh = t_d . da_c`` (``t_d = s * dy @ down_B``). The layer needs
only rank-r sums of those channels: per row ``h @ da.T`` (down's LoRA input) and, in backward,
``d_gate @ gb`` and ``d_up @ ub``; per channel ``d_gate.T @ t_g``, ``d_up.T @ t_u`` and
``h.T @ t_d`` (the B and down-A gradients). As tensors they are a dozen ``[tokens, channels]``
passes over memory per layer (14336 channels at 8B shapes); here each tile of ``e``, ``g``,
``dh`` is recomputed from the factors (rank-r dots) and only the sums are written: one kernel
over row blocks, one over channel blocks.

The caller leaves out what is not LoRA-only by zeros: the factor rows ``t_*`` of output tokens
(their channels are computed in full apart) and the rows of ``gb``, ``ub``, ``da.T`` at kept
channels (``silu(0) * 0 = 0`` and ``dh = 0`` there, so they add nothing).

On CUDA tensors the Triton kernels run; elsewhere (CPU, float64 tests) the same sums are
formed with torch. The kernels' own tests run them on the CPU under Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._register import INTERPRET

_MAX_RANK = 128          # the rank block is held whole in registers


def swiglu_forward(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(e) * g


def swiglu_backward(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, d_up, d_gate) of ``h = silu(e) * g``, at least float32 inside like Unsloth's kernel."""
    ef = e.to(torch.promote_types(e.dtype, torch.float32))
    se = torch.sigmoid(ef)
    f = (ef * se).to(dh.dtype)
    d_gate = (dh * g).to(ef.dtype) * se * (1.0 + ef * (1.0 - se))
    return f * g, dh * f, d_gate.to(dh.dtype)


_MAX_SPLIT = 8


def _configs(rows_kernel: bool) -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BM": 16, "BC": 16, "SPLIT": 2}, num_warps=1)]
    # One program per row block (or channel block) walks the other axis, or a SPLIT-th of it (the
    # partial sums added after): at 8B shapes 4096 rows / 32 = 128 programs is one program of
    # 4 warps per SM, too few to hide the loads' and the sigmoid's latency. (The first
    # measurement, 2026-12-06 on an H100, unsplit: rows 133-198 us, columns 103 us a call,
    # against ~40 us of arithmetic.)
    shapes = (((32, 64, 4), (32, 128, 4), (64, 64, 4), (16, 128, 4), (16, 64, 2), (16, 256, 4), (32, 64, 2))
              if rows_kernel else
              ((64, 64, 4), (128, 64, 4), (64, 128, 8), (32, 64, 4), (64, 32, 4), (128, 32, 4), (32, 32, 2)))
    whole = ((bm, bc, w, 1) for bm, bc, w in shapes)
    more = ((bm, bc, w, k) for bm, bc, w in shapes[:2] for k in (2, 4, _MAX_SPLIT))   # each config compiles once
    return [triton.Config({"BM": bm, "BC": bc, "SPLIT": k}, num_warps=w, num_stages=3)
            for bm, bc, w, k in (*whole, *more)]


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _tile(a_g, a_u, a_d, b_g, b_u, d_a, BACKWARD: tl.constexpr, IEEE: tl.constexpr):
    """(h, d_up, d_gate) of one [rows, channels] tile from the rank-r factors (fp32)."""
    e = _dot(a_g, tl.trans(b_g), IEEE)
    g = _dot(a_u, tl.trans(b_u), IEEE)
    sig = tl.sigmoid(e)
    f = e * sig
    h = f * g
    if BACKWARD:
        dh = _dot(a_d, tl.trans(d_a), IEEE)
        return h, dh * f, dh * g * sig * (1.0 + e * (1.0 - sig))
    return h, h, h


@triton.jit
def _block(p, idx, n, ks, RANK, UPCAST: tl.constexpr):
    """Rows ``idx`` of a row-major ``[n, RANK]`` tensor as a ``[len(idx), BR]`` block (zeros outside)."""
    x = tl.load(p + idx[:, None] * RANK + ks[None, :], mask=(idx < n)[:, None] & (ks < RANK)[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _put(p, x, idx, n, ks, RANK):
    """``x`` into rows ``idx`` of a row-major ``[n, RANK]`` float32 tensor at ``p`` (masked)."""
    tl.store(p + idx[:, None] * RANK + ks[None, :], x, mask=(idx < n)[:, None] & (ks < RANK)[None, :])


@triton.jit
def _share(length, BLOCK: tl.constexpr):
    """[start, stop) of this program's share of ``range(length)``: whole BLOCKs, split
    ``num_programs(1)`` ways."""
    per = tl.cdiv(tl.cdiv(length, BLOCK), tl.num_programs(1)) * BLOCK
    start = tl.program_id(1) * per
    return start, tl.minimum(start + per, length)


@triton.autotune(configs=_configs(True), key=["C", "RANK"])
@triton.jit
def _rows_kernel(tg, tu, td, gb, ub, dat, q_out, rg_out, ru_out, N, C, RANK,
                 BACKWARD: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, BR: tl.constexpr,
                 BM: tl.constexpr, BC: tl.constexpr, SPLIT: tl.constexpr):
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    ks = tl.arange(0, BR)
    a_g = _block(tg, rows, N, ks, RANK, UPCAST)
    a_u = _block(tu, rows, N, ks, RANK, UPCAST)
    a_d = _block(td, rows, N, ks, RANK, UPCAST)       # without BACKWARD: tg again, unused
    acc_q = tl.zeros((BM, BR), dtype=tl.float32)
    acc_g = tl.zeros((BM, BR), dtype=tl.float32)
    acc_u = tl.zeros((BM, BR), dtype=tl.float32)
    start, stop = _share(C, BC)
    for c0 in range(start, stop, BC):
        cols = (c0 + tl.arange(0, BC)).to(tl.int64)
        b_g = _block(gb, cols, stop, ks, RANK, UPCAST)
        b_u = _block(ub, cols, stop, ks, RANK, UPCAST)
        d_a = _block(dat, cols, stop, ks, RANK, UPCAST)
        h, d_up, d_gate = _tile(a_g, a_u, a_d, b_g, b_u, d_a, BACKWARD, IEEE)
        acc_q += _dot(h.to(d_a.dtype), d_a, IEEE)
        if BACKWARD:
            acc_g += _dot(d_gate.to(b_g.dtype), b_g, IEEE)
            acc_u += _dot(d_up.to(b_u.dtype), b_u, IEEE)
    part = tl.program_id(1) * N * RANK                   # this split's partial sums
    _put(q_out + part, acc_q, rows, N, ks, RANK)
    if BACKWARD:
        _put(rg_out + part, acc_g, rows, N, ks, RANK)
        _put(ru_out + part, acc_u, rows, N, ks, RANK)


@triton.autotune(configs=_configs(False), key=["C", "RANK"])
@triton.jit
def _cols_kernel(tg, tu, td, gb, ub, dat, dgb_out, dub_out, ddat_out, N, C, RANK,
                 UPCAST: tl.constexpr, IEEE: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
                 SPLIT: tl.constexpr):
    cols = (tl.program_id(0) * BC + tl.arange(0, BC)).to(tl.int64)
    ks = tl.arange(0, BR)
    b_g = _block(gb, cols, C, ks, RANK, UPCAST)
    b_u = _block(ub, cols, C, ks, RANK, UPCAST)
    d_a = _block(dat, cols, C, ks, RANK, UPCAST)
    acc_g = tl.zeros((BC, BR), dtype=tl.float32)
    acc_u = tl.zeros((BC, BR), dtype=tl.float32)
    acc_d = tl.zeros((BC, BR), dtype=tl.float32)
    start, stop = _share(N, BM)
    for r0 in range(start, stop, BM):
        rows = (r0 + tl.arange(0, BM)).to(tl.int64)
        a_g = _block(tg, rows, stop, ks, RANK, UPCAST)
        a_u = _block(tu, rows, stop, ks, RANK, UPCAST)
        a_d = _block(td, rows, stop, ks, RANK, UPCAST)
        h, d_up, d_gate = _tile(a_g, a_u, a_d, b_g, b_u, d_a, True, IEEE)
        acc_g += _dot(tl.trans(d_gate.to(a_g.dtype)), a_g, IEEE)
        acc_u += _dot(tl.trans(d_up.to(a_u.dtype)), a_u, IEEE)
        acc_d += _dot(tl.trans(h.to(a_d.dtype)), a_d, IEEE)
    part = tl.program_id(1) * C * RANK
    _put(dgb_out + part, acc_g, cols, C, ks, RANK)
    _put(dub_out + part, acc_u, cols, C, ks, RANK)
    _put(ddat_out + part, acc_d, cols, C, ks, RANK)


def _checked(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    rank = tensors[0].shape[1]
    if rank > _MAX_RANK:
        raise ValueError(f"LoRA rank {rank} > {_MAX_RANK}: the fused SwiGLU kernels hold the rank block whole")
    return tuple(t.contiguous() for t in tensors)


def _flags(t: torch.Tensor) -> dict:
    return {"UPCAST": INTERPRET and t.dtype != torch.float32, "IEEE": t.dtype == torch.float32,
            "BR": max(16, triton.next_power_of_2(t.shape[1]))}


def _partials(n: int, rank: int, like: torch.Tensor, count: int) -> list[torch.Tensor]:
    """``count`` float32 ``[_MAX_SPLIT, n, rank]`` buffers of per-split partial sums, uninitialised:
    only the first ``SPLIT`` of the chosen config are read (:func:`_summed`)."""
    return [torch.empty(_MAX_SPLIT, n, rank, dtype=torch.float32, device=like.device) for _ in range(count)]


def _summed(kernel, parts: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The partial sums the launch just made, added up. The first launch of a shape autotunes:
    every config then runs into the same buffers, so the slices past the chosen config's
    ``SPLIT`` hold another config's partials, not zeros (zeroed buffers gave wrong sums there)."""
    split = kernel.best_config.kwargs["SPLIT"]
    return tuple(p[:split].sum(0).to(dtype) for p in parts)


def triton_rows(tg, tu, gb, ub, da_t, td=None) -> tuple[torch.Tensor, ...]:
    """:func:`lora_swiglu_rows` by the Triton kernel (CUDA, or CPU under the interpreter)."""
    backward = td is not None
    tg, tu, gb, ub, da_t, td = _checked((tg, tu, gb, ub, da_t, tg if td is None else td))
    (n, rank), c = tg.shape, gb.shape[0]
    parts = _partials(n, rank, tg, 3 if backward else 1)
    q, rg, ru = parts if backward else parts * 3
    _rows_kernel[lambda meta: (triton.cdiv(n, meta["BM"]), meta["SPLIT"])](
        tg, tu, td, gb, ub, da_t, q, rg, ru, n, c, rank, BACKWARD=backward, **_flags(tg))
    return _summed(_rows_kernel, parts, tg.dtype)


def triton_cols(tg, tu, td, gb, ub, da_t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`lora_swiglu_cols` by the Triton kernel (CUDA, or CPU under the interpreter)."""
    tg, tu, td, gb, ub, da_t = _checked((tg, tu, td, gb, ub, da_t))
    (n, rank), c = tg.shape, gb.shape[0]
    parts = _partials(c, rank, tg, 3)
    _cols_kernel[lambda meta: (triton.cdiv(c, meta["BC"]), meta["SPLIT"])](
        tg, tu, td, gb, ub, da_t, *parts, n, c, rank, **_flags(tg))
    return _summed(_cols_kernel, parts, gb.dtype)


def lora_swiglu_rows(tg: torch.Tensor, tu: torch.Tensor, gb: torch.Tensor, ub: torch.Tensor, da_t: torch.Tensor,
                     td: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Per-row rank-r sums over the channels of ``h = silu(tg @ gb.T) * (tu @ ub.T)``.

    ``tg``, ``tu``, ``td`` ``[rows, r]``; ``gb``, ``ub``, ``da_t`` ``[channels, r]``, one dtype.
    Without ``td``: ``(h @ da_t,)``. With it (``dh = td @ da_t.T``): ``(h @ da_t, d_gate @ gb,
    d_up @ ub)``, where ``d_up = dh * silu(e)`` and ``d_gate`` is ``dh * g`` through silu's
    derivative. Results in the inputs' dtype, summed in at least float32.
    """
    if tg.is_cuda:
        return triton_rows(tg, tu, gb, ub, da_t, td)
    e, g = tg @ gb.t(), tu @ ub.t()
    if td is None:
        return (swiglu_forward(e, g) @ da_t,)
    h, d_up, d_gate = swiglu_backward(td @ da_t.t(), e, g)
    return h @ da_t, d_gate @ gb, d_up @ ub


def lora_swiglu_cols(tg: torch.Tensor, tu: torch.Tensor, td: torch.Tensor, gb: torch.Tensor, ub: torch.Tensor,
                     da_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel rank-r sums over the rows, as in :func:`lora_swiglu_rows`:
    ``(d_gate.T @ tg, d_up.T @ tu, h.T @ td)``, each ``[channels, r]``."""
    if tg.is_cuda:
        return triton_cols(tg, tu, td, gb, ub, da_t)
    h, d_up, d_gate = swiglu_backward(td @ da_t.t(), tg @ gb.t(), tu @ ub.t())
    return d_gate.t() @ tg, d_up.t() @ tu, h.t() @ td
