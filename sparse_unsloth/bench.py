"""Is sparse faster for *this* model on *these* rows? Dense and sparse training steps, interleaved.

One TRL SFTTrainer run on a sparsified LoRA model (loaded through Unsloth where asked, so its
real training step is what gets timed). Its steps come in pairs on one batch each, one step dense
and one sparse, in the order dense-sparse, sparse-dense, ... (:mod:`.timing`): both modes see the
same machine, the same batches and the same model. The first pairs (compilation, allocator
warm-up, CUDA graph captures) are not timed, and the timed pairs go round the warm-up's batches
again: what is timed is the steady state of a long run, in which every batch size has been seen,
not the first sight of each size (with padding-free packing on a GPU a short run is mostly that).
``sparse-unsloth bench`` (:mod:`.cli_bench`) and the demo use it;
``scripts/bench_speed.py`` stays the reproducible synthetic benchmark (random Llama-3-8B-shaped
weights, fixed token layout).
"""

from __future__ import annotations

import dataclasses
import json
import random
import resource
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .finetune import StepTimer, build_trainer
from .flops import flop_fraction
from .patch import sparse_state, unsloth_fast
from .timing import Comparison, alternating_schedule, compare, split_pairs

_GIB = 2**30


@dataclasses.dataclass
class BenchResult:
    """The timed pairs of a bench run and what they measure."""

    comparison: Comparison
    dense_step_s: list[float]            # timed pairs, in order
    sparse_step_s: list[float]
    tokens_per_step: list[int]           # the batch of each timed pair (both of its steps)
    batch_size: int
    seq_len: float                       # mean padded row length of the timed batches
    output_tokens: float                 # mean labelled tokens a row
    warmup_pairs: int
    fresh_batches: bool                  # each timed pair on a batch not seen before (else the warm-up's)
    estimator_share: float | None        # estimator time / sparse step time (None: inside the passes)
    memory: dict[str, Any]
    flop_fraction: float | None
    device: str
    notes: list[str]

    def tokens_per_s(self, sparse: bool) -> float:
        return sum(self.tokens_per_step) / sum(self.sparse_step_s if sparse else self.dense_step_s)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tokens_per_s"] = {"dense": self.tokens_per_s(False), "sparse": self.tokens_per_s(True)}
        out["verdict"] = self.comparison.describe()
        return out


class _Alternate(StepTimer):
    """Times each step and runs it dense or sparse as ``schedule`` says (no warm-up of its own)."""

    def __init__(self, model, schedule: list[bool]) -> None:
        super().__init__()
        self.sparse = sparse_state(model)
        self.sparse.callback_attached = True     # this callback schedules the steps
        self.schedule = schedule
        self.estimator_s: list[float] = []
        self.peak_bytes: list[int] = []
        self._estimator_start = 0.0

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self.sparse.enabled = self.schedule[state.global_step]
        self._estimator_start = self.sparse.stats["estimator_s"]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        super().on_step_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        super().on_step_end(args, state, control, **kwargs)
        self.estimator_s.append(self.sparse.stats["estimator_s"] - self._estimator_start)
        if torch.cuda.is_available():
            self.peak_bytes.append(torch.cuda.max_memory_allocated())


def pair_indices(available: int, batch_size: int, pairs: int, distinct: int | None = None) -> list[int]:
    """Row indices, read in order, in which each batch of ``batch_size`` comes twice in a row (one
    pair). Pair ``k`` trains batch ``k % distinct`` (default: every pair its own batch); rows are
    reused from the start when there are fewer than ``distinct * batch_size``."""
    if available < 1:
        raise ValueError("bench needs at least one row")
    distinct = distinct or pairs
    picked = [i % available for i in range(distinct * batch_size)]
    out: list[int] = []
    for k in range(pairs):
        batch = picked[k % distinct * batch_size:(k % distinct + 1) * batch_size]
        out += batch + batch
    return out


def _memory(peaks: list[int], schedule: list[bool]) -> dict[str, Any]:
    if peaks:
        return {mode: max(p for p, sparse in zip(peaks, schedule) if sparse == want) / _GIB
                for mode, want in (("dense_gib", False), ("sparse_gib", True))}
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"process_peak_rss_gib": rss / _GIB,
            "note": "CPU: the process's peak resident memory over the whole run (model load included); "
                    "torch keeps no per-step peak on CPU, so dense and sparse are not told apart"}


def measure(model, tokenizer, rows: list[dict], *, steps: int, warmup_steps: int = 1, batch_size: int = 8,
            max_length: int = 512, learning_rate: float = 2e-4, seed: int = 0, fresh_batches: bool = False,
            progress: bool = True) -> BenchResult:
    """Time ``steps`` dense and ``steps`` sparse training steps of the sparsified LoRA ``model``.

    ``warmup_steps`` pairs run first, untimed, each on a batch of its own; the timed pairs go round
    the same batches again (with ``warmup_steps=0``, each on a new one). Each pair trains its batch
    of ``batch_size`` rows twice, dense and sparse, in alternating order. The model keeps training
    (its LoRA weights change), as it would in a real run. ``fresh_batches``: each timed pair on a
    batch not seen before, and the CUDA graphs captured as in training (at a shape's second
    sighting): what a padding-free run, whose batch shapes rarely come back, costs.
    """
    if steps < 1 or warmup_steps < 0:
        raise ValueError(f"steps must be >= 1 and warmup_steps >= 0, got {steps} and {warmup_steps}")
    state = sparse_state(model)
    if state is None:
        raise ValueError("bench needs a sparsified model: call sparse_unsloth.sparsify(model, config) first")
    if not rows:
        raise ValueError("bench needs at least one row")
    pairs = warmup_steps + steps
    distinct = pairs if fresh_batches else warmup_steps or pairs
    schedule = alternating_schedule(pairs)
    callback = _Alternate(model, schedule)
    # A seeded sample, so that the timed batches look like a training run's whatever the file's order.
    sample = random.Random(seed).sample(rows, min(len(rows), distinct * batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(model, tokenizer, sample, output_dir=tmp, max_steps=2 * pairs,
                                batch_size=batch_size, learning_rate=learning_rate, max_length=max_length,
                                seed=seed, logging_steps=2 * pairs, callbacks=[callback], progress=progress,
                                in_order=True)
        # Pairs are laid out on the tokenized rows: TRL drops rows that keep no labelled token
        # within max_length, which would shift every later batch off its twin.
        kept = len(trainer.train_dataset)
        if kept == 0:
            raise ValueError(f"none of the {len(sample)} rows drawn keeps a labelled (completion) token "
                             f"within max_length {max_length}: raise the maximum length")
        trainer.train_dataset = trainer.train_dataset.select(pair_indices(kept, batch_size, pairs, distinct))
        was_enabled = state.enabled
        # The warm-up sees each batch once: its CUDA graphs are captured then, not in a timed step.
        weight = next(model.parameters())
        runners = [r for r in (state.runner(weight), state.layer_runner(weight)) if hasattr(r, "capture_at")]
        capture_at = [r.capture_at for r in runners]
        if not fresh_batches:
            for r in runners:
                r.capture_at = 1
        try:
            trainer.train()
        finally:
            state.enabled = was_enabled
            for r, at in zip(runners, capture_at):
                r.capture_at = at
    if len(callback.step_s) != 2 * pairs:
        raise RuntimeError(f"the trainer ran {len(callback.step_s)} steps, not the {2 * pairs} scheduled")

    timed = slice(2 * warmup_steps, None)
    dense_s, sparse_s = split_pairs(callback.step_s[timed], schedule[timed])
    data = trainer.train_dataset
    tokens, padded, labelled = [], [], []
    for k in range(warmup_steps, pairs):
        batch = data[2 * k * batch_size:(2 * k + 1) * batch_size]
        tokens.append(sum(len(ids) for ids in batch["input_ids"]))
        padded.append(max(len(ids) for ids in batch["input_ids"]))
        labelled.append(sum(sum(t != -100 for t in labels) for labels in batch["labels"]) / batch_size)
    estimator = sum(e for e, sparse in zip(callback.estimator_s[timed], schedule[timed]) if sparse)
    seq_len, output_tokens = statistics.mean(padded), statistics.mean(labelled)
    on_gpu = next(model.parameters()).is_cuda
    flops = flop_fraction(state.config, model.config, batch_size, round(seq_len), round(output_tokens))
    notes = []
    if kept < len(sample):
        notes.append(f"{len(sample) - kept} of the {len(sample)} rows drawn had no labelled token within "
                     f"max_length {max_length} and were left out")
    fast = unsloth_fast.applies(model)    # the test by which sparsify picks its backend
    if not fast:
        notes.append("the sparse layers ran the reference path (plain PyTorch, as on CPU or without "
                     "Unsloth): it computes the same result, it is not built to be faster; the fast path "
                     "needs a model loaded through Unsloth on a CUDA GPU (bench --unsloth)")
    return BenchResult(
        comparison=compare(dense_s, sparse_s), dense_step_s=dense_s, sparse_step_s=sparse_s,
        tokens_per_step=tokens, batch_size=batch_size, seq_len=seq_len, output_tokens=output_tokens,
        warmup_pairs=warmup_steps, fresh_batches=fresh_batches, estimator_share=None if fast else estimator / sum(sparse_s),
        memory=_memory(callback.peak_bytes[timed], schedule[timed]), flop_fraction=flops,
        device=torch.cuda.get_device_name() if on_gpu else "cpu", notes=notes)


def format_report(result: BenchResult) -> str:
    """The table people read: step times with their spread, tokens/s, memory, the verdict."""
    c = result.comparison
    lines = [(f"{c.pairs} dense + {c.pairs} sparse steps timed, interleaved in pairs on the same batches "
              f"({result.batch_size} rows x ~{result.seq_len:.0f} tokens, ~{result.output_tokens:.0f} of "
              f"them labelled; {result.warmup_pairs} untimed warm-up pair(s)"
              + ("; each timed pair on a batch not seen before, as in training" if result.fresh_batches else
                 "; the timed pairs on the warm-up's batches again: the steady state")
              + f") on {result.device}"),
             f"{'mode':<8}{'median step':>13}{'min':>10}{'max':>10}{'tokens/s':>11}"]
    for name, spread, sparse in (("dense", c.dense, False), ("sparse", c.sparse, True)):
        lines.append(f"{name:<8}{spread.median:>11.3f} s{spread.low:>8.3f} s{spread.high:>8.3f} s"
                     f"{result.tokens_per_s(sparse):>11.0f}")
    lines.append(f"result:    {c.describe()}")
    lines.append("estimator: made inside the sparse passes' CUDA graphs, not timed apart here "
                 "(scripts/bench_speed.py times it alone)" if result.estimator_share is None else
                 f"estimator: {100 * result.estimator_share:.1f}% of the sparse step time")
    memory = result.memory
    if "dense_gib" in memory:
        lines.append(f"peak GPU memory: dense {memory['dense_gib']:.2f} GiB, "
                     f"sparse {memory['sparse_gib']:.2f} GiB")
    else:
        lines.append(f"peak memory: {memory['process_peak_rss_gib']:.2f} GiB ({memory['note']})")
    if result.flop_fraction is not None:
        lines.append(f"FLOP fraction: {result.flop_fraction:.3f} of the dense step's training FLOPs "
                     f"(bound on the speed-up: {1 / result.flop_fraction:.2f}x)")
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def plot(result: BenchResult, path: str | Path) -> Path | None:
    """Step times of both modes, pair by pair, saved to ``path``; None when matplotlib is not installed.

    Drawn on a bare Figure, not through pyplot: no backend is chosen or changed (a notebook's
    inline plots stay as they were), and nothing needs a display.
    """
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        return None
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    pairs = range(1, result.comparison.pairs + 1)
    ax.plot(pairs, result.dense_step_s, marker="o", label="dense LoRA")
    ax.plot(pairs, result.sparse_step_s, marker="o", label="sparse")
    ax.set(xlabel="timed pair (both steps train the same batch)", ylabel="step time (s)", ylim=(0, None))
    ax.set_title(result.comparison.describe(), fontsize=8, wrap=True)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return Path(path)


def write_outputs(result: BenchResult, out_dir: str | Path,
                  settings: dict[str, Any]) -> dict[str, Path | None]:
    """``bench.json`` (settings + result) and ``bench.png`` in ``out_dir``; the plot's path is None
    when matplotlib is missing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    path.write_text(json.dumps({"settings": settings, **result.to_dict()}, indent=2) + "\n")
    return {"json": path, "plot": plot(result, out / "bench.png")}
