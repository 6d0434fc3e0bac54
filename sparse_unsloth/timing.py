"""Dense vs sparse step times measured under the same conditions, and what they can support.

A speed-up is only meaningful when both modes ran on the same machine state. Timing a dense run,
then a sparse run, compares two machine states as much as two methods: on a shared box a
neighbour's job starting between the runs made the sparse run "9x faster". So the steps come in
pairs that alternate dense-sparse, sparse-dense, ... (:func:`alternating_schedule`), each pair on
one batch, and :func:`compare` reports a speed-up only when the measurement supports one.

A training run has no pairs, but it has its dense warm-up: :class:`StepClock` times its steps,
and :func:`slower_message` warns when the sparse ones are clearly slower (never a speed-up claim).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

#: Fewer timed pairs than this cannot show a spread.
MIN_PAIRS = 3
#: A mode whose step times range over more than this fraction of their median was measured while
#: the machine's load changed: its numbers say more about the neighbours than about the method.
NOISE_LIMIT = 0.5
NO_DIFFERENCE = "no measurable difference"


@dataclasses.dataclass(frozen=True)
class Spread:
    """Median, minimum and maximum of a few measurements."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no measurements")
        return cls(statistics.median(values), min(values), max(values))

    @property
    def relative(self) -> float:
        """(max - min) / median: 0 for identical measurements."""
        return (self.high - self.low) / self.median if self.median else float("inf")

    def overlaps(self, other: Spread) -> bool:
        return self.low <= other.high and other.low <= self.high


def alternating_schedule(pairs: int) -> list[bool]:
    """Which steps run sparse, for ``pairs`` pairs: dense-sparse, sparse-dense, dense-sparse, ...

    Flipping the order every pair cancels what the second step of a pair gains or loses from the
    first (warm caches, a clock ramping up), and a slow drift of the machine hits both modes alike.
    """
    return [bool((step % 2) ^ (step // 2 % 2)) for step in range(2 * pairs)]


def split_pairs(step_s: Sequence[float], schedule: Sequence[bool]) -> tuple[list[float], list[float]]:
    """(dense times, sparse times) in pair order, from the step times of a run that followed ``schedule``."""
    if len(step_s) != len(schedule):
        raise ValueError(f"{len(step_s)} step times for a schedule of {len(schedule)} steps")
    return ([t for t, sparse in zip(step_s, schedule) if not sparse],
            [t for t, sparse in zip(step_s, schedule) if sparse])


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Dense and sparse step times (seconds), the per-pair speed-up, and what they support."""

    dense: Spread
    sparse: Spread
    speedup: Spread          # dense / sparse step time, pair by pair
    pairs: int
    verdict: str             # "faster", "slower" or NO_DIFFERENCE
    reason: str              # why NO_DIFFERENCE; empty otherwise

    def describe(self) -> str:
        """One line for people: the speed-up with its spread, or why there is none to report."""
        if self.verdict == NO_DIFFERENCE:
            return f"{NO_DIFFERENCE}: {self.reason}"
        s = self.speedup
        what = "sparse is faster" if self.verdict == "faster" else "sparse is slower"
        return f"{what}: speed-up {s.median:.2f}x (per pair {s.low:.2f}-{s.high:.2f}x, {self.pairs} pairs)"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def compare(dense_s: Sequence[float], sparse_s: Sequence[float], *, min_pairs: int = MIN_PAIRS,
            noise_limit: float = NOISE_LIMIT) -> Comparison:
    """Compare paired step times (``dense_s[i]`` and ``sparse_s[i]`` ran back to back on one batch).

    The verdict is "faster" or "slower" only with at least ``min_pairs`` pairs, neither mode's
    times spread over more than ``noise_limit`` of their median, and the two ranges apart (then
    every pair agrees on the direction). Otherwise it is :data:`NO_DIFFERENCE`, with the reason.
    """
    if len(dense_s) != len(sparse_s) or not dense_s:
        raise ValueError(f"need paired step times, got {len(dense_s)} dense and {len(sparse_s)} sparse")
    if min(*dense_s, *sparse_s) <= 0:
        raise ValueError("step times must be positive")
    dense, sparse = Spread.of(dense_s), Spread.of(sparse_s)
    speedup = Spread.of([d / s for d, s in zip(dense_s, sparse_s)])
    pairs = len(dense_s)
    reason = ""
    if pairs < min_pairs:
        reason = (f"only {pairs} timed pair(s); at least {min_pairs} are needed to see the spread "
                  "(time more steps)")
    else:
        for name, spread in (("dense", dense), ("sparse", sparse)):
            if spread.relative > noise_limit:
                reason = (f"{name} step times range {spread.low:.3g}-{spread.high:.3g} s "
                          f"({100 * spread.relative:.0f}% of their median, over the {100 * noise_limit:.0f}% "
                          "limit): the machine's load changed during the measurement; rerun when it is idle")
                break
        else:
            if dense.overlaps(sparse):
                reason = (f"the dense ({dense.low:.3g}-{dense.high:.3g} s) and sparse "
                          f"({sparse.low:.3g}-{sparse.high:.3g} s) step times overlap")
    verdict = NO_DIFFERENCE if reason else ("faster" if speedup.median > 1 else "slower")
    return Comparison(dense, sparse, speedup, pairs, verdict, reason)


#: Sparse steps slower than the dense warm-up's by more than this factor get a warning.
SLOWER_LIMIT = 1.1


class StepClock:
    """The step times of a training run, dense (warm-up) and sparse, measured without a host sync:
    CUDA events on a GPU, read once they have completed; the host clock elsewhere.

    A sync per step would cost the step what it measures (the host could no longer queue the next
    step's work while the GPU finishes this one). The first ``skip`` steps of each mode are not
    kept: compilation, first CUDA graph captures.
    """

    def __init__(self, skip: int = 2) -> None:
        self.skip = skip
        self.times: dict[bool, list[float]] = {False: [], True: []}     # sparse? -> seconds
        self._started: dict[bool, int] = {False: 0, True: 0}
        self._start: Any = None
        self._stream: Any = None
        self._pending: list[tuple[bool, Any, Any]] = []

    def start(self, device: torch.device) -> None:
        """Begin a step of the model on ``device`` (its stream's events time it there)."""
        if device.type == "cuda":
            self._stream = torch.cuda.current_stream(device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record(self._stream)
        else:
            self._start = time.perf_counter()

    def stop(self, sparse: bool) -> None:
        """End the step begun by :meth:`start`; ``sparse``: whether it ran sparse. (A step not
        stopped is not kept: the next :meth:`start` replaces it.)"""
        if self._start is None:
            return
        self._started[sparse] += 1
        if self._started[sparse] > self.skip:
            if isinstance(self._start, float):
                self.times[sparse].append(time.perf_counter() - self._start)
            else:
                end = torch.cuda.Event(enable_timing=True)
                end.record(self._stream)
                self._pending.append((sparse, self._start, end))
        self._start = None

    def collect(self) -> None:
        """Read the steps whose events have completed."""
        waiting = []
        for sparse, start, end in self._pending:
            if end.query():
                self.times[sparse].append(start.elapsed_time(end) / 1e3)
            else:
                waiting.append((sparse, start, end))
        self._pending = waiting

    def ratio(self, min_dense: int = 3, min_sparse: int = 10) -> float | None:
        """Median sparse step time over the median dense one, once both have enough steps."""
        dense, sparse = self.times[False], self.times[True]
        if len(dense) < min_dense or len(sparse) < min_sparse:
            return None
        return statistics.median(sparse) / statistics.median(dense)


def slower_message(clock: StepClock, limit: float = SLOWER_LIMIT) -> str | None:
    """A warning for people when the sparse steps are more than ``limit`` times slower than the dense
    warm-up steps of the same run; None otherwise (or while there are too few steps to say)."""
    ratio = clock.ratio()
    if ratio is None or ratio <= limit:
        return None
    dense, sparse = statistics.median(clock.times[False]), statistics.median(clock.times[True])
    return (f"the sparse steps are {ratio:.2f}x slower than this run's dense warm-up steps (median "
            f"{sparse:.3g} s against {dense:.3g} s, {len(clock.times[True])} and {len(clock.times[False])} "
            "steps): sparsity costs this model and machine more than it saves, which is usual for small "
            "models (well under 1B parameters), whose steps are bound by the host, not the GPU. Train "
            "dense, or time both with `sparse-unsloth bench` on your rows. (Batches of changing shape also "
            "slow the first steps: each new shape is captured as CUDA graphs.)")
