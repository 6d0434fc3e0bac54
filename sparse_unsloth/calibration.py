"""``calibrate``: a sparse config for any supported model, from a few batches of the user's data.

The probe loss is the loss on the output tokens (labels != -100) of the probe batches, with the
model in training mode (dropout off) as the sparse patch computes it: context tokens sparse,
output tokens dense. ``budget`` bounds its relative increase: 0.01 allows 1% above dense.

Method, in three stages:

1. Sensitivity (one dense forward + backward). For every decoder layer, module kind (``mlp``,
   ``self_attn``), sparsity level and estimator rank: the channels the SVD estimator would drop
   on each probe batch, and a Taylor estimate of the loss increase that dropping them in that
   layer alone causes. Dropping channels ``D`` of a projection's input (FFN intermediate, O's
   inputs = V's outputs) or output (Q, K) changes the loss by ``g . delta = -sum_{c in D} a_c``
   with ``a_c = sum over context tokens of grad_c * activation_c`` (first order), so the
   backward pass's per-channel ``a`` scores every level and rank at once. The second-order term
   is the per-sequence empirical Fisher ``0.5 * sum_n (grad L_n . delta_n)^2`` (sequences are
   independent, so their gradients come from the same backward). Estimate: a first-order
   increase (a predicted decrease counts as zero) plus the second-order term.
2. Path. Greedy from dense: repeatedly raise the (layer, kind) whose next level saves the most
   training FLOPs (:mod:`.flops`, frozen weights and the estimator) per predicted loss
   increase, giving nested configs of growing predicted loss, one path per candidate rank.
3. Search. Measured sparse forwards of the probe batches along the path (interpolating with the
   measured / predicted ratio, at least a quarter of the interval each step) find the largest
   config whose measured increase is at most ``budget``; the rank predicted to save the most
   is searched first, another one when the ratio says it would save more. The result
   respects the budget on the probe batches by construction (dense when nothing does).

``gradient_budget`` adds a second bound to the search: the relative error of the LoRA
parameters' gradient on the probe batches (at the adapter as it is, usually its
initialisation) against the dense model's, ``||g_sparse - g_dense|| / ||g_dense||``. The loss
of the sparse forward does not rank configs by the accuracy trained under them; on SmolLM2 this
error ranked the four configs trained on the GPU as their results did, on GSM8K and ARC rows
alike (benchmarks/NOTES.md, eleventh session: four configs, one run each, so a lead, not a law).

Cost: the sensitivity pass is about three forwards, each search step one forward (three with
``gradient_budget``: a forward and a backward).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import CALIBRATION_LEVELS, CALIBRATION_RANKS, MODULE_KINDS, SparseConfig
from .estimator.factors import ESTIMATED_PROJS, EstimatorFactors
from .estimator.resolve import resolve_factors
from .estimator.select import attn_channels, ffn_channels, kept_count
from .estimator.store import fingerprint
from .flops import flop_count
from .patch import sparsify, unsparsify
from .patch.models import (
    attention_geometry,
    check_supported,
    decoder_layers,
    estimated_biases,
    estimated_weights,
    frozen_linear,
    model_identity,
    weight_getter,
)

__all__ = ["Calibration", "CalibrationError", "calibrate", "run_calibration"]

log = logging.getLogger("sparse_unsloth")


class CalibrationError(ValueError):
    """Inputs calibrate cannot use; the message names the problem and the fix."""


@dataclasses.dataclass
class ProbeBatch:
    input_ids: torch.Tensor       # [B, T]
    attention_mask: torch.Tensor
    labels: torch.Tensor          # -100 on prompt and padding
    context: torch.Tensor         # [B, T] bool: the tokens the patch computes sparse
    outputs: torch.Tensor         # [B] output tokens a sequence's loss averages over


@dataclasses.dataclass
class Calibration:
    """What :func:`run_calibration` chose and measured."""

    config: SparseConfig
    budget: float
    dense_loss: float
    sparse_loss: float
    flop_fraction: float
    geometry: tuple[int, int, int]          # (batch, seq_len, output_tokens) the FLOPs are counted at
    probe_rows: int
    probe_tokens: int
    forwards: int
    seconds: float
    trials: list[dict[str, Any]]            # every measured config: rank, predicted, measured
    gradient_budget: float | None = None
    gradient_error: float | None = None     # of the chosen config (with a gradient budget)
    date: str = dataclasses.field(default_factory=lambda: datetime.date.today().isoformat())

    @property
    def loss_increase(self) -> float:
        return self.sparse_loss / self.dense_loss - 1


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def _check_budget(budget: Any, name: str = "budget",
                  meaning: str = "the allowed relative increase of the probe loss (e.g. 0.01 for 1% above dense)",
                  ) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
            or not 0 < budget < 1:
        raise CalibrationError(f"{name} must be a fraction in (0, 1), {meaning}; got {budget!r}")
    return float(budget)


def _ids(encoded: Any) -> list[int]:
    # tokenizers return a list, or (transformers 5's apply_chat_template) a mapping with input_ids
    return list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)


def _tokenize(row: dict, tokenizer: Any) -> tuple[list[int], list[int]]:
    """(input ids, labels) as TRL builds them for prompt/completion rows: loss on the completion."""
    if "input_ids" in row:
        ids = list(row["input_ids"])
        return ids, list(row.get("labels", ids))
    if tokenizer is None:
        raise CalibrationError("text rows need tokenizer=; or pass rows with input_ids and labels")
    from .datasets_io import normalize_rows

    row = normalize_rows([row], "calibration rows")[0]
    if "text" in row:
        ids = _ids(tokenizer(row["text"]))
        return ids, ids
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):
        prompt_ids = _ids(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True))
        ids = _ids(tokenizer.apply_chat_template(prompt + completion, tokenize=True))
    else:
        prompt_ids = _ids(tokenizer(prompt))
        ids = _ids(tokenizer(prompt + completion))
        if tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
            ids.append(tokenizer.eos_token_id)  # TRL appends eos to completions
    return ids, [-100] * len(prompt_ids) + ids[len(prompt_ids):]


def _context_mask(labels: torch.Tensor) -> torch.Tensor:
    """Context tokens as the patch defines them: no label here and none at the next position."""
    target = labels != -100
    dense = target.clone()
    dense[..., :-1] |= target[..., 1:]
    return ~dense


def probe_batches(rows: Sequence[dict], tokenizer: Any = None, *, num_rows: int = 16, batch_size: int = 8,
                  max_length: int = 512, seed: int = 0, device: torch.device | str = "cpu",
                  pad_id: int = 0) -> list[ProbeBatch]:
    """Tokenized, padded probe batches from ``num_rows`` rows drawn with ``seed``."""
    if not rows:
        raise CalibrationError("calibrate needs rows of your training data; got none")
    picked = sorted(random.Random(seed).sample(range(len(rows)), min(num_rows, len(rows))))
    examples = []
    for i in picked:
        ids, labels = (t[:max_length] for t in _tokenize(rows[i], tokenizer))
        lab = torch.tensor(labels)
        if not _context_mask(lab).any():
            raise CalibrationError(
                f"row {i} has no context tokens (every token carries loss, or the prompt is empty): "
                "SparseLoRA computes only context tokens sparse. Use prompt/completion rows")
        if not (lab[1:] != -100).any():
            raise CalibrationError(f"row {i} has no output tokens within max_length={max_length}; "
                                   "raise max_length or shorten the prompt")
        examples.append((ids, labels))
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for j, (row_ids, row_labels) in enumerate(chunk):
            ids[j, :len(row_ids)] = torch.tensor(row_ids)
            labels[j, :len(row_labels)] = torch.tensor(row_labels)
            mask[j, :len(row_ids)] = 1
        batches.append(ProbeBatch(ids.to(device), mask.to(device), labels.to(device),
                                  _context_mask(labels).to(device), (labels[:, 1:] != -100).sum(1).to(device)))
    return batches


# ---------------------------------------------------------------------------------------------
# measured probe loss
# ---------------------------------------------------------------------------------------------
@contextmanager
def _training_mode_without_dropout(model: nn.Module) -> Iterator[None]:
    # Sparsity runs only in training mode; dropout would make every probe a different sample.
    modes = {m: m.training for m in model.modules()}
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="sparse_unsloth: training without SparsityCallback")
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _loss_sum(model: nn.Module, batch: ProbeBatch) -> torch.Tensor:
    """Sum of the output tokens' losses (the model averages over the batch's output tokens)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                use_cache=False)
    return out.loss * batch.outputs.sum()


def probe_loss(model: nn.Module, batches: Sequence[ProbeBatch]) -> float:
    total = sum(int(b.outputs.sum()) for b in batches)
    with torch.no_grad():
        return float(sum(float(_loss_sum(model, b)) for b in batches)) / total


def lora_gradients(model: nn.Module, batches: Sequence[ProbeBatch]) -> dict[str, torch.Tensor]:
    """The gradient of the summed output-token loss of ``batches`` for each trainable parameter (the
    LoRA factors), by name, in float64; the parameters' ``.grad`` are put back as they were.

    Accumulated by ``backward()`` into ``.grad``, not ``torch.autograd.grad``: a reentrant
    gradient checkpoint (Hugging Face's default) refuses the latter.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise CalibrationError("gradient_budget needs trainable (LoRA) parameters; this model has none: "
                               "add LoRA adapters (peft.get_peft_model) first")
    kept = {name: p.grad for name, p in params.items()}
    try:
        for p in params.values():
            p.grad = None
        for batch in batches:
            _loss_sum(model, batch).backward()
        return {name: torch.zeros(p.shape, dtype=torch.float64, device=p.device) if p.grad is None
                else p.grad.double() for name, p in params.items()}
    finally:
        for name, p in params.items():
            p.grad = kept[name]


def gradient_error(sparse: Mapping[str, torch.Tensor], dense: Mapping[str, torch.Tensor]) -> float:
    """``||g_sparse - g_dense|| / ||g_dense||`` over all parameters of two :func:`lora_gradients`."""
    diff = math.sqrt(sum(float((sparse[n] - g).square().sum()) for n, g in dense.items()))
    return diff / max(math.sqrt(sum(float(g.square().sum()) for g in dense.values())), 1e-300)


# ---------------------------------------------------------------------------------------------
# stage 1: per-channel Taylor scores of one dense forward + backward
# ---------------------------------------------------------------------------------------------
class _Scores:
    """Per layer: each batch's estimator inputs and the per-channel ``a`` sums of each sequence."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self.batch: ProbeBatch | None = None
        self.index = 0                                               # of the batch running
        self.x: dict[tuple[int, str], list[torch.Tensor]] = {}      # estimator input per batch
        self.a: dict[tuple[int, str], list[torch.Tensor]] = {}      # [B, channels] per batch
        self.handles: list = []

    def _store(self, key, table, value) -> None:
        # Once per batch: gradient checkpointing's recompute runs the hooks a second time.
        values = table.setdefault(key, [])
        if len(values) == self.index:
            values.append(value)

    def _keep_input(self, module: nn.Module, key: tuple[int, str]) -> None:
        def fwd(mod, inputs, output) -> None:
            self._store(key, self.x, inputs[0].detach())
        self.handles.append(module.register_forward_hook(fwd))

    def _score(self, module: nn.Module, key: tuple[int, str], of_input: bool) -> None:
        """``a`` per channel of the projection's output, or (``of_input``) of its input."""
        weight = weight_getter(frozen_linear(module))

        def fwd(mod, inputs, output) -> None:
            ctx = self.batch.context.unsqueeze(-1).float()
            act = (inputs[0] if of_input else output).detach().float()

            def grad_hook(grad: torch.Tensor) -> None:
                g = grad.float()
                if of_input:        # the gradient at the output, pulled back to the input channels
                    g = g @ weight().float()
                self._store(key, self.a, (g * act * ctx).sum(1))
            if output.requires_grad:    # not in a reentrant checkpoint's first, no-grad forward
                output.register_hook(grad_hook)
        self.handles.append(module.register_forward_hook(fwd))

    def attach(self) -> None:
        for i, layer in enumerate(self.layers):
            mlp, attn = layer.mlp, layer.self_attn
            self._keep_input(mlp.gate_proj, (i, "mlp"))
            self._keep_input(attn.q_proj, (i, "self_attn"))
            self._score(mlp.down_proj, (i, "down"), of_input=True)
            self._score(attn.q_proj, (i, "q"), of_input=False)
            self._score(attn.k_proj, (i, "k"), of_input=False)
            self._score(attn.o_proj, (i, "o"), of_input=True)

    def detach(self) -> None:
        for h in self.handles:
            h.remove()


@contextmanager
def _checkpointed(model: nn.Module) -> Iterator[None]:
    """The decoder layers under (reentrant) gradient checkpointing, unless the model has some on.

    The sensitivity pass's backward then holds one layer's activations, and one layer's float
    copies in the score hooks, at a time instead of every layer's: a Llama-3-8B shape with 16
    probe rows of 512 tokens peaked at 74.5 GiB on an H100 without it. Reentrant, so that the
    first forward runs without grad and registers no score hooks.
    """
    from transformers import PreTrainedModel

    hf = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if hf is None or not hf.supports_gradient_checkpointing or hf.is_gradient_checkpointing:
        yield
        return
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    try:
        yield
    finally:
        hf.gradient_checkpointing_disable()


def _taylor_scores(model: nn.Module, batches: Sequence[ProbeBatch], layers: nn.ModuleList) -> _Scores:
    scores = _Scores(layers)
    scores.attach()
    total = sum(int(b.outputs.sum()) for b in batches)
    embed = model.get_input_embeddings()
    try:
        with _checkpointed(model):
            for scores.index, batch in enumerate(batches):
                scores.batch = batch
                # Gradients w.r.t. activations only: leaf embeddings that require grad reach every layer.
                embeds = embed(batch.input_ids).detach().requires_grad_(True)
                out = model(inputs_embeds=embeds, attention_mask=batch.attention_mask, labels=batch.labels,
                            use_cache=False)
                (out.loss * batch.outputs.sum() / total).backward()
                del out, embeds     # the graph (and the hooks' activations) of this batch, before the next
    finally:
        scores.detach()
        model.zero_grad(set_to_none=True)
    if (0, "down") not in scores.a:
        raise CalibrationError(
            "the model's projection modules did not run (Unsloth's fused kernels bypass them): "
            "calibrate a model loaded with plain transformers + PEFT, then train it however you like")
    return scores


def _dropped_sum(a: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per sequence, the ``a`` of the channels not in ``kept``: ``-(g . delta)``."""
    return a.sum(1) - a[:, kept].sum(1)


def _predicted(scores: _Scores, batches: Sequence[ProbeBatch], factors: EstimatorFactors, rank: int,
               kind: str, layer: int, sparsity: float, geo, seq_average: bool, dense_loss: float) -> float:
    """Predicted relative probe-loss increase of ``kind`` of ``layer`` alone at ``sparsity``, ``rank``."""
    f = {k: (factors[f"{layer}.{k}"][0][:, :rank], factors[f"{layer}.{k}"][1][:rank])
         for k in ESTIMATED_PROJS[kind]}
    total = sum(int(b.outputs.sum()) for b in batches)
    first = second = 0.0
    for j, batch in enumerate(batches):
        x = scores.x[(layer, kind)][j]
        ctx = batch.context
        if kind == "mlp":
            keep = kept_count(f["gate_proj"][1].shape[1], sparsity)
            rows = ((x * ctx.unsqueeze(-1)).sum(1) / ctx.sum(1, keepdim=True).clamp(min=1)) if seq_average \
                else x[ctx]
            kept = ffn_channels(rows, f["gate_proj"], f["up_proj"], keep)
            s = -_dropped_sum(scores.a[(layer, "down")][j], kept)
        else:
            keep = kept_count(geo.head_dim, sparsity)
            rows = x[ctx]
            q_idx, k_idx, _, o_idx = attn_channels(rows, f["q_proj"], f["k_proj"], f["v_proj"], geo.num_heads,
                                                   geo.num_kv_heads, geo.head_dim, keep,
                                                   biases=tuple(factors.bias(f"{layer}.{k}")
                                                                for k in ESTIMATED_PROJS[kind]))
            s = -(_dropped_sum(scores.a[(layer, "q")][j], q_idx) + _dropped_sum(scores.a[(layer, "k")][j], k_idx)
                  + _dropped_sum(scores.a[(layer, "o")][j], o_idx))
        has = batch.outputs > 0
        first += float(s[has].sum())
        second += 0.5 * float((s[has] ** 2 * total / batch.outputs[has]).sum())
    return (max(first, 0.0) + second) / dense_loss


# ---------------------------------------------------------------------------------------------
# stage 2: the greedy path
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Step:
    config: SparseConfig
    predicted: float      # sum of the single-layer predictions
    flops: float          # training FLOPs of a step at the geometry


def _config(base: SparseConfig, levels: Mapping[tuple[str, int], float], rank: int) -> SparseConfig:
    tables = {kind: {layer: s for (k, layer), s in levels.items() if k == kind and s > 0} for kind in MODULE_KINDS}
    return dataclasses.replace(base, **tables, estimator_rank=rank)


def _path(base: SparseConfig, pred: Mapping[tuple[str, int, float], float], grid: Mapping[str, Sequence[float]],
          num_layers: int, rank: int, flops) -> list[_Step]:
    """Nested configs from dense: each step raises the item with the most FLOPs saved per predicted loss."""
    dense = flops(_config(base, {}, rank))
    saved = {(kind, layer, s): dense - flops(_config(base, {(kind, layer): s}, rank))
             for kind in MODULE_KINDS for layer in range(num_layers) for s in grid[kind]}
    level = {(kind, layer): 0.0 for kind in MODULE_KINDS for layer in range(num_layers)}
    steps = [_Step(_config(base, {}, rank), 0.0, dense)]
    predicted = 0.0
    while True:
        best, best_ratio = None, -math.inf
        for (kind, layer), now in level.items():
            now_saved, now_pred = saved.get((kind, layer, now), 0.0), pred.get((kind, layer, now), 0.0)
            for s in grid[kind]:
                if s <= now:
                    continue
                gain = saved[(kind, layer, s)] - now_saved
                cost = pred[(kind, layer, s)] - now_pred
                ratio = gain / max(cost, 1e-12)
                if gain > 0 and ratio > best_ratio:
                    best, best_ratio = (kind, layer, s, cost), ratio
        if best is None:
            return steps
        kind, layer, s, cost = best
        level[(kind, layer)] = s
        predicted += max(cost, 0.0)
        config = _config(base, level, rank)
        steps.append(_Step(config, predicted, flops(config)))


# ---------------------------------------------------------------------------------------------
# stage 3: measured search along a path
# ---------------------------------------------------------------------------------------------
@contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class _Measure:
    """The sparse probe of a config on the probe batches: its loss increase over dense and, with a
    gradient budget, its LoRA gradient's error (cached by config)."""

    def __init__(self, model, batches, factors, dense_loss, bar, budget: float, gradient_budget: float | None,
                 dense_gradients: Mapping[str, torch.Tensor] | None) -> None:
        self.model, self.batches, self.factors, self.dense_loss, self.bar = model, batches, factors, dense_loss, bar
        self.budget, self.gradient_budget, self.dense_gradients = budget, gradient_budget, dense_gradients
        self.trials: list[dict[str, Any]] = []
        self.cache: dict[str, tuple[float, float | None]] = {}

    def __call__(self, step: _Step) -> float:
        """The loss increase (what the search's measured / predicted ratio is made of)."""
        return self._measured(step)[0]

    def within(self, step: _Step) -> bool:
        loss, grad = self._measured(step)
        return loss <= self.budget and (grad is None or grad <= self.gradient_budget)

    def gradient_error(self, step: _Step) -> float | None:
        return self._measured(step)[1]

    def _measured(self, step: _Step) -> tuple[float, float | None]:
        config = step.config
        key = repr(config)
        if key not in self.cache:
            r = config.estimator_rank
            factors = EstimatorFactors({k: (a[:, :r].contiguous(), b[:r].contiguous())
                                        for k, (a, b) in self.factors.factors.items()}, r)
            with _quiet(log):   # sparsify logs "using the factors passed in" for every trial
                sparsify(self.model, config, factors, progress=False)
            try:
                loss = probe_loss(self.model, self.batches) / self.dense_loss - 1
                grad = (None if self.dense_gradients is None else
                        gradient_error(lora_gradients(self.model, self.batches), self.dense_gradients))
            finally:
                unsparsify(self.model)
            self.cache[key] = loss, grad
            self.trials.append({"rank": r, "layers": {k: len(getattr(config, k)) for k in MODULE_KINDS},
                                "predicted": round(step.predicted, 6), "measured": round(loss, 6),
                                **({} if grad is None else {"gradient_error": round(grad, 6)})})
            self.bar.update(1 if grad is None else 3)
            self.bar.set_postfix_str(f"rank {r}: predicted {100 * step.predicted:+.2f}%, measured {100 * loss:+.2f}%"
                                     + ("" if grad is None else f", gradient error {grad:.3f}"))
        return self.cache[key]


def _crossing(path: Sequence[_Step], limit: float) -> int:
    return max((k for k, step in enumerate(path) if step.predicted <= limit), default=0)


def _search(path: Sequence[_Step], measure: _Measure, steps: int, ratio: float) -> tuple[int, float]:
    """(index of the largest measured config within the budgets, measured/predicted ratio of the loss)."""
    lo, hi = 0, len(path)           # path[lo] is within the budgets; path[hi:] is not known to be
    for _ in range(steps):
        if hi - lo <= 1:
            break
        quarter = max((hi - lo) // 4, 1)
        mid = min(max(_crossing(path, measure.budget / ratio), lo + quarter), hi - quarter) if hi - lo > 2 else lo + 1
        measured = measure(path[mid])
        if path[mid].predicted > 0 and measured > 0:
            ratio = measured / path[mid].predicted
        if measure.within(path[mid]):
            lo = mid
        else:
            hi = mid
    return lo, ratio


# ---------------------------------------------------------------------------------------------
# the entry points
# ---------------------------------------------------------------------------------------------
def _lora_r(model: nn.Module) -> int:
    peft = getattr(model, "peft_config", None) or {}
    return int(getattr(next(iter(peft.values()), None), "r", 16) or 16)


def run_calibration(model: nn.Module, rows: Sequence[dict], budget: float = 0.01, *, tokenizer: Any = None,
                    num_rows: int = 16, batch_size: int = 8, max_length: int = 512,
                    ranks: Sequence[int] = CALIBRATION_RANKS, levels: Mapping[str, Sequence[float]] | None = None,
                    search_steps: int = 6, base: SparseConfig | None = None, name: str = "calibrated",
                    geometry: tuple[int, int, int] | None = None, estimator: EstimatorFactors | None = None,
                    gradient_budget: float | None = None, seed: int = 0, progress: bool = True) -> Calibration:
    """:func:`calibrate`, with what it measured (see :class:`Calibration`)."""
    import time

    start = time.perf_counter()
    budget = _check_budget(budget)
    if gradient_budget is not None:
        gradient_budget = _check_budget(gradient_budget, "gradient_budget", "the allowed relative error of the "
                                        "LoRA gradient on the probe batches (e.g. 0.25), or None")
    check_supported(model)
    layers = decoder_layers(model)
    geo = attention_geometry(model)
    grid = {**CALIBRATION_LEVELS, **(levels or {})}
    for kind, values in grid.items():
        if kind not in MODULE_KINDS or not values or not all(0 < s < 1 for s in values):
            raise CalibrationError(f"levels[{kind!r}] must be sparsities in (0, 1), got {values!r}")
    grid = {kind: sorted(set(values)) for kind, values in grid.items()}
    smallest = min(min(frozen_linear(getattr(getattr(layers[0], kind), p)).weight.shape)
                   for kind, projs in ESTIMATED_PROJS.items() for p in projs)
    ranks = sorted({min(int(r), smallest) for r in ranks})
    if not ranks or ranks[0] < 1:
        raise CalibrationError(f"ranks must be estimator ranks >= 1, got {ranks!r}")
    base = dataclasses.replace(base or SparseConfig(), name=name, mlp={}, self_attn={})
    torch.manual_seed(seed)
    pad = getattr(tokenizer, "pad_token_id", None)
    device = next(model.parameters()).device
    batches = probe_batches(rows, tokenizer, num_rows=num_rows, batch_size=batch_size, max_length=max_length,
                            seed=seed, device=device, pad_id=pad if pad is not None else 0)
    n_rows = sum(b.input_ids.shape[0] for b in batches)
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    outputs = sum(int(b.outputs.sum()) for b in batches)
    if geometry is None:
        geometry = (batch_size, max(round(tokens / n_rows), 1), round(outputs / n_rows))
    lora_r = _lora_r(model)

    def flops(config: SparseConfig) -> float:
        return flop_count(config, model, *geometry, lora_r=lora_r)["total"]

    every_layer = {kind: range(len(layers)) for kind in MODULE_KINDS}
    if estimator is None or estimator.rank < ranks[-1]:
        # Every layer at the largest rank, sliced for the smaller ones; cached like sparsify's files.
        every = estimated_weights(layers, every_layer)
        model_id, revision = model_identity(model)
        estimator = resolve_factors(every, ranks[-1], fingerprint(every), model_id=model_id, revision=revision,
                                    progress=progress, allow_hub=False)
    factors = estimator.with_biases(estimated_biases(layers, every_layer)).to(device, torch.float32)
    # In forward-pass units: the dense loss 1, the sensitivity pass (forward + backward) 3, a search
    # step 1; with a gradient budget the dense gradient 3 and a search step 3.
    per_step = 1 if gradient_budget is None else 3
    bar = tqdm(total=4 + (per_step - 1) + per_step * (search_steps + search_steps // 2),
               desc="calibrate (probe forwards)", unit="fwd", disable=not progress)
    with _training_mode_without_dropout(model):
        dense_loss = probe_loss(model, batches)
        dense_gradients = None if gradient_budget is None else lora_gradients(model, batches)
        bar.update(per_step)
        bar.set_postfix_str("sensitivities (forward + backward)")
        scores = _taylor_scores(model, batches, layers)
        pred = {r: {(kind, layer, s): _predicted(scores, batches, factors, r, kind, layer, s, geo,
                                                 base.ffn_seq_average, dense_loss)
                    for kind in MODULE_KINDS for layer in range(len(layers)) for s in grid[kind]}
                for r in ranks}
        del scores
        bar.update(3)
        log.info("calibrate: dense probe loss %.4f; sensitivities after %.0f s", dense_loss,
                 time.perf_counter() - start)
        paths = {r: _path(base, pred[r], grid, len(layers), r, flops) for r in ranks}
        measure = _Measure(model, batches, factors, dense_loss, bar, budget, gradient_budget, dense_gradients)

        def saving_at(r: int, ratio: float) -> float:
            return paths[r][0].flops - paths[r][_crossing(paths[r], budget / ratio)].flops

        first = max(ranks, key=lambda r: (saving_at(r, 1.0), r))
        k, ratio = _search(paths[first], measure, search_steps, 1.0)
        best = paths[first][k]
        other = max((r for r in ranks if r != first), key=lambda r: (saving_at(r, ratio), r), default=None)
        if other is not None and paths[other][0].flops - saving_at(other, ratio) < best.flops:
            k2, _ = _search(paths[other], measure, max(search_steps // 2, 1), ratio)
            if paths[other][k2].flops < best.flops:
                best = paths[other][k2]
        sparse = bool(best.config.mlp or best.config.self_attn)
        measured = measure(best) if sparse else 0.0
        grad_error = None if gradient_budget is None else measure.gradient_error(best) if sparse else 0.0
    bar.close()
    if not sparse:
        log.warning("calibrate: no sparse config kept the probe loss within %.2f%% of dense%s; the result is "
                    "dense. Raise the budget%s or add lower sparsity levels", 100 * budget,
                    "" if gradient_budget is None else f" and the LoRA gradient within {gradient_budget:g}",
                    "" if gradient_budget is None else " or the gradient budget")
    return Calibration(
        config=best.config, budget=budget, dense_loss=dense_loss, sparse_loss=dense_loss * (1 + measured),
        flop_fraction=best.flops / paths[first][0].flops, geometry=geometry, probe_rows=n_rows,
        probe_tokens=tokens, forwards=1 + len(measure.trials), seconds=time.perf_counter() - start,
        trials=measure.trials, gradient_budget=gradient_budget, gradient_error=grad_error)


def calibrate(model: nn.Module, rows: Sequence[dict], budget: float = 0.01, **kwargs: Any) -> SparseConfig:
    """A :class:`SparseConfig` for ``model`` that saves the most training FLOPs within ``budget``.

    ``model``: a (PEFT LoRA) causal LM as :func:`sparsify` takes it, loaded with plain
    transformers. ``rows``: training rows (prompt/completion, question/answer or messages with a
    ``tokenizer=``; or ``{"input_ids", "labels"}`` with -100 on the prompt). ``budget``: the
    allowed relative increase of the sparse forward's loss on the probe rows, in (0, 1).
    Keyword arguments: ``tokenizer``, ``num_rows`` (16), ``batch_size`` (8, as in training: the
    estimator picks channels per batch), ``max_length``, ``ranks`` (candidate estimator ranks),
    ``levels`` (sparsities tried per kind), ``search_steps`` (measured forwards), ``base`` (a
    config whose schedule keys are kept), ``name``, ``geometry`` ((batch, seq_len,
    output_tokens) to count FLOPs at; default: the probe rows'), ``estimator`` (SVD factors at
    rank >= the largest candidate), ``gradient_budget`` (also bound the LoRA gradient's relative
    error against dense on the probe rows; None: not measured), ``seed``, ``progress``. See the
    module doc for the method.
    """
    return run_calibration(model, rows, budget, **kwargs).config
