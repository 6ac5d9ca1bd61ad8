"""Powertools glue shared by the Lambda handlers: JSON logs with correlation ids, X-Ray tracing, and
CloudWatch metrics as EMF (DESIGN.md section 8).

Import cost matters here (it is paid on every cold start), so:

* the X-Ray SDK is only imported where it can work: on Lambda with tracing not disabled. Importing it
  builds a botocore client for sampling rules (~0.2 s); elsewhere (tests, ``maas serve``, SAM local)
  :func:`get_tracer` returns a pass-through tracer with the same decorators;
* metrics are EMF documents in the format Powertools writes, buffered and flushed here, one document per
  (model, version) per invocation, so every data point carries exactly the ``model`` and ``version``
  dimensions the dashboard and the rollback alarms query (Powertools' ``Metrics`` keeps one global
  dimension set per flush and adds ``service``, which would split the series).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast, overload

import orjson
from aws_lambda_powertools.logging import Logger
from aws_lambda_powertools.metrics import Metrics
from aws_lambda_powertools.metrics.functions import is_metrics_disabled

if TYPE_CHECKING:
    from aws_lambda_powertools.tracing import Tracer

__all__ = [
    "NAMESPACE",
    "EmfMetrics",
    "NullTracer",
    "TracerLike",
    "correlation_id",
    "get_logger",
    "get_tracer",
    "metrics",
]

NAMESPACE = "maas"
#: the metric names of requests that named their version (``PinnedInvocations``...)
PINNED_PREFIX = "Pinned"
#: Powertools' metrics for handlers that want its decorator (``@metrics.log_metrics``).
metrics = Metrics(namespace=NAMESPACE)

F = TypeVar("F", bound=Callable[..., Any])


# ---------------------------------------------------------------------------------------------- logs


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stdout`` is when a record is emitted (Lambda ships stdout to
    CloudWatch Logs). A plain StreamHandler keeps the stream it was built with, which under test
    capture is closed once the test that imported the handler ends."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it
        return None


@cache
def get_logger(service: str) -> Logger:
    """The JSON logger of a handler (level from ``POWERTOOLS_LOG_LEVEL``, default INFO). The
    ``maas`` package's own loggers (``maas.aws``, ``maas.inference...``) are routed through the same
    handler, so their lines are JSON and carry the correlation id too."""
    logger = Logger(service=service, logger_handler=_StdoutHandler())
    package = logging.getLogger("maas")
    package.handlers = [logger.registered_handler]
    package.setLevel(logger.log_level)
    package.propagate = False
    return logger


def correlation_id(event: Mapping[str, Any] | None) -> str | None:
    """API Gateway's request id (REST v1 and HTTP API v2 both put it in ``requestContext.requestId``):
    the id a client can quote, also returned to it in ``X-Request-Id``."""
    if type(event) is not dict and not isinstance(event, Mapping):
        return None
    context = event.get("requestContext")
    if type(context) is not dict and not isinstance(context, Mapping):
        return None
    value = context.get("requestId")
    return value if isinstance(value, str) and value else None


# -------------------------------------------------------------------------------------------- traces


class TracerLike(Protocol):
    """The part of Powertools' ``Tracer`` the handlers use (typed so decorated handlers stay typed)."""

    @overload
    def capture_lambda_handler(self, lambda_handler: F, capture_response: bool | None = None,
                               capture_error: bool | None = None) -> F: ...

    @overload
    def capture_lambda_handler(self, lambda_handler: None = None, capture_response: bool | None = None,
                               capture_error: bool | None = None) -> Callable[[F], F]: ...

    def capture_method(self, method: Any = None, capture_response: bool | None = None,
                       capture_error: bool | None = None) -> Any: ...

    def put_annotation(self, key: str, value: str | float | bool) -> None: ...


class NullTracer:
    """Tracing off: the decorators return the function unchanged, annotations go nowhere."""

    @overload
    def capture_lambda_handler(self, lambda_handler: F, capture_response: bool | None = None,
                               capture_error: bool | None = None) -> F: ...

    @overload
    def capture_lambda_handler(self, lambda_handler: None = None, capture_response: bool | None = None,
                               capture_error: bool | None = None) -> Callable[[F], F]: ...

    def capture_lambda_handler(self, lambda_handler: Any = None, capture_response: bool | None = None,
                               capture_error: bool | None = None) -> Any:
        return lambda_handler if lambda_handler is not None else _identity

    def capture_method(self, method: Any = None, capture_response: bool | None = None,
                       capture_error: bool | None = None) -> Any:
        return method if method is not None else _identity

    def put_annotation(self, key: str, value: str | float | bool) -> None:
        return None


def _identity(function: F) -> F:
    return function


def tracing_enabled() -> bool:
    """On Lambda (``LAMBDA_TASK_ROOT``), not under SAM local, and not ``POWERTOOLS_TRACE_DISABLED``:
    the same rule Powertools applies, decided before importing the X-Ray SDK."""
    if os.environ.get("POWERTOOLS_TRACE_DISABLED", "false").strip().lower() in ("1", "true", "yes", "on"):
        return False
    return bool(os.environ.get("LAMBDA_TASK_ROOT")) and not os.environ.get("AWS_SAM_LOCAL")


def get_tracer(service: str) -> TracerLike:
    if not tracing_enabled():
        return NullTracer()
    from aws_lambda_powertools.tracing import Tracer  # the X-Ray SDK: only where it can send

    tracer: Tracer = Tracer(service=service)
    return cast(TracerLike, tracer)


# ------------------------------------------------------------------------------------------- metrics

#: (model, version) of a data point; ``None`` for one that concerns no model (a cold start on a
#: health check); a version of ``None`` for a failure before a version was chosen.
Key = tuple[str, str | None] | None


class EmfMetrics:
    """``maas.ports.Metrics`` as CloudWatch embedded metric format, buffered per invocation.

    The engine reports ``invocation`` / ``cache`` / ``model_load``; the handler adds the request-level
    numbers (:meth:`request`, :meth:`error`) and calls :meth:`flush` once per invocation, which prints
    one EMF document per (model, version) to stdout (Lambda ships it to CloudWatch Logs, CloudWatch
    extracts the metrics: no API call on the request path). Names and units:

    Invocations (Count), Errors (Count), ModelLatency (ms, checks + ``session.run``), OverheadLatency
    (ms, the handler's time minus ModelLatency: parsing, auth, lookups, encoding, loading), ColdStart
    (Count, the first invocation of a container), CacheHit (Count, 1 hit / 0 miss of the session
    cache), ModelLoadTime (ms, read + verify + session build). A request that named its version
    (``/versions/{v}/infer``) counts as PinnedInvocations, PinnedErrors and PinnedModelLatency instead:
    the router did not send it, so it never weighs on a canary's health or the alarms.
    """

    def __init__(self, namespace: str = NAMESPACE, emit: Callable[[str], None] | None = None):
        self._namespace = namespace
        self._emit = emit or _print
        # Powertools' switch (POWERTOOLS_METRICS_DISABLED), read once: a Lambda container's environment
        # is fixed for its life, and reading it per flush cost 3 µs of every request.
        self._disabled = is_metrics_disabled()
        self._lock = threading.Lock()
        self._points: dict[Key, dict[str, list[float]]] = {}
        self._model_seconds: dict[Key, float] = {}
        # The parts of a document that repeat from one invocation to the next, built once each.
        self._definitions: dict[tuple[str, ...], list[dict[str, str]]] = {}
        self._dimensions: dict[Key, dict[str, str]] = {}

    # -- maas.ports.Metrics (called by the engine)

    def invocation(self, model: str, version: int, *, latency_s: float, error: bool,
                   routed: bool = True) -> None:
        key: Key = (model, str(version))
        # A pinned request (``/versions/{v}``) goes under names of its own: the deploy health check
        # and the alarms read Invocations, Errors and ModelLatency, which only the router's traffic feeds.
        prefix = "" if routed else PINNED_PREFIX
        with self._lock:
            series = self._series(key)
            series.setdefault(prefix + "Invocations", []).append(1.0)
            series.setdefault(prefix + "Errors", []).append(1.0 if error else 0.0)
            if not error:
                series.setdefault(prefix + "ModelLatency", []).append(latency_s * 1000.0)
            self._model_seconds[key] = self._model_seconds.get(key, 0.0) + latency_s

    def cache(self, model: str, version: int, *, hit: bool) -> None:
        self._add((model, str(version)), "CacheHit", 1.0 if hit else 0.0)

    def model_load(self, model: str, version: int, *, seconds: float) -> None:
        self._add((model, str(version)), "ModelLoadTime", seconds * 1000.0)

    # -- request level (called by the handler)

    def request(self, model: str | None, version: int | None, *, total_s: float, cold_start: bool) -> None:
        """The end of one invocation: OverheadLatency when a model ran, ColdStart on the first one."""
        key: Key = (model, str(version)) if model is not None and version is not None else None
        if key is not None:
            with self._lock:
                model_s = self._model_seconds.get(key)
            if model_s is not None:
                self._add(key, "OverheadLatency", max(total_s - model_s, 0.0) * 1000.0)
        if cold_start:
            self._add(key, "ColdStart", 1.0)

    def error(self, model: str | None, version: int | None = None) -> None:
        """A server-side failure the engine did not see (the registry or storage unavailable before a
        model ran): counted under the model, and the version when one was chosen."""
        if model is None:
            key: Key = None
        else:
            key = (model, str(version) if version is not None else None)
        self._add(key, "Errors", 1.0)

    def flush(self) -> list[dict[str, Any]]:
        """Emit and forget this invocation's points; returns the documents (for tests).

        The documents are exactly what Powertools' EMF provider serializes (values as lists, metric
        definitions in first-seen order, ``[[]]`` dimensions when no model applies), but built here
        as plain dicts, their constant parts cached, and dumped with orjson: constructing a provider
        per flush cost ~80 µs, more than a small model's whole inference."""
        with self._lock:
            points, self._points = self._points, {}
            self._model_seconds = {}
        if not points or self._disabled:
            return []
        timestamp = int(time.time() * 1000)
        documents = []
        for key, series in points.items():
            names = tuple(series)
            definitions = self._definitions.get(names)
            if definitions is None:
                definitions = self._definitions.setdefault(names, [{"Name": name, "Unit": UNITS[name]}
                                                                   for name in names])
            dimensions = self._dimensions.get(key)
            if dimensions is None:
                dimensions = self._dimensions.setdefault(key, _dimensions_of(key))
            document = {"_aws": {"Timestamp": timestamp, "CloudWatchMetrics": [
                {"Namespace": self._namespace, "Dimensions": [list(dimensions)], "Metrics": definitions}]},
                **dimensions, **series}
            documents.append(document)
            self._emit(orjson.dumps(document).decode())
        return documents

    def _series(self, key: Key) -> dict[str, list[float]]:
        series = self._points.get(key)
        if series is None:
            series = self._points[key] = {}
        return series

    def _add(self, key: Key, name: str, value: float) -> None:
        with self._lock:
            self._series(key).setdefault(name, []).append(value)


#: The unit of each metric (DESIGN.md section 8).
UNITS = {"Invocations": "Count", "Errors": "Count", "ModelLatency": "Milliseconds",
         "OverheadLatency": "Milliseconds", "ColdStart": "Count", "CacheHit": "Count",
         "ModelLoadTime": "Milliseconds",
         **{PINNED_PREFIX + name: unit for name, unit in (("Invocations", "Count"), ("Errors", "Count"),
                                                          ("ModelLatency", "Milliseconds"))}}


def _dimensions_of(key: Key) -> dict[str, str]:
    dimensions: dict[str, str] = {}
    if key is not None:
        dimensions["model"] = key[0]
        if key[1] is not None:
            dimensions["version"] = key[1]
    return dimensions


def _print(line: str) -> None:
    """One EMF line on stdout, flushed at once: a frozen container must not hold metrics in a buffer."""
    out = sys.stdout
    out.write(line + "\n")
    out.flush()
