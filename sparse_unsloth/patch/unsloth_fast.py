"""The Unsloth fast backend: sparse versions of Unsloth's fused LoRA MLP / QKV / O on the GPU.

Unsloth binds per layer ``mlp.forward`` (its fused LoRA_MLP), ``self_attn.apply_qkv`` and
``self_attn.apply_o`` (LoRA_QKV / LoRA_W); its attention forward calls the last two as
``self.apply_qkv(self, X)``. A patched layer gets a forward pre-hook that, on every call,
installs our sparse versions while the sparse state is active and puts Unsloth's exact
originals back otherwise, and a forward hook that puts the originals back after the call. So
the dense warm-up, eval and generation run Unsloth untouched (bit-identical, and inside
Unsloth's compiled decoder block as before), the sparse functions only exist in the block while
they are used, and between calls the model copies and pickles as an unpatched one. Our
functions are one per kind for every layer (the MLP's bound as a method, as Unsloth binds its
own): Dynamo guards on them, so the block is not recompiled for each layer. Its ``forward``
becomes a :class:`~.layer_graphs.LayerGraph`: a sparse forward without grad (a checkpointed
layer's) replays as one CUDA graph, and its recompute and backward as another; any other call
runs the layer's own forward.

Our sparse functions are torch ops, each with its backward op (``sparse_unsloth::lora_mlp``,
``lora_qkv``, ``lora_o``): Dynamo traces a call to one into Unsloth's compiled block, as it does
Unsloth's own LoRA kernels, so a sparse layer compiles as one region with no graph break
(each break costs host time, and on an H100 the sparse step is host-bound: benchmarks/NOTES.md,
2026-12-06). What an op does per call runs opaque at that call: it finds its module by the
storage of a LoRA factor it was given, makes or looks up the channel choice (a Python-side
per-batch cache; the MLP and QKV passes make it themselves, as the prologue of their CUDA
graph), and replays its CUDA graphs (``ops/graphs.py``). The frozen weights and
adapters it computes with are looked up once per forward (by the pre-hook) and kept on that
forward's record. The backward ops take the indices and projections of the forward being
differentiated from the state's record of the backward in flight.
A module without an active plain LoRA adapter on every projection (adapters disabled or
merged), or a batch whose every token is an output token, keeps the originals for that call.
"""

from __future__ import annotations

import os
import sys
import types
import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..ops.fast_attn import o_backward, o_forward, qkv_backward, qkv_forward
from ..ops.fast_mlp import mlp_backward, mlp_forward
from ..ops.lora_swiglu import swiglu_backward, swiglu_forward
from ..ops.sparse_mm import LoRAProj, lora_grads_unpacked
from .layer_graphs import LayerGraph
from .models import ATTN_PROJS, MLP_PROJS, decoder_layers, frozen_linear, weight_getter
from .reference import remove_hooks
from .state import BatchRecord, IndicesNow, LayerSparsity

_CTL = "_sparse_unsloth_ctl"
_ORIGINAL = "_sparse_unsloth_original"
_SPARSE = "_sparse_unsloth_sparse"
_SWITCHES = "_sparse_unsloth_switches"
_GUARDED = "_sparse_unsloth_guarded"
_MLP_SLOTS = ("_unsloth_forward", "forward")     # TiledMLP keeps the fused MLP in the first
_KINDS = {"mlp": "mlp", "self_attn": "attn"}      # a switch's submodule -> the kind of its choice


class _Missing:
    """"The class attribute" (no instance attribute was set): copies and pickles as itself."""

    def __deepcopy__(self, memo: dict) -> _Missing:
        return self

    def __reduce__(self) -> str:
        return "_MISSING"


_MISSING = _Missing()


def _fast_lora():
    # Never import Unsloth here: only a model it already patched can take this backend.
    return sys.modules.get("unsloth.kernels.fast_lora")


def _func(value):
    return getattr(value, "__func__", value)


def _mlp_slot(mlp: nn.Module) -> str:
    return next((s for s in _MLP_SLOTS if s in mlp.__dict__), "forward")


def _quantized(proj: nn.Module) -> bool:
    """A bitsandbytes 4-bit weight (NF4/FP4), as Unsloth's ``load_in_4bit`` gives."""
    return getattr(frozen_linear(proj).weight, "quant_state", None) is not None


def _supported_weight(proj: nn.Module) -> bool:
    return frozen_linear(proj).weight.is_floating_point() or _quantized(proj)


def fused(model: nn.Module) -> bool:
    """True when Unsloth bound its fused LoRA functions into ``model``'s layers (its GPU path)."""
    fl = _fast_lora()
    if fl is None:
        return False
    return any(_func(layer.mlp.__dict__.get(_mlp_slot(layer.mlp))) is fl.apply_lora_mlp_swiglu
               or layer.self_attn.__dict__.get("apply_qkv") is fl.apply_lora_qkv
               or layer.self_attn.__dict__.get("apply_o") is fl.apply_lora_o
               for layer in decoder_layers(model))


def applies(model: nn.Module) -> bool:
    """True when Unsloth's fused path runs ``model`` on CUDA (16-bit or 4-bit base weights)."""
    down = decoder_layers(model)[0].mlp.down_proj
    return fused(model) and frozen_linear(down).weight.is_cuda and _supported_weight(down)


def _check_plain_lora(projs: list[nn.Module], biases: bool) -> None:
    for proj in projs:
        dropout = getattr(proj, "lora_dropout", {})
        base = frozen_linear(proj)
        plain = (hasattr(proj, "lora_A") and len(proj.active_adapters) == 1
                 and all(isinstance(d, nn.Identity) for d in dropout.values())
                 and all(b.bias is None for b in proj.lora_B.values())
                 and not getattr(proj, "lora_magnitude_vector", None) and _supported_weight(proj))
        if not plain:
            raise ValueError(
                "sparse_unsloth's Unsloth fast path needs plain LoRA on every projection of a sparse "
                "layer: one active adapter, lora_dropout=0, no LoRA bias, no DoRA, 16-bit or 4-bit base "
                f"weights ({type(proj).__name__} does not qualify). Use lora_dropout=0 and bias='none'.")
        if base.weight.requires_grad:
            raise ValueError(
                f"the base weight under {type(proj).__name__} is trainable, but the sparse path computes "
                "no gradient for base weights; freeze it (do not list these projections in "
                "modules_to_save) or train dense")
        if base.bias is not None and not biases:
            raise ValueError(
                "the sparse fast path does not take MLP biases (mlp_bias=True); train this model "
                "with its MLP layers dense (no `mlp` entry in the sparsity config)")


def _lora(proj: nn.Module) -> LoRAProj | None:
    """This call's frozen weight and active adapter, or None when no adapter is active.

    It runs for every projection of every sparse layer at each forward: submodules and
    parameters are read from their registries (``_modules``, ``_parameters``), not through
    ``nn.Module.__getattr__`` (1-3 us a lookup on the host path that paces the sparse step).
    """
    if proj.disable_adapters or proj.merged:
        return None
    name = proj.active_adapters[0]
    lora_a = proj._modules["lora_A"]._modules.get(name)
    if lora_a is None:
        return None
    base = frozen_linear(proj)
    weight, bias = base._parameters["weight"], base._parameters.get("bias")
    if getattr(weight, "quant_state", None) is not None:
        weight = weight_getter(base)   # a 4-bit weight: its dequantization, which a pass calls once
    return LoRAProj(weight, lora_a._parameters["weight"], proj._modules["lora_B"]._modules[name]._parameters["weight"],
                    proj.scaling[name], bias)


def _unsloth_swiglu_forward(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    from unsloth.kernels.swiglu import swiglu_fg_kernel

    return swiglu_fg_kernel(e.unsqueeze(0), g.unsqueeze(0)).squeeze(0)


def _unsloth_swiglu_backward(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor):
    from unsloth.kernels.swiglu import swiglu_DWf_DW_dfg_kernel

    return swiglu_DWf_DW_dfg_kernel(dh, e, g)


def _swiglu(x: torch.Tensor) -> tuple[Callable, Callable]:
    """Unsloth's SwiGLU Triton kernels on CUDA (2-D adapters), the torch ones elsewhere.

    Module-level functions, so that a CUDA graph of the MLP is found again by them.
    """
    if not x.is_cuda:
        return swiglu_forward, swiglu_backward
    return _unsloth_swiglu_forward, _unsloth_swiglu_backward


def _pick(module: nn.Module, x: torch.Tensor, kind: str, defer: bool):
    """(choice, the work that makes it or None, dense rows, projections) of this forward for
    ``module``'s sparse op (``kind``: "mlp" or "attn"; apply_o gets the choice apply_qkv made
    for this forward). ``defer``: the op's pass makes the choice, as its prologue; else it is
    made now. Counted in the statistics: the op runs sparse (Flip installs it only where a
    choice is made)."""
    ctl: LayerSparsity = module.__dict__[_CTL]
    record = ctl.state.record_for_call()
    if defer:
        choice, pending = ctl.choice(kind, x, record)
    else:
        choice, pending = ctl.choose_now(kind, x, record), None
    if choice is None:
        raise RuntimeError(f"sparse_unsloth: the sparse {kind} ran for a forward that chose no channels "
                           "(Flip installs it only for one that does); please report this")
    ctl.count(record, kind)
    return choice, pending, ctl.state.dense_rows(record), record.projections[ctl.layer, kind]


def _runner(self: nn.Module, x: torch.Tensor):
    return self.__dict__[_CTL].state.pass_runner(x)


# The ops below find their module by the storage of one of its LoRA A factors: a tensor that
# Dynamo passes through (a Python handle would be baked into the compiled block, one per layer).
# Flip files each module here when a forward first looks up its projections, so a moved or
# copied model, or another adapter, is filed again before its ops run.
_BY_FACTOR: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _projections(module: nn.Module) -> list[nn.Module]:
    """The LoRA projections of an MLP (gate, up, down) or an attention module (q, k, v, o)."""
    return [getattr(module, name) for name in (MLP_PROJS if hasattr(module, MLP_PROJS[0]) else ATTN_PROJS)]


def _file(module: nn.Module, factor: torch.Tensor) -> None:
    _BY_FACTOR[factor.data_ptr()] = (weakref.ref(module), weakref.ref(factor))


def _module_of(factor: torch.Tensor) -> nn.Module:
    """The sparse MLP or attention module one of whose projections has the active LoRA A ``factor``."""
    module, param = (ref() for ref in _BY_FACTOR.get(factor.data_ptr(), (_dead, _dead)))
    if module is None or param is None or param.data_ptr() != factor.data_ptr():
        raise RuntimeError("sparse_unsloth: a sparse op got a LoRA factor of no module that runs sparse now; "
                           "please report this")
    return module


def _dead() -> None:
    return None


def _lora_inputs(projs: list[nn.Module]) -> list[torch.Tensor]:
    """The active adapter's A and B of each projection: the ops' inputs (Dynamo traces this)."""
    return [t for p in projs for t in (p.lora_A[p.active_adapters[0]].weight, p.lora_B[p.active_adapters[0]].weight)]


def _indices(module: nn.Module, kind: str, fields: tuple[str, ...]) -> tuple:
    """The backward's indices and dense rows, as they are now, and the projections, from the
    record of the backward in flight."""
    ctl: LayerSparsity = module.__dict__[_CTL]
    record = ctl.state.record_for_call()
    return (*IndicesNow(ctl.state, record, (ctl.layer, kind), fields)(), record.projections[ctl.layer, kind])


def _by_name(found: dict[str, LoRAProj], names: tuple[str, ...]) -> list[LoRAProj]:
    return [found[name] for name in names]


def _rows2(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


@torch.library.custom_op("sparse_unsloth::lora_mlp", mutates_args=())
def _lora_mlp(x: torch.Tensor, gate_a: torch.Tensor, gate_b: torch.Tensor, up_a: torch.Tensor,
              up_b: torch.Tensor, down_a: torch.Tensor, down_b: torch.Tensor) -> torch.Tensor:
    mlp = _module_of(gate_a)
    ctl: LayerSparsity = mlp.__dict__[_CTL]
    recompute = torch._C._current_graph_task_id() != -1
    choice, pending, dense_idx, found = _pick(mlp, x, "mlp", defer=not recompute)
    x2 = _rows2(x)
    if recompute:
        # A checkpointed layer's recompute: the supported decoder layers only add the MLP's output
        # to the residual (patch/models.py), so nothing reads it, as long as no other layer is
        # recomputed before its backward (Guard); the backward recomputes what it needs from x.
        ctl.state.skipped_output = ctl.layer
        out = x2.new_empty(x2.shape[0], down_b.shape[0])
    else:
        out = mlp_forward(x2, *_by_name(found, MLP_PROJS), choice.idx, dense_idx, _swiglu(x)[0], _runner(mlp, x),
                          pending)
    return out.view(*x.shape[:-1], out.shape[-1])


@_lora_mlp.register_fake
def _(x, gate_a, gate_b, up_a, up_b, down_a, down_b):
    return x.new_empty(*x.shape[:-1], down_b.shape[0])


@torch.library.custom_op("sparse_unsloth::lora_mlp_backward", mutates_args=())
def _lora_mlp_backward(dy: torch.Tensor, x: torch.Tensor, gate_a: torch.Tensor, gate_b: torch.Tensor,
                       up_a: torch.Tensor, up_b: torch.Tensor, down_a: torch.Tensor, down_b: torch.Tensor,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, the six LoRA gradients in one flat tensor: the outputs of an op may not alias)."""
    mlp = _module_of(gate_a)
    idx, dense_idx, found = _indices(mlp, "mlp", ("idx",))
    dx, flat = mlp_backward(_rows2(dy), _rows2(x), *_by_name(found, MLP_PROJS), idx, dense_idx, _swiglu(x)[1],
                            _runner(mlp, x))
    return dx.view(x.shape), flat


@_lora_mlp_backward.register_fake
def _(dy, x, gate_a, gate_b, up_a, up_b, down_a, down_b):
    return torch.empty_like(x), x.new_empty(sum(t.numel() for t in (gate_a, gate_b, up_a, up_b, down_a, down_b)))


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _lora_mlp_grads(ctx, dy):
    x, *loras = ctx.saved_tensors
    dx, flat = torch.ops.sparse_unsloth.lora_mlp_backward(dy, x, *loras)
    return dx, *(g for d_a, d_b, _ in lora_grads_unpacked(flat, list(zip(loras[0::2], loras[1::2])), (False,) * 3)
                 for g in (d_a, d_b))


_lora_mlp.register_autograd(_lora_mlp_grads, setup_context=_save_inputs)


@torch.library.custom_op("sparse_unsloth::lora_qkv", mutates_args=())
def _lora_qkv(x: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor, k_a: torch.Tensor, k_b: torch.Tensor,
              v_a: torch.Tensor, v_b: torch.Tensor, q_bias: torch.Tensor | None, k_bias: torch.Tensor | None,
              v_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    attn = _module_of(q_a)
    choice, pending, dense_idx, found = _pick(attn, x, "attn", defer=True)
    outs = qkv_forward(_rows2(x), *_by_name(found, ATTN_PROJS[:3]), choice.q_idx, choice.k_idx, choice.v_idx,
                       dense_idx, _runner(attn, x), pending)
    return tuple(o.view(*x.shape[:-1], o.shape[-1]) for o in outs)


@_lora_qkv.register_fake
def _(x, q_a, q_b, k_a, k_b, v_a, v_b, q_bias, k_bias, v_bias):
    return tuple(x.new_empty(*x.shape[:-1], b.shape[0]) for b in (q_b, k_b, v_b))


@torch.library.custom_op("sparse_unsloth::lora_qkv_backward", mutates_args=())
def _lora_qkv_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, x: torch.Tensor, q_a: torch.Tensor,
                       q_b: torch.Tensor, k_a: torch.Tensor, k_b: torch.Tensor, v_a: torch.Tensor, v_b: torch.Tensor,
                       q_bias_grad: bool, k_bias_grad: bool, v_bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, the LoRA gradients and the biases' asked for, in one flat tensor)."""
    attn = _module_of(q_a)
    q_idx, k_idx, v_idx, dense_idx, found = _indices(attn, "attn", ("q_idx", "k_idx", "v_idx"))
    dx, flat = qkv_backward(_rows2(dq), _rows2(dk), _rows2(dv), _rows2(x), *_by_name(found, ATTN_PROJS[:3]), q_idx,
                            k_idx, v_idx, dense_idx, (q_bias_grad, k_bias_grad, v_bias_grad), _runner(attn, x))
    return dx.view(x.shape), flat


@_lora_qkv_backward.register_fake
def _(dq, dk, dv, x, q_a, q_b, k_a, k_b, v_a, v_b, q_bias_grad, k_bias_grad, v_bias_grad):
    sizes = [t.numel() for t in (q_a, q_b, k_a, k_b, v_a, v_b)]
    sizes += [b.shape[0] for b, need in zip((q_b, k_b, v_b), (q_bias_grad, k_bias_grad, v_bias_grad)) if need]
    return torch.empty_like(x), x.new_empty(sum(sizes))


def _save_qkv_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:7])
    ctx.bias_dtypes = [None if b is None else b.dtype for b in inputs[7:]]


def _lora_qkv_grads(ctx, dq, dk, dv):
    x, *loras = ctx.saved_tensors
    needed = [dtype is not None and need for dtype, need in zip(ctx.bias_dtypes, ctx.needs_input_grad[7:10])]
    dx, flat = torch.ops.sparse_unsloth.lora_qkv_backward(dq, dk, dv, x, *loras, *needed)
    grads = lora_grads_unpacked(flat, list(zip(loras[0::2], loras[1::2])), needed)
    return (dx, *(g for d_a, d_b, _ in grads for g in (d_a, d_b)),
            *(None if d_bias is None else d_bias.to(dtype) for (_, _, d_bias), dtype in zip(grads, ctx.bias_dtypes)))


_lora_qkv.register_autograd(_lora_qkv_grads, setup_context=_save_qkv_inputs)


@torch.library.custom_op("sparse_unsloth::lora_o", mutates_args=())
def _lora_o(x: torch.Tensor, o_a: torch.Tensor, o_b: torch.Tensor, o_bias: torch.Tensor | None) -> torch.Tensor:
    attn = _module_of(o_a)
    choice, _, dense_idx, found = _pick(attn, x, "attn", defer=False)
    out = o_forward(_rows2(x), *_by_name(found, ATTN_PROJS[3:]), choice.o_idx, dense_idx, _runner(attn, x))
    return out.view(*x.shape[:-1], out.shape[-1])


@_lora_o.register_fake
def _(x, o_a, o_b, o_bias):
    return x.new_empty(*x.shape[:-1], o_b.shape[0])


@torch.library.custom_op("sparse_unsloth::lora_o_backward", mutates_args=())
def _lora_o_backward(dy: torch.Tensor, x: torch.Tensor, o_a: torch.Tensor, o_b: torch.Tensor, bias_grad: bool,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    attn = _module_of(o_a)
    idx, dense_idx, found = _indices(attn, "attn", ("o_idx",))
    dx, flat = o_backward(_rows2(dy), _rows2(x), *_by_name(found, ATTN_PROJS[3:]), idx, dense_idx, bias_grad,
                          _runner(attn, x))
    return dx.view(x.shape), flat


@_lora_o_backward.register_fake
def _(dy, x, o_a, o_b, bias_grad):
    return torch.empty_like(x), x.new_empty(o_a.numel() + o_b.numel() + (o_b.shape[0] if bias_grad else 0))


def _save_o_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:3])
    ctx.bias_dtype = None if inputs[3] is None else inputs[3].dtype


def _lora_o_grads(ctx, dy):
    x, a, b = ctx.saved_tensors
    needed = ctx.bias_dtype is not None and ctx.needs_input_grad[3]
    dx, flat = torch.ops.sparse_unsloth.lora_o_backward(dy, x, a, b, needed)
    ((d_a, d_b, d_bias),) = lora_grads_unpacked(flat, [(a, b)], (needed,))
    return dx, d_a, d_b, None if d_bias is None else d_bias.to(ctx.bias_dtype)


_lora_o.register_autograd(_lora_o_grads, setup_context=_save_o_inputs)


def _sparse_projs(module: nn.Module, record: BatchRecord) -> dict[str, LoRAProj] | None:
    """The projections' frozen weights and adapters if the sparse functions serve this forward in
    ``module`` (an MLP or attention): every projection with an active plain adapter, and context
    tokens to choose channels from; else None."""
    if record.split.sparse_idx.numel() == 0:
        return None
    projs = module._modules             # registries, not __getattr__: see _lora
    found = {name: _lora(projs[name]) for name in (MLP_PROJS if MLP_PROJS[0] in projs else ATTN_PROJS)}
    return None if any(lora is None for lora in found.values()) else found


def _mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Our MLP ``forward`` (bound to its module as a method by Flip, as Unsloth binds its own): the
    sparse MLP op on the active adapter's factors. One function for every layer: Dynamo guards
    on it, not on a per-layer object, so the compiled block is not recompiled for each layer."""
    return torch.ops.sparse_unsloth.lora_mlp(x, *_lora_inputs(_projections(mlp)))


def _biases(projs: list[nn.Module]) -> list[torch.Tensor | None]:
    return [frozen_linear(p).bias for p in projs]


def _apply_qkv(attn: nn.Module, x: torch.Tensor):
    """Our ``apply_qkv``, which Unsloth's attention calls as ``self.apply_qkv(self, x)``."""
    projs = [attn.q_proj, attn.k_proj, attn.v_proj]
    return torch.ops.sparse_unsloth.lora_qkv(x, *_lora_inputs(projs), *_biases(projs))


def _apply_o(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Our ``apply_o``, called as ``self.apply_o(self, x)``."""
    return torch.ops.sparse_unsloth.lora_o(x, *_lora_inputs([attn.o_proj]), *_biases([attn.o_proj]))


class Flip:
    """Decoder-layer pre-hook: our sparse functions while this forward (or the forward a
    recompute belongs to) runs sparse, Unsloth's exact originals otherwise."""

    def __call__(self, layer: nn.Module, _args: tuple) -> None:
        ctl: LayerSparsity = layer.__dict__[_CTL]
        record = ctl.state.record_for_call()
        for module_name, name in layer.__dict__[_SWITCHES]:
            module = _submodule(layer, module_name)
            found = None if record is None else self._found(module, (ctl.layer, _KINDS[module_name]), record)
            sparse = found is not None
            value = module.__dict__[_SPARSE][name] if sparse else module.__dict__[_ORIGINAL][name]
            if sparse and module_name == "mlp":
                value = types.MethodType(value, module)       # the MLP's forward, a method as Unsloth's is
            _set(module, name, value)

    @staticmethod
    def _found(module: nn.Module, key: tuple[int, str], record: BatchRecord) -> dict[str, LoRAProj] | None:
        """The projections ``module``'s ops compute with for ``record``: looked up at its forward
        (its recompute and backward use the same; the record keeps them, so a backward looks up
        nothing), when ``module`` is filed for its ops under their LoRA A factors (the host paces
        the sparse forward: this hook runs for every layer call, a recompute's too)."""
        if key not in record.projections:
            found = record.projections[key] = _sparse_projs(module, record)
            for lora in (found or {}).values():
                _file(module, lora.lora_a)
        return record.projections[key]


class Unflip:
    """Decoder-layer forward hook: Unsloth's originals back once the layer has run, so that between
    calls a model holds only them (it copies and pickles as an unpatched one does)."""

    def __call__(self, layer: nn.Module, _args: tuple, _output) -> None:
        for module_name, name in layer.__dict__[_SWITCHES]:
            module = _submodule(layer, module_name)
            _set(module, name, module.__dict__[_ORIGINAL][name])


class Guard:
    """Decoder-layer pre-hook (on every layer): a layer recomputed while another layer's skipped
    MLP output is pending would read that output, so a checkpoint around several layers is an
    error, not silently wrong gradients."""

    def __call__(self, layer: nn.Module, _args: tuple) -> None:
        state = layer.__dict__[_GUARDED]
        if state.skipped_output is not None and torch._C._current_graph_task_id() != -1:
            raise RuntimeError(
                f"sparse_unsloth: a gradient checkpoint spans several decoder layers (layer "
                f"{state.skipped_output} and the next were recomputed together). The sparse MLP's recompute "
                "skips its output, which only per-layer checkpointing (Unsloth's, Hugging Face's) never "
                "reads; checkpoint one decoder layer per region, or keep these layers' MLPs dense")


def guard_layer(layer: nn.Module, state) -> None:
    """Install :class:`Guard` on a decoder layer of a model this backend makes sparse."""
    layer.__dict__[_GUARDED] = state
    layer.register_forward_pre_hook(Guard())


def _submodule(layer: nn.Module, name: str) -> nn.Module:
    # A switch names the decoder layer's "mlp" or "self_attn"; read from the registry, as the
    # hooks run at every layer call (see _lora).
    return layer._modules[name]


def _set(module: nn.Module, name: str, value) -> None:
    # Instance attributes, as Unsloth sets them; _MISSING means "the class attribute".
    if value is _MISSING:
        module.__dict__.pop(name, None)
    else:
        module.__dict__[name] = value


def patch_layer(layer: nn.Module, ctl: LayerSparsity) -> None:
    """Make one decoder layer's Unsloth fused LoRA functions sparse."""
    if "SPARSE_UNSLOTH_MODE" in os.environ:
        raise ValueError("SPARSE_UNSLOTH_MODE is set, but the execution modes were removed: sparse layers now "
                         "always run inside Unsloth's compiled block (faster, benchmarks/NOTES.md). Unset it; "
                         "SPARSE_UNSLOTH_CUDA_GRAPHS=0 still runs the sparse work eagerly for debugging")
    switches: list[tuple[str, str, object]] = []    # (submodule, attribute, sparse value)
    if ctl.mlp_sparsity:
        mlp = layer.mlp
        _check_plain_lora([mlp.gate_proj, mlp.up_proj, mlp.down_proj], biases=False)
        switches.append(("mlp", _mlp_slot(mlp), _mlp_forward))
    if ctl.attn_sparsity:
        attn = layer.self_attn
        # Q/K/V biases (Qwen2) are added by our functions; Unsloth leaves such a QKV unfused,
        # and its original_apply_qkv stays the dense fallback.
        _check_plain_lora([attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj], biases=True)
        switches += [("self_attn", "apply_qkv", _apply_qkv), ("self_attn", "apply_o", _apply_o)]
    for module_name, name, sparse in switches:
        module = _submodule(layer, module_name)
        module.__dict__[_CTL] = ctl
        module.__dict__.setdefault(_ORIGINAL, {})[name] = module.__dict__.get(name, _MISSING)
        module.__dict__.setdefault(_SPARSE, {})[name] = sparse
    layer.__dict__[_CTL] = ctl
    layer.__dict__[_SWITCHES] = [(module_name, name) for module_name, name, _ in switches]
    if switches:
        kinds = tuple(dict.fromkeys(_KINDS[module_name] for module_name, _, _ in switches))
        layer.__dict__["forward"] = LayerGraph(layer, ctl, kinds, layer.__dict__.get("forward"))
    layer.register_forward_pre_hook(Flip())
    layer.register_forward_hook(Unflip())


def unpatch_layer(layer: nn.Module) -> None:
    """Undo :func:`patch_layer` and :func:`guard_layer`: Unsloth's originals back (a no-op on a
    layer neither touched)."""
    if layer.__dict__.pop(_GUARDED, None) is not None:
        remove_hooks(layer, (Guard,))
    switches = layer.__dict__.pop(_SWITCHES, None)
    if switches is None:
        return
    remove_hooks(layer, (Flip, Unflip))
    graph = layer.__dict__.get("forward")
    if isinstance(graph, LayerGraph):            # the layer's own instance forward back, if it had one
        _set(layer, "forward", _MISSING if graph.original is None else graph.original)
    for module_name, name in switches:
        module = _submodule(layer, module_name)
        _set(module, name, module.__dict__[_ORIGINAL][name])
    for module_name, _ in switches:
        module = _submodule(layer, module_name)
        for key in (_CTL, _ORIGINAL, _SPARSE):
            module.__dict__.pop(key, None)
    layer.__dict__.pop(_CTL, None)
