"""Regenerate the bundled example model deterministically (byte-identical on every run).

A softmax regression over the four iris features: features[N,4] -> probabilities[N,3], label[N]
(int64). The weights are fixed numbers derived from the published class means; no training framework is needed.

    python scripts/make_example_model.py [OUTPUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Linear discriminant on petal length and width (class means / pooled variance), scaled by 0.3 so the
# probabilities stay readable; the sepal features carry no weight.
WEIGHTS = (
    np.array(
        [
            [0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0],
            [7.68, 22.4, 29.2],
            [6.25, 33.25, 50.75],
        ],
        dtype=np.float32,
    )
    * np.float32(0.3)
)
BIAS = np.array([-6.4, -69.9, -132.6], dtype=np.float32) * np.float32(0.3)
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "layers/runtime/maas/examples/iris.onnx"


def build() -> onnx.ModelProto:
    features = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])
    probabilities = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])
    label = helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"])
    nodes = [
        helper.make_node("MatMul", ["features", "W"], ["logits_raw"], name="matmul"),
        helper.make_node("Add", ["logits_raw", "B"], ["logits"], name="bias"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax"),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0, name="argmax"),
    ]
    graph = helper.make_graph(
        nodes,
        "iris_softmax_regression",
        [features],
        [probabilities, label],
        initializer=[numpy_helper.from_array(WEIGHTS, "W"), numpy_helper.from_array(BIAS, "B")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="maas-example", producer_version="1"
    )
    model.ir_version = 8
    model.doc_string = "Iris species classifier (setosa, versicolor, virginica) for the maas demo."
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUTPUT
    output.write_bytes(build().SerializeToString(deterministic=True))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
