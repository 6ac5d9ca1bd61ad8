"""int8 weight schemes whose arithmetic is exact on every CPU, and the check that proves it of a graph.

Why this module exists: onnxruntime runs a dynamically quantized MatMul (uint8 activations times int8
weights, "U8S8") with ``VPMADDUBSW`` on x86 CPUs without VNNI (AVX2, and AVX-512 before Cascade Lake).
That instruction adds the products of two adjacent activation/weight pairs into a signed 16-bit lane and
*saturates*: ``255 * 127 * 2 = 64770`` does not fit in 32767. VNNI CPUs (``VPDPBUSD``), ARM64 (``SDOT`` /
widening multiplies) and the U8U8 kernels accumulate in 32 bits and never saturate. So the same int8
model can be accurate on the CPU that quantized it and 0.7 off on the one that serves it (onnxruntime's
quantization docs and FAQ; OpenVINO documents the same defect and the same 7-bit workaround).

The schemes below make every kernel compute the exact integer result, so an accuracy check measured on
one CPU holds on all of them (up to float rounding of the scales, ~1e-7). They are tried fastest first:

* ``s7``: int8 weights limited to 7 bits (``reduce_range``: values in [-64, 64], so a pair sums to at
  most ``2 * 255 * 64 = 32640``), one scale per tensor. The fast U8S8 kernels (VNNI, AVX2, AVX-512,
  ARM64) stay in use.
* ``s7-per-channel``: the same with one scale per output channel: more precise where channels differ
  in range, about 15% slower.
* ``u8``: uint8 weights (U8U8: 16-bit operands, 32-bit sums, never saturates), one scale per tensor.
  A full 8 bits of weight precision, slower on VNNI CPUs: the fallback when 7 bits lose too much.

Only MatMul and Gemm weights are quantized. onnxruntime's ``ConvInteger`` is slower than its float Conv
on CPU (measured 0.2x-0.8x with either weight type), so quantizing a Conv never passes optimize's speed
check and would keep a CNN's dense layers from being optimized at all.

``saturation_risks`` is the check that makes the claim true of a given graph rather than of a setting:
every integer matrix product must take a constant weight that is uint8, or int8 within [-64, 64].
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from maas.errors import ModelRejected, Unavailable
from maas.inference.validation import clean_reason

#: The operators whose weights are quantized: the bulk of an MLP's or a transformer's bytes.
QUANTIZED_OPS: tuple[str, ...] = ("MatMul", "Gemm")
#: The largest int8 weight magnitude for which ``VPMADDUBSW`` cannot saturate: 2 * 255 * 64 <= 32767.
SAFE_INT8_MAGNITUDE = 64
#: Integer matrix products and the input index of their weight operand (B), standard and
#: onnxruntime-domain ops alike: each runs on the same U8S8/U8U8 kernels.
_WEIGHT_INPUT: dict[str, int] = {
    "MatMulInteger": 1, "ConvInteger": 1, "QLinearMatMul": 3, "QLinearConv": 3, "QGemm": 3,
    "DynamicQuantizeMatMul": 1, "MatMulIntegerToFloat": 1,
}
_FLOAT_ELEM_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16})


@dataclass(frozen=True)
class Scheme:
    """One way of quantizing weights; ``name`` is what reports and version descriptions say."""

    name: str
    unsigned: bool  # uint8 weights (U8U8 kernels) instead of int8 (U8S8)
    reduce_range: bool  # 7-bit weights
    per_channel: bool
    summary: str  # for people: what the scheme trades


S7 = Scheme("s7", unsigned=False, reduce_range=True, per_channel=False,
            summary="7-bit int8 weights per tensor (fast U8S8 kernels, exact on every CPU)")
S7_PER_CHANNEL = Scheme("s7-per-channel", unsigned=False, reduce_range=True, per_channel=True,
                        summary="7-bit int8 weights per output channel (fast U8S8 kernels, exact on every CPU)")
U8 = Scheme("u8", unsigned=True, reduce_range=False, per_channel=False,
            summary="uint8 weights per tensor (U8U8 kernels: 8-bit precision, exact on every CPU)")
#: Tried in this order (fastest first); the first whose outputs stay within the tolerance is kept.
SCHEMES: tuple[Scheme, ...] = (S7, S7_PER_CHANNEL, U8)
SCHEME_NAMES: frozenset[str] = frozenset(scheme.name for scheme in SCHEMES)
#: What onnxruntime's ``quantize_dynamic`` does by default (full-range int8 weights per tensor): the
#: settings that saturate on CPUs without VNNI. Never used by maas; tests force it to show the guard.
FULL_RANGE_INT8 = Scheme("s8", unsigned=False, reduce_range=False, per_channel=False,
                         summary="8-bit int8 weights per tensor (saturates on x86 CPUs without VNNI)")

#: Operators the quantizer emits; a derived graph without any of them was left unchanged.
_INTEGER_OPS = frozenset({*_WEIGHT_INPUT, "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear"})


def has_weights(model: onnx.ModelProto) -> bool:
    """Whether some MatMul/Gemm of the main graph takes a float initializer of rank >= 2."""
    weights = {t.name for t in model.graph.initializer if t.data_type in _FLOAT_ELEM_TYPES and len(t.dims) >= 2}
    return any(node.op_type in QUANTIZED_OPS and any(name in weights for name in node.input)
               for node in model.graph.node)


def has_integer_ops(model: onnx.ModelProto) -> bool:
    return any(node.op_type in _INTEGER_OPS for node in model.graph.node)


def quantize_weights(model_bytes: bytes, scheme: Scheme) -> bytes:
    """``onnxruntime.quantization.quantize_dynamic`` with ``scheme``'s settings: the derived bytes."""
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
            quantize_dynamic(source, target, op_types_to_quantize=list(QUANTIZED_OPS),
                             weight_type=QuantType.QUInt8 if scheme.unsigned else QuantType.QInt8,
                             reduce_range=scheme.reduce_range, per_channel=scheme.per_channel)
        except MemoryError:
            raise
        except Exception as exc:
            raise ModelRejected(f"int8 quantization failed: {clean_reason(str(exc))}") from None
        if any(path.name not in {source.name, target.name} for path in Path(tmp).iterdir()):
            raise ModelRejected("int8 quantization wrote external data; maas stores self-contained models only")
        return target.read_bytes()


def saturation_risks(model: onnx.ModelProto) -> list[str]:
    """Why some integer matrix product of ``model`` could saturate on an x86 CPU without VNNI (and so
    answer differently there than here): one line per offending node, empty when every kernel is exact.
    Subgraphs (If, Loop, Scan bodies) are checked too."""
    risks: list[str] = []
    for graph in _graphs(model.graph):
        constants = {tensor.name: tensor for tensor in graph.initializer}
        constants.update({node.output[0]: attribute.t for node in graph.node if node.op_type == "Constant"
                          for attribute in node.attribute if attribute.name == "value"})
        for node in graph.node:
            index = _WEIGHT_INPUT.get(node.op_type)
            if index is None or len(node.input) <= index:
                continue
            label = f"{node.op_type} {node.name or node.output[0]!r}"
            weight = constants.get(node.input[index])
            if weight is None:
                risks.append(f"{label} multiplies by a tensor computed at run time, whose range cannot be bounded")
                continue
            values = numpy_helper.to_array(weight)
            if values.dtype == np.uint8:
                continue
            if values.dtype != np.int8:
                risks.append(f"{label} has {values.dtype} weights, which no exact kernel is known for")
                continue
            peak = int(np.max(np.abs(values.astype(np.int16)))) if values.size else 0
            if peak > SAFE_INT8_MAGNITUDE:
                risks.append(f"{label} has int8 weights up to {peak} in magnitude (over {SAFE_INT8_MAGNITUDE}: "
                             "pairs of products saturate 16-bit sums on x86 CPUs without VNNI)")
    return risks


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _graphs(sub)
