"""The management API Lambda (functions/api/handler.py: the FastAPI app behind Mangum) over the AWS
backend under moto, fed recorded API Gateway events (REST v1 and HTTP API v2, named and default
stages, JSON and binary bodies, missing and bad tokens). The last test pushes a version through this
handler and has the inference Lambda serve it."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest

from maas.examples import EXAMPLE_REQUEST, example_model_path
from maas.services.tokens import TokenService
from maas.settings import Settings
from tests.conftest import TEST_BUCKET, TEST_TABLE
from tests.functional.test_inference_handler import (
    BINARY_FIXTURES,
    FEATURES,
    JSON_FIXTURES,
    assert_json_outputs,
    emf_documents,
)
from tests.functions import LambdaContext, api_event, load_handler

IRIS = example_model_path().read_bytes()
PROBLEM = "application/problem+json"


@pytest.fixture
def api(moto: None, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    for name, value in {"MAAS_BUCKET": TEST_BUCKET, "MAAS_TABLE": TEST_TABLE, "MAAS_HOME": str(settings.home),
                        "MAAS_ARTIFACT_CACHE_DIR": str(tmp_path / "artifact-cache")}.items():
        monkeypatch.setenv(name, value)
    return load_handler("api")


@pytest.fixture
def admin(api: ModuleType) -> str:
    return TokenService(api.backend.registry).create("operator", ["admin"])[1]


def call(module: ModuleType, fixture: str, method: str, path: str, token: str | None, *, body: Any = None,
         content_type: str = "application/json", binary: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request through the handler; returns status, lower-cased headers and the raw body.
    A query string in ``path`` goes where API Gateway puts it (v2 ``rawQueryString``, v1 parameters)."""
    path, _, query = path.partition("?")
    raw = binary if binary is not None else b"" if body is None else orjson.dumps(body)
    event = api_event(fixture, token=token, body=raw, path=path, method=method,
                      headers={"Content-Type": content_type if raw else None,
                               "Authorization": None if token is None else f"Bearer {token}"})
    if query and event.get("version") == "2.0":
        event["rawQueryString"] = query
    elif query:
        event["queryStringParameters"] = dict(part.split("=", 1) for part in query.split("&"))
    if binary is not None and not event.get("isBase64Encoded"):
        event["body"], event["isBase64Encoded"] = base64.b64encode(raw).decode("ascii"), True
    answer = module.handler(event, LambdaContext(function_name="maas-api"))
    payload = answer.get("body") or ""
    data = base64.b64decode(payload) if answer.get("isBase64Encoded") else payload.encode()
    return answer["statusCode"], {k.lower(): v for k, v in answer["headers"].items()}, data


def test_every_event_shape_and_stage_reaches_the_routes(api: ModuleType, admin: str) -> None:
    fixtures = JSON_FIXTURES + BINARY_FIXTURES
    for index, fixture in enumerate(fixtures):
        status, headers, body = call(api, fixture, "POST", "/models", admin, body={"name": f"m{index}"})
        assert status == 201, (fixture, body)
        assert json.loads(body)["name"] == f"m{index}"
        assert headers["x-request-id"]  # API Gateway's request id, echoed for support
    status, _, body = call(api, "v1_rest_json_infer_prod", "GET", "/models", admin)
    assert status == 200
    assert [m["name"] for m in json.loads(body)["items"]] == sorted(f"m{i}" for i in range(len(fixtures)))


def test_named_stage_prefix_is_stripped_only_where_api_gateway_adds_it(api: ModuleType, admin: str) -> None:
    assert api.base_path(api_event("v2_http_json_infer_prod", path="/models")) == "/prod"
    assert api.base_path(api_event("v2_http_json_infer_default", path="/models")) == "/"
    assert api.base_path(api_event("v1_rest_json_infer_prod", path="/models")) == "/"  # v1 path has no stage
    event = api_event("v1_rest_json_infer_prod", path="/models")
    event["path"] = "/prod/models"  # a custom-domain base path mapping keeps it
    assert api.base_path(event) == "/prod"
    assert call(api, "v2_http_json_infer_prod", "GET", "/models", admin)[0] == 200


def test_missing_and_invalid_tokens_are_401_problems(api: ModuleType, admin: str) -> None:
    for fixture in ("v1_rest_missing_auth_prod", "v2_http_json_infer_prod"):
        status, headers, body = call(api, fixture, "POST", "/models", None, body={"name": "x"})
        assert status == 401 and headers["content-type"] == PROBLEM, body
    status, headers, body = call(api, "v2_http_bad_auth_prod", "GET", "/models", "maas_not-a-real-token")
    assert status == 401 and headers["content-type"] == PROBLEM
    assert call(api, "v2_http_json_infer_prod", "GET", "/models", admin)[0] == 200
    invoke = TokenService(api.backend.registry).create("reader", ["invoke"])[1]
    status, _, body = call(api, "v2_http_json_infer_prod", "POST", "/models", invoke, body={"name": "x"})
    assert status == 403, body
    problem = json.loads(body)
    assert TEST_BUCKET not in body.decode() and TEST_TABLE not in body.decode() and "arn:" not in problem["detail"]


def test_bad_input_is_a_problem_naming_the_field_and_changes_nothing(api: ModuleType, admin: str) -> None:
    status, headers, body = call(api, "v2_http_json_infer_prod", "POST", "/models", admin, body={"name": "Bad!"})
    assert status == 422 and headers["content-type"] == PROBLEM
    assert json.loads(body)["field"] == "name"
    status, _, body = call(api, "v2_http_json_infer_prod", "POST", "/models", admin, body={"name": "m"},
                           content_type="text/plain")
    assert status == 415, body
    assert json.loads(call(api, "v2_http_json_infer_prod", "GET", "/models", admin)[2])["items"] == []


def test_version_pushed_through_the_api_handler_is_served_by_the_inference_handler(
        api: ModuleType, admin: str, capsys: pytest.CaptureFixture[str]) -> None:
    v2, v1 = "v2_http_json_infer_prod", "v1_rest_binary_infer_prod"
    assert call(api, v2, "POST", "/models", admin, body={"name": "iris"})[0] == 201
    digest = hashlib.sha256(IRIS).hexdigest()
    status, _, body = call(api, v2, "POST", "/models/iris/versions", admin,
                           body={"size": len(IRIS), "sha256": digest})
    assert status == 201, body
    created = json.loads(body)
    target = created["upload"]
    assert target["url"].startswith("https://") and "X-Amz-Signature" in target["url"]  # presigned S3 PUT
    assert target["headers"]["x-amz-checksum-sha256"] == base64.b64encode(bytes.fromhex(digest)).decode()
    # The bytes go to S3 through the API's upload route here (in-process moto cannot take the HTTP PUT
    # to the presigned URL; test_s3_presigned.py does that against moto's server), as a binary event.
    status, _, body = call(api, v1, "PUT", f"/uploads/{target['upload_id']}", admin, binary=IRIS,
                           content_type="application/octet-stream")
    assert status == 200, body
    assert json.loads(body)["sha256"] == digest
    version = created["version"]["version"]
    status, _, body = call(api, v2, "POST", f"/models/iris/versions/{version}/commit", admin,
                           body={"sha256": digest, "size": len(IRIS)})
    assert status == 200, body
    committed = json.loads(body)
    assert committed["status"] == "READY" and committed["storage_version_id"]
    status, _, body = call(api, v2, "POST", "/models/iris/deployments", admin, body={"version": version})
    assert status == 201 and json.loads(body)["status"] == "SUCCEEDED", body
    invoke = json.loads(call(api, v2, "POST", "/tokens", admin, body={"name": "app", "scopes": ["invoke"]})[2])

    # The management API answers inference too (same FastAPI routes) ...
    status, headers, body = call(api, v2, "POST", "/v2/models/iris/infer", invoke["token"],
                                 body=EXAMPLE_REQUEST)
    assert status == 200 and headers["x-maas-model-version"] == "1", body
    assert_json_outputs(json.loads(body), FEATURES)
    documents = emf_documents(capsys.readouterr().out)
    names = {m["Name"] for d in documents for directive in d["_aws"]["CloudWatchMetrics"]
             for m in directive["Metrics"]}
    assert {"Invocations", "ModelLatency", "CacheHit", "ModelLoadTime"} <= names
    assert any(d.get("model") == "iris" and d.get("version") == "1" for d in documents)

    # ... and the lean inference function, a separate container, serves the pushed version.
    inference = load_handler("inference")
    answer = inference.handler(api_event("v2_http_json_infer_default", token=invoke["token"],
                                         body=orjson.dumps(EXAMPLE_REQUEST)), LambdaContext())
    assert answer["statusCode"] == 200, answer["body"]
    assert answer["headers"]["X-Maas-Model-Version"] == "1"
    result = json.loads(answer["body"])
    assert_json_outputs(result, FEATURES)
    probabilities = np.array(result["outputs"][0]["data"]).reshape(result["outputs"][0]["shape"])
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(("code", "status"), [("ProvisionedThroughputExceededException", 429),
                                             ("ThrottlingException", 429), ("InternalServerError", 503)])
def test_aws_throttles_and_outages_are_429_or_503_with_retry_after(
        api: ModuleType, admin: str, code: str, status: int) -> None:
    def fail(**_: Any) -> tuple[Any, dict[str, Any]]:
        return SimpleNamespace(status_code=400 if status == 429 else 500, headers={}), {
            "Error": {"Code": code, "Message": "injected"},
            "ResponseMetadata": {"HTTPStatusCode": 400 if status == 429 else 500}}

    assert call(api, "v2_http_json_infer_prod", "GET", "/models", admin)[0] == 200  # token cached
    api.backend.dynamodb.meta.events.register("before-call.dynamodb.PutItem", fail)
    try:
        answer, headers, body = call(api, "v2_http_json_infer_prod", "POST", "/models", admin, body={"name": "m"})
    finally:
        api.backend.dynamodb.meta.events.unregister("before-call.dynamodb.PutItem", fail)
    assert answer == status and headers["content-type"] == PROBLEM, body
    assert int(headers["retry-after"]) >= 1
    assert "Traceback" not in body.decode() and TEST_TABLE not in body.decode()


def test_response_over_lambdas_limit_is_a_clear_413(api: ModuleType, admin: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for index in range(3):
        call(api, "v2_http_json_infer_prod", "POST", "/models", admin, body={"name": f"m{index}",
                                                                             "description": "d" * 500})
    full = call(api, "v2_http_json_infer_prod", "GET", "/models", admin)
    monkeypatch.setattr(api, "MAX_RESPONSE_BYTES", len(full[2]) - 1)  # a page just over the limit
    status, headers, body = call(api, "v2_http_json_infer_prod", "GET", "/models", admin)
    assert status == 413 and headers["content-type"] == PROBLEM and headers["x-request-id"]
    assert "limit" in json.loads(body)["detail"]
    assert call(api, "v2_http_json_infer_prod", "GET", "/models?limit=1", admin)[0] == 200


def test_the_import_path_loads_no_model_runtime(tmp_path: Path) -> None:
    """The API function never runs a model on AWS (the inference function does): importing its handler,
    in a fresh interpreter as a cold start would, loads neither onnxruntime nor onnx (issue 7: each costs
    tens of ms on every cold start); the optimize route imports them on its first call."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('handler', sys.argv[1]); "
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
            "print(sorted(m for m in ('onnxruntime', 'onnx', 'fastapi', 'mangum') if m in sys.modules))")
    env = {**os.environ, "MAAS_BUCKET": TEST_BUCKET, "MAAS_TABLE": TEST_TABLE, "MAAS_HOME": str(tmp_path / "home"),
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "PYTHONPATH": str(repo / "layers" / "runtime")}
    done = subprocess.run([sys.executable, "-c", code, str(repo / "functions" / "api" / "handler.py")], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["['fastapi',", "'mangum']"]
