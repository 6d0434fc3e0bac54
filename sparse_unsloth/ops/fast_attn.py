"""Fused sparse LoRA attention projections: Q/K/V from one input, and O.

What Unsloth's LoRA_QKV and LoRA_W do (save the input and the LoRA factors, LoRA gradients
by hand), plus the base layers' biases (Qwen2's q/k/v; trainable ones get their gradient), except that the context rows see only the kept output channels of the frozen
q/k/v weights (``q_idx``/``k_idx``/``v_idx``) and only the kept input channels of the frozen
o weight (``o_idx``). Dense rows see the full weights; the LoRA branches are dense.
"""

from __future__ import annotations

import torch

from .sparse_mm import (
    LoRAProj,
    add_bias_,
    add_lora_,
    bias_grad,
    cast_like,
    has_rows,
    keep_cols_,
    keep_rows,
    kept_channels,
    lora_grads,
    lora_out,
    weight_like,
)


class _SparseLoRAQKV(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, q_w, q_a, q_b, q_s, q_bias, k_w, k_a, k_b, k_s, k_bias, v_w, v_a, v_b, v_s, v_bias,
                q_idx, k_idx, v_idx, dense_idx):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        srcs = (q_w, k_w, v_w)
        weights = tuple(weight_like(w, x2) for w in srcs)
        loras = tuple(cast_like(t, x2) for t in (q_a, q_b, k_a, k_b, v_a, v_b))
        kepts = tuple(kept_channels(i) for i in (q_idx, k_idx, v_idx))
        x_rows = x2.index_select(0, dense_idx) if has_rows(dense_idx) else None
        biases = (q_bias, k_bias, v_bias)
        outs = [add_bias_(keep_cols_(lora_out(x2, a, b, s), x2, w.t(), kept, dense_idx, x_rows), bias)
                .view(*shape[:-1], -1)
                for w, a, b, s, bias, kept in zip(weights, loras[0::2], loras[1::2], (q_s, k_s, v_s), biases,
                                                  kepts)]
        ctx.weight_srcs = srcs         # dequantized again in backward (see fast_mlp)
        ctx.biases = biases
        ctx.scales = (q_s, k_s, v_s)
        ctx.save_for_backward(x2, *loras, *(t for kept in kepts for t in (kept.idx, kept.padded)), dense_idx)
        ctx.in_shape = shape
        return tuple(outs)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dq, dk, dv):
        x, *rest = ctx.saved_tensors
        loras, idx_pairs, dense_idx = rest[:6], rest[6:12], rest[12]
        kepts = [kept_channels(i, p) for i, p in zip(idx_pairs[0::2], idx_pairs[1::2])]
        grads = [d.reshape(-1, d.shape[-1]).to(x.dtype) for d in (dq, dk, dv)]
        pairs = list(zip(loras[0::2], loras[1::2]))
        lora_g = [lora_grads(x, d, a, b, s) for d, (a, b), s in zip(grads, pairs, ctx.scales)]
        weights = [weight_like(w, x) for w in ctx.weight_srcs]
        dx = keep_rows(list(zip(grads, weights, kepts)), dense_idx)
        for (_, _, dyb), (a, _) in zip(lora_g, pairs):
            dx.addmm_(dyb, a)
        out: list = [dx.view(ctx.in_shape)]
        for (d_a, d_b, _), d, bias, needed in zip(lora_g, grads, ctx.biases, ctx.needs_input_grad[5::5]):
            out += [None, d_a, d_b, None, bias_grad(d, bias, needed)]
        return (*out, None, None, None, None)


class _SparseLoRAO(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, w, a, b, s, bias, idx, dense_idx):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        src, w, a, b = w, weight_like(w, x2), cast_like(a, x2), cast_like(b, x2)
        kept = kept_channels(idx)
        out = keep_rows([(x2, w.t(), kept)], dense_idx)
        add_bias_(add_lora_(out, x2, a, b, s), bias)
        ctx.weight_src, ctx.scale, ctx.bias = src, s, bias
        ctx.save_for_backward(x2, a, b, idx, kept.padded, dense_idx)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x, a, b, idx, padded, dense_idx = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x.dtype)
        d_a, d_b, dyb = lora_grads(x, dy2, a, b, ctx.scale)
        dx = keep_cols_(dyb @ a, dy2, weight_like(ctx.weight_src, x), kept_channels(idx, padded), dense_idx)
        d_bias = bias_grad(dy2, ctx.bias, ctx.needs_input_grad[5])
        return dx.view(*dy.shape[:-1], dx.shape[-1]), None, d_a, d_b, None, d_bias, None, None


def sparse_lora_qkv(x: torch.Tensor, q: LoRAProj, k: LoRAProj, v: LoRAProj, q_idx: torch.Tensor,
                    k_idx: torch.Tensor, v_idx: torch.Tensor, dense_idx: torch.Tensor | None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, K, V) of ``x`` (``[..., hidden]``), context rows keeping output channels ``*_idx``."""
    return _SparseLoRAQKV.apply(x, *q, *k, *v, q_idx, k_idx, v_idx, dense_idx)


def sparse_lora_o(x: torch.Tensor, o: LoRAProj, idx: torch.Tensor,
                  dense_idx: torch.Tensor | None) -> torch.Tensor:
    """The O projection of ``x``, context rows reading only input channels ``idx``."""
    return _SparseLoRAO.apply(x, *o, idx, dense_idx)
