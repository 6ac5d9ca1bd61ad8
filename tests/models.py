"""Small ONNX models built in memory for tests (deterministic, no downloads)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def scale_model(factor: float, *, name: str = "x", width: int = 4) -> bytes:
    """y = x * factor over FP32 [batch, width]: each version of a model answers distinguishably."""
    graph = helper.make_graph(
        [helper.make_node("Mul", [name, "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(np.array(factor, dtype=np.float32), "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()
