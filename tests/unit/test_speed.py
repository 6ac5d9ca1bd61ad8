"""``maas.inference.speed``: paired timings and the sign test's interval, on made-up clocks."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from maas.inference.optimize import _latency_check
from maas.inference.speed import compare_speed, median_interval, summarize


def test_the_interval_is_the_sign_tests() -> None:
    ordered = [float(i) for i in range(64)]
    low, high = median_interval(ordered)
    # P(Binomial(64, 1/2) <= 21) ~= 0.0038 <= 0.005 < P(<= 22): ranks 21 and 42
    assert (low, high) == (21.0, 42.0)
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]) == (1.0, 8.0)  # 2 / 2^8 < 1%
    assert median_interval([1.0, 2.0, 3.0]) == (0.0, math.inf)  # too few pairs to say anything


@pytest.mark.parametrize(("parent", "derived", "faster", "slower"), [
    ([2.0] * 8, [1.0] * 8, True, False),
    ([1.0] * 8, [2.0] * 8, False, True),
    ([1.0, 2.0] * 8, [2.0, 1.0] * 8, False, False),  # half each way: not distinguishable
    ([2.0] * 7 + [0.5], [1.0] * 8, False, False),  # with 8 pairs, one dissent is enough doubt
    ([2.0] * 30 + [0.5] * 2, [1.0] * 32, True, False),  # with 32, two are not
])
def test_faster_and_slower_need_the_whole_interval(parent: list[float], derived: list[float], faster: bool,
                                                   slower: bool) -> None:
    speed = summarize(parent, derived)
    assert (speed.faster, speed.slower) == (faster, slower)
    assert speed.pairs == len(parent) and speed.low <= speed.speedup <= speed.high


def test_goals() -> None:
    faster, slower, even = summarize([2.0] * 8, [1.0] * 8), summarize([1.0] * 8, [2.0] * 8), \
        summarize([1.0, 2.0] * 8, [2.0, 1.0] * 8)
    assert _latency_check(faster, "latency", "u8").passed and _latency_check(faster, "size", "u8").passed
    refused = _latency_check(even, "latency", "u8")
    assert not refused.passed and refused.detail.startswith("the int8 model is not faster than its parent")
    assert _latency_check(even, "size", "u8").passed  # size: not slower is enough
    for goal in ("latency", "size"):
        check = _latency_check(slower, goal, "u8")
        assert not check.passed and check.check == "latency" and "0.50x" in check.detail


class FakeClock:
    """Each run advances time by its model's cost; reading the clock costs nothing."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def runner(self, name: str, cost: float) -> Callable[[int], None]:
        def run(feed: int) -> None:
            self.calls.append(f"{name}{feed}")
            self.now += cost
        return run


def test_pairs_alternate_which_model_runs_first_and_cycle_the_inputs() -> None:
    clock = FakeClock()
    speed = compare_speed(clock.runner("p", 0.002), clock.runner("d", 0.001), 3, max_pairs=4, clock=clock)
    assert clock.calls == ["p0", "d0", "d1", "p1", "p2", "d2", "d0", "p0"]
    assert speed.pairs == 4 and speed.speedup == 2.0 and speed.parent_p50_ms == 2.0 and speed.derived_p50_ms == 1.0


def test_the_budget_stops_slow_models_after_the_minimum() -> None:
    clock = FakeClock()
    speed = compare_speed(clock.runner("p", 1.0), clock.runner("d", 0.5), 2, budget_seconds=2.0, clock=clock)
    assert speed.pairs == 8  # the minimum, though the budget ran out after the first
    assert speed.faster


def test_summarize_refuses_unpaired_timings() -> None:
    with pytest.raises(ValueError):
        summarize([1.0], [])
