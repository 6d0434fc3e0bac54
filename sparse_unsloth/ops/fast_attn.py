"""Fused sparse LoRA attention projections: Q/K/V from one input, and O.

What Unsloth's LoRA_QKV and LoRA_W do (save the input and the LoRA factors, LoRA gradients
by hand), plus the base layers' biases (Qwen2's q/k/v; trainable ones get their gradient), except that the context rows see only the kept output channels of the frozen
q/k/v weights (``q_idx``/``k_idx``/``v_idx``) and only the kept input channels of the frozen
o weight (``o_idx``). Dense rows see the full weights; the LoRA branches are dense.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .graphs import Runner, run_after, run_eager
from .sparse_mm import (
    LoRAProj,
    add_bias_,
    add_lora_,
    cast_like,
    keep_cols_,
    keep_rows,
    kept_channels,
    lora_grads,
    lora_grads_unpacked,
    lora_ins,
    packed,
    weight_like,
)


def _qkv_forward(x, q_idx, k_idx, v_idx, dense_idx, q_w, q_a, q_b, q_s, q_bias, k_w, k_a, k_b, k_s, k_bias,
                 v_w, v_a, v_b, v_s, v_bias, outs=None):
    """(q, k, v) of 2-D ``x``, context rows keeping the output channels ``*_idx`` (written into
    ``outs`` when given)."""
    x_rows = functools.cache(lambda: x.index_select(0, dense_idx))    # gathered once, if a product needs it
    a_s = [cast_like(a, x) for a in (q_a, k_a, v_a)]
    lora = lora_ins(x, torch.cat(a_s), [a.shape[0] for a in a_s], (q_s, k_s, v_s))
    projs = ((q_w, q_b, q_bias, q_idx), (k_w, k_b, k_bias, k_idx), (v_w, v_b, v_bias, v_idx))
    return tuple(add_bias_(keep_cols_(torch.mm(t, cast_like(b, x).t(), out=buf), x, weight_like(w, x).t(),
                                      kept_channels(idx), dense_idx, x_rows), bias)
                 for (w, b, bias, idx), t, buf in zip(projs, lora, outs or (None, None, None)))


def _qkv_backward(dq, dk, dv, x, q_idx, k_idx, v_idx, dense_idx, q_w, q_a, q_b, q_s, k_w, k_a, k_b, k_s,
                  v_w, v_a, v_b, v_s, bias_grads, outs=None):
    """(dx, packed (dq_a, dq_b, dq_bias, dk_a, ...)): a bias's gradient where ``bias_grads`` says so."""
    grads = [d.to(x.dtype) for d in (dq, dk, dv)]
    pairs = [(cast_like(a, x), cast_like(b, x)) for a, b in ((q_a, q_b), (k_a, k_b), (v_a, v_b))]
    d_a, d_b, dy_b, a_all = lora_grads(x, grads, pairs, (q_s, k_s, v_s))
    terms = [(d, weight_like(w, x), kept_channels(idx)) for d, w, idx in zip(grads, (q_w, k_w, v_w),
                                                                             (q_idx, k_idx, v_idx))]
    dx = keep_rows(terms, dense_idx, outs and outs[0]).addmm_(dy_b, a_all)
    small = []
    for da, db, d, needed in zip(d_a, d_b, grads, bias_grads):
        small += [da, db, d.sum(0)] if needed else [da, db]
    return dx, packed(small)


def qkv_forward(x: torch.Tensor, q: LoRAProj, k: LoRAProj, v: LoRAProj, q_idx: torch.Tensor, k_idx: torch.Tensor,
                v_idx: torch.Tensor, dense_idx: torch.Tensor | None, run: Runner, choose: Any = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) of 2-D ``x``, no autograd: one pass through ``run``. Kept channels and dense rows
    go in as consts, read in place by a CUDA graph (see ``fast_mlp.mlp_forward``, and there
    ``choose``)."""
    return run_after(run, choose, _qkv_forward, x, (q_idx, k_idx, v_idx, dense_idx, *q, *k, *v), (0, 1, 2))


def qkv_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, x: torch.Tensor, q: LoRAProj, k: LoRAProj,
                 v: LoRAProj, q_idx: torch.Tensor, k_idx: torch.Tensor, v_idx: torch.Tensor,
                 dense_idx: torch.Tensor | None, bias_grads: tuple[bool, bool, bool], run: Runner,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, q A, q B, (q bias,) k A, ... packed into one tensor: ``sparse_mm.lora_grads_unpacked``)
    of :func:`qkv_forward` (2-D), a bias's gradient where ``bias_grads`` says so."""
    consts = [c for p in (q, k, v) for c in p[:4]]
    return run(_qkv_backward, (dq, dk, dv, x), (q_idx, k_idx, v_idx, dense_idx, *consts, tuple(bias_grads)),
               rows=((0, 1, 2, 3), (0,)))


class _SparseLoRAQKV(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, q_w, q_a, q_b, q_s, q_bias, k_w, k_a, k_b, k_s, k_bias, v_w, v_a, v_b, v_s, v_bias,
                q_idx, k_idx, v_idx, dense_idx, run):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        ctx.projs = (LoRAProj(q_w, q_a, q_b, q_s, q_bias), LoRAProj(k_w, k_a, k_b, k_s, k_bias),
                     LoRAProj(v_w, v_a, v_b, v_s, v_bias))
        ctx.run = run
        ctx.save_for_backward(x2, q_idx, k_idx, v_idx, dense_idx)
        return tuple(o.view(*shape[:-1], -1) for o in qkv_forward(x2, *ctx.projs, q_idx, k_idx, v_idx, dense_idx, run))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dq, dk, dv):
        x, q_idx, k_idx, v_idx, dense_idx = ctx.saved_tensors
        needed = tuple(p.bias is not None and need for p, need in zip(ctx.projs, ctx.needs_input_grad[5::5]))
        dx, flat = qkv_backward(*(d.reshape(-1, d.shape[-1]) for d in (dq, dk, dv)), x, *ctx.projs, q_idx, k_idx,
                                v_idx, dense_idx, needed, ctx.run)
        out: list = [dx.view(*dq.shape[:-1], x.shape[-1])]
        for p, (d_a, d_b, d_bias) in zip(ctx.projs, lora_grads_unpacked(flat, [(p.lora_a, p.lora_b) for p in ctx.projs],
                                                                         needed)):
            out += [None, d_a, d_b, None, None if d_bias is None else d_bias.to(p.bias.dtype)]
        return (*out, None, None, None, None, None)


def _o_forward(x, idx, dense_idx, w, a, b, s, bias, outs=None):
    out = keep_rows([(x, weight_like(w, x).t(), kept_channels(idx))], dense_idx, outs and outs[0])
    return (add_bias_(add_lora_(out, x, cast_like(a, x), cast_like(b, x), s), bias),)


def _o_backward(dy, x, idx, dense_idx, w, a, b, s, bias_grad, outs=None):
    dy = dy.to(x.dtype)
    (d_a,), (d_b,), dy_b, a = lora_grads(x, [dy], [(cast_like(a, x), cast_like(b, x))], [s])
    dx = keep_cols_(torch.mm(dy_b, a, out=outs and outs[0]), dy, weight_like(w, x), kept_channels(idx), dense_idx)
    return dx, packed((d_a, d_b, dy.sum(0)) if bias_grad else (d_a, d_b))


def o_forward(x: torch.Tensor, o: LoRAProj, idx: torch.Tensor, dense_idx: torch.Tensor | None, run: Runner,
              ) -> torch.Tensor:
    """The O projection of 2-D ``x``, no autograd: one pass through ``run``."""
    (out,) = run(_o_forward, (x,), (idx, dense_idx, *o), rows=((0,), (0,)))
    return out


def o_backward(dy: torch.Tensor, x: torch.Tensor, o: LoRAProj, idx: torch.Tensor, dense_idx: torch.Tensor | None,
               bias_grad: bool, run: Runner) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, A, B (, bias) packed into one tensor) of :func:`o_forward` (2-D), the bias's gradient if
    ``bias_grad``."""
    return run(_o_backward, (dy, x), (idx, dense_idx, *o[:4], bias_grad), rows=((0, 1), (0,)))


class _SparseLoRAO(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, w, a, b, s, bias, idx, dense_idx, run):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        ctx.proj, ctx.run = LoRAProj(w, a, b, s, bias), run
        ctx.save_for_backward(x2, idx, dense_idx)
        out = o_forward(x2, ctx.proj, idx, dense_idx, run)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x, idx, dense_idx = ctx.saved_tensors
        needed = ctx.proj.bias is not None and ctx.needs_input_grad[5]
        dx, flat = o_backward(dy.reshape(-1, dy.shape[-1]), x, ctx.proj, idx, dense_idx, needed, ctx.run)
        ((d_a, d_b, d_bias),) = lora_grads_unpacked(flat, [(ctx.proj.lora_a, ctx.proj.lora_b)], (needed,))
        d_bias = None if d_bias is None else d_bias.to(ctx.proj.bias.dtype)
        return dx.view(*dy.shape[:-1], dx.shape[-1]), None, d_a, d_b, None, d_bias, None, None, None


def sparse_lora_qkv(x: torch.Tensor, q: LoRAProj, k: LoRAProj, v: LoRAProj, q_idx: torch.Tensor,
                    k_idx: torch.Tensor, v_idx: torch.Tensor, dense_idx: torch.Tensor | None,
                    run: Runner = run_eager) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, K, V) of ``x`` (``[..., hidden]``), context rows keeping output channels ``*_idx``.

    ``run``: how each pass runs (:class:`~sparse_unsloth.ops.graphs.GraphRunner` on a GPU).
    """
    return _SparseLoRAQKV.apply(x, *q, *k, *v, q_idx, k_idx, v_idx, dense_idx, run)


def sparse_lora_o(x: torch.Tensor, o: LoRAProj, idx: torch.Tensor, dense_idx: torch.Tensor | None,
                  run: Runner = run_eager) -> torch.Tensor:
    """The O projection of ``x``, context rows reading only input channels ``idx``."""
    return _SparseLoRAO.apply(x, *o, idx, dense_idx, run)
