"""``maas.inference.optimize.quantize``: dynamic int8 quantization checked against the parent."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from maas.domain import Signature, TensorSpec
from maas.errors import InvalidInput, ModelRejected
from maas.inference.optimize import OptimizeReport, _compare, quantize
from maas.inference.validation import inspect_model_bytes
from maas.settings import Limits
from tests.models import mlp_model, quantizable_model, scale_model, wide_matmul_model


def _signature(data: bytes) -> Signature:
    return inspect_model_bytes(data, Limits())


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           initializers: list[onnx.TensorProto]) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize("gemm", [False, True], ids=["matmul-add", "gemm"])
def test_an_mlp_shrinks_and_stays_within_tolerance(gemm: bool) -> None:
    parent = quantizable_model(gemm=gemm)
    derived, report = quantize(parent, _signature(parent))
    assert isinstance(report, OptimizeReport)
    assert report.parent_bytes == len(parent) and report.derived_bytes == len(derived)
    assert report.derived_bytes < 0.5 * report.parent_bytes  # int8 weights are a quarter of float32
    assert report.scheme == "s7" and report.goal == "latency"  # the fastest scheme, accurate enough here
    assert [(c.check, c.passed) for c in report.checks] == [
        ("portability", True), ("size", True), ("accuracy", True), ("latency", True)]
    # Kept under goal latency means the whole 99% interval of the paired speedup lies above 1.
    low, high = report.speedup_interval
    assert 1 < low <= report.speedup <= high and report.timing_pairs >= 8
    assert 0 < report.max_rel_diff <= report.tolerance == 0.05
    assert report.max_abs_diff >= report.max_rel_diff
    assert report.compared == ("y", "label") and report.samples == 16 and report.batch == 4
    assert report.inputs == "random" and report.min_agreement_seen >= 0.9
    assert report.parent_p50_ms > 0 and report.derived_p50_ms > 0
    ops = {node.op_type for node in onnx.load_from_string(derived).graph.node}
    assert "MatMulInteger" in ops and "MatMul" not in ops and "Gemm" not in ops
    # The derived model is a valid, self-contained model with the parent's signature.
    assert inspect_model_bytes(derived, Limits()) == _signature(parent)
    body = report.as_dict()
    json.dumps(body, allow_nan=False)
    assert body["size_ratio"] < 0.5 and [o["name"] for o in body["outputs"]] == ["y", "label"]
    assert [c["check"] for c in body["checks"]] == ["portability", "size", "accuracy", "latency"]


def test_the_check_is_deterministic_and_holds_on_fresh_inputs() -> None:
    parent = quantizable_model(seed=2)
    signature = _signature(parent)
    first_bytes, first = quantize(parent, signature, 0.05, seed=7)
    second_bytes, second = quantize(parent, signature, tolerance=0.05, seed=7)
    assert first_bytes == second_bytes
    assert (first.max_abs_diff, first.outputs) == (second.max_abs_diff, second.outputs)
    x = np.random.default_rng(99).standard_normal((64, 256)).astype(np.float32)
    p_y, p_label = ort.InferenceSession(parent).run(None, {"x": x})
    d_y, d_label = ort.InferenceSession(first_bytes).run(None, {"x": x})
    assert np.max(np.abs(p_y - d_y)) / max(1.0, np.max(np.abs(p_y))) <= 0.05
    assert np.mean(p_label == d_label) >= 0.9


def test_outside_the_tolerance_is_rejected_naming_the_output() -> None:
    parent = quantizable_model(seed=4)
    with pytest.raises(ModelRejected) as raised:
        quantize(parent, _signature(parent), 0.0)
    assert "'y'" in raised.value.detail and "tolerance of 0" in raised.value.detail
    assert raised.value.extra["output"] == "y" and raised.value.extra["check"] == "accuracy"
    report = raised.value.extra["report"]
    json.dumps(report, allow_nan=False)
    assert report["tolerance"] == 0.0 and report["parent_bytes"] == len(parent)


def test_a_model_that_would_grow_is_refused() -> None:
    parent = mlp_model(dims=(8, 16, 3), seed=11)  # the int8 graph's extra nodes outweigh 176 weights
    with pytest.raises(ModelRejected) as raised:
        quantize(parent, _signature(parent))
    assert raised.value.extra["check"] == "size"
    assert "is not smaller than its parent" in raised.value.detail
    report = raised.value.extra["report"]
    assert report["derived_bytes"] > report["parent_bytes"] == len(parent)


@pytest.mark.parametrize("goal", ["latency", "size"])
def test_a_smaller_but_slower_model_is_refused_whatever_the_goal(goal: str) -> None:
    parent = wide_matmul_model()
    with pytest.raises(ModelRejected) as raised:
        quantize(parent, _signature(parent), goal=goal)
    assert raised.value.extra["check"] == "latency"
    report = raised.value.extra["report"]
    assert report["derived_bytes"] < report["parent_bytes"] and report["goal"] == goal
    assert report["speedup_interval"][1] < 1 or goal == "latency"
    assert [(c["check"], c["passed"]) for c in report["checks"]] == [
        ("portability", True), ("size", True), ("accuracy", True), ("latency", False)]


def test_labels_must_agree() -> None:
    # Unspread logits: on 256 samples the int8 error flips a few near-tie labels (~2%).
    parent = quantizable_model(logit_scale=1.0)
    signature = _signature(parent)
    with pytest.raises(ModelRejected) as raised:
        quantize(parent, signature, 0.5, min_agreement=1.0, samples=64)
    assert "'label'" in raised.value.detail and "100.0% required" in raised.value.detail
    _, report = quantize(parent, signature, 0.5, samples=64)
    assert 0.9 <= report.min_agreement_seen < 1.0


def test_nothing_to_quantize() -> None:
    parent = scale_model(2.0)
    with pytest.raises(InvalidInput) as raised:
        quantize(parent, _signature(parent))
    assert "nothing to quantize" in raised.value.detail and raised.value.field == "version"
    # A MatMul of two activations has no weights either.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    square = _model([helper.make_node("MatMul", ["x", "xt"], ["y"]), ],
                    [x, helper.make_tensor_value_info("xt", TensorProto.FLOAT, [4, "n"])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "n"])], [])
    with pytest.raises(InvalidInput, match="nothing to quantize"):
        quantize(square, _signature(square))


def test_integer_inputs_get_small_values_and_a_failing_parent_falls_back_to_zeros() -> None:
    # ids (INT64) index a 2-row embedding table: random ids in [0, 4) fail on the parent, zeros work.
    rng = np.random.default_rng(0)
    parent = _model(
        [helper.make_node("Gather", ["table", "ids"], ["e"], axis=0), helper.make_node("MatMul", ["e", "w"], ["y"])],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(rng.standard_normal((2, 16)).astype(np.float32), "table"),
         numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")],
    )
    # (Both are too small to shrink: the refusal's report says what was sampled.)
    with pytest.raises(ModelRejected) as raised:
        quantize(parent, _signature(parent), 0.1, samples=2)
    assert raised.value.extra["report"]["inputs"] == "zeros"
    wide = _model(
        [helper.make_node("Gather", ["table", "ids"], ["e"], axis=0), helper.make_node("MatMul", ["e", "w"], ["y"])],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "table"),
         numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")],
    )
    with pytest.raises(ModelRejected) as raised:
        quantize(wide, _signature(wide), 0.1, samples=2)
    assert raised.value.extra["report"]["inputs"] == "random"  # ids in [0, 4) index a 4-row table


def test_limits_are_respected() -> None:
    parent = quantizable_model()
    signature = _signature(parent)
    _, report = quantize(parent, signature, goal="size", limits=Limits(max_tensor_elements=256))
    assert report.batch == 1  # a batch of 4 x 256 would exceed the cap
    with pytest.raises(ModelRejected, match="elements per tensor"):
        quantize(parent, signature, limits=Limits(max_tensor_elements=255))
    with pytest.raises(InvalidInput, match="over the limit"):
        quantize(parent, signature, limits=Limits(max_model_bytes=len(parent) - 1))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"tolerance": -0.1}, "tolerance"), ({"tolerance": float("nan")}, "tolerance"),
    ({"tolerance": float("inf")}, "tolerance"), ({"samples": 0}, "samples"), ({"samples": 10_000}, "samples"),
    ({"min_agreement": 1.5}, "min_agreement"), ({"goal": "speed"}, "goal"),
])
def test_arguments_are_checked(kwargs: dict[str, float], field: str) -> None:
    parent = mlp_model(dims=(8, 4))
    with pytest.raises(InvalidInput) as raised:
        quantize(parent, _signature(parent), **kwargs)  # type: ignore[arg-type]
    assert raised.value.field == field


def test_compare_rules() -> None:
    spec = TensorSpec(name="y", datatype="FP32", shape=(-1, 2))
    parent = [np.array([[0.5, 10.0], [np.nan, np.inf]], dtype=np.float32)]
    close = [np.array([[0.52, 10.4], [np.nan, np.inf]], dtype=np.float32)]
    verdict = _compare(spec, parent, close, 0.05, 0.9)
    assert verdict.passed and verdict.max_abs_diff == pytest.approx(0.4, abs=1e-5)
    assert verdict.max_rel_diff == pytest.approx(0.04, abs=1e-5)  # 0.4 relative to the peak of 10
    misplaced = [np.array([[0.5, 10.0], [1.0, np.inf]], dtype=np.float32)]
    assert _compare(spec, parent, misplaced, 1.0, 0.9).nonfinite_mismatch
    flipped = [np.array([[0.5, 10.0], [np.nan, -np.inf]], dtype=np.float32)]
    assert not _compare(spec, parent, flipped, 1.0, 0.9).passed
    assert _compare(spec, parent, [np.zeros((3, 2), np.float32)], 1.0, 0.9).kind == "shape"
    labels = TensorSpec(name="label", datatype="INT64", shape=(-1,))
    verdict = _compare(labels, [np.arange(10)], [np.r_[np.arange(9), 0]], 0.05, 0.9)
    assert verdict.passed and verdict.agreement == 0.9
    assert not _compare(labels, [np.arange(10)], [np.r_[np.arange(9), 0]], 0.05, 0.95).passed
    text = TensorSpec(name="t", datatype="BYTES", shape=(-1,))
    assert _compare(text, [np.array(["a", "b"], dtype=object)], [np.array(["a", "b"], dtype=object)], 0, 1).passed
