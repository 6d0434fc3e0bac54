"""Fused sparse LoRA gated MLP: ``down(act(gate(x), up(x)))`` with contextual sparsity.

What Unsloth's LoRA_MLP does (one autograd Function, saves ``x, e, g`` and the LoRA factors,
recomputes the rest in backward, LoRA gradients by hand), except that the frozen gate/up rows
and down columns outside ``idx`` are zero for the context rows. The dense rows (output
tokens) see the full weights, and every LoRA branch is dense. So for a context row the gate
value at a dropped channel is its LoRA term alone, ``h = act(e, g)`` stays full width and
down's LoRA reads all of ``h``: exactly the masked dense layer (``ops.reference``).

The activation is passed in (``act_forward(e, g) -> h`` and
``act_backward(dh, e, g) -> (h, dg, de)``, both on 2-D ``[tokens, channels]`` tensors; the
backward may overwrite its inputs), so Unsloth's SwiGLU / GEGLU Triton kernels plug in; the
torch SwiGLU below is the default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .graphs import GraphRunner, Runner, run_eager
from .sparse_mm import (
    LoRAProj,
    add_lora_,
    cast_like,
    has_rows,
    keep_cols_,
    keep_rows,
    kept_channels,
    lora_grads,
    lora_out,
    packed,
    unpacked,
    weight_like,
)


def swiglu_forward(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return F.silu(e) * g


def swiglu_backward(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, d_up, d_gate) of ``h = silu(e) * g``, at least float32 inside like Unsloth's kernel."""
    ef = e.to(torch.promote_types(e.dtype, torch.float32))
    se = torch.sigmoid(ef)
    f = (ef * se).to(dh.dtype)
    d_gate = (dh * g).to(ef.dtype) * se * (1.0 + ef * (1.0 - se))
    return f * g, dh * f, d_gate.to(dh.dtype)


def _forward(x, idx, dense_idx, gate_w, gate_a, gate_b, gate_s, up_w, up_a, up_b, up_s, down_w, down_a,
             down_b, down_s, act_forward, with_out, outs=None):
    """(out, e, g) of the sparse MLP on 2-D ``x``, written into ``outs`` when given (a CUDA graph's
    buffers). Without ``with_out``, ``out`` is left uncomputed (its buffer, or zeros)."""
    out_buf, e_buf, g_buf = outs or (None, None, None)
    gate_w, up_w = weight_like(gate_w, x), weight_like(up_w, x)
    ga, gb, ua, ub, da, db = (cast_like(t, x) for t in (gate_a, gate_b, up_a, up_b, down_a, down_b))
    kept = kept_channels(idx)
    x_rows = x.index_select(0, dense_idx) if has_rows(dense_idx) else None
    e = keep_cols_(lora_out(x, ga, gb, gate_s, e_buf), x, gate_w.t(), kept, dense_idx, x_rows)
    g = keep_cols_(lora_out(x, ua, ub, up_s, g_buf), x, up_w.t(), kept, dense_idx, x_rows)
    del x_rows
    if not with_out:                 # (nor is a 4-bit down weight dequantized)
        return (out_buf if out_buf is not None else x.new_zeros(x.shape[0], db.shape[0])), e, g
    h = act_forward(e, g)
    out = keep_rows([(h, weight_like(down_w, x).t(), kept)], dense_idx, out_buf)
    add_lora_(out, h, da, db, down_s)
    return out, e, g


def _backward(dy, x, e, g, idx, dense_idx, gate_w, gate_a, gate_b, gate_s, up_w, up_a, up_b, up_s, down_w,
              down_a, down_b, down_s, act_backward, outs=None):
    """(dx, the LoRA gradients packed: gate A, B, up A, B, down A, B); overwrites ``e`` and ``g``."""
    gate_w, up_w, down_w = (weight_like(w, x) for w in (gate_w, up_w, down_w))
    ga, gb, ua, ub, da, db = (cast_like(t, x) for t in (gate_a, gate_b, up_a, up_b, down_a, down_b))
    kept = kept_channels(idx)
    dy = dy.to(x.dtype)
    # dh = dy @ down (context rows: kept columns only) + down's LoRA (all of h).
    d_down_a_in = (dy @ db).mul_(down_s)
    dh = keep_cols_(d_down_a_in @ da, dy, down_w, kept, dense_idx)
    h, d_up, d_gate = act_backward(dh, e, g)
    del dh, e, g
    d_down_a = d_down_a_in.t() @ h
    d_down_b = dy.t() @ (h @ da.t()).mul_(down_s)
    del h, d_down_a_in
    d_up_a, d_up_b, up_dyb = lora_grads(x, d_up, ua, ub, up_s)
    d_gate_a, d_gate_b, gate_dyb = lora_grads(x, d_gate, ga, gb, gate_s)
    dx = keep_rows([(d_up, up_w, kept), (d_gate, gate_w, kept)], dense_idx, outs and outs[0])
    dx.addmm_(up_dyb, ua).addmm_(gate_dyb, ga)
    return dx, packed((d_gate_a, d_gate_b, d_up_a, d_up_b, d_down_a, d_down_b))


class _SparseLoRAMLP(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, gate_w, gate_a, gate_b, gate_s, up_w, up_a, up_b, up_s, down_w, down_a,
                down_b, down_s, idx, dense_idx, act_forward, act_backward, run, keep_acts, indices_now,
                out_in_recompute):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        # The weights themselves (or their dequantizing functions), never a pass's copies: a
        # 4-bit weight is dequantized again in backward rather than kept alive in between.
        ctx.consts = (gate_w, gate_s, up_w, up_s, down_w, down_s)
        loras = (gate_a, gate_b, up_a, up_b, down_a, down_b)
        # e and g stay in the CUDA graph's buffers (no copy out) unless a backward that is not
        # the next one keeps them: a checkpointed layer's recompute (a forward inside backward)
        # is followed by its own backward before any other layer's, which reads them in place
        # (checked untouched), and a forward without grad drops them (so its e and g take the
        # recompute's buffers, not room in the graphs' memory pool).
        in_backward = torch._C._current_graph_task_id() != -1
        share = (1, 2) if isinstance(run, GraphRunner) and (not keep_acts or in_backward) else ()
        # A recompute exists for e and g; where the layer only adds the MLP's output to its
        # residual (whose backward reads no values), that output is never read: no down product,
        # and its buffer comes back as it is, uncopied.
        with_out = out_in_recompute or not (keep_acts and in_backward)
        if not with_out and share:
            share = (0, 1, 2)
        # The kept channels and dense rows go in with the weights, as consts: a CUDA graph reads
        # them where they are (the patch keeps them in buffers of their own), no copy per pass.
        out, e, g = run(_forward, (x2,),
                        (idx, dense_idx, gate_w, gate_a, gate_b, gate_s, up_w, up_a, up_b, up_s, down_w, down_a, down_b,
                         down_s, act_forward, with_out), share=share, rows=((0,), (0, 1, 2)))
        ctx.act_backward, ctx.run, ctx.indices_now = act_backward, run, indices_now
        if not keep_acts:
            e = g = None
        ctx.shared = (e, g, run.writes(e), run.writes(g)) if share and keep_acts else None
        # Shared or not, e and g are saved as [tokens, channels]: non-reentrant checkpointing
        # wants the recompute to save what the first forward saved (a shared buffer's real rows
        # are only a view of it; the backward reads the whole, padded buffer).
        n = x2.shape[0]
        out = out[:n]                          # a shared (uncomputed) output is the padded buffer
        ctx.save_for_backward(x2, *(None if t is None else t[:n] for t in (e, g)),
                              *((None, None) if indices_now else (idx, dense_idx)), *loras)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x, e, g, idx, dense_idx, ga, gb, ua, ub, da, db = ctx.saved_tensors
        if ctx.shared is not None:
            e, g, e_writes, g_writes = ctx.shared
            if (ctx.run.writes(e), ctx.run.writes(g)) != (e_writes, g_writes):
                raise RuntimeError(
                    "sparse_unsloth: another layer's recompute overwrote this MLP's activations before its "
                    "backward. The sparse MLP's CUDA graphs expect each checkpointed layer to be recomputed "
                    "right before its own backward, as per-layer gradient checkpointing (Unsloth's, Hugging "
                    "Face's) does; checkpoint one decoder layer per region, or set SPARSE_UNSLOTH_CUDA_GRAPHS=0")
        if e is None:
            raise RuntimeError("the sparse MLP ran without keeping its activations (grad mode was off "
                               "when it was called), so it has no backward")
        gate_w, gate_s, up_w, up_s, down_w, down_s = ctx.consts
        if ctx.indices_now is not None:
            idx, dense_idx = ctx.indices_now()
        grads = ctx.run(_backward, (dy.reshape(-1, dy.shape[-1]), x, e, g),
                        (idx, dense_idx, gate_w, ga, gb, gate_s, up_w, ua, ub, up_s, down_w, da, db, down_s, ctx.act_backward),
                        adopt=(2, 3), rows=((0, 1, 2, 3), (0,)))
        dx, flat = grads
        d_gate_a, d_gate_b, d_up_a, d_up_b, d_down_a, d_down_b = unpacked(
            flat, [t.shape for t in (ga, gb, ua, ub, da, db)])
        return (dx.view(*dy.shape[:-1], dx.shape[-1]), None, d_gate_a, d_gate_b, None, None,
                d_up_a, d_up_b, None, None, d_down_a, d_down_b, None, None, None, None, None, None, None, None,
                None)


def sparse_lora_mlp(x: torch.Tensor, gate: LoRAProj, up: LoRAProj, down: LoRAProj,
                    idx: torch.Tensor, dense_idx: torch.Tensor | None,
                    act_forward: Callable = swiglu_forward,
                    act_backward: Callable = swiglu_backward, run: Runner = run_eager,
                    indices_now: Callable[[], tuple] | None = None, out_in_recompute: bool = True,
                    ) -> torch.Tensor:
    """The gated LoRA MLP of ``x`` (``[..., hidden]``) keeping intermediate channels ``idx``.

    ``dense_idx``: rows of the flattened ``x`` that see every channel (None: none; repeats are
    fine). ``run``: how each pass runs (:class:`~sparse_unsloth.ops.graphs.GraphRunner` on a GPU).
    ``indices_now``: where the indices live in buffers that a later forward may take, the
    backward asks it for ``(idx, dense_idx)`` as they are then, instead of keeping them.
    ``out_in_recompute=False``: in a checkpointed layer's recompute (a forward inside backward)
    the returned values are not computed (the down product is skipped; e and g, which the backward
    needs, are). Right only where nothing differentiated after the MLP reads its output's values,
    as in a decoder layer that ends ``residual + mlp(x)`` (the recomputed layer output itself is
    discarded by checkpointing).
    """
    if any(p.bias is not None for p in (gate, up, down)):
        raise ValueError("the fused sparse MLP takes no base-layer biases (mlp_bias=True models): "
                         "keep their MLP layers dense")
    keep_acts = torch.is_grad_enabled() and (x.requires_grad or any(
        t.requires_grad for p in (gate, up, down) for t in (p.lora_a, p.lora_b)))
    return _SparseLoRAMLP.apply(x, *gate[:4], *up[:4], *down[:4], idx, dense_idx, act_forward, act_backward,
                                run, keep_acts, indices_now, out_in_recompute)
