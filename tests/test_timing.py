"""The timing rule of ``bench`` and the demo: interleaved pairs, and no speed-up the numbers cannot carry."""

from __future__ import annotations

import pytest
import torch

from sparse_unsloth import timing
from sparse_unsloth.timing import (
    NO_DIFFERENCE,
    Spread,
    StepClock,
    alternating_schedule,
    compare,
    slower_message,
    split_pairs,
)


def test_schedule_alternates_the_order_of_each_pair():
    assert alternating_schedule(4) == [False, True, True, False, False, True, True, False]
    schedule = alternating_schedule(5)
    for pair in range(5):   # every pair has one dense and one sparse step
        assert sorted(schedule[2 * pair:2 * pair + 2]) == [False, True]


def test_split_pairs_keeps_pair_order():
    schedule = alternating_schedule(2)                       # D S S D
    assert split_pairs([1.0, 2.0, 3.0, 4.0], schedule) == ([1.0, 4.0], [2.0, 3.0])
    with pytest.raises(ValueError, match="3 step times for a schedule of 4"):
        split_pairs([1.0, 2.0, 3.0], schedule)


def test_a_clear_speedup_is_reported_with_its_spread():
    c = compare([1.0, 1.1, 1.05, 0.95], [0.5, 0.52, 0.55, 0.5])
    assert c.verdict == "faster" and c.reason == ""
    ratios = [1.0 / 0.5, 1.1 / 0.52, 1.05 / 0.55, 0.95 / 0.5]     # pair by pair, not median over median
    assert (c.speedup.low, c.speedup.high) == (pytest.approx(min(ratios)), pytest.approx(max(ratios)))
    assert c.describe().startswith("sparse is faster: speed-up ")
    assert "per pair" in c.describe() and "4 pairs" in c.describe()


def test_a_clear_slowdown_is_reported_as_such():
    c = compare([1.0, 1.02, 0.98], [1.2, 1.22, 1.19])
    assert c.verdict == "slower"
    assert c.describe().startswith("sparse is slower: speed-up 0.8")


def test_overlapping_ranges_give_no_speedup():
    c = compare([1.0, 1.2, 1.1, 1.05], [0.95, 1.15, 1.0, 1.1])
    assert c.verdict == NO_DIFFERENCE and "overlap" in c.reason
    assert c.describe().startswith("no measurable difference: the dense (1-1.2 s) and sparse")
    assert "x" not in c.describe().split(":")[0]


def test_a_busy_machine_gives_no_speedup_even_when_the_medians_differ():
    # The case: a neighbour's job slowed some steps down many times over.
    c = compare([32.9, 4.0, 30.1, 3.9], [3.6, 3.7, 3.65, 3.8])
    assert c.verdict == NO_DIFFERENCE
    assert "dense step times range 3.9-32.9 s" in c.reason and "load changed" in c.reason


def test_too_few_pairs_give_no_speedup():
    c = compare([2.0, 2.0], [1.0, 1.0])
    assert c.verdict == NO_DIFFERENCE and "only 2 timed pair(s)" in c.reason
    assert compare([2.0, 2.0], [1.0, 1.0], min_pairs=2).verdict == "faster"


def test_the_noise_limit_is_the_threshold():
    dense = [1.0, 1.0, 1.4]                                  # spread 40% of the median
    assert compare(dense, [0.5, 0.5, 0.5], noise_limit=0.5).verdict == "faster"
    assert compare(dense, [0.5, 0.5, 0.5], noise_limit=0.3).verdict == NO_DIFFERENCE


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="paired"):
        compare([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="positive"):
        compare([1.0, 0.0, 1.0], [1.0, 1.0, 1.0])


def test_spread():
    s = Spread.of([3.0, 1.0, 2.0])
    assert (s.median, s.low, s.high, s.relative) == (2.0, 1.0, 3.0, 1.0)
    assert s.overlaps(Spread.of([2.5, 4.0])) and not s.overlaps(Spread.of([3.5, 4.0]))


class _FakeClock:
    """time.perf_counter for sparse_unsloth.timing: advanced by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(clock: StepClock, fake: _FakeClock, times: list[float], sparse: bool) -> None:
    for t in times:
        clock.start(torch.device("cpu"))
        fake.now += t
        clock.stop(sparse)


def test_step_clock_skips_each_modes_first_steps_and_compares_medians(monkeypatch):
    fake = _FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    clock = StepClock(skip=2)
    _run(clock, fake, [30.0, 5.0, 1.0, 1.2, 0.9], sparse=False)     # compile, capture, steady
    _run(clock, fake, [9.0, 4.0] + [1.5] * 9, sparse=True)
    assert clock.times[False] == pytest.approx([1.0, 1.2, 0.9])
    assert clock.times[True] == pytest.approx([1.5] * 9)
    assert clock.ratio() is None                                   # 9 sparse steps: too few to say
    _run(clock, fake, [1.6], sparse=True)
    assert clock.ratio() == pytest.approx(1.5)
    message = slower_message(clock)
    assert "1.50x slower" in message and "median 1.5 s against 1 s" in message
    assert "sparse-unsloth bench" in message


def test_no_warning_when_sparse_is_as_fast_or_faster(monkeypatch):
    fake = _FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    clock = StepClock(skip=0)
    _run(clock, fake, [1.0] * 3, sparse=False)
    _run(clock, fake, [1.09] * 10, sparse=True)                    # within the 10% limit
    assert clock.ratio() == pytest.approx(1.09) and slower_message(clock) is None
    _run(clock, fake, [0.5] * 20, sparse=True)
    assert slower_message(clock) is None


def test_a_step_started_but_not_stopped_is_not_kept(monkeypatch):
    fake = _FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    clock = StepClock(skip=0)
    clock.start(torch.device("cpu"))
    fake.now += 100.0                                              # e.g. an enabled step that ran dense
    _run(clock, fake, [1.0], sparse=False)
    clock.stop(False)                                              # nothing started: nothing kept
    assert clock.times[False] == [1.0]
