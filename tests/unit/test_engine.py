"""The inference engine: same numbers as raw onnxruntime, signature checks, the session cache, metrics."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as triton
from onnx import TensorProto, helper, numpy_helper

from maas.domain import ModelVersion, Signature, TensorSpec, VersionStatus
from maas.errors import InferenceFailed, InputRejected, InvalidInput, NotReady, StorageCorrupted
from maas.examples import EXAMPLE_REQUEST, example_model_path
from maas.inference.codec import DecodedRequest, decode_request, encode_response
from maas.inference.engine import InferenceEngine, SessionCache, default_session_options, ort_threads
from maas.settings import Limits

IRIS_BYTES = example_model_path().read_bytes()
IRIS_SIGNATURE = Signature(
    inputs=(TensorSpec(name="features", datatype="FP32", shape=(-1, 4)),),
    outputs=(
        TensorSpec(name="probabilities", datatype="FP32", shape=(-1, 3)),
        TensorSpec(name="label", datatype="INT64", shape=(-1,)),
    ),
)
FEATURES = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]], dtype=np.float32)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def version_of(
    data: bytes, signature: Signature | None, model: str = "iris", number: int = 1
) -> ModelVersion:
    return ModelVersion(
        model=model,
        version=number,
        status=VersionStatus.READY,
        sha256=sha(data),
        size=len(data),
        signature=signature,
    )


def request_of(
    inputs: dict[str, np.ndarray], datatypes: dict[str, str] | None = None, **kw: Any
) -> DecodedRequest:
    if datatypes is None:
        datatypes = {name: DTYPES[array.dtype.name] for name, array in inputs.items()}
    return DecodedRequest(id=None, inputs=inputs, datatypes=datatypes, **kw)


DTYPES = {
    "float32": "FP32",
    "float64": "FP64",
    "int64": "INT64",
    "int32": "INT32",
    "float16": "FP16",
    "object": "BYTES",
}


@dataclass
class Store:
    """Artifact bytes by sha256, counting reads; ``delay`` widens the window for concurrent loads."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    reads: int = 0
    delay: float = 0.0

    def add(self, data: bytes) -> None:
        self.blobs[sha(data)] = data

    def read(self, version: ModelVersion) -> bytes:
        self.reads += 1
        if self.delay:
            time.sleep(self.delay)
        assert version.sha256 is not None
        return self.blobs[version.sha256]


@dataclass
class RecordingMetrics:
    """Implements ``maas.ports.Metrics`` by remembering every call."""

    invocations: list[tuple[str, int, bool]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    routed: list[bool] = field(default_factory=list)
    caches: list[tuple[str, int, bool]] = field(default_factory=list)
    loads: list[tuple[str, int, float]] = field(default_factory=list)

    def invocation(self, model: str, version: int, *, latency_s: float, error: bool,
                   routed: bool = True) -> None:
        self.invocations.append((model, version, error))
        self.latencies.append(latency_s)
        self.routed.append(routed)

    def cache(self, model: str, version: int, *, hit: bool) -> None:
        self.caches.append((model, version, hit))

    def model_load(self, model: str, version: int, *, seconds: float) -> None:
        self.loads.append((model, version, seconds))


def engine_for(*models: bytes, limits: Limits | None = None, **kw: Any) -> tuple[InferenceEngine, Store]:
    store = Store()
    for data in models:
        store.add(data)
    return InferenceEngine(store.read, limits or Limits(), **kw), store


def build_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] | None = None,
    name: str = "g",
) -> bytes:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    serialized: bytes = model.SerializeToString()
    return serialized


def two_input_model() -> tuple[bytes, Signature]:
    """a FP32 [2, -1] and b INT64 [-1] -> sum FP32 [2, -1] (a + 1), count INT64 [-1] (b * 2)."""
    data = build_model(
        [
            helper.make_node("Add", ["a", "one"], ["sum"]),
            helper.make_node("Mul", ["b", "two"], ["count"]),
        ],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, "n"]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["m"]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, [2, "n"]),
            helper.make_tensor_value_info("count", TensorProto.INT64, ["m"]),
        ],
        [
            helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
            helper.make_tensor("two", TensorProto.INT64, [], [2]),
        ],
    )
    signature = Signature(
        inputs=(
            TensorSpec(name="a", datatype="FP32", shape=(2, -1)),
            TensorSpec(name="b", datatype="INT64", shape=(-1,)),
        ),
        outputs=(
            TensorSpec(name="sum", datatype="FP32", shape=(2, -1)),
            TensorSpec(name="count", datatype="INT64", shape=(-1,)),
        ),
    )
    return data, signature


def identity_model(elem_type: int, datatype: str, name: str = "identity") -> tuple[bytes, Signature]:
    data = build_model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", elem_type, ["n"])],
        [helper.make_tensor_value_info("y", elem_type, ["n"])],
        name=name,
    )
    signature = Signature(
        inputs=(TensorSpec(name="x", datatype=datatype, shape=(-1,)),),
        outputs=(TensorSpec(name="y", datatype=datatype, shape=(-1,)),),
    )
    return data, signature


# ---------------------------------------------------------------------------------------- correctness


def test_outputs_equal_raw_onnxruntime() -> None:
    engine, _ = engine_for(IRIS_BYTES)
    version = version_of(IRIS_BYTES, IRIS_SIGNATURE)
    outputs = engine.infer(version, request_of({"features": FEATURES}))
    raw = ort.InferenceSession(str(example_model_path()), providers=["CPUExecutionProvider"])
    expected = raw.run(None, {"features": FEATURES})
    assert [name for name, _ in outputs] == ["probabilities", "label"]
    for (_, got), want in zip(outputs, expected, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_full_path_json_and_binary_match_raw_onnxruntime() -> None:
    engine, _ = engine_for(IRIS_BYTES)
    version = version_of(IRIS_BYTES, IRIS_SIGNATURE)
    raw = ort.InferenceSession(IRIS_BYTES, providers=["CPUExecutionProvider"])
    flowers = np.array(EXAMPLE_REQUEST["inputs"][0]["data"], dtype=np.float32)
    probabilities, label = raw.run(None, {"features": flowers})

    decoded = decode_request(orjson.dumps(EXAMPLE_REQUEST), None, Limits())
    body, header_length = encode_response(
        "iris", "1", decoded.id, engine.infer(version, decoded), decoded.response_binary()
    )
    assert header_length is None
    result = triton.InferenceServerClient.parse_response_body(body)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    np.testing.assert_array_equal(result.as_numpy("label"), label)

    infer_input = triton.InferInput("features", [2, 4], "FP32").set_data_from_numpy(flowers, binary_data=True)
    wanted = [triton.InferRequestedOutput("label"), triton.InferRequestedOutput("probabilities")]
    request, json_size = triton.InferenceServerClient.generate_request_body([infer_input], outputs=wanted)
    decoded = decode_request(request, json_size, Limits())
    outputs = engine.infer(version, decoded)
    assert [name for name, _ in outputs] == ["label", "probabilities"]
    body, header_length = encode_response("iris", "1", decoded.id, outputs, decoded.response_binary())
    assert header_length is not None
    result = triton.InferenceServerClient.parse_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    np.testing.assert_array_equal(result.as_numpy("label"), label)


def test_requested_outputs_subset_and_order() -> None:
    data, signature = two_input_model()
    engine, _ = engine_for(data)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1, 2, 3, 4], dtype=np.int64)
    outputs = engine.infer(
        version_of(data, signature), request_of({"b": b, "a": a}, requested_outputs=["count"])
    )
    assert len(outputs) == 1
    assert outputs[0][0] == "count"
    np.testing.assert_array_equal(outputs[0][1], b * 2)


def test_missing_signature_falls_back_to_the_graph() -> None:
    data, _ = two_input_model()
    engine, _ = engine_for(data)
    version = version_of(data, None)
    a = np.ones((2, 1), dtype=np.float32)
    outputs = dict(engine.infer(version, request_of({"a": a, "b": np.array([3], dtype=np.int64)})))
    np.testing.assert_array_equal(outputs["sum"], a + 1)
    with pytest.raises(InvalidInput) as info:
        engine.infer(version, request_of({"a": np.ones((3, 1), dtype=np.float32), "b": np.array([3])}))
    assert info.value.field == "inputs[0].shape"


def test_bytes_inputs_reach_onnxruntime_as_text() -> None:
    data, signature = identity_model(TensorProto.STRING, "BYTES")
    engine, _ = engine_for(data)
    version = version_of(data, signature, model="echo")
    body = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [2], "data": ["héllo", "b"]}]}
    )
    decoded = decode_request(body, None, Limits())
    outputs = engine.infer(version, decoded)
    assert outputs[0][1].tolist() == ["héllo", "b"]
    response, header_length = encode_response("echo", "1", None, outputs, binary=True)
    result = triton.InferenceServerClient.parse_response_body(response, header_length=header_length)
    assert result.as_numpy("y").tolist() == ["héllo".encode(), b"b"]

    with pytest.raises(InvalidInput) as info:
        engine.infer(version, request_of({"x": np.array([b"\xff"], dtype=object)}))
    assert info.value.field == "inputs[0].data"


def test_fp16_model() -> None:
    data, signature = identity_model(TensorProto.FLOAT16, "FP16", name="half")
    engine, _ = engine_for(data)
    x = np.array([0.5, -1.0, 65504], dtype=np.float16)
    outputs = engine.infer(version_of(data, signature, model="half"), request_of({"x": x}))
    assert outputs[0][1].dtype == np.float16
    np.testing.assert_array_equal(outputs[0][1], x)


# ----------------------------------------------------------------------------------------- checks


def iris_error(request: DecodedRequest, limits: Limits | None = None) -> InvalidInput:
    engine, _ = engine_for(IRIS_BYTES, limits=limits)
    with pytest.raises(InvalidInput) as info:
        engine.infer(version_of(IRIS_BYTES, IRIS_SIGNATURE), request)
    return info.value


def test_wrong_declared_datatype() -> None:
    error = iris_error(request_of({"features": FEATURES.astype(np.float64)}))
    assert error.field == "inputs[0].datatype"
    assert "FP32" in error.detail and "FP64" in error.detail and "features" in error.detail


def test_array_dtype_must_match_the_declared_datatype() -> None:
    error = iris_error(request_of({"features": FEATURES.astype(np.float64)}, datatypes={"features": "FP32"}))
    assert error.field == "inputs[0].datatype"


def test_wrong_rank() -> None:
    error = iris_error(request_of({"features": FEATURES.reshape(-1)}))
    assert error.field == "inputs[0].shape"
    assert "rank 2" in error.detail and "rank 1" in error.detail and "[-1, 4]" in error.detail


def test_wrong_fixed_dimension() -> None:
    error = iris_error(request_of({"features": np.zeros((2, 5), dtype=np.float32)}))
    assert error.field == "inputs[0].shape"
    assert "[-1, 4]" in error.detail and "[2, 5]" in error.detail


def test_missing_input() -> None:
    error = iris_error(request_of({}))
    assert error.field == "inputs"
    assert "features" in error.detail and "missing" in error.detail


def test_unknown_input() -> None:
    error = iris_error(request_of({"features": FEATURES, "extra": FEATURES}))
    assert error.field == "inputs[1].name"
    assert "extra" in error.detail and "features" in error.detail


def test_misnamed_input_is_reported_missing() -> None:
    error = iris_error(request_of({"feature": FEATURES}))
    assert "features" in error.detail


def test_unknown_requested_output() -> None:
    error = iris_error(request_of({"features": FEATURES}, requested_outputs=["label", "logits"]))
    assert error.field == "outputs[1].name"
    assert "logits" in error.detail and "probabilities" in error.detail


def test_element_cap() -> None:
    error = iris_error(
        request_of({"features": np.zeros((3, 4), dtype=np.float32)}), Limits(max_tensor_elements=8)
    )
    assert error.field == "inputs[0].shape"
    assert "12" in error.detail


def test_onnxruntime_failure_is_one_line_without_paths() -> None:
    data = build_model(
        [helper.make_node("Reshape", ["x", "target"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [helper.make_tensor("target", TensorProto.INT64, [1], [3])],
    )
    signature = Signature(
        inputs=(TensorSpec(name="x", datatype="FP32", shape=(-1,)),),
        outputs=(TensorSpec(name="y", datatype="FP32", shape=(3,)),),
    )
    metrics = RecordingMetrics()
    engine, _ = engine_for(data, metrics=metrics)
    version = version_of(data, signature, model="reshape")
    np.testing.assert_array_equal(
        engine.infer(version, request_of({"x": np.ones(3, np.float32)}))[0][1], np.ones(3)
    )
    with pytest.raises(InferenceFailed) as info:
        engine.infer(version, request_of({"x": np.ones(4, np.float32)}))
    message = info.value.detail
    assert "\n" not in message
    assert "/" not in message and "\\" not in message and ".cc" not in message and ".h:" not in message
    assert "ONNXRuntimeError" not in message and "::" not in message
    assert "reshape" in message
    assert [error for _, _, error in metrics.invocations] == [False, True]


def test_pending_version_is_not_ready() -> None:
    engine, store = engine_for(IRIS_BYTES)
    pending = ModelVersion(model="iris", version=2)
    with pytest.raises(NotReady):
        engine.infer(pending, request_of({"features": FEATURES}))
    assert store.reads == 0


# ------------------------------------------------------------------------------------------ loading


def test_corrupted_artifact_raises_storage_corrupted_and_caches_nothing() -> None:
    version = version_of(IRIS_BYTES, IRIS_SIGNATURE)
    corrupted = bytearray(IRIS_BYTES)
    corrupted[-1] ^= 0xFF
    engine = InferenceEngine(lambda v: bytes(corrupted), Limits())
    with pytest.raises(StorageCorrupted):
        engine.session(version)
    with pytest.raises(StorageCorrupted):
        engine.infer(version, request_of({"features": FEATURES}))
    assert len(engine.cache) == 0


def test_unloadable_artifact_is_inference_failed() -> None:
    junk = b"definitely not onnx"
    engine, _ = engine_for(junk)
    with pytest.raises(InferenceFailed) as info:
        engine.session(version_of(junk, IRIS_SIGNATURE))
    assert "\n" not in info.value.detail and "/" not in info.value.detail


def test_concurrent_first_requests_load_once() -> None:
    metrics = RecordingMetrics()
    engine, store = engine_for(IRIS_BYTES, metrics=metrics)
    store.delay = 0.2
    version = version_of(IRIS_BYTES, IRIS_SIGNATURE)
    start = threading.Barrier(8)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            start.wait()
            results.append(engine.infer(version, request_of({"features": FEATURES}))[1][1])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 8
    assert store.reads == 1
    assert len(metrics.loads) == 1
    stats = engine.cache.stats
    assert (stats.misses, stats.hits) == (1, 7)
    assert sorted(hit for _, _, hit in metrics.caches) == [False] + [True] * 7


def test_lru_eviction_by_bytes() -> None:
    other, other_signature = two_input_model()
    limit = max(len(IRIS_BYTES), len(other)) + min(len(IRIS_BYTES), len(other)) // 2  # room for one only
    engine, store = engine_for(IRIS_BYTES, other, limits=Limits(session_cache_bytes=limit))
    iris = version_of(IRIS_BYTES, IRIS_SIGNATURE)
    second = version_of(other, other_signature, model="adder")

    engine.warm(iris)
    assert engine.cache.keys() == [iris.sha256]
    assert engine.cache.stats.bytes == len(IRIS_BYTES)
    engine.warm(second)
    assert engine.cache.keys() == [second.sha256]
    stats = engine.cache.stats
    assert (stats.evictions, stats.bytes, stats.entries) == (1, len(other), 1)
    engine.session(iris)
    assert store.reads == 3
    assert engine.cache.stats.evictions == 2


def test_lru_keeps_the_most_recently_used() -> None:
    cache: SessionCache[str] = SessionCache(max_bytes=10)
    loads: list[str] = []

    def loader(key: str, cost: int) -> Callable[[], tuple[str, int]]:
        def load() -> tuple[str, int]:
            loads.append(key)
            return key.upper(), cost

        return load

    assert cache.get_or_load("a", loader("a", 4)) == ("A", False)
    assert cache.get_or_load("b", loader("b", 4)) == ("B", False)
    assert cache.get_or_load("a", loader("a", 4)) == ("A", True)  # a is now the most recent
    cache.get_or_load("c", loader("c", 4))  # 12 > 10: evicts b, the least recently used
    assert cache.keys() == ["a", "c"]
    assert "b" not in cache
    cache.get_or_load("huge", loader("huge", 50))  # alone over budget: kept, everything else evicted
    assert cache.keys() == ["huge"]
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.evictions, stats.bytes) == (1, 4, 3, 50)
    assert loads == ["a", "b", "c", "huge"]


def test_failed_load_caches_nothing_and_is_retried() -> None:
    cache: SessionCache[int] = SessionCache(max_bytes=10)
    attempts = []

    def failing() -> tuple[int, int]:
        attempts.append(1)
        raise RuntimeError("boom")

    for _ in range(2):
        with pytest.raises(RuntimeError):
            cache.get_or_load("k", failing)
    assert len(attempts) == 2
    assert cache.get_or_load("k", lambda: (7, 1)) == (7, False)


def test_versions_sharing_an_artifact_share_the_session() -> None:
    engine, store = engine_for(IRIS_BYTES)
    first = version_of(IRIS_BYTES, IRIS_SIGNATURE, number=1)
    copy = version_of(IRIS_BYTES, IRIS_SIGNATURE, model="iris-copy", number=4)
    assert engine.session(first) is engine.session(copy)
    assert store.reads == 1


# ------------------------------------------------------------------------------------------ metrics


def test_metrics_record_invocations_cache_and_loads() -> None:
    metrics = RecordingMetrics()
    engine, _ = engine_for(IRIS_BYTES, metrics=metrics)
    version = version_of(IRIS_BYTES, IRIS_SIGNATURE, number=3)
    request = request_of({"features": FEATURES})
    engine.infer(version, request)
    engine.infer(version, request)
    with pytest.raises(InvalidInput):
        engine.infer(version, request_of({"features": FEATURES[:, :3].copy()}))
    assert metrics.invocations == [("iris", 3, False)] * 3  # a rejected request is not a model error
    assert all(latency >= 0 for latency in metrics.latencies)
    assert metrics.caches == [("iris", 3, False), ("iris", 3, True), ("iris", 3, True)]
    assert len(metrics.loads) == 1 and metrics.loads[0][:2] == ("iris", 3) and metrics.loads[0][2] > 0


def test_storage_errors_count_as_errors() -> None:
    metrics = RecordingMetrics()
    engine = InferenceEngine(lambda v: b"changed", Limits(), metrics=metrics)
    with pytest.raises(StorageCorrupted):
        engine.infer(version_of(IRIS_BYTES, IRIS_SIGNATURE), request_of({"features": FEATURES}))
    assert metrics.invocations == [("iris", 1, True)]


# ------------------------------------------------------------------------------------ session options


def test_session_options_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAAS_ORT_THREADS", raising=False)
    # unset: onnxruntime's default (0) with every CPU allowed, else one thread per allowed CPU
    everything = set(os.sched_getaffinity(0))
    assert ort_threads() == (0 if len(everything) == os.cpu_count() else len(everything))
    if len(everything) > 1:
        try:
            os.sched_setaffinity(0, {min(everything)})
            assert ort_threads() == 1
        finally:
            os.sched_setaffinity(0, everything)
    monkeypatch.setenv("MAAS_ORT_THREADS", "0")
    assert ort_threads() == 0
    monkeypatch.setenv("MAAS_ORT_THREADS", "2")
    options = default_session_options()
    assert options.intra_op_num_threads == 2
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    monkeypatch.setenv("MAAS_ORT_THREADS", "many")
    with pytest.raises(ValueError, match="MAAS_ORT_THREADS"):
        InferenceEngine(lambda v: b"", Limits())


def test_custom_session_options_factory() -> None:
    made: list[ort.SessionOptions] = []

    def factory() -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        made.append(options)
        return options

    engine, _ = engine_for(IRIS_BYTES, session_options_factory=factory)
    session = engine.session(version_of(IRIS_BYTES, IRIS_SIGNATURE))
    assert len(made) == 1
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_shared_symbolic_dimensions_must_agree_before_running() -> None:
    data = build_model(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
    )
    signature = Signature(
        inputs=(TensorSpec(name="a", datatype="FP32", shape=(-1,)), TensorSpec(name="b", datatype="FP32", shape=(-1,))),
        outputs=(TensorSpec(name="y", datatype="FP32", shape=(-1,)),),
    )
    metrics = RecordingMetrics()
    engine, _ = engine_for(data, metrics=metrics)
    version = version_of(data, signature)
    ok = engine.infer(version, request_of({"a": np.ones(3, np.float32), "b": np.ones(3, np.float32)}))
    np.testing.assert_array_equal(ok[0][1], np.full(3, 2.0, np.float32))
    with pytest.raises(InvalidInput) as raised:
        engine.infer(version, request_of({"a": np.ones(2, np.float32), "b": np.ones(3, np.float32)}))
    assert "'N'" in raised.value.detail and "a[0]=2" in raised.value.detail
    assert [error for *_, error in metrics.invocations] == [False, False]  # a client error, not the model's


def test_an_input_the_model_refuses_is_a_client_error_not_a_failure() -> None:
    """onnxruntime's INVALID_ARGUMENT (a token id beyond the embedding table) once answered 500
    "Inference failed" and counted against the version: a canary of an identical model was rolled back."""
    data = build_model(
        [helper.make_node("Gather", ["table", "ids"], ["y"])],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.ones((10, 4), np.float32), "table")],
    )
    signature = Signature(
        inputs=(TensorSpec(name="ids", datatype="INT64", shape=(-1,)),),
        outputs=(TensorSpec(name="y", datatype="FP32", shape=(-1, 4)),),
    )
    metrics = RecordingMetrics()
    engine, _ = engine_for(data, metrics=metrics)
    version = version_of(data, signature, model="embed")
    assert engine.infer(version, request_of({"ids": np.array([3, 9])}))[0][1].shape == (2, 4)
    with pytest.raises(InputRejected) as info:
        engine.infer(version, request_of({"ids": np.array([3, 12])}), routed=False)
    assert info.value.status == 400 and "out of data bounds" in info.value.detail
    assert "embed" in info.value.detail and "/" not in info.value.detail
    assert [error for _, _, error in metrics.invocations] == [False, False]
    assert metrics.routed == [True, False]


def test_an_output_over_the_byte_cap_is_refused_before_it_is_encoded() -> None:
    """An outer product of a dynamic-length vector: n floats in, n*n out."""
    from maas.errors import OutputTooLarge
    from maas.settings import Limits

    data = build_model(
        [helper.make_node("Unsqueeze", ["x", "a1"], ["col"]), helper.make_node("Unsqueeze", ["x", "a0"], ["row"]),
         helper.make_node("Mul", ["col", "row"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "n"])],
        [numpy_helper.from_array(np.array([1], np.int64), "a1"),
         numpy_helper.from_array(np.array([0], np.int64), "a0")],
    )
    signature = Signature(inputs=(TensorSpec(name="x", datatype="FP32", shape=(-1,)),),
                          outputs=(TensorSpec(name="y", datatype="FP32", shape=(-1, -1)),))
    metrics = RecordingMetrics()
    engine, _ = engine_for(data, metrics=metrics, limits=Limits(max_output_bytes=1024 * 1024))
    version = version_of(data, signature, model="outer")
    assert engine.infer(version, request_of({"x": np.ones(100, np.float32)}))[0][1].shape == (100, 100)
    with pytest.raises(OutputTooLarge) as refused:  # 1000 x 1000 floats: 4 MB > 1 MiB
        engine.infer(version, request_of({"x": np.ones(1000, np.float32)}))
    assert refused.value.status == 422 and "max_output_bytes" in refused.value.detail
    assert [error for _, _, error in metrics.invocations] == [False, False]  # the request's, not the version's


def loop_model() -> bytes:
    """A Loop whose trip count is an input: the work is whatever the request asks for."""
    body = helper.make_graph(
        [helper.make_node("Add", ["v_in", "one"], ["v_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1])],
        initializer=[numpy_helper.from_array(np.ones(1, np.float32), "one")])
    return build_model(
        [helper.make_node("Loop", ["trips", "cond", "v0"], ["v"], body=body)],
        [helper.make_tensor_value_info("trips", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("v0", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.array(True), "cond")],
        name="loop",
    )


def test_a_run_past_its_deadline_is_stopped_and_the_engine_serves_on() -> None:
    """A Loop of 3e6 trips once held a server thread for 20 s; the deadline stops onnxruntime itself."""
    import time

    from maas.errors import InferenceTimeout
    from maas.settings import Limits

    data = loop_model()
    signature = Signature(inputs=(TensorSpec(name="trips", datatype="INT64", shape=(1,)),
                                  TensorSpec(name="v0", datatype="FP32", shape=(1,))),
                          outputs=(TensorSpec(name="v", datatype="FP32", shape=(1,)),))
    metrics = RecordingMetrics()
    engine, _ = engine_for(data, metrics=metrics, limits=Limits(max_inference_seconds=0.5))
    version = version_of(data, signature, model="loop")

    def run(trips: int) -> Any:
        return engine.infer(version, request_of({"trips": np.array([trips], np.int64),
                                                 "v0": np.zeros(1, np.float32)}))

    assert run(10)[0][1].tolist() == [10.0]
    started = time.monotonic()
    with pytest.raises(InferenceTimeout) as stopped:
        run(2_000_000_000)  # hours of work
    assert time.monotonic() - started < 5
    assert stopped.value.status == 504 and "max_inference_seconds" in stopped.value.detail
    assert run(3)[0][1].tolist() == [3.0]  # the same session serves the next request
    assert [error for _, _, error in metrics.invocations] == [False, True, False]
