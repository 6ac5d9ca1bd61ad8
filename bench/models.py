"""Deterministic bench models, generated into a cache directory (never downloaded, never committed).

* ``tiny``: a 20-feature linear classifier built with ``onnx.helper`` (needs only the dev extra; the smoke
  test uses it);
* ``logreg``: a 20-feature scikit-learn logistic regression (skl2onnx, ``zipmap`` off);
* ``forest``: a 100-tree scikit-learn random forest on the same 20 features (skl2onnx);
* ``mlp``: 512 -> 1024 -> 512 -> 10 with ReLUs, ~1.05 M parameters (``onnx.helper``, seeded weights);
* ``cnn``: a ResNet-18-shaped CNN on 1x3x224x224 (~11.7 M parameters, batch norm folded away, seeded
  He-initialised weights, ``onnx.helper``): ~1.1 MB of JSON per request.

scikit-learn and skl2onnx are not project dependencies: ``.venv/bin/pip install -r bench/requirements.txt``.

    python -m bench.models [--out bench/results/models] [--models logreg,mlp]
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / "bench" / "results" / "models"
OPSET = 17
SKLEARN_HINT = "the scikit-learn models need scikit-learn and skl2onnx: .venv/bin/pip install -r bench/requirements.txt"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_name: str
    item_shape: tuple[int, ...]  # one request's input shape (batch of one)
    build: Callable[[], bytes]
    needs_sklearn: bool = False

    def sample(self, seed: int = 1) -> dict[str, np.ndarray]:
        """The request input every system gets: deterministic float32 values."""
        rng = np.random.default_rng(seed)
        return {self.input_name: rng.standard_normal(self.item_shape).astype(np.float32)}


def _classification_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 20)).astype(np.float32)
    weights = rng.standard_normal(20)
    y = (x @ weights + 0.5 * rng.standard_normal(2000) > 0).astype(np.int64)
    return x, y


def _sklearn_to_onnx(model: object) -> bytes:
    try:
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType
    except ModuleNotFoundError:
        raise SystemExit(SKLEARN_HINT) from None
    onx = to_onnx(model, initial_types=[("features", FloatTensorType([None, 20]))],
                  options={id(model): {"zipmap": False}}, target_opset={"": OPSET, "ai.onnx.ml": 3})
    return onx.SerializeToString()


def build_logreg() -> bytes:
    try:
        from sklearn.linear_model import LogisticRegression
    except ModuleNotFoundError:
        raise SystemExit(SKLEARN_HINT) from None
    x, y = _classification_data()
    return _sklearn_to_onnx(LogisticRegression(max_iter=500).fit(x, y))


def build_forest() -> bytes:
    try:
        from sklearn.ensemble import RandomForestClassifier
    except ModuleNotFoundError:
        raise SystemExit(SKLEARN_HINT) from None
    x, y = _classification_data()
    return _sklearn_to_onnx(RandomForestClassifier(n_estimators=100, max_depth=10, random_state=0, n_jobs=1).fit(x, y))


class _Graph:
    """A tiny builder over onnx.helper: seeded initializers, unique names."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def weight(self, shape: tuple[int, ...], fan_in: int, prefix: str) -> str:
        name = self.name(prefix)
        values = (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        self.initializers.append(numpy_helper.from_array(values, name))
        return name

    def bias(self, size: int, prefix: str) -> str:
        name = self.name(prefix)
        values = (self.rng.standard_normal(size) * 0.01).astype(np.float32)
        self.initializers.append(numpy_helper.from_array(values, name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs: object) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def gemm(self, x: str, n_in: int, n_out: int) -> str:
        return self.op("Gemm", [x, self.weight((n_in, n_out), n_in, "w"), self.bias(n_out, "b")])

    def conv(self, x: str, c_in: int, c_out: int, kernel: int, stride: int) -> str:
        w = self.weight((c_out, c_in, kernel, kernel), c_in * kernel * kernel, "conv_w")
        pad = kernel // 2
        return self.op("Conv", [x, w, self.bias(c_out, "conv_b")], kernel_shape=[kernel, kernel],
                       strides=[stride, stride], pads=[pad, pad, pad, pad])

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], name: str) -> bytes:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="maas-bench")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model.SerializeToString()


def _dense(sizes: list[int], seed: int, name: str) -> bytes:
    g = _Graph(seed)
    x = "features"
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        x = g.gemm(x, n_in, n_out)
        if i < len(sizes) - 2:
            x = g.op("Relu", [x])
    g.nodes.append(helper.make_node("Softmax", [x], ["probabilities"], axis=1))
    return g.model([helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", sizes[0]])],
                   [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", sizes[-1]])], name)


def build_tiny() -> bytes:
    return _dense([20, 3], seed=7, name="tiny")


def build_mlp() -> bytes:
    return _dense([512, 1024, 512, 10], seed=11, name="mlp")


def build_cnn() -> bytes:
    """ResNet-18 layout: 7x7/2 conv, max pool, 4 stages of 2 basic blocks (64-512 channels), GAP, FC 1000."""
    g = _Graph(seed=18)
    x = g.op("Relu", [g.conv("image", 3, 64, 7, 2)])
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    channels = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            y = g.op("Relu", [g.conv(x, channels, width, 3, stride)])
            y = g.conv(y, width, width, 3, 1)
            shortcut = g.conv(x, channels, width, 1, stride) if stride != 1 or channels != width else x
            x = g.op("Relu", [g.op("Add", [y, shortcut])])
            channels = width
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    logits = g.gemm(x, 512, 1000)
    g.nodes.append(helper.make_node("Softmax", [logits], ["probabilities"], axis=1))
    return g.model([helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])],
                   [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 1000])], "cnn")


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("tiny", "features", (1, 20), build_tiny),
        ModelSpec("logreg", "features", (1, 20), build_logreg, needs_sklearn=True),
        ModelSpec("forest", "features", (1, 20), build_forest, needs_sklearn=True),
        ModelSpec("mlp", "features", (1, 512), build_mlp),
        ModelSpec("cnn", "image", (1, 3, 224, 224), build_cnn),
    )
}


def generate(names: list[str], cache: Path = DEFAULT_CACHE) -> dict[str, Path]:
    """``{name: path}`` of each model, built on first use (same bytes every time for the same versions)."""
    cache.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name in names:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        path = cache / f"{name}.onnx"
        if not path.exists():
            data = MODELS[name].build()
            partial = path.with_suffix(".tmp")
            partial.write_bytes(data)
            partial.replace(path)
        paths[name] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--models", default=",".join(MODELS))
    options = parser.parse_args()
    for name, path in generate(options.models.split(","), options.out).items():
        print(f"{name:<8} {path} {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
