"""The Unsloth fast backend: sparse versions of Unsloth's fused LoRA MLP / QKV / O on the GPU.

Unsloth binds per layer ``mlp.forward`` (its fused LoRA_MLP), ``self_attn.apply_qkv`` and
``self_attn.apply_o`` (LoRA_QKV / LoRA_W); its attention forward calls the last two as
``self.apply_qkv(self, X)``. A patched layer gets a forward pre-hook that, on every call,
installs our sparse versions while the sparse state is active and puts Unsloth's exact
originals back otherwise. So the dense warm-up, eval and generation run Unsloth untouched
(bit-identical, and inside Unsloth's compiled decoder block as before), and the sparse
functions only exist in the block while they are used.

Our sparse functions do their GPU work as replayed CUDA graphs (``ops/graphs.py``), and the rest
of a sparse layer stays in Unsloth's compiled block. The MLP is a pair of torch ops
(``sparse_unsloth::lora_mlp`` and its backward): Dynamo traces a call to it into the block, as
it does Unsloth's own LoRA kernels, and what the op does per call (the channel choice with its
Python-side per-batch cache, the replay) runs opaque at that call. The attention functions run
outside torch.compile (``torch.compiler.disable``), so the block breaks around them. Graph breaks
cost host time: on an H100 the sparse step is host-bound (benchmarks/NOTES.md, 2026-12-06).
The sparse functions are module-level, so every layer shares them (no per-layer recompiles).
An MLP without an active plain LoRA adapter on every projection (adapters disabled or merged),
or a batch whose every token is an output token, keeps the original for that call.
"""

from __future__ import annotations

import copy
import os
import sys
import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..ops.fast_attn import sparse_lora_o, sparse_lora_qkv
from ..ops.fast_mlp import mlp_backward, mlp_forward
from ..ops.lora_swiglu import swiglu_backward, swiglu_forward
from ..ops.sparse_mm import LoRAProj, unpacked
from .models import decoder_layers, frozen_linear, weight_getter
from .reference import remove_hooks
from .state import BatchRecord, IndicesNow, LayerSparsity

_CTL = "_sparse_unsloth_ctl"
_ORIGINAL = "_sparse_unsloth_original"
_SPARSE = "_sparse_unsloth_sparse"
_SWITCHES = "_sparse_unsloth_switches"
_GUARDED = "_sparse_unsloth_guarded"
_MLP_SLOTS = ("_unsloth_forward", "forward")     # TiledMLP keeps the fused MLP in the first


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
    """This call's frozen weight and active adapter, or None when no adapter is active."""
    if proj.disable_adapters or proj.merged:
        return None
    name = proj.active_adapters[0]
    if name not in proj.lora_A:
        return None
    base = frozen_linear(proj)
    # A 4-bit weight goes in as its dequantization, which the Functions call once per pass.
    weight = weight_getter(base) if _quantized(proj) else base.weight
    return LoRAProj(weight, proj.lora_A[name].weight, proj.lora_B[name].weight, proj.scaling[name], base.bias)


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


def _dense_attn(attn: nn.Module, name: str) -> Callable:
    original = attn.__dict__[_ORIGINAL][name]
    if original is not _MISSING:
        return original
    # Unsloth's original_apply_qkv / original_apply_o: the plain (PEFT) projections.
    if name == "apply_qkv":
        return lambda self, x: (self.q_proj(x), self.k_proj(x), self.v_proj(x))
    return lambda self, x: self.o_proj(x)


def _pick(self: nn.Module, x: torch.Tensor, kind: str, fields: tuple[str, ...]):
    """(choice, dense rows, where the backward asks for them) for this forward, or None.

    ``kind``: "mlp" or "attn" (apply_o gets the choice apply_qkv cached for this forward);
    ``fields``: the choice's indices the function reads. Called only when the sparse function
    will run, so the statistics count what ran sparse.
    """
    ctl: LayerSparsity = self.__dict__[_CTL]
    record = ctl.state.record_for_call()
    choice = (ctl.mlp_choice if kind == "mlp" else ctl.attn_choice)(x, record)
    if choice is None:
        return None
    ctl.count(record, kind)
    return choice, ctl.state.dense_rows(record), IndicesNow(ctl.state, record, (ctl.layer, kind), fields)


def _runner(self: nn.Module, x: torch.Tensor):
    return self.__dict__[_CTL].state.runner(x)


# The sparse MLP's ops find their module by the storage of its gate LoRA A factor: a tensor that
# Dynamo passes through (a Python handle would be baked into the compiled block, one per layer).
_MLPS: weakref.WeakSet = weakref.WeakSet()        # every live MLPForward
_BY_FACTOR: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _mlp_of(gate_a: torch.Tensor) -> nn.Module:
    """The patched MLP whose active gate LoRA A is ``gate_a``."""
    for attempt in range(2):
        mlp, factor = (ref() for ref in _BY_FACTOR.get(gate_a.data_ptr(), (lambda: None, lambda: None)))
        if mlp is not None and factor is not None and factor.data_ptr() == gate_a.data_ptr():
            return mlp
        if attempt == 0:     # moved, copied or another adapter since: look them all up again
            _BY_FACTOR.clear()
            for forward in list(_MLPS):
                lora = _lora(forward.module.gate_proj)
                if lora is not None:
                    _BY_FACTOR[lora.lora_a.data_ptr()] = (weakref.ref(forward.module), weakref.ref(lora.lora_a))
    raise RuntimeError("sparse_unsloth::lora_mlp got a gate LoRA factor that belongs to no sparse MLP")


def _loras(mlp: nn.Module) -> list[torch.Tensor]:
    """The active adapter's A and B of gate, up and down: the op's inputs (Dynamo traces this)."""
    return [t for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            for t in (p.lora_A[p.active_adapters[0]].weight, p.lora_B[p.active_adapters[0]].weight)]


def _mlp_projs(mlp: nn.Module) -> list[LoRAProj]:
    return [_lora(p) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]


@torch.library.custom_op("sparse_unsloth::lora_mlp", mutates_args=())
def _lora_mlp(x: torch.Tensor, gate_a: torch.Tensor, gate_b: torch.Tensor, up_a: torch.Tensor,
              up_b: torch.Tensor, down_a: torch.Tensor, down_b: torch.Tensor) -> torch.Tensor:
    mlp = _mlp_of(gate_a)
    ctl: LayerSparsity = mlp.__dict__[_CTL]
    picked = _pick(mlp, x, "mlp", ("idx",))
    if picked is None:
        raise RuntimeError("sparse_unsloth: the sparse MLP ran for a forward that chose no channels "
                           "(Flip installs it only for one that does); please report this")
    choice, dense_idx, _ = picked
    x2 = x.reshape(-1, x.shape[-1])
    if torch._C._current_graph_task_id() != -1:
        # A checkpointed layer's recompute: the supported decoder layers only add the MLP's output
        # to the residual (patch/models.py), so nothing reads it, as long as no other layer is
        # recomputed before its backward (Guard); the backward recomputes what it needs from x.
        ctl.state.skipped_output = ctl.layer
        out = x2.new_empty(x2.shape[0], down_b.shape[0])
    else:
        out = mlp_forward(x2, *_mlp_projs(mlp), choice.idx, dense_idx, _swiglu(x)[0], _runner(mlp, x))
    return out.view(*x.shape[:-1], out.shape[-1])


@_lora_mlp.register_fake
def _(x, gate_a, gate_b, up_a, up_b, down_a, down_b):
    return x.new_empty(*x.shape[:-1], down_b.shape[0])


@torch.library.custom_op("sparse_unsloth::lora_mlp_backward", mutates_args=())
def _lora_mlp_backward(dy: torch.Tensor, x: torch.Tensor, gate_a: torch.Tensor, gate_b: torch.Tensor,
                       up_a: torch.Tensor, up_b: torch.Tensor, down_a: torch.Tensor, down_b: torch.Tensor,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, the six LoRA gradients flattened into one tensor: outputs of an op may not alias)."""
    mlp = _mlp_of(gate_a)
    ctl: LayerSparsity = mlp.__dict__[_CTL]
    record = ctl.state.record_for_call()
    idx, dense_idx = IndicesNow(ctl.state, record, (ctl.layer, "mlp"), ("idx",))()
    dx, grads = mlp_backward(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), *_mlp_projs(mlp), idx,
                             dense_idx, _swiglu(x)[1], _runner(mlp, x))
    return dx.view(x.shape), torch.cat([g.reshape(-1) for g in grads])


@_lora_mlp_backward.register_fake
def _(dy, x, gate_a, gate_b, up_a, up_b, down_a, down_b):
    return torch.empty_like(x), x.new_empty(sum(t.numel() for t in (gate_a, gate_b, up_a, up_b, down_a, down_b)))


def _save_mlp_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _lora_mlp_grads(ctx, dy):
    x, *loras = ctx.saved_tensors
    dx, flat = torch.ops.sparse_unsloth.lora_mlp_backward(dy, x, *loras)
    return dx, *unpacked(flat, [t.shape for t in loras])


_lora_mlp.register_autograd(_lora_mlp_grads, setup_context=_save_mlp_inputs)


def _mlp_runs_sparse(mlp: nn.Module, record: BatchRecord) -> bool:
    """Whether the sparse MLP serves this forward: every projection with an active plain adapter,
    and context tokens to choose channels from."""
    return record.split.sparse_idx.numel() > 0 and all(p is not None for p in _mlp_projs(mlp))


def _sparse_qkv(self: nn.Module, x: torch.Tensor):
    projs = [_lora(p) for p in (self.q_proj, self.k_proj, self.v_proj)]
    picked = None if any(p is None for p in projs) else _pick(self, x, "attn", ("q_idx", "k_idx", "v_idx"))
    if picked is None:
        return _dense_attn(self, "apply_qkv")(self, x)
    choice, dense_idx, now = picked
    return sparse_lora_qkv(x, *projs, choice.q_idx, choice.k_idx, choice.v_idx, dense_idx,
                           run=_runner(self, x), indices_now=now)


def _sparse_o(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    proj = _lora(self.o_proj)
    picked = None if proj is None else _pick(self, x, "attn", ("o_idx",))
    if picked is None:
        return _dense_attn(self, "apply_o")(self, x)
    choice, dense_idx, now = picked
    return sparse_lora_o(x, proj, choice.o_idx, dense_idx, run=_runner(self, x), indices_now=now)


# Never traced by Dynamo: inside Unsloth's compiled block each one is a graph break.
_SPARSE_FNS = {name: torch.compiler.disable(fn) for name, fn in {"apply_qkv": _sparse_qkv, "apply_o": _sparse_o}.items()}


class AttnFunction:
    """Our ``apply_qkv`` / ``apply_o``: Unsloth calls them as ``self.apply_qkv(self, x)``.

    An object naming its function rather than the function itself, so a model holding it
    pickles (the eager variants are wrappers that pickle cannot find by name).
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, x: torch.Tensor):
        return _SPARSE_FNS[self.name](module, x)


class MLPForward:
    """Our MLP ``forward``, bound to its module the way a method is, but copied with it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        _MLPS.add(self)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.sparse_unsloth.lora_mlp(x, *_loras(self.module))

    def __deepcopy__(self, memo: dict) -> MLPForward:
        return MLPForward(copy.deepcopy(self.module, memo))

    def __reduce__(self):
        return MLPForward, (self.module,)


class Flip:
    """Decoder-layer pre-hook: our sparse functions while this forward (or the forward a
    recompute belongs to) runs sparse, Unsloth's exact originals otherwise."""

    def __call__(self, layer: nn.Module, _args: tuple) -> None:
        record = layer.__dict__[_CTL].state.record_for_call()
        for module_name, name in layer.__dict__[_SWITCHES]:
            module = _submodule(layer, module_name)
            sparse = record is not None and (module_name != "mlp" or _mlp_runs_sparse(module, record))
            _set(module, name, module.__dict__[_SPARSE][name] if sparse else module.__dict__[_ORIGINAL][name])


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
    return getattr(layer, name)       # a switch names the decoder layer's "mlp" or "self_attn"


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
        switches.append(("mlp", _mlp_slot(mlp), MLPForward(mlp)))
    if ctl.attn_sparsity:
        attn = layer.self_attn
        # Q/K/V biases (Qwen2) are added by our functions; Unsloth leaves such a QKV unfused,
        # and its original_apply_qkv stays the dense fallback.
        _check_plain_lora([attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj], biases=True)
        switches += [("self_attn", "apply_qkv", AttnFunction("apply_qkv")),
                     ("self_attn", "apply_o", AttnFunction("apply_o"))]
    for module_name, name, sparse in switches:
        module = _submodule(layer, module_name)
        module.__dict__[_CTL] = ctl
        module.__dict__.setdefault(_ORIGINAL, {})[name] = module.__dict__.get(name, _MISSING)
        module.__dict__.setdefault(_SPARSE, {})[name] = sparse
    layer.__dict__[_CTL] = ctl
    layer.__dict__[_SWITCHES] = [(module_name, name) for module_name, name, _ in switches]
    layer.register_forward_pre_hook(Flip())


def unpatch_layer(layer: nn.Module) -> None:
    """Undo :func:`patch_layer` and :func:`guard_layer`: Unsloth's originals back (a no-op on a
    layer neither touched)."""
    if layer.__dict__.pop(_GUARDED, None) is not None:
        remove_hooks(layer, (Guard,))
    switches = layer.__dict__.pop(_SWITCHES, None)
    if switches is None:
        return
    remove_hooks(layer, (Flip,))
    for module_name, name in switches:
        module = _submodule(layer, module_name)
        _set(module, name, module.__dict__[_ORIGINAL][name])
    for module_name, _ in switches:
        module = _submodule(layer, module_name)
        for key in (_CTL, _ORIGINAL, _SPARSE):
            module.__dict__.pop(key, None)
    layer.__dict__.pop(_CTL, None)
