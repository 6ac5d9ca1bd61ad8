"""Attack class 6: error messages that leak internals (Triton CVE-2025-23319: an error message handed
the attacker the shared-memory name that the rest of the exploit chain needed).

Many error paths are driven on both backends (malformed JSON, wrong types, forged cursors, missing
things, conflicts, models the validator refuses, inference with wrong shapes and dtypes, body-size
lies, text that is not Unicode) and, on AWS, every S3 and DynamoDB call failing the ways AWS fails
(AccessDenied whose message names the ARN and the bucket, throttles, 5xx, connection and read
timeouts). Every response the module's clients receive, errors or not, is audited by an httpx
response hook: no traceback, no filesystem path (store root, /tmp, site-packages, the repository),
no exception class names of the libraries underneath, and in errors no bucket or table name and no
ARN; errors are problem+json with type, title, status and detail. The inference Lambda is audited
the same way, including a container that failed to initialise."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import pickle
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from fastapi.testclient import TestClient
from onnx import ModelProto, StringStringEntryProto, TensorProto

from maas.api import create_app
from maas.backends.local import LocalBackend
from maas.services.tokens import TokenService
from maas.settings import Settings
from tests.conftest import HOST, TEST_BUCKET, TEST_TABLE, push
from tests.functions import REPO, LambdaContext, api_event, load_handler
from tests.models import InProcessValidator, scale_model
from tests.security.conftest import PROBLEM, registry_state

#: Never in any response: tracebacks, filesystem paths, library internals.
STATIC_LEAKS = ["Traceback", 'File "', "/tmp", "site-packages", "dist-packages", str(REPO), "botocore",
                "ClientError", "sqlite3", "OperationalError", "Errno", "pydantic_core", "onnxruntime.capi",
                "google.protobuf", "0x7f", "/usr/", "/home/", "/root"]
#: Never in an error: cloud resource names. (A successful version reservation on AWS hands out a
#: presigned S3 URL, which names the bucket by design: the client uploads there.)
RESOURCE_LEAKS = [TEST_BUCKET, TEST_TABLE, "arn:aws", "amazonaws.com", "123456789012", "REQ123"]


class Auditor:
    """Checks every response a client receives; collects what it saw for the summary asserts."""

    def __init__(self, secrets: list[str]):
        self.leaks = STATIC_LEAKS + [s for s in secrets if s]
        self.seen: list[int] = []

    def __call__(self, response: httpx.Response) -> None:
        response.read()
        self.check(response.status_code, dict(response.headers), response.content)

    def check(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.seen.append(status)
        text = body.decode("utf-8", "replace") + "\n" + "\n".join(f"{k}: {v}" for k, v in headers.items())
        for leak in self.leaks + (RESOURCE_LEAKS if status >= 400 else []):
            assert leak.lower() not in text.lower(), f"response {status} leaks {leak!r}: {text[:2000]}"
        if status >= 400:
            content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
            assert content_type.startswith(PROBLEM), (status, content_type, text[:500])
            problem = json.loads(body)
            assert {"type", "title", "status", "detail"} <= set(problem) and problem["status"] == status, problem


@pytest.fixture
def audited(app: Any, admin_token: str, settings: Settings, tmp_path: Path) -> Iterator[tuple[TestClient, Auditor]]:
    """An admin client over each backend whose every response is audited."""
    auditor = Auditor([str(settings.home), str(tmp_path), str(Path.home())])
    with TestClient(app, base_url=f"http://{HOST}") as client:
        client.event_hooks["response"].append(auditor)
        client.headers["Authorization"] = f"Bearer {admin_token}"
        yield client, auditor


def cursor(*value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(value)).encode()).rstrip(b"=").decode()


def json_request(client: TestClient, method: str, url: str, raw: bytes | str) -> httpx.Response:
    content = raw.encode() if isinstance(raw, str) else raw
    response: httpx.Response = client.request(method, url, content=content,
                                              headers={"Content-Type": "application/json"})
    return response


def test_client_errors(audited: tuple[TestClient, Auditor]) -> None:
    client, auditor = audited
    push(client, "m", scale_model(2.0))
    assert client.post("/models/m/deployments", json={"version": 1}).status_code == 201
    raws: list[str | bytes] = [
                "{", "[", "null", '{"name": "x",}', "\xff", b"\xff\xfe{", '"x"', "1e999", '{"name": "a"}{}',
                '{"name": "' + "a" * 100 + '"}', '{"name": 1}', '{"name": ["a"]}', '{"name": null}',
                '{"name": "x", "tags": "t"}', '{"name": "x", "tags": {"a": 1}}', '{"name": "x", "tags": [1]}',
                '{"name": "x", "description": {"$ref": "/etc/passwd"}}', '{"name": "\\u0000"}',
                '{"__proto__": {}, "name": "x"}', '{"name": "x", "name": "../y"}']
    for raw in raws:
        answer = json_request(client, "POST", "/models", raw)
        assert 400 <= answer.status_code < 500, (raw, answer.text)
    for raw in ['{"size": -1}', '{"sha256": "zz"}', '{"size": "big"}', '{"part_size": 1.5}', '{"part_sha256": "x"}']:
        assert 400 <= json_request(client, "POST", "/models/m/versions", raw).status_code < 500
    for raw in ['{"version": "abc"}', '{"version": 1.5}', '{"version": -1}', '{"version": [1]}', "{}",
                '{"version": 1, "strategy": "yolo"}', '{"version": 1, "canary_percent": 1000}',
                '{"version": 1, "thresholds": {"max_error_rate": "x"}}', '{"version": 1, "target": "../x"}',
                '{"version": 99999}', '{"version": "ghost-alias"}']:
        assert 400 <= json_request(client, "POST", "/models/m/deployments", raw).status_code < 500, raw
    for query in ["limit=abc", "limit=0", "limit=100000", "cursor=!!!", "cursor=" + "a" * 600,
                  "cursor=" + cursor("models", {"a": 1}), "cursor=" + cursor("models", "../../etc"),
                  "cursor=" + cursor("versions", 10**30), "cursor=" + cursor("models", None),
                  "cursor=" + cursor("deployments", -1), "cursor=" + cursor("x", 1, 2)]:
        for path in ["/models", "/models/m/versions", "/models/m/deployments"]:
            answer = client.get(f"{path}?{query}")
            assert answer.status_code in (200, 422), (path, query, answer.text)
    assert client.request("PATCH", "/models/m", json={}).status_code == 405
    assert client.get("/no/such/route").status_code == 404
    assert client.post("/models", content=b"{}", headers={"Content-Type": "application/json",
                                                         "Content-Length": "1000000000000"}).status_code == 413
    assert client.post("/models", content=b"{}", headers={"Content-Type": "application/json",
                                                         "Content-Length": "nope"}).status_code == 400
    # Deeply nested JSON: a recursion limit is an input error, not a crash (the JSON body rules
    # of the API are pydantic's and the infer codec's).
    for depth in (5_000, 100_000):
        assert 400 <= json_request(client, "POST", "/models", "[" * depth + "]" * depth).status_code < 500
    assert auditor.seen and max(auditor.seen) < 500, auditor.seen
    inference_errors(client)
    assert max(auditor.seen) < 500, auditor.seen


#: (method, url, JSON text with a lone surrogate escape, the field the refusal must name)
SURROGATES = [
    ("POST", "/models", '{"name": "s1", "description": "\\ud800"}', "description"),
    ("POST", "/models", '{"name": "s2", "tags": {"team": "\\udfff"}}', "tags"),
    ("POST", "/models/m/versions", '{"description": "x\\ud800"}', "description"),
    ("POST", "/models/m/versions", '{"part_sha256": ["\\ud800"]}', "part_sha256"),
    ("POST", "/tokens", '{"name": "\\ud800", "scopes": ["invoke"]}', "name"),
    ("POST", "/tokens", '{"name": "t", "scopes": ["\\ud800"]}', "scopes"),
    ("POST", "/models/m/deployments", '{"version": "\\ud800"}', "version"),
    ("POST", "/models/m/deployments", '{"version": 1, "strategy": "\\ud800"}', "strategy"),
    ("POST", "/models/m/deployments", '{"version": 1, "target": "\\ud800"}', "target"),
]


def test_text_that_is_not_unicode_is_refused(audited: tuple[TestClient, Auditor], backend: Any) -> None:
    """JSON can escape a lone surrogate; Python keeps it in a ``str`` that UTF-8 cannot encode. Stored,
    it made every later answer that includes it fail: one ``POST /models`` with such a tag value broke
    ``GET /models`` for everyone (a 500 on every list). Now each is a 422 naming the field."""
    client, _ = audited
    assert client.post("/models", json={"name": "m"}).status_code == 201
    before = registry_state(backend)
    for method, url, raw, field in SURROGATES:
        answer = json_request(client, method, url, raw)
        assert answer.status_code == 422, (url, raw, answer.text)
        assert answer.json()["field"] == field, answer.json()
        assert "Unicode" in answer.json()["detail"]
    assert registry_state(backend) == before
    assert client.get("/models").status_code == 200
    assert client.get("/tokens").status_code == 200


def inference_errors(client: TestClient) -> None:
    """Inputs that do not fit the signature, binary bodies whose header lies, unknown models."""
    good = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    bodies: list[Any] = [
        {"inputs": [good | {"shape": [1, 5]}]}, {"inputs": [good | {"shape": [4]}]},
        {"inputs": [good | {"shape": [2, 4]}]}, {"inputs": [good | {"datatype": "INT64"}]},
        {"inputs": [good | {"datatype": "BYTES", "data": ["/etc/passwd"] * 4}]},
        {"inputs": [good | {"name": "../x"}]}, {"inputs": [good, good]}, {"inputs": []}, {},
        {"inputs": [good | {"data": ["a", "b", "c", "d"]}]},
        {"inputs": [good | {"shape": [-1, 4]}]}, {"inputs": [good | {"shape": [10**12, 10**12]}]},
        {"inputs": [good], "outputs": [{"name": "nope"}]}, {"inputs": "x"}, [good],
        {"inputs": [good | {"data": [[1, 2], [3]]}]}, {"inputs": [good | {"parameters": {"binary_data_size": 99}}]},
    ]
    for body in bodies:
        answer = client.post("/v2/models/m/infer", json=body)
        assert 400 <= answer.status_code < 500, (body, answer.text)
    header = json.dumps({"inputs": [good | {"parameters": {"binary_data_size": 16}}]}).encode()
    del_data = header.replace(b',"data":[1,2,3,4]', b"")
    for length, payload in [("5", del_data), (str(len(del_data)), del_data + b"\x00" * 3), ("-1", del_data),
                            ("999999", del_data), ("x", del_data), (str(len(del_data)), del_data + b"\x00" * 17)]:
        answer = client.post("/v2/models/m/infer", content=payload, headers={
            "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": length})
        assert 400 <= answer.status_code < 500, (length, answer.text)
    for url in ["/v2/models/ghost/infer", "/v2/models/m/versions/9/infer", "/v2/models/m/versions/nope/infer"]:
        assert client.post(url, json={"inputs": [good]}).status_code in (404, 422)


def test_not_found_conflicts_and_bad_models(audited: tuple[TestClient, Auditor], backend: Any) -> None:
    client, auditor = audited
    push(client, "m", scale_model(2.0))
    assert client.put("/models/m/aliases/champion", json={"version": 1}).status_code == 200
    assert client.post("/models/m/deployments", json={"version": 1}).status_code == 201
    for method, url in [("GET", "/models/ghost"), ("GET", "/models/m/versions/7"), ("GET", "/deployments/" + "a" * 32),
                        ("DELETE", "/tokens/" + "a" * 16), ("GET", "/models/m/aliases/nope"),
                        ("PUT", "/uploads/" + "a" * 32), ("POST", "/models/ghost/rollback"),
                        ("POST", "/models/m/versions/7/optimize")]:
        headers = {"Content-Type": "application/octet-stream"} if url.startswith("/uploads/") else {}
        answer = client.request(method, url, content=b"x" if headers else None, headers=headers)
        assert answer.status_code in (404, 409, 422), (url, answer.text)
    assert client.post("/models", json={"name": "m"}).status_code == 409
    assert client.delete("/models/m/versions/1").status_code == 409
    assert client.delete("/models/m").status_code == 409
    assert client.post("/models/m/rollback").status_code in (404, 409)
    # The validator (a child process) is the same on both backends: its whole corpus runs once.
    for data in bad_models() if isinstance(backend, LocalBackend) else bad_models()[:2]:
        committed = upload_and_commit(client, "m", data)
        assert committed.status_code in (409, 422), committed.text
        version = client.get("/models/m/versions", params={"limit": 1}).json()["items"][0]
        assert version["status"] in ("FAILED", "PENDING"), version
    mismatch = upload_and_commit(client, "m", scale_model(3.0), sha256="0" * 64)
    assert 400 <= mismatch.status_code < 500
    assert max(auditor.seen) < 500, auditor.seen


def bad_models() -> list[bytes]:
    """Uploads the validator refuses, each with a message the user needs (and nothing more)."""
    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (print, ("pwned",))

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("../../etc/cron.d/x", "* * * * * root id")
    external = ModelProto()
    external.ParseFromString(scale_model(4.0))
    tensor = external.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.extend([StringStringEntryProto(key="location", value="../../../../etc/passwd")])
    truncated = scale_model(5.0)[:-7]
    return [b"not a model", pickle.dumps(Payload()), archive.getvalue(), external.SerializeToString(), truncated,
            b"\x08\x07" + b"\xff" * 64]


def upload_and_commit(client: TestClient, name: str, data: bytes, *, sha256: str | None = None) -> httpx.Response:
    digest = hashlib.sha256(data).hexdigest()
    reserved = client.post(f"/models/{name}/versions", json={"size": len(data), "sha256": digest})
    assert reserved.status_code == 201, reserved.text
    upload = reserved.json()["upload"]["upload_id"]
    assert client.put(f"/uploads/{upload}", content=data,
                      headers={"Content-Type": "application/octet-stream"}).status_code == 200
    version = reserved.json()["version"]["version"]
    committed: httpx.Response = client.post(f"/models/{name}/versions/{version}/commit",
                                            json={"sha256": sha256 or digest, "size": len(data)})
    return committed


# --- AWS failing the ways AWS fails ------------------------------------------------------------------

ARN_MESSAGE = (f"User: arn:aws:sts::123456789012:assumed-role/maas-api/fn is not authorized to perform: "
               f"s3:GetObject on resource: arn:aws:s3:::{TEST_BUCKET}/models/m/1 and table "
               f"arn:aws:dynamodb:us-east-1:123456789012:table/{TEST_TABLE}")


def client_error(code: str, status: int) -> Callable[..., None]:
    def fail(**kwargs: Any) -> None:
        raise ClientError({"Error": {"Code": code, "Message": ARN_MESSAGE, "BucketName": TEST_BUCKET},
                           "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": "REQ123"}},
                          str(kwargs.get("model", "op")))
    return fail


def connection_error(**kwargs: Any) -> None:
    raise EndpointConnectionError(endpoint_url=f"https://{TEST_BUCKET}.s3.us-east-1.amazonaws.com/models")


def read_timeout(**kwargs: Any) -> None:
    raise ReadTimeoutError(endpoint_url=f"https://dynamodb.us-east-1.amazonaws.com/{TEST_TABLE}")


FAULTS: dict[str, Callable[..., None]] = {
    "access-denied": client_error("AccessDenied", 403),
    "throttled": client_error("ProvisionedThroughputExceededException", 400),
    "internal": client_error("InternalError", 500),
    "no-such-bucket": client_error("NoSuchBucket", 404),
    "resource-not-found": client_error("ResourceNotFoundException", 400),
    "connection": connection_error,
    "read-timeout": read_timeout,
}


@pytest.fixture
def fast_aws_backend(moto: None, settings: Settings) -> Any:
    """The AWS backend with the in-process validator (the sandboxed one is tested elsewhere; here it
    would only add a child process per push)."""
    from maas.backends.aws import AwsBackend

    return AwsBackend(settings, bucket=TEST_BUCKET, table=TEST_TABLE, validator=InProcessValidator(settings))


@pytest.mark.parametrize("service", ["s3", "dynamodb"])
def test_aws_outages_leak_nothing(fast_aws_backend: Any, settings: Settings, tmp_path: Path, service: str) -> None:
    """Every call to one service fails (injected in botocore before the request is sent, so the
    adapters' own error handling runs): answers are 4xx/5xx problems that name no resource."""
    aws_backend = fast_aws_backend
    app = create_app(aws_backend, settings)
    auditor = Auditor([str(settings.home), str(tmp_path)])
    with TestClient(app, base_url=f"http://{HOST}") as client:
        client.event_hooks["response"].append(auditor)
        client.headers["Authorization"] = f"Bearer {aws_admin(aws_backend)}"
        push(client, "m", scale_model(2.0))
        assert client.post("/models/m/deployments", json={"version": 1}).status_code == 201
        upload_path = client.post("/models/m/versions", json={
            "size": 4, "sha256": hashlib.sha256(b"abcd").hexdigest()}).json()["upload"]["upload_id"]
        infer = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        boto_client = getattr(aws_backend, service)
        for name, fault in FAULTS.items():
            boto_client.meta.events.register(f"before-call.{service}", fault, unique_id="fault")
            try:
                answers = [
                    client.get("/models"), client.get("/models/m"), client.get("/models/m/versions/1"),
                    client.post("/models", json={"name": f"n-{name}"}),
                    client.post("/models/m/versions", json={"size": 4, "sha256": "0" * 64}),
                    client.put(f"/uploads/{upload_path}", content=b"abcd",
                               headers={"Content-Type": "application/octet-stream"}),
                    client.post("/models/m/versions/1/commit", json={"sha256": "0" * 64, "size": 1}),
                    client.post("/v2/models/m/infer", json=infer), client.get("/v2/models/m/ready"),
                    client.put("/models/m/aliases/a", json={"version": 1}),
                    client.post("/models/m/deployments", json={"version": 1}),
                    client.post("/models/m/rollback"), client.get("/tokens"),
                    client.delete("/models/m/versions/1"),
                ]
            finally:
                boto_client.meta.events.unregister(f"before-call.{service}", unique_id="fault")
            failed = [a.status_code for a in answers if a.status_code >= 400]
            assert failed, (name, [a.status_code for a in answers])
            assert all(a.status_code != 500 or a.json()["type"].endswith("/internal") for a in answers)
    assert any(status >= 500 for status in auditor.seen)


def test_a_missing_bucket_is_an_outage_not_a_missing_upload(fast_aws_backend: Any, settings: Settings) -> None:
    with TestClient(create_app(fast_aws_backend, settings), base_url=f"http://{HOST}") as client:
        client.headers["Authorization"] = f"Bearer {aws_admin(fast_aws_backend)}"
        assert client.post("/models", json={"name": "m"}).status_code == 201
        upload = client.post("/models/m/versions", json={
            "size": 4, "sha256": hashlib.sha256(b"abcd").hexdigest()}).json()["upload"]["upload_id"]
        fast_aws_backend.s3.meta.events.register("before-call.s3", FAULTS["no-such-bucket"], unique_id="fault")
        answer = client.put(f"/uploads/{upload}", content=b"abcd", headers={"Content-Type": "application/octet-stream"})
        assert answer.status_code == 503, answer.text


# --- the inference Lambda ----------------------------------------------------------------------------


def aws_admin(backend: Any) -> str:
    return str(TokenService(backend.registry).create("admin", ["admin"])[1])


@pytest.fixture
def inference_fn(fast_aws_backend: Any, settings: Settings, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, str]:
    """The inference Lambda over a deployed model, and an admin token for it."""
    admin_token = aws_admin(fast_aws_backend)
    with TestClient(create_app(fast_aws_backend, settings), base_url=f"http://{HOST}") as client:
        client.headers["Authorization"] = f"Bearer {admin_token}"
        push(client, "iris", scale_model(2.0))
        assert client.post("/models/iris/deployments", json={"version": 1}).status_code == 201
    for name, value in {"MAAS_BUCKET": TEST_BUCKET, "MAAS_TABLE": TEST_TABLE, "MAAS_HOME": str(settings.home),
                        "MAAS_ARTIFACT_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    return load_handler("inference", "maas_fn_inference_hygiene"), admin_token


def test_inference_lambda_errors_leak_nothing(inference_fn: tuple[ModuleType, str], settings: Settings,
                                              tmp_path: Path) -> None:
    function, admin_token = inference_fn
    auditor = Auditor([str(settings.home), str(tmp_path)])
    good = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}

    def call(path: str, body: bytes, method: str = "POST", **headers: str | None) -> int:
        event = api_event("v2_http_json_infer_prod", token=admin_token, body=body, path=path, method=method,
                          headers=dict(headers))
        raw = function.handler(event, LambdaContext())
        payload = base64.b64decode(raw["body"]) if raw["isBase64Encoded"] else raw["body"].encode()
        auditor.check(raw["statusCode"], raw["headers"], payload)
        return int(raw["statusCode"])

    for body in [b"{", b"[" * 50_000, json.dumps({"inputs": [good | {"shape": [9]}]}).encode(),
                 json.dumps({"inputs": [good | {"datatype": "BYTES"}]}).encode()]:
        assert 400 <= call("/v2/models/iris/infer", body) < 500, body[:20]
    assert call("/v2/models/ghost/infer", json.dumps({"inputs": [good]}).encode()) == 404
    assert call("/v2/models/..%2f..%2fetc/infer", b"{}") in (404, 422)
    assert call("/v2/models/iris/infer", b"{}", **{"Inference-Header-Content-Length": "99"}) >= 400
    assert call("/v2/models/iris/infer", b"x", **{"Content-Type": "text/plain"}) == 415
    assert call("/v2/models/iris/infer", json.dumps({"inputs": [good]}).encode()) == 200
    # The registry fails under it: a 5xx problem naming nothing.
    backend = function.function.backend
    for fault in FAULTS.values():
        for boto_client in (backend.s3, backend.dynamodb):
            boto_client.meta.events.register("before-call", fault, unique_id="fault")
        try:
            status = call("/v2/models/other/infer", json.dumps({"inputs": [good]}).encode())
        finally:
            for boto_client in (backend.s3, backend.dynamodb):
                boto_client.meta.events.unregister("before-call", unique_id="fault")
        assert status in (429, 503), (fault, status)


def test_a_lambda_that_cannot_start_says_nothing_about_why(inference_fn: tuple[ModuleType, str], settings: Settings,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A misconfigured container (here a cache size that is not a number, with a path in the message
    of the exception) answers a generic 500 problem: the reason goes to the logs only."""
    _, admin_token = inference_fn
    monkeypatch.setenv("MAAS_ARTIFACT_CACHE_BYTES", f"{tmp_path}/not-a-number")
    broken = load_handler("inference", "maas_fn_inference_broken")
    assert broken.function is None
    auditor = Auditor([str(settings.home), str(tmp_path), "MAAS_ARTIFACT_CACHE_BYTES", "not-a-number"])
    event = api_event("v2_http_json_infer_prod", token=admin_token, body=b"{}", path="/v2/models/iris/infer")
    raw = broken.handler(event, LambdaContext())
    auditor.check(raw["statusCode"], raw["headers"], raw["body"].encode())
    assert raw["statusCode"] == 500
