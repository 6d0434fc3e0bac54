"""Pure PyTorch sparse frozen linears: the CPU path and the oracle of the GPU kernels.

Both functions compute ``x @ W.T (+ b)`` with a frozen ``W`` whose channels outside ``idx``
are treated as zero for every row of ``x`` except the dense rows, which see all of ``W``.
Equivalently: the dense layer with the dropped channels masked out, for the sparse rows.

* :func:`sparse_out_linear` drops output channels (rows of ``W``): gate/up, q/k/v.
* :func:`sparse_in_linear` drops input channels (columns of ``W``): down, o.

Only the index tensors are saved for backward, so backward slices the same channels that
forward used; the weight gets no gradient (it is frozen); a trainable bias (PEFT's
``bias="all"`` / ``"lora_only"``) gets its full gradient, as the bias is never masked.
``x`` is 2-D ``[tokens, features]``.
``weight`` is a tensor or a function returning one (a 4-bit weight's dequantization): a
function is called again in backward, so no dequantized copy lives between the passes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Weight = torch.Tensor | Callable[[], torch.Tensor]


def _get(weight: Weight) -> torch.Tensor:
    return weight() if callable(weight) else weight


def _check_frozen(weight: torch.Tensor) -> None:
    if weight.requires_grad:
        raise ValueError("sparse linears are for frozen base weights; this weight requires grad. "
                         "Sparsify a LoRA model whose base weights are frozen.")


def _as(weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Activations may run in another dtype than the stored weight (fp32 LoRA training of a
    # bf16 model, autocast): compute in the activation's dtype as F.linear under autocast does.
    return weight if weight.dtype == like.dtype else weight.to(like.dtype)


def _dense_rows_(out: torch.Tensor, rows_in: torch.Tensor, weight: torch.Tensor,
                 dense_idx: torch.Tensor | None) -> torch.Tensor:
    """Overwrite the dense rows of ``out`` with ``rows_in[dense_idx] @ weight`` (all channels)."""
    if dense_idx is not None and dense_idx.numel():
        out[dense_idx] = rows_in[dense_idx] @ _as(weight, rows_in)
    return out


def _bias_grad(ctx, grad_out: torch.Tensor) -> torch.Tensor | None:
    return grad_out.sum(0) if ctx.needs_input_grad[2] else None


class _SparseOutLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_src, bias, idx, dense_idx):
        weight = _get(weight_src)
        _check_frozen(weight)
        out = x.new_zeros(x.shape[0], weight.shape[0])
        out[:, idx] = x @ _as(weight[idx], x).T
        _dense_rows_(out, x, weight.T, dense_idx)
        if bias is not None:
            out += bias
        ctx.weight_src = weight_src
        ctx.save_for_backward(idx, dense_idx)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        idx, dense_idx = ctx.saved_tensors
        weight = _get(ctx.weight_src)
        grad_x = grad_out[:, idx] @ _as(weight[idx], grad_out)
        return _dense_rows_(grad_x, grad_out, weight, dense_idx), None, _bias_grad(ctx, grad_out), None, None


class _SparseInLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_src, bias, idx, dense_idx):
        weight = _get(weight_src)
        _check_frozen(weight)
        out = _dense_rows_(x[:, idx] @ _as(weight[:, idx], x).T, x, weight.T, dense_idx)
        if bias is not None:
            out += bias
        ctx.weight_src = weight_src
        ctx.save_for_backward(idx, dense_idx)
        ctx.in_features = x.shape[1]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        idx, dense_idx = ctx.saved_tensors
        weight = _get(ctx.weight_src)
        grad_x = grad_out.new_zeros(grad_out.shape[0], ctx.in_features)
        grad_x[:, idx] = grad_out @ _as(weight[:, idx], grad_out)
        return _dense_rows_(grad_x, grad_out, weight, dense_idx), None, _bias_grad(ctx, grad_out), None, None


def sparse_out_linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None,
                      idx: torch.Tensor, dense_idx: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + b`` with output channels outside ``idx`` zero for non-dense rows."""
    return _SparseOutLinear.apply(x, weight, bias, idx, dense_idx)


def sparse_in_linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None,
                     idx: torch.Tensor, dense_idx: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + b`` reading only input channels ``idx`` for non-dense rows."""
    return _SparseInLinear.apply(x, weight, bias, idx, dense_idx)


def masked_linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None,
                  idx: torch.Tensor, dense_idx: torch.Tensor | None, dim: int) -> torch.Tensor:
    """The definition both functions must match: the dense linear with channels masked per row.

    ``dim`` 0 masks output channels (rows of W), 1 input channels. Costs a full weight per row;
    for tests only.
    """
    weight = _get(weight)
    keep = torch.zeros(weight.shape[dim], dtype=torch.bool, device=weight.device)
    keep[idx] = True
    sparse_w = weight * (keep[:, None] if dim == 0 else keep[None, :])
    rows = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if dense_idx is not None:
        rows[dense_idx] = True
    out = torch.where(rows[:, None], F.linear(x, weight), F.linear(x, sparse_w))
    return out if bias is None else out + bias
