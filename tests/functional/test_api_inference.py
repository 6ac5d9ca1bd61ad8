"""OIP v2 over the real app: JSON and binary tensors, metadata, readiness, errors, metrics."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient

from maas.examples import EXAMPLE_REQUEST, example_model_path
from tests.conftest import TEST_BUCKET, break_artifact, push, reserve
from tests.functional.test_api_models import assert_problem
from tests.models import failing_model

FEATURES = np.array(EXAMPLE_REQUEST["inputs"][0]["data"], dtype=np.float32)


@pytest.fixture
def deployed(client: TestClient, example_bytes: bytes) -> TestClient:
    push(client, "iris", example_bytes)
    assert client.post("/models/iris/deployments", json={"version": 1}).status_code == 201
    return client


def raw(example_bytes: bytes, features: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(example_bytes).run(None, {"features": features})


def test_json_inference_equals_raw_onnxruntime(deployed: TestClient, example_bytes: bytes) -> None:
    response = deployed.post("/v2/models/iris/infer", json=EXAMPLE_REQUEST | {"id": "req-1"})
    assert response.status_code == 200, response.text
    assert response.headers["X-Maas-Model-Version"] == "1"
    body = response.json()
    assert body["model_name"] == "iris" and body["model_version"] == "1" and body["id"] == "req-1"
    expected = dict(zip(["probabilities", "label"], raw(example_bytes, FEATURES), strict=True))
    for output in body["outputs"]:
        want = expected[output["name"]]
        assert output["shape"] == list(want.shape)
        got = np.array(output["data"], dtype=want.dtype).reshape(want.shape)
        np.testing.assert_array_equal(got, want)
    assert [o["datatype"] for o in body["outputs"]] == ["FP32", "INT64"]


def test_requested_outputs_only(deployed: TestClient) -> None:
    response = deployed.post("/v2/models/iris/infer", json=EXAMPLE_REQUEST | {"outputs": [{"name": "label"}]})
    assert [o["name"] for o in response.json()["outputs"]] == ["label"]
    assert_problem(deployed.post("/v2/models/iris/infer", json=EXAMPLE_REQUEST | {"outputs": [{"name": "nope"}]}),
                   422)


def test_binary_extension_round_trip_with_tritonclient_codec(deployed: TestClient, example_bytes: bytes) -> None:
    features = np.random.default_rng(7).normal(5, 2, size=(16, 4)).astype(np.float32)
    tensor = triton.InferInput("features", list(features.shape), "FP32")
    tensor.set_data_from_numpy(features, binary_data=True)
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=True),
               triton.InferRequestedOutput("label", binary_data=True)]
    body, json_size = triton.InferenceServerClient.generate_request_body([tensor], outputs=outputs)
    response = deployed.post("/v2/models/iris/infer", content=body, headers={
        "Inference-Header-Content-Length": str(json_size), "Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    header_length = int(response.headers["Inference-Header-Content-Length"])
    result = triton.InferenceServerClient.parse_response_body(response.content, header_length=header_length)
    probabilities, label = raw(example_bytes, features)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    np.testing.assert_array_equal(result.as_numpy("label"), label)


def test_input_checks_name_the_field(deployed: TestClient) -> None:
    def infer(inputs: list[dict]) -> dict:  # type: ignore[type-arg]
        return assert_problem(deployed.post("/v2/models/iris/infer", json={"inputs": inputs}), 422)

    good = EXAMPLE_REQUEST["inputs"][0]
    assert "features" in infer([good | {"datatype": "INT64", "data": [[1, 2, 3, 4], [1, 2, 3, 4]]}])["detail"]
    assert "features" in infer([good | {"shape": [2, 2, 2], "data": [1] * 8}])["detail"]
    assert "features" in infer([good | {"shape": [1, 5], "data": [1] * 5}])["detail"]
    assert infer([good | {"name": "other"}])
    assert infer([good | {"shape": [2, 4], "data": [1, 2, 3]}])
    assert infer([good | {"datatype": "FP128"}])
    assert infer([])
    assert_problem(deployed.post("/v2/models/iris/infer", content=b"{not json",
                                 headers={"Content-Type": "application/json"}), 400)
    assert_problem(deployed.post("/v2/models/iris/infer", content=b"x",
                                 headers={"Content-Type": "text/plain"}), 415)


def test_inference_errors(client: TestClient, example_bytes: bytes) -> None:
    assert_problem(client.post("/v2/models/ghost/infer", json=EXAMPLE_REQUEST), 404)
    push(client, "iris", example_bytes)
    assert_problem(client.post("/v2/models/iris/infer", json=EXAMPLE_REQUEST), 404)  # not deployed
    assert client.post("/v2/models/iris/versions/1/infer", json=EXAMPLE_REQUEST).status_code == 200
    assert_problem(client.post("/v2/models/iris/versions/7/infer", json=EXAMPLE_REQUEST), 404)
    assert_problem(client.post("/v2/models/iris/versions/no-alias/infer", json=EXAMPLE_REQUEST), 404)
    assert_problem(client.post("/v2/models/iris/versions/BAD/infer", json=EXAMPLE_REQUEST), 422, "version")
    assert client.post("/v2/models/iris/versions/..%2f/infer", json=EXAMPLE_REQUEST).status_code in (404, 422)
    reserve(client, "iris")  # v2 PENDING
    assert_problem(client.post("/v2/models/iris/versions/2/infer", json=EXAMPLE_REQUEST), 409)
    big = EXAMPLE_REQUEST["inputs"][0] | {"shape": [400_000, 4], "data": [[1.0, 2.0, 3.0, 4.0]] * 400_000}
    assert_problem(client.post("/v2/models/iris/versions/1/infer", json={"inputs": [big]}), 413)


def test_runtime_failure_is_a_clean_problem(client: TestClient) -> None:
    push(client, "fragile", failing_model())
    ok = client.post("/v2/models/fragile/versions/1/infer",
                     json={"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]})
    assert ok.json()["outputs"][0]["data"] == [2.0, 4.0]
    failed = client.post("/v2/models/fragile/versions/1/infer",
                         json={"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]})
    body = assert_problem(failed, 500)
    assert "onnxruntime_src" not in failed.text and "Traceback" not in failed.text
    assert body["title"] == "Inference failed"


def test_metadata_and_readiness(deployed: TestClient) -> None:
    meta = deployed.get("/v2/models/iris").json()
    assert meta["name"] == "iris" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    assert deployed.get("/v2/models/iris/versions/1").json()["outputs"][1]["datatype"] == "INT64"
    assert deployed.get("/v2/models/iris/ready").json() == {"name": "iris", "ready": True}
    assert deployed.get("/v2/models/iris/versions/1/ready").status_code == 200
    assert deployed.get("/v2/models/ghost/ready").status_code == 404
    assert deployed.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    assert deployed.get("/v2/health/live").json() == {"live": True}
    assert deployed.get("/v2/health/ready").json() == {"ready": True}


def test_prometheus_metrics_per_model_and_version(deployed: TestClient) -> None:
    push(deployed, "fragile", failing_model())
    failed = deployed.post("/v2/models/fragile/versions/1/infer",
                           json={"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]})
    assert failed.status_code == 500
    for _ in range(3):
        deployed.post("/v2/models/iris/infer", json=EXAMPLE_REQUEST)
    text = deployed.get("/metrics").text
    assert 'maas_invocations_total{model="iris",version="1"} 3.0' in text
    assert 'maas_model_latency_seconds_count{model="iris",version="1"} 3.0' in text
    assert 'maas_cache_hits_total{model="iris",version="1"}' in text
    assert 'maas_model_load_seconds_count{model="iris",version="1"}' in text
    assert 'maas_errors_total{model="fragile",version="1"} 1.0' in text
    # every series of a version that served exists from its first request on (rate() needs the zero)
    assert 'maas_errors_total{model="iris",version="1"} 0.0' in text


def test_lost_artifact_is_a_storage_fault_without_internals(client: TestClient, backend) -> None:  # type: ignore[no-untyped-def]
    version = push(client, "iris", example_model_path().read_bytes())
    break_artifact(backend, version, lose=True)
    response = client.post("/v2/models/iris/versions/1/infer", json=EXAMPLE_REQUEST)
    body = assert_problem(response, 500)
    assert body["title"] == "Stored artifact is corrupted"
    assert str(backend.settings.home) not in response.text and "Traceback" not in response.text
    assert TEST_BUCKET not in response.text and "s3://" not in response.text


def gather_model() -> bytes:
    """An embedding lookup: ids index a 10-row table (an id of 10 or more is the caller's mistake)."""
    from onnx import TensorProto, helper, numpy_helper

    from tests.models import _serialize

    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"])], "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=[numpy_helper.from_array(np.ones((10, 4), np.float32), "table")])
    return _serialize(graph)


def test_an_input_the_model_refuses_is_a_400_and_no_error_of_the_version(client: TestClient) -> None:
    push(client, "embed", gather_model())
    assert client.post("/models/embed/deployments", json={"version": 1}).status_code == 201

    def ids(*values: int) -> dict[str, object]:
        return {"inputs": [{"name": "ids", "shape": [len(values)], "datatype": "INT64", "data": list(values)}]}

    assert client.post("/v2/models/embed/infer", json=ids(1, 9)).status_code == 200
    refused = client.post("/v2/models/embed/infer", json=ids(1, 12))
    body = assert_problem(refused, 400)
    assert body["title"] == "Input rejected by the model" and "out of data bounds" in body["detail"]
    metrics = client.get("/metrics").text
    assert 'maas_errors_total{model="embed",version="1"} 0.0' in metrics


def test_an_invoke_token_may_name_live_versions_only(client: TestClient, example_bytes: bytes) -> None:
    push(client, "iris", example_bytes)
    push(client, "iris", example_bytes, create=False)
    assert client.post("/models/iris/deployments", json={"version": 1}).status_code == 201
    app_token = client.post("/tokens", json={"name": "app", "scopes": ["invoke"]}).json()["token"]
    deployer = client.post("/tokens", json={"name": "ci", "scopes": ["deploy"]}).json()["token"]

    def infer(path: str, token: str) -> object:
        return client.post(path, json=EXAMPLE_REQUEST, headers={"Authorization": f"Bearer {token}"})

    assert infer("/v2/models/iris/versions/1/infer", app_token).status_code == 200  # live
    refused = infer("/v2/models/iris/versions/2/infer", app_token)
    assert "not live" in assert_problem(refused, 403)["detail"]
    answer = infer("/v2/models/iris/versions/2/infer", deployer)
    assert answer.status_code == 200 and answer.headers["X-Maas-Model-Version"] == "2"
