"""int8 weight schemes are exact on every CPU; the guard refuses a graph that could saturate somewhere.

What an x86 CPU without VNNI computes is emulated (``tests.cpu_kernels``), so every branch runs on
whatever CPU runs the tests.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from maas.errors import InvalidInput, ModelRejected
from maas.inference.optimize import quantize
from maas.inference.quantization import (
    FULL_RANGE_INT8,
    S7_PER_CHANNEL,
    SCHEMES,
    U8,
    quantize_weights,
    saturation_risks,
)
from maas.inference.validation import inspect_model_bytes
from maas.settings import Limits
from tests import cpu_kernels
from tests.models import lossy_model, mlp_model, quantizable_model

# The models of the CPU-dependent failures first seen on an AVX2-only AMD EPYC (0.73 off there).
_weights = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
_graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                           [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
                           [numpy_helper.from_array(_weights, "w")])
_matmul = helper.make_model(_graph, opset_imports=[helper.make_opsetid("", 17)])
_matmul.ir_version = 8
MODELS = {
    "matmul-4x64": (_matmul.SerializeToString(), 4),
    "mlp-8-16-3": (mlp_model(dims=(8, 16, 3), seed=11), 8),
    "mlp-64-256-10": (mlp_model(), 64),
    "quantizable": (quantizable_model(), 256),
}


def _feeds(width: int, count: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)  # what optimize samples: standard normal, batch 4
    return [{"x": rng.standard_normal((4, width)).astype(np.float32)} for _ in range(count)]


def _relative(parent: np.ndarray, derived: np.ndarray) -> float:
    return float(np.max(np.abs(parent - derived)) / max(1.0, float(np.max(np.abs(parent)))))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda scheme: scheme.name)
@pytest.mark.parametrize("model", MODELS, ids=str)
def test_every_scheme_answers_the_same_on_every_cpu(model: str, scheme: object) -> None:
    parent, width = MODELS[model]
    derived = quantize_weights(parent, scheme)  # type: ignore[arg-type]
    assert saturation_risks(onnx.load_from_string(derived)) == []
    session = ort.InferenceSession(derived, providers=["CPUExecutionProvider"])
    for feed in _feeds(width):
        vnni, no_vnni = cpu_kernels.exact(derived, feed)[0], cpu_kernels.without_vnni(derived, feed)[0]
        np.testing.assert_array_equal(no_vnni, vnni)  # no pair of products saturates
        here = session.run(["y"], feed)[0]
        assert _relative(vnni, here) < 1e-4  # and onnxruntime here computes that same result


def test_full_range_int8_answers_differently_without_vnni_and_the_guard_sees_it() -> None:
    """The defect, reproduced: onnxruntime's default int8 weights are accurate where sums are exact and
    far off where pairs saturate; ``saturation_risks`` flags exactly such graphs."""
    worst = {}
    for model, (parent, width) in MODELS.items():
        derived = quantize_weights(parent, FULL_RANGE_INT8)
        assert saturation_risks(onnx.load_from_string(derived)), model
        reference = ort.InferenceSession(parent, providers=["CPUExecutionProvider"])
        worst[model] = max(
            (_relative(reference.run(["y"], feed)[0], cpu_kernels.exact(derived, feed)[0]),
             _relative(reference.run(["y"], feed)[0], cpu_kernels.without_vnni(derived, feed)[0]))
            for feed in _feeds(width))
    exact_error, saturated_error = worst["matmul-4x64"]
    assert exact_error < 0.05 < saturated_error  # within tolerance on one CPU, far outside on another


def test_the_guard_refuses_a_scheme_that_could_saturate_and_falls_back() -> None:
    parent = quantizable_model()
    signature = inspect_model_bytes(parent, Limits())
    with pytest.raises(ModelRejected) as raised:
        quantize(parent, signature, schemes=(FULL_RANGE_INT8,))
    assert raised.value.extra["check"] == "portability"
    assert "other CPUs" in raised.value.detail and "without VNNI" in raised.value.detail
    # Forced first, the unsafe scheme is refused and the next one kept (goal size: speed is not the point).
    derived, report = quantize(parent, signature, schemes=(FULL_RANGE_INT8, U8), goal="size")
    assert report.scheme == "u8" and saturation_risks(onnx.load_from_string(derived)) == []
    assert [(c.scheme, c.check, c.passed) for c in report.checks] == [
        ("s8", "portability", False), ("u8", "portability", True), ("u8", "size", True), ("u8", "accuracy", True),
        ("u8", "latency", True)]


def test_schemes_are_tried_fastest_first_and_the_first_within_tolerance_is_kept() -> None:
    parent = quantizable_model()
    signature = inspect_model_bytes(parent, Limits())
    diffs = [quantize(parent, signature, 1.0, schemes=(scheme,), goal="size")[1].max_rel_diff for scheme in SCHEMES]
    assert [scheme.name for scheme in SCHEMES] == ["s7", "s7-per-channel", "u8"]
    assert diffs[0] > diffs[1] > diffs[2]  # here each later scheme is more precise than the one before
    for kept, (looser, tighter) in enumerate(itertools.pairwise([1.0, *diffs])):
        _, report = quantize(parent, signature, (looser + tighter) / 2, goal="size")
        assert report.scheme == SCHEMES[kept].name
        refused = [c.scheme for c in report.checks if c.check == "accuracy" and not c.passed]
        assert refused == [scheme.name for scheme in SCHEMES[:kept]]


def test_a_model_that_int8_ruins_is_refused_on_every_cpu() -> None:
    parent = lossy_model()
    with pytest.raises(ModelRejected) as raised:
        quantize(parent, inspect_model_bytes(parent, Limits()))
    problem = raised.value
    assert problem.extra["check"] == "accuracy" and problem.extra["output"] == "y"
    assert all(f"with {scheme.name} weights" in problem.detail for scheme in SCHEMES)
    report = problem.extra["report"]
    assert [(c["scheme"], c["check"], c["passed"]) for c in report["checks"]] == [
        (scheme.name, check, check != "accuracy") for scheme in SCHEMES
        for check in ("portability", "size", "accuracy")]
    # The loss is the arithmetic's, not a CPU's: exact and saturating kernels agree on it.
    derived = quantize_weights(parent, S7_PER_CHANNEL)
    reference = ort.InferenceSession(parent, providers=["CPUExecutionProvider"])
    for feed in _feeds(256, 2):
        exact = cpu_kernels.exact(derived, feed)[0]
        np.testing.assert_array_equal(cpu_kernels.without_vnni(derived, feed)[0], exact)
        assert _relative(reference.run(["y"], feed)[0], exact) > 0.5


def _matmul_integer(weight: np.ndarray | None, *, loop: bool = False) -> onnx.ModelProto:
    """a (uint8, from DynamicQuantizeLinear) times a weight: an initializer, or computed at run time."""
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["a", "a_scale", "a_zero"])]
    initializers = []
    if weight is None:
        nodes.append(helper.make_node("Cast", ["xi"], ["w"], to=TensorProto.INT8))
    else:
        initializers.append(numpy_helper.from_array(weight, "w"))
    nodes.append(helper.make_node("MatMulInteger", ["a", "w", "a_zero"], ["y"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
              helper.make_tensor_value_info("xi", TensorProto.FLOAT, [4, 2])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 2])],
                              initializer=initializers)
    if loop:  # the same product inside a Loop body
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond"], ["cond_out"]), *graph.node],
            "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                     helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("y", TensorProto.INT32, [1, 2])], initializer=initializers)
        graph = helper.make_graph([helper.make_node("Loop", ["n", ""], ["ys"], body=body)], "outer",
                                  [*inputs, helper.make_tensor_value_info("n", TensorProto.INT64, [])],
                                  [helper.make_tensor_value_info("ys", TensorProto.INT32, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("weight", "risky"), [
    (np.full((4, 2), 64, np.int8), False),
    (np.full((4, 2), -64, np.int8), False),
    (np.r_[np.zeros((3, 2)), [[65, 0]]].astype(np.int8), True),
    (np.full((4, 2), -128, np.int8), True),
    (np.full((4, 2), 255, np.uint8), False),  # U8U8 kernels never saturate
    (None, True),  # a weight computed at run time cannot be bounded
], ids=["int8-64", "int8-minus-64", "int8-65", "int8-minus-128", "uint8", "runtime"])
def test_saturation_risks_bound_every_int8_weight(weight: np.ndarray | None, risky: bool) -> None:
    risks = saturation_risks(_matmul_integer(weight))
    assert bool(risks) is risky, risks
    if weight is not None and weight.dtype == np.int8 and risky:
        assert "int8 weights up to" in risks[0] and "without VNNI" in risks[0]


def test_saturation_risks_look_inside_subgraphs() -> None:
    assert saturation_risks(_matmul_integer(np.full((4, 2), 100, np.int8), loop=True))
    assert saturation_risks(_matmul_integer(np.full((4, 2), 10, np.int8), loop=True)) == []


def test_conv_weights_are_left_in_float() -> None:
    # onnxruntime's ConvInteger is slower than its float Conv on CPU: a Conv-only model has nothing to gain.
    weights = np.random.default_rng(0).standard_normal((16, 3, 3, 3)).astype(np.float32) / 5
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16, 8, 8])],
                              [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    parent = model.SerializeToString()
    with pytest.raises(InvalidInput, match="nothing to quantize"):
        quantize(parent, inspect_model_bytes(parent, Limits()))
