"""Small ONNX models built in memory for tests (deterministic, no downloads)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from maas.domain import Signature
from maas.inference.validation import inspect_model_file
from maas.settings import Limits, Settings


def _serialize(graph: onnx.GraphProto) -> bytes:
    """Opset 17, IR version 8: what every model here is built as."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


class InProcessValidator:
    """The real validation checks without the sandbox child process (~0.5 s saved per push), for
    tests that push many versions; the sandbox itself is tested in tests/unit/test_validation.py."""

    def __init__(self, settings: Settings | Limits):
        self._limits = settings.limits if isinstance(settings, Settings) else settings

    def validate(self, path: Path) -> Signature:
        return inspect_model_file(path, self._limits)


def scale_model(factor: float, *, name: str = "x", width: int = 4) -> bytes:
    """y = x * factor over FP32 [batch, width]: each version of a model answers distinguishably."""
    graph = helper.make_graph(
        [helper.make_node("Mul", [name, "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(np.array(factor, dtype=np.float32), "k")],
    )
    return _serialize(graph)


def failing_model() -> bytes:
    """Valid ONNX whose run fails for some inputs: x[n] + c[2] broadcasts for n in (1, 2) only, so
    validation (which runs n=1) accepts it and n=3 fails inside onnxruntime."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "broadcast2",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializer=[numpy_helper.from_array(np.array([1, 2], dtype=np.float32), "c")],
    )
    return _serialize(graph)


def large_model(factor: float = 2.0) -> bytes:
    """A valid ONNX model over 5 MiB (S3's smallest multipart part): y = x * sum(w) over FP32
    [batch, 4], with a 6.4 MB initializer ``w`` whose sum is ``factor``."""
    weights = np.zeros(1_600_000, dtype=np.float32)
    weights[0] = factor
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["w"], ["k"], keepdims=0), helper.make_node("Mul", ["x", "k"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    return _serialize(graph)


def mlp_model(dims: tuple[int, ...] = (64, 256, 10), *, seed: int = 0, gemm: bool = False,
              label: bool = True, logit_scale: float = 4.0) -> bytes:
    """A seeded MLP over FP32 [batch, dims[0]]: MatMul + Add (or Gemm) layers with Relu between them,
    returning the logits ``y`` and, with ``label``, their ArgMax ``label`` (INT64 [batch]).
    ``logit_scale`` spreads the logits so labels rarely sit on a near-tie. What int8 quantization is for."""
    rng = np.random.default_rng(seed)
    nodes, initializers, previous = [], [], "x"
    layers = list(itertools.pairwise(dims))
    for i, (fan_in, fan_out) in enumerate(layers):
        weights = rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)
        if i == len(layers) - 1:
            weights *= logit_scale
        bias = rng.standard_normal(fan_out) * 0.1
        initializers += [numpy_helper.from_array(weights.astype(np.float32), f"w{i}"),
                         numpy_helper.from_array(bias.astype(np.float32), f"b{i}")]
        if gemm:
            nodes.append(helper.make_node("Gemm", [previous, f"w{i}", f"b{i}"], [f"h{i}"]))
        else:
            nodes += [helper.make_node("MatMul", [previous, f"w{i}"], [f"m{i}"]),
                      helper.make_node("Add", [f"m{i}", f"b{i}"], [f"h{i}"])]
        previous = f"h{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [previous], [f"r{i}"]))
            previous = f"r{i}"
    nodes.append(helper.make_node("Identity", [previous], ["y"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dims[-1]])]
    if label:
        nodes.append(helper.make_node("ArgMax", ["y"], ["label"], axis=1, keepdims=0))
        outputs.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dims[0]])],
                              outputs, initializer=initializers)
    return _serialize(graph)


def quantizable_model(*, inputs: int = 256, seed: int = 0, gemm: bool = False, logit_scale: float = 4.0) -> bytes:
    """An MLP big enough (3 MB of FP32 weights, [batch, inputs] -> 16 logits + label) that its int8
    version is smaller and clearly faster on every CPU (about 1.6-2x here, memory- and compute-bound
    alike): what optimize keeps. Narrow inputs get a first layer of 256 to widen them."""
    dims = (inputs, 1024, 512, 16) if inputs >= 64 else (inputs, 256, 1024, 512, 16)
    return mlp_model(dims=dims, seed=seed, gemm=gemm, logit_scale=logit_scale)


def wide_matmul_model() -> bytes:
    """y = x @ W over FP32 [batch, 2] -> [batch, 16384]: int8 weights shrink it 4x, but the int8 graph
    converts and rescales 16384 outputs per row around a trivial product (about 5x slower here): smaller,
    never faster."""
    weights = np.random.default_rng(0).standard_normal((2, 16384)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16384])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    return _serialize(graph)


def lossy_model() -> bytes:
    """A quantizable MLP that int8 ruins on every CPU: feature 0 is scaled by 1000 before the first
    MatMul (with a weight of 1e-3, so it matters no more than the others), so the activations' one
    per-tensor scale rounds every other feature to zero."""
    rng = np.random.default_rng(0)
    gain = np.ones(256, dtype=np.float32)
    gain[0] = 1000.0
    w0 = (rng.standard_normal((256, 1024)) / 16).astype(np.float32)
    w0[0] /= 1000.0
    w1 = (rng.standard_normal((1024, 16)) / 32).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "gain"], ["g"]), helper.make_node("MatMul", ["g", "w0"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w1"], ["y"])],
        "lossy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        initializer=[numpy_helper.from_array(gain, "gain"), numpy_helper.from_array(w0, "w0"),
                     numpy_helper.from_array(w1, "w1")],
    )
    return _serialize(graph)
