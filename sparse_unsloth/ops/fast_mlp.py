"""Fused sparse LoRA gated MLP: ``down(act(gate(x), up(x)))`` with contextual sparsity.

What Unsloth's LoRA_MLP does (one autograd Function, LoRA gradients by hand), except that the
frozen gate/up rows and down columns outside ``idx`` are zero for the context rows. The dense
rows (output tokens) see the full weights, and every LoRA branch is dense: for a context row
the gate value at a dropped channel is its LoRA term alone, ``h = act(e, g)`` stays full width
and down's LoRA reads all of ``h``. Exactly the masked dense layer (``ops.reference``).

No ``[tokens, channels]`` tensor is formed. A pass splits the channels three ways: the kept
ones for every row (``[tokens, kept]``, a few percent), all of them for the dense rows
(``[dense, channels]``), and the LoRA-only rest, which ``ops.lora_swiglu`` reduces to rank-r
sums in registers. Nothing but the input is kept for backward: the backward recomputes what
it needs from ``x`` (so a checkpointed layer's recompute, a forward inside backward, computes
nothing when its output is not read).

The activation of the kept channels and dense rows is passed in (``act_forward(e, g) -> h``
and ``act_backward(dh, e, g) -> (h, d_up, d_gate)``, both on 2-D tensors, the backward free
to overwrite its inputs), so Unsloth's SwiGLU Triton kernels plug in; it must be SwiGLU, as
the LoRA-only channels' kernels compute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .graphs import Runner, run_after, run_eager
from .lora_swiglu import lora_swiglu_cols, lora_swiglu_rows, swiglu_backward, swiglu_forward
from .sparse_mm import (
    LoRAProj,
    cast_like,
    has_rows,
    kept_channels,
    lora_grads_unpacked,
    lora_ins,
    packed,
    weight_like,
)


def first_occurrence(idx: torch.Tensor, n: int) -> torch.Tensor:
    """[len(idx)] 1 where ``idx`` (values below ``n``) holds a value for the first time, else 0:
    a sum over the dense rows counts a padded repeat once."""
    pos = torch.arange(idx.numel(), device=idx.device)
    first = torch.full((n,), idx.numel(), device=idx.device, dtype=pos.dtype).scatter_reduce_(0, idx, pos, "amin")
    return first[idx] == pos


def _without(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``t`` with ``rows`` zeroed (a contiguous copy, as the LoRA-only kernels read it; ``t``
    itself when there are none)."""
    return t.index_fill(0, rows, 0) if has_rows(rows) else t


def _kept_parts(x, slices, t_g, t_u):
    """(e, g) of the kept channels, every row: ``[rows, kept.padded]``, from the kept slices
    (gate W, gate B, up W, up B rows)."""
    gate_wk, gbk, up_wk, ubk = slices
    return (x @ gate_wk.t()).addmm_(t_g, gbk.t()), (x @ up_wk.t()).addmm_(t_u, ubk.t())


def _kept_slices(kp, *ts):
    """The rows ``kp`` of each of ``ts``: each slice is gathered once per pass."""
    return [t.index_select(0, kp) for t in ts]


def _clear(ts, kept, dense_idx) -> None:
    """Zero the alignment padding columns (repeats of the first kept channel) and the dense rows
    (computed in full apart) of the kept-channel tensors ``ts``, in place."""
    for t in ts:
        t[:, kept.k:] = 0
        if has_rows(dense_idx):
            t.index_fill_(0, dense_idx, 0)


def _forward(x, idx, dense_idx, gate_w, gate_a, gate_b, gate_s, up_w, up_a, up_b, up_s, down_w, down_a,
             down_b, down_s, act_forward, outs=None):
    """(out,) of the sparse MLP on 2-D ``x`` (written into ``outs`` when given: a CUDA graph's buffer)."""
    gate_w, up_w, down_w = (weight_like(w, x) for w in (gate_w, up_w, down_w))
    ga, gb, ua, ub, da, db = (cast_like(t, x) for t in (gate_a, gate_b, up_a, up_b, down_a, down_b))
    kept = kept_channels(idx)
    t_g, t_u = lora_ins(x, torch.cat([ga, ua]), [ga.shape[0], ua.shape[0]], (gate_s, up_s))
    e_k, g_k = _kept_parts(x, _kept_slices(kept.padded, gate_w, gb, up_w, ub), t_g, t_u)
    h_k = act_forward(e_k, g_k)
    _clear([h_k], kept, None)
    out = torch.mm(h_k, down_w.index_select(1, kept.padded).t(), out=outs and outs[0])
    (q,) = lora_swiglu_rows(_without(t_g, dense_idx), _without(t_u, dense_idx), gb.index_fill(0, kept.idx, 0),
                            ub.index_fill(0, kept.idx, 0), da.t().index_fill(0, kept.idx, 0))
    q.addmm_(h_k, da.index_select(1, kept.padded).t())
    if has_rows(dense_idx):
        x_r = x.index_select(0, dense_idx)
        h_r = act_forward((x_r @ gate_w.t()).addmm_(t_g.index_select(0, dense_idx), gb.t()),
                          (x_r @ up_w.t()).addmm_(t_u.index_select(0, dense_idx), ub.t()))
        out.index_copy_(0, dense_idx, h_r @ down_w.t())
        q.index_copy_(0, dense_idx, h_r @ da.t())
    out.addmm_(q, db.t(), alpha=down_s)
    return (out,)


def _backward(dy, x, idx, dense_idx, gate_w, gate_a, gate_b, gate_s, up_w, up_a, up_b, up_s, down_w,
              down_a, down_b, down_s, act_backward, outs=None):
    """(dx, the LoRA gradients packed: gate A, B, up A, B, down A, B), from ``x`` and ``dy`` alone."""
    gate_w, up_w, down_w = (weight_like(w, x) for w in (gate_w, up_w, down_w))
    ga, gb, ua, ub, da, db = (cast_like(t, x) for t in (gate_a, gate_b, up_a, up_b, down_a, down_b))
    kept = kept_channels(idx)
    kp = kept.padded
    dy = dy.to(x.dtype)
    a_both = torch.cat([ga, ua])
    t_g, t_u = lora_ins(x, a_both, [ga.shape[0], ua.shape[0]], (gate_s, up_s))
    t_d = (dy @ db).mul_(down_s)
    # The kept channels, every row (the dense rows' and padding columns' values zeroed after the
    # activation; the kept products below therefore see the context rows only).
    slices = _kept_slices(kp, gate_w, gb, up_w, ub)
    e_k, g_k = _kept_parts(x, slices, t_g, t_u)
    da_k = da.index_select(1, kp)
    h_k, du_k, dg_k = act_backward((dy @ down_w.index_select(1, kp)).addmm_(t_d, da_k), e_k, g_k)
    _clear([h_k, du_k, dg_k], kept, dense_idx)
    # The LoRA-only channels of the context rows: rank-r sums per row and per channel.
    ctx = [_without(t, dense_idx) for t in (t_g, t_u, t_d)]
    masked = [t.index_fill(0, kept.idx, 0) for t in (gb, ub, da.t())]
    q, r_g, r_u = lora_swiglu_rows(ctx[0], ctx[1], *masked, ctx[2])
    d_gb, d_ub, d_da_t = lora_swiglu_cols(*ctx, *masked)
    gate_wk, gbk, up_wk, ubk = slices
    q.addmm_(h_k, da_k.t())
    r_g.addmm_(dg_k, gbk)
    r_u.addmm_(du_k, ubk)
    d_gb.index_add_(0, kp, dg_k.t() @ t_g)          # padding columns are zero: they add nothing
    d_ub.index_add_(0, kp, du_k.t() @ t_u)
    d_da_t.index_add_(0, kp, h_k.t() @ t_d)
    dx = torch.mm(dg_k, gate_wk, out=outs and outs[0]).addmm_(du_k, up_wk)
    del e_k, g_k, h_k, du_k, dg_k
    # The dense rows, every channel; a padded repeat of a row is written twice and summed once.
    if has_rows(dense_idx):
        x_r, dy_r = x.index_select(0, dense_idx), dy.index_select(0, dense_idx)
        rows_of = [t.index_select(0, dense_idx) for t in (t_g, t_u, t_d)]
        h_r, du_r, dg_r = act_backward((dy_r @ down_w).addmm_(rows_of[2], da),
                                       (x_r @ gate_w.t()).addmm_(rows_of[0], gb.t()),
                                       (x_r @ up_w.t()).addmm_(rows_of[1], ub.t()))
        q.index_copy_(0, dense_idx, h_r @ da.t())
        r_g.index_copy_(0, dense_idx, dg_r @ gb)
        r_u.index_copy_(0, dense_idx, du_r @ ub)
        once = first_occurrence(dense_idx, x.shape[0]).to(x.dtype).unsqueeze(1)
        d_gb.addmm_(dg_r.t(), rows_of[0] * once)
        d_ub.addmm_(du_r.t(), rows_of[1] * once)
        d_da_t.addmm_(h_r.t(), rows_of[2] * once)
        dx.index_copy_(0, dense_idx, (dg_r @ gate_w).addmm_(du_r, up_w))
    # The LoRA A gradients and input gradient, every row: one product over x each for both A's.
    r = torch.cat([r_g.mul_(gate_s), r_u.mul_(up_s)], dim=1)
    dx.addmm_(r, a_both)
    d_a = r.t() @ x
    rank = ga.shape[0]
    return dx, packed((d_a[:rank], d_gb, d_a[rank:], d_ub, d_da_t.t(), dy.t() @ q.mul_(down_s)))


def mlp_forward(x: torch.Tensor, gate: LoRAProj, up: LoRAProj, down: LoRAProj, idx: torch.Tensor,
                dense_idx: torch.Tensor | None, act_forward: Callable, run: Runner, choose: Any = None,
                ) -> torch.Tensor:
    """The sparse MLP's output for 2-D ``x``, no autograd: one pass through ``run``. The kept
    channels and dense rows go in with the weights, as consts: a CUDA graph reads them where
    they are (the patch keeps them in buffers of their own), no copy per pass. The weights go in
    themselves (or their dequantizing functions): a 4-bit weight is dequantized per pass.
    ``choose``: the prologue that writes ``idx`` first, in the same pass (``graphs.run_after``)."""
    (out,) = run_after(run, choose, _forward, x, (idx, dense_idx, *gate[:4], *up[:4], *down[:4], act_forward), (0,))
    return out


def mlp_backward(dy: torch.Tensor, x: torch.Tensor, gate: LoRAProj, up: LoRAProj, down: LoRAProj,
                 idx: torch.Tensor, dense_idx: torch.Tensor | None, act_backward: Callable, run: Runner,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, the LoRA gradients gate A, B, up A, B, down A, B packed into one tensor) of
    :func:`mlp_forward`, from ``x`` and ``dy`` (2-D) alone: one pass through ``run``."""
    return run(_backward, (dy, x), (idx, dense_idx, *gate[:4], *up[:4], *down[:4], act_backward),
               rows=((0, 1), (0,)))


class _SparseLoRAMLP(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, gate_w, gate_a, gate_b, gate_s, up_w, up_a, up_b, up_s, down_w, down_a,
                down_b, down_s, idx, dense_idx, act_forward, act_backward, run, out_in_recompute):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        projs = (LoRAProj(gate_w, gate_a, gate_b, gate_s), LoRAProj(up_w, up_a, up_b, up_s),
                 LoRAProj(down_w, down_a, down_b, down_s))
        if out_in_recompute or torch._C._current_graph_task_id() == -1:
            out = mlp_forward(x2, *projs, idx, dense_idx, act_forward, run)
        else:
            # A checkpointed layer's recompute (a forward inside backward) whose output nothing reads:
            # the backward, next, recomputes what it needs from x, so nothing is computed here.
            out = x2.new_empty(x2.shape[0], down_b.shape[0])
        ctx.projs, ctx.act_backward, ctx.run = projs, act_backward, run
        ctx.save_for_backward(x2, idx, dense_idx)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x, idx, dense_idx = ctx.saved_tensors
        dx, flat = mlp_backward(dy.reshape(-1, dy.shape[-1]), x, *ctx.projs, idx, dense_idx, ctx.act_backward,
                                ctx.run)
        (d_gate_a, d_gate_b, _), (d_up_a, d_up_b, _), (d_down_a, d_down_b, _) = lora_grads_unpacked(
            flat, [(p.lora_a, p.lora_b) for p in ctx.projs], (False,) * 3)
        return (dx.view(*dy.shape[:-1], dx.shape[-1]), None, d_gate_a, d_gate_b, None, None,
                d_up_a, d_up_b, None, None, d_down_a, d_down_b, None, None, None, None, None, None, None)


def sparse_lora_mlp(x: torch.Tensor, gate: LoRAProj, up: LoRAProj, down: LoRAProj,
                    idx: torch.Tensor, dense_idx: torch.Tensor | None,
                    act_forward: Callable = swiglu_forward,
                    act_backward: Callable = swiglu_backward, run: Runner = run_eager,
                    out_in_recompute: bool = True) -> torch.Tensor:
    """The gated LoRA MLP of ``x`` (``[..., hidden]``) keeping intermediate channels ``idx``.

    ``dense_idx``: rows of the flattened ``x`` that see every channel (None: none; unique, but
    for repeats of its first row: the padding of the patch's buckets). ``run``: how each pass
    runs (:class:`~sparse_unsloth.ops.graphs.GraphRunner` on a GPU). ``out_in_recompute=False``: in a
    checkpointed layer's recompute (a forward inside backward) the returned values are not
    computed at all (the backward recomputes what it needs). Right only where nothing
    differentiated after the MLP reads its output's values, as in a decoder layer that ends
    ``residual + mlp(x)`` (the recomputed layer output itself is discarded by checkpointing).
    """
    if any(p.bias is not None for p in (gate, up, down)):
        raise ValueError("the fused sparse MLP takes no base-layer biases (mlp_bias=True models): "
                         "keep their MLP layers dense")
    return _SparseLoRAMLP.apply(x, *gate[:4], *up[:4], *down[:4], idx, dense_idx, act_forward, act_backward,
                                run, out_in_recompute)
