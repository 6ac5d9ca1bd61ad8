"""Per-version health for progressive deploys (DESIGN.md section 7).

:class:`HealthRecorder` is the local ``HealthSource``: the API process's engine reports every
inference to it (it is also a ``maas.ports.Metrics`` sink) and the deploy workflow's ``check_health``
step reads the canary's error rate and p99 latency over the bake window from it. On AWS the same
numbers come from CloudWatch (``maas.backends.aws.health``).

:func:`assess` is the verdict, shared by every source: a canary breaks the deployment's thresholds if
its error rate is over ``max_error_rate``, its p99 over ``max_p99_latency_ms``, or its p99 over
``max_p99_latency_ratio`` times the stable version's p99 in the same window. A window in which the
canary answered no request is healthy: there is nothing against it (the event says so)."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from maas.domain import HealthThresholds
from maas.ports import VersionHealth

#: Samples kept per (model, version): the newest ones (a bake window longer than this many requests
#: is judged on its most recent requests).
MAX_SAMPLES_PER_VERSION = 20_000
#: (model, version) pairs tracked; the least recently reported pair is forgotten first.
MAX_VERSIONS = 512
#: The latency ratio rule ignores a canary p99 below this: sub-millisecond models jitter by several x.
RATIO_FLOOR_MS = 5.0


class HealthRecorder:
    """A bounded in-memory record of ``(time, latency, error)`` per (model, version).

    The hot path (:meth:`invocation`) is one lock, one dict lookup and one ``deque.append``; memory is
    capped at ``max_samples`` per version and ``max_versions`` versions (about 100 bytes a sample)."""

    def __init__(self, *, max_samples: int = MAX_SAMPLES_PER_VERSION, max_versions: int = MAX_VERSIONS,
                 clock: Callable[[], float] = time.time):
        if max_samples < 1 or max_versions < 1:
            raise ValueError("max_samples and max_versions must be at least 1")
        self._max_samples = max_samples
        self._max_versions = max_versions
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: OrderedDict[tuple[str, int], deque[tuple[float, float, bool]]] = OrderedDict()

    # -- maas.ports.Metrics

    def invocation(self, model: str, version: int, *, latency_s: float, error: bool,
                   routed: bool = True) -> None:
        if not routed:
            return  # a pinned request says nothing about how the router's traffic fares
        sample = (self._clock(), latency_s * 1000.0, error)
        key = (model, version)
        with self._lock:
            samples = self._samples.get(key)
            if samples is None:
                samples = self._samples[key] = deque(maxlen=self._max_samples)
                while len(self._samples) > self._max_versions:
                    self._samples.popitem(last=False)
            else:
                self._samples.move_to_end(key)
            samples.append(sample)

    def cache(self, model: str, version: int, *, hit: bool) -> None:
        return None

    def model_load(self, model: str, version: int, *, seconds: float) -> None:
        return None

    # -- maas.ports.HealthSource

    def health(self, model: str, version: int, since: datetime, until: datetime) -> VersionHealth:
        start, end = since.timestamp(), until.timestamp()
        with self._lock:
            samples = self._samples.get((model, version))
            window = [s for s in samples if start <= s[0] <= end] if samples else []
        errors = sum(1 for _, _, error in window if error)
        latencies = sorted(latency for _, latency, error in window if not error)
        return VersionHealth(requests=len(window), errors=errors, p99_latency_ms=percentile(latencies, 0.99))


def percentile(ordered: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not ordered:
        return None
    rank = max(math.ceil(fraction * len(ordered)), 1)
    return ordered[rank - 1]


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    detail: str


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def assess(version: int, canary: VersionHealth, thresholds: HealthThresholds,
           stable: VersionHealth | None = None, stable_version: int | None = None) -> Verdict:
    """Compare a canary's window with the thresholds (and the stable version's p99 in that window)."""
    if canary.requests == 0:
        return Verdict(True, f"version {version} answered no request in the window: nothing against it")
    summary = (f"version {version}: {canary.requests} requests, {canary.errors} errors "
               f"({canary.error_rate:.2%}), p99 {_ms(canary.p99_latency_ms)}")
    if stable is not None and stable_version is not None:
        summary += f"; stable version {stable_version}: p99 {_ms(stable.p99_latency_ms)}"
    problems = []
    if canary.error_rate > thresholds.max_error_rate:
        problems.append(f"error rate {canary.error_rate:.2%} > max {thresholds.max_error_rate:.2%}")
    p99 = canary.p99_latency_ms
    if p99 is not None and thresholds.max_p99_latency_ms is not None and p99 > thresholds.max_p99_latency_ms:
        problems.append(f"p99 {p99:.1f} ms > max {thresholds.max_p99_latency_ms:g} ms")
    ratio = thresholds.max_p99_latency_ratio
    if (p99 is not None and ratio is not None and stable is not None and stable.p99_latency_ms is not None
            and p99 > RATIO_FLOOR_MS and p99 > ratio * stable.p99_latency_ms):
        problems.append(f"p99 {p99:.1f} ms > {ratio:g} x stable p99 {stable.p99_latency_ms:.1f} ms")
    if problems:
        return Verdict(False, f"unhealthy: {'; '.join(problems)} ({summary})")
    return Verdict(True, f"healthy: {summary}")


__all__ = ["MAX_SAMPLES_PER_VERSION", "MAX_VERSIONS", "RATIO_FLOOR_MS", "HealthRecorder", "Verdict", "assess",
           "percentile"]
