"""Prometheus metrics with the same names as the CloudWatch ones (Invocations, Errors, ModelLatency,
CacheHit, ModelLoadTime), labelled by model and version. One registry per app so tests and several
apps in one process never share counters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from maas.ports import Metrics

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class _VersionSeries:
    invocations: Any
    errors: Any
    latency: Any
    cache_hits: Any
    cache_misses: Any


class PrometheusMetrics:
    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("model", "version")
        self.invocations = Counter("maas_invocations", "Inference requests", labels, registry=self.registry)
        self.errors = Counter("maas_errors", "Inference requests that failed", labels,
                              registry=self.registry)
        self.latency = Histogram("maas_model_latency_seconds", "Model run time", labels,
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.cache_hits = Counter("maas_cache_hits", "Session cache hits", labels, registry=self.registry)
        self.cache_misses = Counter("maas_cache_misses", "Session cache misses", labels,
                                    registry=self.registry)
        self.load_time = Histogram("maas_model_load_seconds", "Time to load a model into a session",
                                   labels, registry=self.registry)
        self._children: dict[tuple[str, int], _VersionSeries] = {}

    def invocation(self, model: str, version: int, *, latency_s: float, error: bool,
                   routed: bool = True) -> None:
        series = self._series(model, version)
        series.invocations.inc()
        if error:
            series.errors.inc()
        else:
            series.latency.observe(latency_s)

    def cache(self, model: str, version: int, *, hit: bool) -> None:
        series = self._series(model, version)
        (series.cache_hits if hit else series.cache_misses).inc()

    def _series(self, model: str, version: int) -> _VersionSeries:
        """The labelled children of one (model, version), looked up once: ``labels()`` takes a lock
        and builds a key per call, which cost more than a small model's run."""
        series = self._children.get((model, version))
        if series is None:
            key = (model, str(version))
            series = self._children.setdefault((model, version), _VersionSeries(
                self.invocations.labels(*key), self.errors.labels(*key), self.latency.labels(*key),
                self.cache_hits.labels(*key), self.cache_misses.labels(*key)))
        return series

    def model_load(self, model: str, version: int, *, seconds: float) -> None:
        self.load_time.labels(model, str(version)).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class FanOut:
    """Reports to several sinks: ``/metrics`` keeps working on Lambda while the same points go to
    CloudWatch as EMF."""

    def __init__(self, *sinks: Metrics):
        self._sinks = sinks

    def invocation(self, model: str, version: int, *, latency_s: float, error: bool,
                   routed: bool = True) -> None:
        for sink in self._sinks:
            sink.invocation(model, version, latency_s=latency_s, error=error, routed=routed)

    def cache(self, model: str, version: int, *, hit: bool) -> None:
        for sink in self._sinks:
            sink.cache(model, version, hit=hit)

    def model_load(self, model: str, version: int, *, seconds: float) -> None:
        for sink in self._sinks:
            sink.model_load(model, version, seconds=seconds)
