"""The inference engine: onnxruntime sessions cached by artifact sha256, signature checks, bounded runs,
metrics.

The hot path (``InferenceEngine.infer``) does one cache lookup (``maas.inference.session_cache``), a
handful of precomputed checks per input (datatype, rank, fixed dimensions, element cap:
``maas.inference.checks``, derived from the version's signature once and kept with the cached session)
and ``session.run`` under the run's deadline, in the process's capped arena (``maas.inference.memory``).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from maas.domain import ModelVersion, VersionStatus
from maas.errors import (
    InferenceFailed,
    InferenceTimeout,
    InputRejected,
    InvalidInput,
    MaasError,
    MemoryBusy,
    MemoryLimitExceeded,
    NotReady,
    OutputTooLarge,
    StorageCorrupted,
)
from maas.inference.checks import Checks, build_checks, field_of, session_signature, shape_text, to_strings
from maas.inference.codec import DecodedRequest
from maas.inference.deadline import WATCHDOG
from maas.inference.memory import (
    MEMORY,
    TRIM_AFTER_BYTES,
    TRIM_AFTER_S,
    allocation_request,
    default_inference_memory_bytes,
    resident_bytes,
)
from maas.inference.session_cache import CacheStats, SessionCache
from maas.ports import Metrics, NullMetrics
from maas.settings import Limits

if TYPE_CHECKING:
    # Imported where a session is built: the API function's import path (FastAPI behind Mangum, which
    # never runs a model on AWS) must not pay onnxruntime's ~50-100 ms import on every cold start.
    import onnxruntime as ort

__all__ = [
    "CacheStats",
    "InferenceEngine",
    "RunOverran",
    "SessionCache",
    "default_session_options",
    "ort_threads",
]

V = TypeVar("V")

THREADS_ENV = "MAAS_ORT_THREADS"
PROVIDERS = ("CPUExecutionProvider",)


def ort_threads() -> int:
    """``MAAS_ORT_THREADS`` (intra-op threads per session); unset = :func:`cpu_share_threads`,
    0 = onnxruntime's default (one thread per physical core)."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return cpu_share_threads()
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{THREADS_ENV} must be a non-negative integer, got {raw!r}")
    return value


def cpu_share_threads() -> int:
    """As many intra-op threads as CPUs this process may run on, when that is fewer than the machine
    has (``taskset``, a container's cpuset); else 0, onnxruntime's default. onnxruntime sizes its pool
    by the machine's cores: on a narrower share its spinning threads fight each other and the event
    loop for the same CPU, which more than doubled a small model's latency under load here."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return 0
    return allowed if allowed < (os.cpu_count() or allowed) else 0


def default_session_options() -> ort.SessionOptions:
    """Server defaults: full graph optimisation, ``MAAS_ORT_THREADS`` intra-op threads, quiet logs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = ort_threads()
    # Fatal only: onnxruntime would otherwise log every failed run to stderr; the engine raises
    # InferenceFailed with the (cleaned) message instead, and the service logs what it wants.
    options.log_severity_level = 4
    return options


# -------------------------------------------------------------------------------------- error messages

_ORT_PREFIX = re.compile(r"^\s*\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_CPP_FUNCTION = re.compile(r"(?:[\w~<>]+::)+[\w~<>]+\([^()]*\)(?:\s*const)?")
_PATH = re.compile(r"(?<![\w)\]])(?:[A-Za-z]:)?(?:[\\/][^\s\\/'\"]+)+(?::\d+)?")
_SPACES = re.compile(r"\s+")
_MAX_MESSAGE = 400


_RUN_OPTIONS: Any = None
#: One session built at a time, so the resident memory measured around a build is that session's.
_LOAD_LOCK = threading.Lock()


def _run_options() -> ort.RunOptions:
    """A fresh ``RunOptions`` (its class looked up once: onnxruntime is imported lazily)."""
    global _RUN_OPTIONS
    if _RUN_OPTIONS is None:
        from onnxruntime import RunOptions

        _RUN_OPTIONS = RunOptions
    return _RUN_OPTIONS()


def _is_invalid_argument(error: BaseException) -> bool:
    """onnxruntime's ``InvalidArgument`` (status ``INVALID_ARGUMENT``), matched by name: the class lives
    in its private pybind module."""
    kind = type(error)
    return kind.__name__ == "InvalidArgument" and kind.__module__.startswith("onnxruntime")


def _clean_message(exc: BaseException) -> str:
    """onnxruntime's message on one line, without its error-code prefix, file paths nor C++ names."""
    text = _ORT_PREFIX.sub("", str(exc))
    text = _PATH.sub("", text)
    text = _CPP_FUNCTION.sub("", text)
    text = _SPACES.sub(" ", text).strip(" :")
    if not text:
        text = type(exc).__name__
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 3] + "..."
    return text


# ------------------------------------------------------------------------------------------ the engine


@dataclass(slots=True)
class _Loaded:
    session: ort.InferenceSession
    #: (model, version) -> checks; every version sharing this sha256 shares the session
    checks: dict[tuple[str, int], Checks] = field(default_factory=dict)
    #: False once a run passed its inline deadline: this session never runs on an event loop again
    inline: bool = True


class RunOverran(Exception):
    """A run given an ``inline_deadline_s`` passed it and was stopped: run it again where it may take
    its full deadline (a worker thread). Nothing was counted for it."""


def _detached(results: list[Any]) -> list[Any]:
    """Copies of a run's outputs, so the originals (which may keep one of the arena's regions in use:
    a scalar answer can sit in the leftover of the region a 400 MB intermediate took) are released and
    the arena can give that region back."""
    return [np.array(result, copy=True) if isinstance(result, np.ndarray) else result for result in results]


class InferenceEngine:
    """Runs READY model versions: loads (verifying sha256), caches, checks inputs, runs, measures.

    ``read_artifact`` returns the bytes of a READY version's artifact. ``session_options_factory``
    builds the ``onnxruntime.SessionOptions`` for each new session (default:
    :func:`default_session_options`). ``providers``: the onnxruntime execution providers of each new
    session, in preference order (default :data:`PROVIDERS`, CPU only; the SageMaker GPU image passes
    ``CUDAExecutionProvider`` first).

    Metrics: ``cache`` on every lookup, ``model_load`` (read + verify + session build) on each miss, and
    ``invocation`` for every ``infer`` call with the time spent checking and running (not loading);
    ``error`` is True for server-side failures only (InferenceFailed, StorageCorrupted...), not for
    requests rejected as invalid.
    """

    def __init__(
        self,
        read_artifact: Callable[[ModelVersion], bytes],
        limits: Limits,
        metrics: Metrics = NullMetrics(),
        session_options_factory: Callable[[], ort.SessionOptions] | None = None,
        *,
        providers: Sequence[str] = PROVIDERS,
    ):
        self._read_artifact = read_artifact
        self._limits = limits
        self._max_elements = limits.max_tensor_elements
        self._metrics = metrics
        if session_options_factory is None:
            ort_threads()  # fail at start-up, not on the first request, if the variable is invalid
            session_options_factory = default_session_options
        self._options = session_options_factory
        self._providers = list(providers)
        #: every session of this process allocates from one arena capped here (maas.inference.memory),
        #: installed on the first load: building an engine must not import onnxruntime
        self.memory_cap = MEMORY.cap or limits.inference_memory_bytes or default_inference_memory_bytes()
        self.cache: SessionCache[_Loaded] = SessionCache(min(limits.session_cache_bytes, self.memory_cap))

    # -- sessions

    def session(self, version: ModelVersion) -> ort.InferenceSession:
        """The onnxruntime session of a READY version, loaded (and verified) on first use."""
        return self._loaded(version).session

    def warm(self, version: ModelVersion) -> None:
        """Load a version's session ahead of its first request (e.g. before shifting traffic to it)."""
        loaded = self._loaded(version)
        self._checks(loaded, version)

    def artifact(self, version: ModelVersion) -> bytes:
        """A version's artifact bytes, checked against its recorded sha256 (``StorageCorrupted`` if not)."""
        data = self._read_artifact(version)
        if hashlib.sha256(data).hexdigest() != version.sha256:
            raise StorageCorrupted(
                f"the stored artifact of model {version.model!r} version {version.version} does not "
                "match its recorded sha256"
            )
        return data

    def _loaded(self, version: ModelVersion) -> _Loaded:
        sha256 = version.sha256
        if version.status != VersionStatus.READY or not sha256:
            raise NotReady(f"model {version.model!r} version {version.version} is not ready")
        loaded, hit = self.cache.get_or_load(sha256, lambda: self._load(version))
        if not hit:
            MEMORY.trim()  # what the sessions just evicted held goes back to the system
        self._metrics.cache(version.model, version.version, hit=hit)
        return loaded

    def _load(self, version: ModelVersion) -> tuple[_Loaded, int]:
        """Build the session and measure what it holds: resident memory before and after (loads are
        serialized so the difference is this session's weights, pre-packed buffers and arena), at
        least the artifact's bytes. When the arena is full, least recently used sessions are evicted
        until it fits; a model that does not fit alone is refused with the bound named."""
        started = perf_counter()
        data = self.artifact(version)
        import onnxruntime as ort

        self.memory_cap = MEMORY.install(self.memory_cap)
        while True:
            with _LOAD_LOCK:
                MEMORY.trim()
                before = resident_bytes()
                try:
                    session = ort.InferenceSession(data, sess_options=MEMORY.session_options(self._options()),
                                                   providers=self._providers)
                except Exception as exc:
                    failure: Exception | None = exc
                else:
                    failure = None
                MEMORY.trim()
                held = resident_bytes() - before
            if failure is None:
                break
            if allocation_request(failure) is None:
                raise InferenceFailed(
                    f"model {version.model!r} version {version.version} could not be loaded: "
                    f"{_clean_message(failure)}"
                ) from None
            if not self.cache.evict_oldest(keep=version.sha256):
                raise InferenceFailed(
                    f"model {version.model!r} version {version.version} needs more memory than the "
                    f"{self.memory_cap} bytes every loaded model shares (inference_memory_bytes)") from None
        self._metrics.model_load(version.model, version.version, seconds=perf_counter() - started)
        return _Loaded(session), max(len(data), held)

    def _checks(self, loaded: _Loaded, version: ModelVersion) -> Checks:
        key = (version.model, version.version)
        checks = loaded.checks.get(key)
        if checks is None:
            signature = version.signature or session_signature(loaded.session)
            checks = loaded.checks.setdefault(key, build_checks(signature, loaded.session, self._limits,
                                                                 version.limits))
        return checks

    # -- inference

    def runs_inline(self, version: ModelVersion) -> bool:
        """Whether ``version`` is loaded and none of its runs ever passed an inline deadline."""
        loaded = self.cache.get(version.sha256 or "")
        return loaded is not None and loaded.inline

    def infer(self, version: ModelVersion, request: DecodedRequest, *, routed: bool = True,
              inline_deadline_s: float | None = None) -> list[tuple[str, np.ndarray]]:
        """Check ``request`` against the version's signature, run it, return ``(name, array)`` pairs
        in the requested order (every output in signature order when none were named). ``routed``
        False: the caller named the version (reported so to the metrics, never to deploy health).

        onnxruntime's ``INVALID_ARGUMENT`` while running (an index beyond a table, a length the model
        cannot take) is the caller's input: ``InputRejected`` (400), not counted as an error.

        ``inline_deadline_s``: the caller runs this on an event loop, so the run is stopped past that
        short deadline and ``RunOverran`` raised (the session is marked never to run inline again)."""
        model, number = version.model, version.version
        error = False
        overran = False
        started = perf_counter()
        try:
            loaded = self._loaded(version)
            started = perf_counter()
            checks = self._checks(loaded, version)
            feeds = self._feeds(checks, request)
            names = self._output_names(checks, request.requested_outputs)
            run_started = perf_counter()
            results = self._run(loaded, version, checks, names, feeds, inline_deadline_s)
            produced = sum(int(getattr(result, "nbytes", 0)) for result in results)
            if produced > checks.max_output_bytes:
                del results  # the arrays may still be the arena's memory: freed before trimming it
                MEMORY.trim()
                raise OutputTooLarge(
                    f"model {model!r} version {number} produced {produced} bytes of output for this request, more "
                    f"than the {checks.max_output_bytes}-byte limit ({checks.bound_owner}max_output_bytes): send "
                    "fewer or smaller inputs")
            if produced > TRIM_AFTER_BYTES or perf_counter() - run_started > TRIM_AFTER_S:
                results = _detached(results)
                MEMORY.trim()
            return list(zip(names, results, strict=True))
        except MaasError as exc:
            error = exc.status >= 500 and not isinstance(exc, MemoryBusy)
            raise
        except RunOverran:
            overran = True
            raise
        except BaseException:
            error = True
            raise
        finally:
            if not overran:
                self._metrics.invocation(model, number, latency_s=perf_counter() - started, error=error,
                                         routed=routed)

    def _run(self, loaded: _Loaded, version: ModelVersion, checks: Checks, names: list[str],
             feeds: dict[str, np.ndarray], inline_deadline_s: float | None) -> list[Any]:
        """One ``session.run`` under its deadline, its failure classified. An allocation the arena refused
        while it held free regions (not shrunk after a run that was fast) is tried once more after
        shrinking: only a run that still does not fit is answered 503."""
        model, number = version.model, version.version
        limit = checks.deadline_s
        deadline = limit if inline_deadline_s is None else min(limit, inline_deadline_s)
        for attempt in (1, 2):
            options = _run_options()
            watched = WATCHDOG.arm(options, deadline)
            try:
                results: list[Any] = loaded.session.run(names, feeds, options)
            except Exception as exc:
                fired = WATCHDOG.disarm(watched)
                MEMORY.trim()
                requested = allocation_request(exc)
                if requested is not None:
                    if attempt == 1 and requested <= self.memory_cap:
                        continue
                    raise self._memory_error(model, number, requested) from None
                if fired:
                    if deadline < limit:
                        loaded.inline = False
                        raise RunOverran() from None
                    raise InferenceTimeout(
                        f"model {model!r} version {number} ran longer than {limit:g} s ({checks.bound_owner}"
                        "max_inference_seconds) on this input and was stopped: send fewer or smaller inputs") from None
                if _is_invalid_argument(exc):
                    raise InputRejected(
                        f"model {model!r} version {number} cannot take this input: {_clean_message(exc)}"
                    ) from None
                raise InferenceFailed(
                    f"model {model!r} version {number} failed on this input: {_clean_message(exc)}"
                ) from None
            WATCHDOG.disarm(watched)
            return results
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _memory_error(self, model: str, number: int, requested: int) -> MaasError:
        """422 when the request alone asks for more than the whole arena, else 503: others hold it now."""
        if requested > self.memory_cap:
            return MemoryLimitExceeded(
                f"model {model!r} version {number} asked for {requested} bytes of memory for this input, more "
                f"than the {self.memory_cap} bytes all inference may hold (inference_memory_bytes): send "
                "fewer or smaller inputs")
        return MemoryBusy(
            f"model {model!r} version {number} needs more memory for this input than is free now among the "
            f"{self.memory_cap} bytes all inference may hold (inference_memory_bytes); retry shortly",
            retry_after=1)

    def _feeds(self, checks: Checks, request: DecodedRequest) -> dict[str, np.ndarray]:
        inputs = request.inputs
        declared = request.datatypes
        feeds: dict[str, np.ndarray] = {}
        max_elements = self._max_elements
        for check in checks.inputs:
            name = check.name
            array = inputs.get(name)
            if array is None:
                raise InvalidInput(
                    f"input {name!r} ({check.datatype} {shape_text(check.shape)}) is missing",
                    field="inputs",
                )
            datatype = declared.get(name, check.datatype)
            if datatype != check.datatype or array.dtype != check.dtype:
                got = datatype if datatype != check.datatype else str(array.dtype)
                raise InvalidInput(
                    f"input {name!r} must be {check.datatype}, got {got}",
                    field=field_of(request, name, ".datatype"),
                )
            shape = array.shape
            if len(shape) != check.rank:
                raise InvalidInput(
                    f"input {name!r} must have rank {check.rank} (shape {shape_text(check.shape)}), "
                    f"got rank {len(shape)} (shape {shape_text(shape)})",
                    field=field_of(request, name, ".shape"),
                )
            for axis, size in check.fixed:
                if shape[axis] != size:
                    raise InvalidInput(
                        f"input {name!r} must have shape {shape_text(check.shape)} (-1 = any size), "
                        f"got {shape_text(shape)}: dimension {axis} must be {size}",
                        field=field_of(request, name, ".shape"),
                    )
            if array.size > max_elements:
                raise InvalidInput(
                    f"input {name!r} has {array.size} elements, the limit is {max_elements}",
                    field=field_of(request, name, ".shape"),
                )
            if check.strings:
                array = to_strings(array, name, field_of(request, name, ".data"))
            feeds[name] = array
        for dim, places in checks.shared_dims:
            sizes = {(name, axis): feeds[name].shape[axis] for name, axis in places if name in feeds}
            if len(set(sizes.values())) > 1:
                detail = ", ".join(f"{name}[{axis}]={size}" for (name, axis), size in sizes.items())
                raise InvalidInput(f"dimension {dim!r} must be the same size everywhere: got {detail}",
                                   field="inputs")
        if len(inputs) != len(feeds):
            for index, name in enumerate(inputs):
                if name not in checks.input_names:
                    expected = ", ".join(sorted(checks.input_names)) or "none"
                    raise InvalidInput(
                        f"the model has no input {name!r} (its inputs: {expected})",
                        field=f"inputs[{index}].name",
                    )
        return feeds

    @staticmethod
    def _output_names(checks: Checks, requested: list[str] | None) -> list[str]:
        if requested is None:
            return checks.outputs
        known = checks.output_names
        for index, name in enumerate(requested):
            if name not in known:
                raise InvalidInput(
                    f"the model has no output {name!r} (its outputs: {', '.join(checks.outputs)})",
                    field=f"outputs[{index}].name",
                )
        return requested
