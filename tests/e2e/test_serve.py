"""End to end: `maas serve` in a subprocess on 127.0.0.1, driven by the CLI, the SDK, tritonclient.http
and KServe's v2 REST client. Predictions must equal raw onnxruntime on the same inputs."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton

from maas.client import Client, MaasClientError
from maas.examples import EXAMPLE_REQUEST, example_model_path
from tests.e2e.conftest import Server
from tests.models import scale_model

pytestmark = pytest.mark.e2e
FEATURES = np.array(EXAMPLE_REQUEST["inputs"][0]["data"], dtype=np.float32)


def raw_iris(features: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(str(example_model_path())).run(None, {"features": features})


def test_first_start_creates_a_private_admin_token(server: Server) -> None:
    token_file = server.home / "admin-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert server.token.startswith("maas_")
    assert server.token in server.log.read_text()


def test_cli_push_deploy_predict_rollback(server: Server, tmp_path: Path) -> None:
    pushed = server.cli("models", "push", "iris", str(example_model_path()))
    assert "READY" in pushed.stdout and "features" in pushed.stdout
    v1, v2 = tmp_path / "v1.onnx", tmp_path / "v2.onnx"
    v1.write_bytes(scale_model(1.0))
    v2.write_bytes(scale_model(10.0))
    server.cli("models", "push", "scaler", str(v1))
    server.cli("models", "push", "scaler", str(v2))
    assert "2" in server.cli("versions", "scaler").stdout
    server.cli("deploy", "scaler", "1")
    server.cli("deploy", "scaler", "2")
    request = json.dumps({"x": [[1, 2, 3, 4]]})
    answered = json.loads(server.cli("--json", "predict", "scaler", "--data", request).stdout)
    assert answered["model_version"] == "2" and answered["outputs"][0]["data"] == [10, 20, 30, 40]
    server.cli("rollback", "scaler")
    answered = json.loads(server.cli("--json", "predict", "scaler", "--data", request).stdout)
    assert answered["model_version"] == "1" and answered["outputs"][0]["data"] == [1, 2, 3, 4]
    status = server.cli("status", "scaler").stdout
    assert "ROLLED_BACK" in status
    server.cli("alias", "set", "scaler", "champion", "2")
    request_file = tmp_path / "request.json"
    request_file.write_text(json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                                    "data": [1, 1, 1, 1]}]}))
    by_alias = json.loads(server.cli("--json", "predict", "scaler", "--data", f"@{request_file}",
                                     "--version", "champion").stdout)
    assert by_alias["model_version"] == "2"
    missing = server.cli("deploy", "scaler", "99", check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "99" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_sdk_and_iris_prediction_equal_raw_onnxruntime(server: Server) -> None:
    with Client(server.url, server.token) as client:
        try:
            client.create_model("iris-sdk")
        except MaasClientError as error:
            assert error.status == 409
        version = client.push("iris-sdk", example_model_path())
        client.deploy("iris-sdk", version["version"])
        response = client.predict("iris-sdk", {"features": FEATURES})
    probabilities, label = raw_iris(FEATURES)
    outputs = {o["name"]: o for o in response["outputs"]}
    np.testing.assert_array_equal(np.array(outputs["probabilities"]["data"], np.float32).reshape(2, 3),
                                  probabilities)
    assert outputs["label"]["data"] == label.tolist()


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_http_unchanged(server: Server, binary: bool) -> None:
    with Client(server.url, server.token) as client:
        if not any(m["name"] == "iris-triton" for m in client.list_models()):
            client.push("iris-triton", example_model_path())
            client.deploy("iris-triton", 1)
    auth = {"Authorization": f"Bearer {server.token}"}
    triton_client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        assert triton_client.is_server_live()
        assert triton_client.is_model_ready("iris-triton", headers=auth)
        metadata = triton_client.get_model_metadata("iris-triton", headers=auth)
        assert metadata["inputs"][0]["name"] == "features"
        features = np.random.default_rng(3).normal(5, 2, size=(8, 4)).astype(np.float32)
        tensor = triton.InferInput("features", list(features.shape), "FP32")
        tensor.set_data_from_numpy(features, binary_data=binary)
        outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label")]
        result = triton_client.infer("iris-triton", [tensor], outputs=outputs, headers=auth)
    finally:
        triton_client.close()
    probabilities, label = raw_iris(features)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    assert result.get_response()["model_version"] == "1"


def test_kserve_v2_rest_client_unchanged(server: Server) -> None:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    with Client(server.url, server.token) as client:
        if not any(m["name"] == "iris-kserve" for m in client.list_models()):
            client.push("iris-kserve", example_model_path())
            client.deploy("iris-kserve", 1)

    async def run() -> object:
        rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
        try:
            tensor = InferInput(name="features", shape=list(FEATURES.shape), datatype="FP32")
            tensor.set_data_from_numpy(FEATURES, binary_data=False)
            request = InferRequest(model_name="iris-kserve", infer_inputs=[tensor])
            return await rest.infer(server.url, request, model_name="iris-kserve",
                                    headers={"Authorization": f"Bearer {server.token}"})
        finally:
            await rest.close()

    response = asyncio.run(run())
    probabilities, label = raw_iris(FEATURES)
    outputs = {o.name: o for o in response.outputs}  # type: ignore[attr-defined]
    np.testing.assert_array_equal(outputs["probabilities"].as_numpy(), probabilities)
    np.testing.assert_array_equal(outputs["label"].as_numpy(), label)


def test_foreign_host_header_is_refused(server: Server) -> None:
    import httpx

    response = httpx.get(f"{server.url}/v2/health/live", headers={"Host": "attacker.example"})
    assert response.status_code == 403
    assert httpx.get(f"{server.url}/v2/health/live", headers={"Host": f"localhost:{server.port}"}).status_code == 200
