"""int8 optimization of a registered model, kept only if it is smaller, faster and answers like its parent.

``quantize`` quantizes the MatMul/Gemm weights (``maas.inference.quantization``: schemes whose integer
arithmetic is exact on every CPU, so the accuracy measured here holds on the CPU that serves the model)
and keeps the first scheme whose derived model passes, in this order:

1. **portability**: every integer matrix product is one that cannot saturate on any CPU
   (``saturation_risks``); a model that could answer differently elsewhere is never kept;
2. **size**: the derived model has fewer bytes than the parent (quantizing a tiny model adds more
   graph than it saves in weights);
3. **accuracy**, on deterministic sample inputs generated from the signature (seeded; dynamic leading
   dims become a small batch, other dynamic dims 1; floats standard normal, integers in ``[0, 4)`` so they
   are valid as indices or categories, booleans fair coins; zeros if the parent cannot run on those),
   per output named in the signature:

   * float outputs (FP16/FP32/FP64): ``max_rel_diff = max|derived - parent| / max(1, peak)`` must be at
     most ``tolerance``, where ``peak`` is the largest ``|parent|`` value of that output over the samples.
     So the tolerance is absolute for outputs within [-1, 1] (probabilities, scores) and relative to the
     output's scale above that (logits, regressions). NaN/Inf must appear exactly where the parent has them.
   * every other output (integer labels, booleans, strings): the fraction of elements equal to the
     parent's (``agreement``) must be at least ``min_agreement`` (default 0.9; 1.0 demands equality).
     Quantization moves scores slightly, so near-ties may flip a label.

Then the kept candidate must pass **latency** (``maas.inference.speed``: paired runs, a 99% interval of
the speedup): with ``goal="latency"`` (the default) it must be measurably faster; with ``goal="size"``
it must not be measurably slower. Either way no version is kept that is larger or slower than its parent.
A failure raises ``ModelRejected`` whose ``extra`` names the ``check`` that failed and carries the
``report`` measured so far; a model without MatMul/Gemm weights raises ``InvalidInput`` ("nothing to
quantize"). With ``derived`` given, that derivative is checked instead of making one (a reused one is
measured again, on this CPU, against this request's tolerance and goal).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from maas.domain import OptimizeGoal, Signature, TensorSpec
from maas.errors import InvalidInput, ModelRejected
from maas.inference.codec import datatype_to_dtype
from maas.inference.quantization import (
    SCHEMES,
    Scheme,
    has_integer_ops,
    has_weights,
    quantize_weights,
    saturation_risks,
)
from maas.inference.signature import quote_name
from maas.inference.speed import SpeedComparison, compare_speed
from maas.inference.validation import clean_reason
from maas.settings import Limits

METHOD = "int8-dynamic"
GOALS: tuple[str, ...] = tuple(goal.value for goal in OptimizeGoal)
DEFAULT_GOAL = OptimizeGoal.LATENCY.value
DEFAULT_TOLERANCE = 0.05
DEFAULT_MIN_AGREEMENT = 0.9
MAX_SAMPLES = 256
#: The batch size dynamic leading dims get in the samples (1 when a batch would exceed the element cap).
SAMPLE_BATCH = 4
_FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})


@dataclass(frozen=True)
class OutputComparison:
    """How one output of the derived model compares with the parent's over all samples."""

    name: str
    datatype: str
    kind: str  # "float" (compared by max_rel_diff), "exact" (by agreement) or "shape" (shapes differ)
    elements: int
    passed: bool
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None  # max_abs_diff / max(1, peak |parent|): what tolerance bounds
    agreement: float | None = None  # fraction of elements equal to the parent's
    nonfinite_mismatch: bool = False  # NaN/Inf where the parent has a finite value, or the reverse


@dataclass(frozen=True)
class Check:
    """One of the checks a derived model passed or failed: portability, size, accuracy, latency."""

    check: str
    passed: bool
    detail: str
    scheme: str = ""


@dataclass(frozen=True)
class OptimizeReport:
    method: str
    scheme: str  # the weight scheme kept (maas.inference.quantization), "" for a given derivative
    goal: str
    parent_bytes: int
    derived_bytes: int
    parent_p50_ms: float
    derived_p50_ms: float
    speedup: float  # median paired ratio parent / derived
    speedup_interval: tuple[float, float]  # its 99% interval: > 1 is faster, < 1 slower
    timing_pairs: int
    max_abs_diff: float  # over every float output (0.0 if there is none)
    max_rel_diff: float
    min_agreement_seen: float  # lowest agreement over non-float outputs (1.0 if there is none)
    tolerance: float
    min_agreement: float
    samples: int
    batch: int
    inputs: str  # "random" or "zeros" (the parent could not run on random inputs)
    compared: tuple[str, ...]
    outputs: tuple[OutputComparison, ...]
    checks: tuple[Check, ...] = field(default=())

    @property
    def size_ratio(self) -> float:
        return self.derived_bytes / self.parent_bytes if self.parent_bytes else 1.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (every float is finite), with the size ratio added."""
        body = asdict(self)
        body["compared"] = list(self.compared)
        body["outputs"] = [asdict(output) for output in self.outputs]
        body["checks"] = [asdict(check) for check in self.checks]
        body["speedup_interval"] = [_finite(bound) for bound in self.speedup_interval]
        body["size_ratio"] = round(self.size_ratio, 4)
        return body


@dataclass(frozen=True)
class _Candidate:
    scheme: Scheme | None  # None: a derivative given to check
    data: bytes
    comparisons: tuple[OutputComparison, ...] = ()
    checks: tuple[Check, ...] = ()
    session: ort.InferenceSession | None = None  # loaded for the accuracy check, reused for timing

    @property
    def name(self) -> str:
        return self.scheme.name if self.scheme is not None else ""

    @property
    def failure(self) -> Check | None:
        return next((check for check in self.checks if not check.passed), None)


def quantize(model_bytes: bytes, signature: Signature, tolerance: float = DEFAULT_TOLERANCE, *,
             goal: str = DEFAULT_GOAL, derived: bytes | None = None, schemes: Sequence[Scheme] = SCHEMES,
             samples: int = 16, seed: int = 0, min_agreement: float = DEFAULT_MIN_AGREEMENT,
             limits: Limits | None = None) -> tuple[bytes, OptimizeReport]:
    """Quantize ``model_bytes`` (or check ``derived``) against the parent: the derived bytes and the
    report, or ``ModelRejected`` (a check failed; ``extra["check"]`` says which) / ``InvalidInput`` (bad
    arguments, nothing to quantize). ``tolerance`` may be passed positionally or by keyword; ``schemes``
    are tried in order (tests force others to show the guard)."""
    limits = limits or Limits()
    tolerance = _check_fraction(tolerance, "tolerance", upper=None)
    min_agreement = _check_fraction(min_agreement, "min_agreement", upper=1.0)
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES:
        raise InvalidInput(f"samples must be an integer from 1 to {MAX_SAMPLES}", field="samples")
    if goal not in GOALS:
        raise InvalidInput(f"goal must be one of {', '.join(GOALS)}", field="goal")
    if len(model_bytes) > limits.max_model_bytes:
        raise InvalidInput(f"model is {len(model_bytes)} bytes, over the limit of {limits.max_model_bytes} bytes",
                           field="version")
    try:
        parent_model = onnx.load_from_string(model_bytes)
    except Exception:
        raise ModelRejected("the parent model could not be parsed as ONNX") from None
    if derived is None and not has_weights(parent_model):
        raise InvalidInput("nothing to quantize: the model has no MatMul or Gemm weights", field="version")
    del parent_model

    parent = _session(model_bytes, "the parent model")
    batch = _batch_size(signature, limits)
    feeds = _sample_inputs(signature, samples, seed, batch)
    inputs = "random"
    try:
        parent.run(None, feeds[0])
    except Exception:
        feeds = [_zero_inputs(signature, batch)] * samples
        inputs = "zeros"
    names = [spec.name for spec in signature.outputs]
    parent_out = [_run(parent, names, feed, "the parent model") for feed in feeds]
    baseline = _Baseline(signature, feeds, parent_out, tolerance, min_agreement, limits, len(model_bytes),
                         goal, inputs, batch, samples)

    tried: list[_Candidate] = []
    for candidate in _candidates(model_bytes, derived, schemes):
        tried.append(_assess(candidate, baseline))
        failure = tried[-1].failure
        if failure is None or failure.check == "size":
            break  # every scheme's weights take the same bytes: none is smaller where one is not
    kept = tried[-1]
    if kept.failure is not None:
        _reject(tried, baseline)
    derived_session = kept.session or _session(kept.data, "the int8 model")
    speed = compare_speed(lambda i: parent.run(names, feeds[i]), lambda i: derived_session.run(names, feeds[i]),
                          len(feeds))
    latency = _latency_check(speed, goal, kept.name)
    checks = (*(check for candidate in tried for check in candidate.checks), latency)
    report = _report(kept, baseline, speed, checks)
    if not latency.passed:
        raise ModelRejected(latency.detail, extra={"check": "latency", "report": report.as_dict()})
    return kept.data, report


# ----------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class _Baseline:
    """What every candidate is measured against (the parent's outputs are computed once)."""

    signature: Signature
    feeds: list[dict[str, np.ndarray[Any, Any]]]
    parent_out: list[list[np.ndarray[Any, Any]]]
    tolerance: float
    min_agreement: float
    limits: Limits
    parent_bytes: int
    goal: str
    inputs: str  # "random" or "zeros"
    batch: int
    samples: int


def _candidates(model_bytes: bytes, derived: bytes | None, schemes: Sequence[Scheme]) -> Iterator[_Candidate]:
    """The derivative given to check, or one per scheme, each made only when the one before failed."""
    if derived is not None:
        yield _Candidate(None, derived)
        return
    for scheme in schemes:
        yield _Candidate(scheme, quantize_weights(model_bytes, scheme))


def _assess(candidate: _Candidate, baseline: _Baseline) -> _Candidate:
    """Portability, then size, then accuracy: the candidate with its checks (stopping at a failure)."""
    with_scheme = f" with {candidate.name} weights" if candidate.name else ""
    if len(candidate.data) > baseline.limits.max_model_bytes:
        raise ModelRejected(f"the int8 model is {len(candidate.data)} bytes, over the limit of "
                            f"{baseline.limits.max_model_bytes} bytes")
    try:
        graph = onnx.load_from_string(candidate.data)
    except Exception:
        raise ModelRejected("the int8 model could not be parsed as ONNX") from None
    if candidate.scheme is not None and not has_integer_ops(graph):
        raise InvalidInput("nothing to quantize: the quantizer left every MatMul and Gemm unchanged",
                           field="version")
    risks = saturation_risks(graph)
    del graph  # a large model's protobuf need not stay alive beside its session
    portable = Check("portability", not risks, (
        f"the int8 model{with_scheme} could answer differently on other CPUs: {'; '.join(risks[:3])}" if risks
        else "every integer matrix product is exact on every CPU (no 16-bit saturation)"), candidate.name)
    if not portable.passed:
        return _with(candidate, portable)
    smaller = len(candidate.data) < baseline.parent_bytes
    size = Check("size", smaller, (
        f"{_bytes(baseline.parent_bytes)} -> {_bytes(len(candidate.data))} "
        f"({len(candidate.data) / baseline.parent_bytes:.2f}x)" if smaller else
        f"the int8 model{with_scheme} is not smaller than its parent: {_bytes(len(candidate.data))} against "
        f"{_bytes(baseline.parent_bytes)} (quantizing adds more graph than it saves in weights)"), candidate.name)
    if not size.passed:
        return _with(candidate, portable, size)
    session = _session(candidate.data, "the int8 model")
    names = [spec.name for spec in baseline.signature.outputs]
    derived_out = [_run(session, names, feed, "the int8 model") for feed in baseline.feeds]
    comparisons = tuple(
        _compare(spec, [run[i] for run in baseline.parent_out], [run[i] for run in derived_out],
                 baseline.tolerance, baseline.min_agreement)
        for i, spec in enumerate(baseline.signature.outputs)
    )
    failed = next((comparison for comparison in comparisons if not comparison.passed), None)
    accuracy = Check("accuracy", failed is None, (
        _rejection(failed, baseline.tolerance, baseline.min_agreement, with_scheme) if failed is not None else
        f"every output within tolerance {baseline.tolerance:g} (max relative diff "
        f"{max((c.max_rel_diff or 0.0 for c in comparisons), default=0.0):.4g})"), candidate.name)
    return _Candidate(candidate.scheme, candidate.data, comparisons, (portable, size, accuracy), session)


def _with(candidate: _Candidate, *checks: Check) -> _Candidate:
    return _Candidate(candidate.scheme, candidate.data, candidate.comparisons, checks)


def _latency_check(speed: SpeedComparison, goal: str, scheme: str) -> Check:
    if goal == "latency":
        verdict = speed.faster
        failed = "the int8 model is not faster than its parent"
    else:
        verdict = not speed.slower
        failed = "the int8 model is slower than its parent"
    return Check("latency", verdict, speed.describe() if verdict else f"{failed}: {speed.describe()}", scheme)


def _reject(tried: list[_Candidate], baseline: _Baseline) -> None:
    """Every scheme failed a check: ModelRejected naming the last failure (and the others before it)."""
    failures = [candidate.failure for candidate in tried if candidate.failure is not None]
    last = failures[-1]
    detail = last.detail if len(failures) == 1 else "; ".join(
        [last.detail, *(f"also {failure.detail}" for failure in failures[:-1])])
    kept = tried[-1]
    report = {
        "method": METHOD, "scheme": kept.name, "goal": baseline.goal, "parent_bytes": baseline.parent_bytes,
        "derived_bytes": len(kept.data), "tolerance": baseline.tolerance, "min_agreement": baseline.min_agreement,
        "samples": baseline.samples, "batch": baseline.batch, "inputs": baseline.inputs,
        "outputs": [asdict(comparison) for comparison in kept.comparisons],
        "checks": [asdict(check) for candidate in tried for check in candidate.checks],
    }
    extra: dict[str, Any] = {"check": last.check, "report": report}
    failed_output = next((c.name for c in kept.comparisons if not c.passed), None)
    if last.check == "accuracy" and failed_output is not None:
        extra["output"] = failed_output
    raise ModelRejected(detail, extra=extra)


def _report(kept: _Candidate, baseline: _Baseline, speed: SpeedComparison, checks: tuple[Check, ...]) -> OptimizeReport:
    floats = [c for c in kept.comparisons if c.kind == "float"]
    exact = [c for c in kept.comparisons if c.kind == "exact"]
    return OptimizeReport(
        method=METHOD,
        scheme=kept.name,
        goal=baseline.goal,
        parent_bytes=baseline.parent_bytes,
        derived_bytes=len(kept.data),
        parent_p50_ms=speed.parent_p50_ms,
        derived_p50_ms=speed.derived_p50_ms,
        speedup=speed.speedup,
        speedup_interval=(speed.low, speed.high),
        timing_pairs=speed.pairs,
        max_abs_diff=max((c.max_abs_diff or 0.0 for c in floats), default=0.0),
        max_rel_diff=max((c.max_rel_diff or 0.0 for c in floats), default=0.0),
        min_agreement_seen=min((c.agreement if c.agreement is not None else 1.0 for c in exact), default=1.0),
        tolerance=baseline.tolerance,
        min_agreement=baseline.min_agreement,
        samples=baseline.samples,
        batch=baseline.batch,
        inputs=baseline.inputs,
        compared=tuple(spec.name for spec in baseline.signature.outputs),
        outputs=kept.comparisons,
        checks=checks,
    )


# ----------------------------------------------------------------------------------------- helpers


def _check_fraction(value: float, field: str, *, upper: float | None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0 \
            or (upper is not None and value > upper):
        bound = f"from 0 to {upper:g}" if upper is not None else "a finite number >= 0"
        raise InvalidInput(f"{field} must be {bound}", field=field)
    return float(value)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _bytes(count: int) -> str:
    return f"{count} B" if count < 1024 else f"{count / 1024:.1f} KiB" if count < 1024 ** 2 else \
        f"{count / 1024 ** 2:.1f} MiB"


def _session(data: bytes, what: str) -> ort.InferenceSession:
    # One thread: optimize runs inside a serving process, and paired timings are steadier on one core.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelRejected(f"{what} could not be loaded: {clean_reason(str(exc))}") from None


def _run(session: ort.InferenceSession, names: list[str], feed: dict[str, np.ndarray[Any, Any]],
         what: str) -> list[np.ndarray[Any, Any]]:
    try:
        return [np.asarray(value) for value in session.run(names, feed)]
    except Exception as exc:
        raise ModelRejected(f"{what} failed on sample inputs: {clean_reason(str(exc))}") from None


def _shape(spec: TensorSpec, batch: int) -> tuple[int, ...]:
    return tuple((batch if axis == 0 else 1) if dim < 0 else dim for axis, dim in enumerate(spec.shape))


def _batch_size(signature: Signature, limits: Limits) -> int:
    """``SAMPLE_BATCH``, or 1 if that would put a tensor over the element cap (refused if even 1 does)."""
    for batch in (SAMPLE_BATCH, 1):
        if all(math.prod(_shape(spec, batch)) <= limits.max_tensor_elements for spec in signature.inputs):
            return batch
    raise ModelRejected(f"the inputs need more than {limits.max_tensor_elements} elements per tensor; "
                        "sample inputs cannot be built within the limits")


def _sample_inputs(signature: Signature, samples: int, seed: int, batch: int) -> list[dict[str, np.ndarray[Any, Any]]]:
    rng = np.random.default_rng(seed)
    feeds: list[dict[str, np.ndarray[Any, Any]]] = []
    for _ in range(samples):
        feed: dict[str, np.ndarray[Any, Any]] = {}
        for spec in signature.inputs:
            shape = _shape(spec, batch)
            if spec.datatype in _FLOAT_TYPES:
                feed[spec.name] = rng.standard_normal(shape).astype(datatype_to_dtype(spec.datatype))
            elif spec.datatype == "BOOL":
                feed[spec.name] = rng.random(shape) < 0.5
            elif spec.datatype == "BYTES":
                feed[spec.name] = rng.integers(0, 10, shape).astype(str).astype(np.object_)
            else:
                feed[spec.name] = rng.integers(0, 4, shape).astype(datatype_to_dtype(spec.datatype))
        feeds.append(feed)
    return feeds


def _zero_inputs(signature: Signature, batch: int) -> dict[str, np.ndarray[Any, Any]]:
    feed: dict[str, np.ndarray[Any, Any]] = {}
    for spec in signature.inputs:
        if spec.datatype == "BYTES":
            feed[spec.name] = np.full(_shape(spec, batch), "", dtype=np.object_)
        else:
            feed[spec.name] = np.zeros(_shape(spec, batch), dtype=datatype_to_dtype(spec.datatype))
    return feed


def _compare(spec: TensorSpec, parent: list[np.ndarray[Any, Any]], derived: list[np.ndarray[Any, Any]],
             tolerance: float, min_agreement: float) -> OutputComparison:
    elements = sum(int(p.size) for p in parent)
    if any(p.shape != d.shape for p, d in zip(parent, derived, strict=True)):
        return OutputComparison(name=spec.name, datatype=spec.datatype, kind="shape", elements=elements,
                                passed=False)
    if spec.datatype not in _FLOAT_TYPES:
        equal = sum(int(np.count_nonzero(p == d)) for p, d in zip(parent, derived, strict=True))
        agreement = equal / elements if elements else 1.0
        return OutputComparison(name=spec.name, datatype=spec.datatype, kind="exact", elements=elements,
                                passed=agreement >= min_agreement, agreement=round(agreement, 6))
    worst, peak, misplaced = 0.0, 0.0, False
    for p, d in zip(parent, derived, strict=True):
        p64, d64 = p.astype(np.float64), d.astype(np.float64)
        finite_p, finite_d = np.isfinite(p64), np.isfinite(d64)
        # Non-finite values must match the parent's position by position (NaN where NaN, same Inf).
        if np.any(finite_p != finite_d) or np.any(~finite_p & ~(np.isnan(p64) & np.isnan(d64)) & (p64 != d64)):
            misplaced = True
        both = finite_p & finite_d
        if np.any(both):
            worst = max(worst, float(np.max(np.abs(p64[both] - d64[both]))))
            peak = max(peak, float(np.max(np.abs(p64[both]))))
    relative = worst / max(1.0, peak)
    return OutputComparison(name=spec.name, datatype=spec.datatype, kind="float", elements=elements,
                            passed=not misplaced and relative <= tolerance, max_abs_diff=worst,
                            max_rel_diff=relative, nonfinite_mismatch=misplaced)


def _rejection(comparison: OutputComparison, tolerance: float, min_agreement: float, with_scheme: str) -> str:
    name = quote_name(comparison.name)
    subject = f"the int8 model's output {name}{with_scheme}"
    if comparison.kind == "shape":
        return f"{subject} has another shape than the parent's"
    if comparison.kind == "exact":
        return (f"{subject} equals the parent's on {comparison.agreement:.1%} of "
                f"{comparison.elements} sampled elements, under the {min_agreement:.1%} required")
    if comparison.nonfinite_mismatch:
        return f"{subject} has NaN or Inf where the parent's does not"
    return (f"{subject} differs from the parent's by up to {comparison.max_abs_diff:.4g} "
            f"({comparison.max_rel_diff:.4g} relative to its scale), over the tolerance of {tolerance:g}")
