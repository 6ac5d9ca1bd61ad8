"""Dynamic int8 quantization of a registered model, accepted only if it still answers like its parent.

``quantize`` runs ``onnxruntime.quantization.quantize_dynamic`` (int8 weights for MatMul, Gemm and Conv;
activations quantized on the fly) and then compares the derived model with the parent on deterministic
sample inputs generated from the signature (seeded; dynamic leading dims become a small batch, other
dynamic dims 1; floats standard normal, integers in ``[0, 4)`` so they are valid as indices or
categories, booleans fair coins). If the parent cannot run on those inputs it is compared on zeros (the
inputs validation already ran it on).

Acceptance, per output named in the signature:

* float outputs (FP16/FP32/FP64): ``max_rel_diff = max|derived - parent| / max(1, peak)`` must be at most
  ``tolerance``, where ``peak`` is the largest ``|parent|`` value of that output over the samples. So the
  tolerance is absolute for outputs within [-1, 1] (probabilities, scores) and relative to the output's
  scale above that (logits, regressions). NaN/Inf must appear exactly where the parent has them.
* every other output (integer labels, booleans, strings): the fraction of elements equal to the
  parent's (``agreement``) must be at least ``min_agreement`` (default 0.9; 1.0 demands equality).
  Quantization moves scores slightly, so near-ties may flip a label: demanding equality would reject
  good models on samples that sit on a decision boundary.

An output outside its bound raises ``ModelRejected`` naming it and the difference; a model without
MatMul/Gemm/Conv weights raises ``InvalidInput`` ("nothing to quantize"). The parent's bytes are a READY
version's (validated in the sandbox at registration), so they are loaded here as the engine loads them.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from maas.domain import Signature, TensorSpec
from maas.errors import InvalidInput, ModelRejected, Unavailable
from maas.inference.codec import datatype_to_dtype
from maas.inference.signature import quote_name
from maas.inference.validation import clean_reason
from maas.settings import Limits

METHOD = "int8-dynamic"
DEFAULT_TOLERANCE = 0.05
DEFAULT_MIN_AGREEMENT = 0.9
MAX_SAMPLES = 256
#: The batch size dynamic leading dims get in the samples (1 when a batch would exceed the element cap).
SAMPLE_BATCH = 4
#: The operators whose weights are quantized: the bulk of an MLP's, a transformer's or a CNN's bytes.
QUANTIZED_OPS: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
#: Operators the quantizer emits; a derived graph without any of them was left unchanged.
_INTEGER_OPS = frozenset({"MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul",
                          "QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QLinearConv"})
_FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})
_FLOAT_ELEM_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16})


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
class OptimizeReport:
    method: str
    parent_bytes: int
    derived_bytes: int
    parent_p50_ms: float
    derived_p50_ms: float
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

    @property
    def size_ratio(self) -> float:
        return self.derived_bytes / self.parent_bytes if self.parent_bytes else 1.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (every float is finite), with the size ratio and speedup added."""
        body = asdict(self)
        body["compared"] = list(self.compared)
        body["outputs"] = [asdict(output) for output in self.outputs]
        body["size_ratio"] = round(self.size_ratio, 4)
        body["speedup"] = round(self.parent_p50_ms / self.derived_p50_ms, 3) if self.derived_p50_ms > 0 else None
        return body


def quantize(model_bytes: bytes, signature: Signature, tolerance: float = DEFAULT_TOLERANCE, *,
             samples: int = 16, seed: int = 0, min_agreement: float = DEFAULT_MIN_AGREEMENT,
             limits: Limits | None = None) -> tuple[bytes, OptimizeReport]:
    """Quantize ``model_bytes`` (dynamic int8) and check it against the parent: the derived bytes and
    the report, or ``ModelRejected`` (outside the tolerance, or the result cannot run) / ``InvalidInput``
    (bad arguments, nothing to quantize). ``tolerance`` may be passed positionally or by keyword."""
    limits = limits or Limits()
    tolerance = _check_fraction(tolerance, "tolerance", upper=None)
    min_agreement = _check_fraction(min_agreement, "min_agreement", upper=1.0)
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES:
        raise InvalidInput(f"samples must be an integer from 1 to {MAX_SAMPLES}", field="samples")
    if len(model_bytes) > limits.max_model_bytes:
        raise InvalidInput(f"model is {len(model_bytes)} bytes, over the limit of {limits.max_model_bytes} bytes",
                           field="version")
    try:
        parent_model = onnx.load_from_string(model_bytes)
    except Exception:
        raise ModelRejected("the parent model could not be parsed as ONNX") from None
    if not _has_weights(parent_model):
        raise InvalidInput("nothing to quantize: the model has no MatMul, Gemm or Conv weights",
                           field="version")
    del parent_model
    derived_bytes = _quantize_dynamic(model_bytes)
    if not _has_integer_ops(derived_bytes):
        raise InvalidInput("nothing to quantize: the quantizer left every MatMul, Gemm and Conv unchanged",
                           field="version")
    if len(derived_bytes) > limits.max_model_bytes:
        raise ModelRejected(f"the int8 model is {len(derived_bytes)} bytes, over the limit of "
                            f"{limits.max_model_bytes} bytes")

    parent = _session(model_bytes, "the parent model")
    derived = _session(derived_bytes, "the int8 model")
    batch = _batch_size(signature, limits)
    feeds = _sample_inputs(signature, samples, seed, batch)
    inputs = "random"
    try:
        parent.run(None, feeds[0])
    except Exception:
        feeds = [_zero_inputs(signature, batch)] * samples
        inputs = "zeros"
    names = [spec.name for spec in signature.outputs]
    parent_times: list[float] = []
    derived_times: list[float] = []
    parent_out: list[list[np.ndarray[Any, Any]]] = []
    derived_out: list[list[np.ndarray[Any, Any]]] = []
    _run(derived, names, feeds[0], "the int8 model")  # warm-up (the parent's ran above)
    for feed in feeds:
        parent_out.append(_timed(parent, names, feed, "the parent model", parent_times))
        derived_out.append(_timed(derived, names, feed, "the int8 model", derived_times))

    comparisons = tuple(
        _compare(spec, [run[i] for run in parent_out], [run[i] for run in derived_out], tolerance, min_agreement)
        for i, spec in enumerate(signature.outputs)
    )
    for comparison in comparisons:
        if not comparison.passed:
            raise ModelRejected(_rejection(comparison, tolerance, min_agreement),
                                extra={"output": comparison.name})
    floats = [c for c in comparisons if c.kind == "float"]
    exact = [c for c in comparisons if c.kind == "exact"]
    report = OptimizeReport(
        method=METHOD,
        parent_bytes=len(model_bytes),
        derived_bytes=len(derived_bytes),
        parent_p50_ms=_p50_ms(parent_times),
        derived_p50_ms=_p50_ms(derived_times),
        max_abs_diff=max((c.max_abs_diff or 0.0 for c in floats), default=0.0),
        max_rel_diff=max((c.max_rel_diff or 0.0 for c in floats), default=0.0),
        min_agreement_seen=min((c.agreement if c.agreement is not None else 1.0 for c in exact), default=1.0),
        tolerance=tolerance,
        min_agreement=min_agreement,
        samples=samples,
        batch=batch,
        inputs=inputs,
        compared=tuple(names),
        outputs=comparisons,
    )
    return derived_bytes, report


# ----------------------------------------------------------------------------------------- helpers


def _check_fraction(value: float, field: str, *, upper: float | None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0 \
            or (upper is not None and value > upper):
        bound = f"from 0 to {upper:g}" if upper is not None else "a finite number >= 0"
        raise InvalidInput(f"{field} must be {bound}", field=field)
    return float(value)


def _has_weights(model: onnx.ModelProto) -> bool:
    """Whether some MatMul/Gemm/Conv of the main graph takes a float initializer of rank >= 2."""
    weights = {t.name for t in model.graph.initializer if t.data_type in _FLOAT_ELEM_TYPES and len(t.dims) >= 2}
    return any(node.op_type in QUANTIZED_OPS and any(name in weights for name in node.input)
               for node in model.graph.node)


def _has_integer_ops(data: bytes) -> bool:
    return any(node.op_type in _INTEGER_OPS for node in onnx.load_from_string(data).graph.node)


def _quantize_dynamic(model_bytes: bytes) -> bytes:
    # Deferred: onnxruntime.quantization is ~0.3 s of imports only this needs (and the trimmed Lambda
    # layer drops it: optimizing runs where the full onnxruntime is installed).
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise Unavailable("int8 quantization is not available on this server (onnxruntime.quantization is "
                          "not installed); optimize where the full onnxruntime is installed") from None

    with tempfile.TemporaryDirectory(prefix="maas-quantize-") as tmp:
        source, target = Path(tmp) / "parent.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(model_bytes)
        try:
            quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS))
        except MemoryError:
            raise
        except Exception as exc:
            raise ModelRejected(f"int8 quantization failed: {clean_reason(str(exc))}") from None
        if any(path.name not in {source.name, target.name} for path in Path(tmp).iterdir()):
            raise ModelRejected("int8 quantization wrote external data; maas stores self-contained models only")
        return target.read_bytes()


def _session(data: bytes, what: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
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


def _timed(session: ort.InferenceSession, names: list[str], feed: dict[str, np.ndarray[Any, Any]], what: str,
           times: list[float]) -> list[np.ndarray[Any, Any]]:
    started = time.perf_counter()
    result = _run(session, names, feed, what)
    times.append(time.perf_counter() - started)
    return result


def _p50_ms(times: list[float]) -> float:
    return round(float(np.median(times)) * 1000.0, 4) if times else 0.0


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


def _rejection(comparison: OutputComparison, tolerance: float, min_agreement: float) -> str:
    name = quote_name(comparison.name)
    if comparison.kind == "shape":
        return f"the int8 model's output {name} has another shape than the parent's"
    if comparison.kind == "exact":
        return (f"the int8 model's output {name} equals the parent's on {comparison.agreement:.1%} of "
                f"{comparison.elements} sampled elements, under the {min_agreement:.1%} required")
    if comparison.nonfinite_mismatch:
        return f"the int8 model's output {name} has NaN or Inf where the parent's does not"
    return (f"the int8 model's output {name} differs from the parent's by up to {comparison.max_abs_diff:.4g} "
            f"({comparison.max_rel_diff:.4g} relative to its scale), over the tolerance of {tolerance:g}")
