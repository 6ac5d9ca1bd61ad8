"""Is a derived model faster than its parent? Paired timings and a distribution-free interval.

Why paired: optimize runs inside a busy server (and CI runs it on a loaded two-core machine), so two
separate p50s drift with whatever else the CPU does. Timing the parent and the derived model back to
back on the same input, alternating which goes first, exposes both to the same load; the per-pair
ratio ``parent / derived`` cancels most of it.

Why an interval: a claim "faster" must survive noise. The interval is the sign test's confidence
interval for the median ratio (order statistics of the ratios, exact for any distribution), so
"faster" means the whole interval lies above 1 and "slower" that it lies below 1; anything else is
"not distinguishable". Eight pairs that all agree already give 99% confidence (2 / 2^8 < 1%).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: Confidence of the speedup interval.
CONFIDENCE = 0.99
MIN_PAIRS = 8
MAX_PAIRS = 64
#: Timing stops after this many seconds once MIN_PAIRS pairs are in (large models).
BUDGET_SECONDS = 2.0


@dataclass(frozen=True)
class SpeedComparison:
    parent_p50_ms: float
    derived_p50_ms: float
    speedup: float  # median of the paired ratios parent_time / derived_time
    low: float  # CONFIDENCE interval of that median
    high: float
    pairs: int

    @property
    def faster(self) -> bool:
        return self.low > 1.0

    @property
    def slower(self) -> bool:
        return self.high < 1.0

    def describe(self) -> str:
        return (f"p50 {self.parent_p50_ms:.4g} ms -> {self.derived_p50_ms:.4g} ms, {self.speedup:.2f}x "
                f"({CONFIDENCE:.0%} interval {self.low:.2f}x-{self.high:.2f}x over {self.pairs} paired runs)")


def compare_speed(run_parent: Callable[[int], object], run_derived: Callable[[int], object], inputs: int, *,
                  min_pairs: int = MIN_PAIRS, max_pairs: int = MAX_PAIRS, budget_seconds: float = BUDGET_SECONDS,
                  clock: Callable[[], float] = time.perf_counter) -> SpeedComparison:
    """Time ``run_parent(i)`` and ``run_derived(i)`` back to back over inputs ``i`` in ``range(inputs)``
    (cycled), alternating which runs first, until ``max_pairs`` pairs or the time budget is spent."""
    parent_times: list[float] = []
    derived_times: list[float] = []
    started = clock()
    for pair in range(max_pairs):
        if pair >= min_pairs and clock() - started > budget_seconds:
            break
        feed = pair % inputs
        order = ((run_parent, parent_times), (run_derived, derived_times))
        for run, times in order if pair % 2 == 0 else reversed(order):
            before = clock()
            run(feed)
            times.append(clock() - before)
    return summarize(parent_times, derived_times)


def summarize(parent_times: Sequence[float], derived_times: Sequence[float]) -> SpeedComparison:
    """The comparison of paired timings (seconds; ``parent_times[i]`` pairs with ``derived_times[i]``)."""
    if not parent_times or len(parent_times) != len(derived_times):
        raise ValueError("speed needs as many parent as derived timings, at least one")
    tiny = 1e-9  # a clock tick of 0 must not divide by zero
    ratios = sorted(max(p, tiny) / max(d, tiny) for p, d in zip(parent_times, derived_times, strict=True))
    low, high = median_interval(ratios)
    return SpeedComparison(parent_p50_ms=round(statistics.median(parent_times) * 1000.0, 4),
                           derived_p50_ms=round(statistics.median(derived_times) * 1000.0, 4),
                           speedup=round(statistics.median(ratios), 4), low=round(low, 4), high=round(high, 4),
                           pairs=len(ratios))


def median_interval(ordered: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The sign test's interval for the median of sorted ``ordered``: ``(ordered[k], ordered[n-1-k])``
    with the largest ``k`` such that ``P(Binomial(n, 1/2) <= k) <= (1 - confidence) / 2``; the whole
    range (0, inf) when ``n`` is too small for any ``k``."""
    n = len(ordered)
    tail = (1.0 - confidence) / 2.0
    k, cumulative = -1, 0.0
    while k + 1 < n:
        cumulative += math.comb(n, k + 1) / 2.0 ** n
        if cumulative > tail:
            break
        k += 1
    if k < 0:
        return 0.0, math.inf
    return ordered[k], ordered[n - 1 - k]

