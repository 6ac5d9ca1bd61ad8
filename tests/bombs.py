"""Input-dependent bombs: tiny valid ONNX models whose allocation, run time or output size comes from a
request's *values*, so they pass validation (zeros) and the deploy smoke test (dims 1, ints 0/1) and
explode on one crafted request.

Each ``Bomb`` has a harmless request (what a validation or smoke run sees) and a hostile one, as OIP
JSON inputs, plus the bound the hostile one must hit: ``memory`` (the shared arena's cap: 422/503),
``time`` (``max_inference_seconds``: 504) or ``output`` (``max_output_bytes``: 422).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _serialize(graph: onnx.GraphProto, opset: int = 17) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _int64_input(name: str, shape: list[Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, shape)


def _sum_output() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("y", TensorProto.FLOAT, [])


def constant_of_shape() -> bytes:
    """``ConstantOfShape(n)`` summed: n floats allocated from one int64."""
    value = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["n"], ["big"], value=value),
         helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)],
        "constant_of_shape", [_int64_input("n", [1])], [_sum_output()])
    return _serialize(graph)


def expand() -> bytes:
    """A scalar ``Expand``-ed to the requested shape, summed."""
    graph = helper.make_graph(
        [helper.make_node("Expand", ["one", "shape"], ["big"]),
         helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)],
        "expand", [_int64_input("shape", [2])], [_sum_output()],
        initializer=[numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")])
    return _serialize(graph)


def tile() -> bytes:
    """A one-element tensor ``Tile``-d by the requested repeats, summed."""
    graph = helper.make_graph(
        [helper.make_node("Tile", ["one", "repeats"], ["big"]),
         helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)],
        "tile", [_int64_input("repeats", [2])], [_sum_output()],
        initializer=[numpy_helper.from_array(np.ones((1, 1), dtype=np.float32), "one")])
    return _serialize(graph)


def range_op() -> bytes:
    """``Range(0, limit, 1)`` in float, summed."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["limit"], ["limit_f"], to=TensorProto.FLOAT),
         helper.make_node("Squeeze", ["limit_f"], ["limit_s"]),
         helper.make_node("Range", ["zero", "limit_s", "step"], ["big"]),
         helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)],
        "range", [_int64_input("limit", [1])], [_sum_output()],
        initializer=[numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
                     numpy_helper.from_array(np.array(1.0, dtype=np.float32), "step")])
    return _serialize(graph)


def outer_product() -> bytes:
    """x[n, 1] * x[1, n] of a dynamic-length vector: n^2 outputs from n inputs (output size)."""
    graph = helper.make_graph(
        [helper.make_node("Unsqueeze", ["x", "axis1"], ["column"]),
         helper.make_node("Unsqueeze", ["x", "axis0"], ["row"]),
         helper.make_node("Mul", ["column", "row"], ["y"])],
        "outer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "n"])],
        initializer=[numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
                     numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0")])
    return _serialize(graph)


def loop() -> bytes:
    """A ``Loop`` whose trip count is an input: each trip adds 1 to a float (time)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "one"], ["acc_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")])
    graph = helper.make_graph(
        [helper.make_node("Squeeze", ["trips"], ["trips_s"]),
         helper.make_node("Loop", ["trips_s", "true", "zero"], ["y"], body=body)],
        "loop", [_int64_input("trips", [1])], [_sum_output()],
        initializer=[numpy_helper.from_array(np.array(True), "true"),
                     numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")])
    return _serialize(graph)


@dataclass(frozen=True)
class Bomb:
    name: str
    model: bytes
    harmless: list[dict[str, Any]]
    hostile: list[dict[str, Any]]
    bound: str  # "memory", "time" or "output"


def _ints(name: str, values: list[int]) -> list[dict[str, Any]]:
    return [{"name": name, "datatype": "INT64", "shape": [len(values)], "data": values}]


#: ~8 GB of floats asked for by each memory bomb: above any cap a test sets, far below what a crafted
#: int64 could ask (the point is the bound, not the machine's limit).
HUGE = 2_000_000_000


def corpus(outer_length: int = 5000) -> list[Bomb]:
    """Every class of the issue: allocation (four ops), time (a Loop), output size (an outer product of
    ``outer_length``, ``outer_length``^2 * 4 bytes of output)."""
    return [
        Bomb("constant_of_shape", constant_of_shape(), _ints("n", [3]), _ints("n", [HUGE]), "memory"),
        Bomb("expand", expand(), _ints("shape", [1, 3]), _ints("shape", [HUGE // 4, 4]), "memory"),
        # 1 GB: above any cap a test sets, below the 4 GiB Tile refuses by itself
        Bomb("tile", tile(), _ints("repeats", [1, 3]), _ints("repeats", [HUGE // 8, 1]), "memory"),
        Bomb("range", range_op(), _ints("limit", [3]), _ints("limit", [HUGE]), "memory"),
        Bomb("loop", loop(), _ints("trips", [3]), _ints("trips", [10**12]), "time"),
        Bomb("outer_product", outer_product(),
             [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}],
             [{"name": "x", "datatype": "FP32", "shape": [outer_length], "data": [1.0] * outer_length}],
             "output"),
    ]


def _ceil_times(scale: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes making int64 ``size`` = ceil(x) * scale from FP32 ``x``: 0 on zeros (what validation runs),
    ``scale`` on the smoke test's floats in (0, 1]."""
    nodes = [helper.make_node("Ceil", ["x"], ["up"]),
             helper.make_node("Cast", ["up"], ["ones"], to=TensorProto.INT64),
             helper.make_node("Mul", ["ones", "scale"], ["size"])]
    return nodes, [numpy_helper.from_array(np.array([scale], dtype=np.int64), "scale")]


def _float_input() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])


def smoke_bomb() -> bytes:
    """Harmless on zeros (validation), ~8 GB on the deploy smoke test's inputs: ``ConstantOfShape``."""
    nodes, initializers = _ceil_times(HUGE)
    value = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [*nodes, helper.make_node("ConstantOfShape", ["size"], ["big"], value=value),
         helper.make_node("ReduceSum", ["big"], ["y"], keepdims=0)],
        "smoke_bomb", [_float_input()], [_sum_output()], initializer=initializers)
    return _serialize(graph)


def smoke_loop() -> bytes:
    """No trips on zeros, 10^12 on the smoke test's inputs: a ``Loop``."""
    nodes, initializers = _ceil_times(10**12)
    body = onnx.load_from_string(loop()).graph.node[1].attribute[0].g
    graph = helper.make_graph(
        [*nodes, helper.make_node("Squeeze", ["size"], ["trips"]),
         helper.make_node("Loop", ["trips", "true", "zero"], ["y"], body=body)],
        "smoke_loop", [_float_input()], [_sum_output()],
        initializer=[*initializers, numpy_helper.from_array(np.array(True), "true"),
                     numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")])
    return _serialize(graph)
