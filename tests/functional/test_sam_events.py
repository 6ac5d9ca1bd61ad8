"""The Lambda handlers fed with events that `sam local generate-event apigateway ...` produces (the
shapes API Gateway sends and `sam local invoke` replays), under moto.

aws-sam-cli lives in its own virtual environment (it pins an old boto3): ``make sam`` creates
``.venv-sam``, and ``make install-dev`` runs it, so CI always has it. ``MAAS_SAM`` points elsewhere."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import pytest

from maas.backends.aws import AwsBackend
from maas.domain import UploadPlan
from maas.examples import EXAMPLE_REQUEST, example_model_path
from maas.services.deployments import DeploymentService
from maas.services.models import ModelService
from maas.services.tokens import TokenService
from maas.settings import Settings
from tests.conftest import TEST_BUCKET, TEST_TABLE
from tests.functions import REPO, LambdaContext, load_handler
from tests.models import InProcessValidator

SAM = Path(os.environ.get("MAAS_SAM") or REPO / ".venv-sam" / "bin" / "sam")
IRIS = example_model_path().read_bytes()


def sam_event(kind: str, *args: str) -> dict[str, Any]:
    assert SAM.exists(), f"aws-sam-cli not found at {SAM}: run `make sam` (or set MAAS_SAM)"
    completed = subprocess.run([str(SAM), "local", "generate-event", "apigateway", kind, *args],
                               capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr
    event: dict[str, Any] = json.loads(completed.stdout)
    return event


def with_token(event: dict[str, Any], token: str) -> dict[str, Any]:
    """What a client adds: the bearer token (REST events also carry multi-value headers)."""
    event["headers"] = {**(event.get("headers") or {}), "Authorization": f"Bearer {token}"}
    if "multiValueHeaders" in event:
        event["multiValueHeaders"] = {**(event["multiValueHeaders"] or {}), "Authorization": [f"Bearer {token}"]}
    return event


@pytest.fixture
def stack_world(moto: None, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """iris version 1 deployed in the moto stack, and two tokens: invoke and admin."""
    for name, value in {"MAAS_BUCKET": TEST_BUCKET, "MAAS_TABLE": TEST_TABLE, "MAAS_HOME": str(settings.home),
                        "MAAS_ARTIFACT_CACHE_DIR": str(tmp_path / "artifact-cache")}.items():
        monkeypatch.setenv(name, value)
    backend = AwsBackend(settings, bucket=TEST_BUCKET, table=TEST_TABLE,
                         validator=InProcessValidator(settings.limits))
    models = ModelService(backend.registry, backend.artifacts, backend.validator, settings.limits)
    models.create_model("iris")
    plan = UploadPlan(size=len(IRIS), sha256=hashlib.sha256(IRIS).hexdigest())
    pending = models.begin_version("iris", plan=plan)
    backend.artifacts.receive_upload(pending.upload.upload_id, io.BytesIO(IRIS), len(IRIS))
    models.commit_version("iris", 1, sha256=plan.sha256 or "", size=len(IRIS))
    DeploymentService(backend.registry, models).deploy("iris", 1)
    tokens = TokenService(backend.registry)
    return {"invoke": tokens.create("app", ["invoke"])[1], "admin": tokens.create("ops", ["admin"])[1]}


def respond(module: ModuleType, event: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    raw = module.handler(event, LambdaContext())
    return raw["statusCode"], json.loads(raw["body"])


def expected_iris() -> dict[str, Any]:
    features = np.array(EXAMPLE_REQUEST["inputs"][0]["data"], dtype=np.float32).reshape(
        EXAMPLE_REQUEST["inputs"][0]["shape"])
    names = [output.name for output in ort.InferenceSession(IRIS).get_outputs()]
    return dict(zip(names, ort.InferenceSession(IRIS).run(None, {"features": features}), strict=True))


def assert_iris_answer(body: dict[str, Any]) -> None:
    assert body["model_name"] == "iris" and body["model_version"] == "1"
    outputs = {output["name"]: np.array(output["data"]).reshape(output["shape"]) for output in body["outputs"]}
    for name, value in expected_iris().items():
        np.testing.assert_allclose(outputs[name], value, rtol=1e-6)


@pytest.mark.parametrize("stage", ["dev", "prod"])
def test_rest_proxy_event_infers(stack_world: dict[str, str], stage: str) -> None:
    event = sam_event("aws-proxy", "--method", "POST", "--stage", stage, "--resource", "/v2/{proxy+}",
                      "--path", "v2/models/iris/infer", "--body", orjson.dumps(EXAMPLE_REQUEST).decode())
    status, body = respond(load_handler("inference"), with_token(event, stack_world["invoke"]))
    assert status == 200, body
    assert_iris_answer(body)


def test_http_api_event_infers(stack_world: dict[str, str]) -> None:
    event = sam_event("http-api-proxy", "--method", "POST", "--stage", "$default",
                      "--path", "v2/models/iris/infer", "--body", orjson.dumps(EXAMPLE_REQUEST).decode())
    status, body = respond(load_handler("inference"), with_token(event, stack_world["invoke"]))
    assert status == 200, body
    assert_iris_answer(body)


def test_rest_proxy_event_without_a_token_is_refused(stack_world: dict[str, str]) -> None:
    event = sam_event("aws-proxy", "--method", "POST", "--stage", "dev", "--resource", "/v2/{proxy+}",
                      "--path", "v2/models/iris/infer", "--body", orjson.dumps(EXAMPLE_REQUEST).decode())
    status, body = respond(load_handler("inference"), event)
    assert status == 401 and body["title"] == "Unauthorized"


def test_management_api_event(stack_world: dict[str, str]) -> None:
    event = sam_event("aws-proxy", "--method", "GET", "--stage", "dev", "--resource", "/{proxy+}",
                      "--path", "models", "--body", "")
    event["body"] = None
    event["queryStringParameters"] = event["multiValueQueryStringParameters"] = None
    status, body = respond(load_handler("api"), with_token(event, stack_world["admin"]))
    assert status == 200, body
    assert [model["name"] for model in body["items"]] == ["iris"]


def test_authorizer_event(stack_world: dict[str, str]) -> None:
    module = load_handler("authorizer")
    event = sam_event("authorizer", "--stage", "dev", "--method", "POST", "--resource", "v2/models/iris/infer")
    api = event["methodArn"].split("/")[0]
    assert api.startswith("arn:aws:execute-api:") and event["methodArn"].endswith("/dev/POST/v2/models/iris/infer")
    event["authorizationToken"] = f"Bearer {stack_world['invoke']}"
    answer = module.handler(event, LambdaContext())
    (statement,) = answer["policyDocument"]["Statement"]
    # the whole API and stage: API Gateway caches the answer per token and reuses it for every route
    assert statement == {"Action": "execute-api:Invoke", "Effect": "Allow", "Resource": f"{api}/dev/*/*"}
    assert answer["context"]["scopes"] == "invoke" and answer["principalId"] == answer["context"]["tokenId"]

    for bad in ("Bearer maas_" + "x" * 43, "", "Basic abc"):
        event["authorizationToken"] = bad
        with pytest.raises(Exception, match=r"^Unauthorized$"):
            module.handler(event, LambdaContext())


def test_image_pool_serves_the_same_routes_under_its_prefix(stack_world: dict[str, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The container-image pool is mounted at /image on the shared API (infra/api.py); the handler strips
    its MAAS_POOL_PATH so the routes are those of every pool."""
    monkeypatch.setenv("MAAS_POOL_PATH", "/image")
    event = sam_event("aws-proxy", "--method", "POST", "--stage", "dev", "--resource", "/image/v2/{proxy+}",
                      "--path", "image/v2/models/iris/infer", "--body", orjson.dumps(EXAMPLE_REQUEST).decode())
    image_pool = load_handler("inference", "maas_fn_inference_image")
    status, body = respond(image_pool, with_token(event, stack_world["invoke"]))
    assert status == 200, body
    assert_iris_answer(body)
    # without the prefix setting, /image/... is not a route
    monkeypatch.delenv("MAAS_POOL_PATH")
    status, _ = respond(load_handler("inference", "maas_fn_inference_zip"), with_token(event, stack_world["invoke"]))
    assert status == 404
