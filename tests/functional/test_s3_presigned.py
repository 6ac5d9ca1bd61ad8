"""Presigned S3 uploads over real HTTP, against moto's server on 127.0.0.1: what a client does with
the URLs S3ArtifactStore hands out, and ``Client.push`` end to end through the maas API on the AWS
backend (S3 + DynamoDB on the same moto server).

What moto 5.2.5 enforces here (asserted below, so a moto upgrade that changes it shows up):
- it does NOT verify ``x-amz-checksum-sha256`` on a presigned PUT or part: other bytes than the
  signed checksum are accepted (real S3 answers 400 BadDigest). maas does not depend on it: the commit
  hashes the bytes it validates and ``promote`` proves the sha256 of the copy, so such bytes are
  refused at commit time instead of at upload time.
- it does not verify presigned signatures or their expiry either.
- it stores no checksum for a presigned PUT, and a composite one (sha256 of the part sha256s, without
  S3's ``-<parts>`` suffix) for a multipart object: the store hashes a download instead.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx
import numpy as np
import pytest
import uvicorn
from botocore.config import Config

from maas.backends.aws.artifacts import S3ArtifactStore, full_object_sha256
from maas.backends.aws.table import create_table
from maas.client import Client
from maas.client.client import MaasClientError
from maas.domain import UploadPlan
from maas.errors import Conflict
from maas.examples import EXAMPLE_REQUEST, example_model_path
from maas.settings import Limits, Settings
from tests.conftest import TEST_BUCKET, TEST_TABLE
from tests.models import large_model

MiB = 1024 * 1024
PART = 5 * MiB  # S3's smallest part


@dataclass
class Moto:
    url: str

    def client(self, service: str) -> Any:
        return boto3.client(service, endpoint_url=self.url, config=Config(signature_version="s3v4"))


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{server._server.server_port}"  # type: ignore[union-attr]
    finally:
        server.stop()


@pytest.fixture
def moto(moto_server: str, aws_credentials: None) -> Moto:
    """A clean moto server with the versioned bucket."""
    httpx.post(f"{moto_server}/moto-api/reset").raise_for_status()
    emulator = Moto(moto_server)
    s3 = emulator.client("s3")
    s3.create_bucket(Bucket=TEST_BUCKET)
    s3.put_bucket_versioning(Bucket=TEST_BUCKET, VersioningConfiguration={"Status": "Enabled"})
    return emulator


@pytest.fixture
def store(moto: Moto, tmp_path: Path) -> S3ArtifactStore:
    return S3ArtifactStore(moto.client("s3"), TEST_BUCKET, Limits(), tmp_dir=tmp_path / "s3-tmp")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def multipart_plan(data: bytes) -> UploadPlan:
    parts = tuple(sha(data[i:i + PART]) for i in range(0, len(data), PART))
    return UploadPlan(size=len(data), sha256=sha(data), part_size=PART, part_sha256=parts)


def put(url: str, data: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.put(url, content=data, headers=headers, timeout=30)


def test_presigned_put_signs_the_checksum_and_round_trips(store: S3ArtifactStore) -> None:
    data = os.urandom(300_000)
    target = store.create_upload("m", plan=UploadPlan(size=len(data), sha256=sha(data)))
    assert target.url is not None and target.parts == ()
    query = parse_qs(urlsplit(target.url).query)
    signed = set(query["X-Amz-SignedHeaders"][0].split(";"))
    # The client must send exactly the signed headers (moto does not check signatures; S3 does).
    assert signed == {"host", "x-amz-checksum-sha256", "content-type"}
    assert {name.lower() for name in target.headers} == signed - {"host"}
    response = put(target.url, data, target.headers)
    assert response.status_code == 200, response.text
    staged = store.inspect_upload(target.upload_id)
    assert (staged.size, staged.sha256) == (len(data), sha(data))
    with store.staged_path(target.upload_id) as path:
        assert path.read_bytes() == data
    artifact = store.promote(target.upload_id, "m", 1, staged.sha256)
    assert store.read(artifact) == data
    store.discard_upload(target.upload_id)
    assert list(store.list_uploads()) == []


def test_presigned_multipart_upload_is_completed_and_hashed(store: S3ArtifactStore) -> None:
    data = os.urandom(2 * PART + 4321)
    target = store.create_upload("m", plan=multipart_plan(data))
    assert target.url is None and target.part_size == PART and len(target.parts) == 3
    for part in target.parts:
        signed = set(parse_qs(urlsplit(part.url).query)["X-Amz-SignedHeaders"][0].split(";"))
        assert signed == {"host", "x-amz-checksum-sha256"} == {"host", *(name.lower() for name in part.headers)}
        chunk = data[(part.number - 1) * PART:part.number * PART]
        response = put(part.url, chunk, part.headers)
        assert response.status_code == 200, response.text
    staged = store.inspect_upload(target.upload_id)  # completes the multipart upload
    assert (staged.size, staged.sha256) == (len(data), sha(data))
    head = store.client.head_object(Bucket=TEST_BUCKET, Key=f"uploads/{target.upload_id}/model.onnx",
                                    ChecksumMode="ENABLED")
    assert full_object_sha256(head) is None  # composite or absent: never mistaken for the sha256
    artifact = store.promote(target.upload_id, "m", 1, staged.sha256)
    assert store.read(artifact) == data and artifact.size == len(data)


def test_bytes_other_than_the_plan_are_refused_at_commit(store: S3ArtifactStore) -> None:
    planned, sent = os.urandom(1000), os.urandom(1000)
    target = store.create_upload("m", plan=UploadPlan(size=len(planned), sha256=sha(planned)))
    assert target.url is not None
    response = put(target.url, sent, target.headers)
    # Real S3 refuses this PUT (400 BadDigest: the body does not match the signed checksum);
    # moto accepts it, so the commit-time checks are what stops it here.
    assert response.status_code == 200
    staged = store.inspect_upload(target.upload_id)
    assert staged.sha256 == sha(sent) != sha(planned)  # ModelService.commit answers ChecksumMismatch
    with pytest.raises(Conflict):
        store.promote(target.upload_id, "m", 1, sha(planned))
    assert list(store.list_artifacts()) == []


# --- Client.push through the maas API on the AWS backend ------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def api(moto: Moto, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The maas API on the AWS backend (moto server), served by uvicorn on 127.0.0.1."""
    from maas.api import create_app
    from maas.backends.aws import AwsBackend
    from maas.services.tokens import TokenService

    create_table(moto.client("dynamodb"), TEST_TABLE)
    settings = Settings(home=tmp_path / "home", limits=Limits(validation_timeout_s=60))
    backend = AwsBackend(settings, bucket=TEST_BUCKET, table=TEST_TABLE, endpoint_url=moto.url)
    _, secret = TokenService(backend.registry).create("admin", ["admin"], created_by="test")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(backend, settings), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", secret
    finally:
        server.should_exit = True
        thread.join(10)


def big_model(path: Path, factor: float = 2.0) -> bytes:
    """A valid ONNX model over 5 MiB, written to ``path`` (see ``tests.models.large_model``)."""
    data = large_model(factor)
    path.write_bytes(data)
    return data


class Recording(httpx.HTTPTransport):
    """Every request the SDK makes: (method, url, whether it carried the maas token)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, bool]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, str(request.url), "authorization" in request.headers))
        return super().handle_request(request)


def test_client_push_single_and_multipart_end_to_end(api: tuple[str, str], moto: Moto, tmp_path: Path) -> None:
    url, token = api
    transport = Recording()
    with Client(url, token=token, transport=transport) as client:
        example = example_model_path()
        seen: list[tuple[int, int]] = []
        version = client.push("iris", example, progress=lambda sent, total: seen.append((sent, total)))
        assert (version["status"], version["sha256"]) == ("READY", sha(example.read_bytes()))
        assert seen[0] == (0, example.stat().st_size) and seen[-1][0] == example.stat().st_size
        answer = client.predict("iris", EXAMPLE_REQUEST, version=version["version"])
        assert answer["outputs"]
        to_s3 = [(method, target, auth) for method, target, auth in transport.seen if target.startswith(moto.url)]
        assert [(method, auth) for method, _, auth in to_s3] == [("PUT", False)]  # the token stays home
        assert "X-Amz-Signature=" in to_s3[0][1]
        transport.seen.clear()

        data = big_model(tmp_path / "big.onnx")
        assert len(data) > PART
        seen.clear()
        big = client.push("big", tmp_path / "big.onnx", part_size=PART,
                          progress=lambda sent, total: seen.append((sent, total)))
        assert (big["status"], big["sha256"], big["size"]) == ("READY", sha(data), len(data))
        assert seen[-1] == (len(data), len(data)) and seen == sorted(seen)
        to_s3 = [(method, target, auth) for method, target, auth in transport.seen if target.startswith(moto.url)]
        assert [(method, auth) for method, _, auth in to_s3] == [("PUT", False), ("PUT", False)]
        assert ["partNumber=1" in to_s3[0][1], "partNumber=2" in to_s3[1][1]] == [True, True]
        answer = client.predict("big", {"x": [[1.0, 2.0, 3.0, 4.0]]}, version=big["version"])
        assert answer["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0]

        with pytest.raises(MaasClientError) as info:  # S3 multipart rules are checked up front
            client.push("big", tmp_path / "big.onnx", part_size=MiB)
        assert info.value.status == 422 and info.value.field == "part_size"
        with pytest.raises(MaasClientError) as info:  # S3 needs the plan to sign the checksum
            client.create_version("big")
        assert info.value.status == 422 and info.value.field == "sha256"

        # Other bytes than announced: moto stores them (S3 would not), the commit refuses them.
        planned = example.read_bytes()
        pending = client.create_version("iris", size=len(planned), sha256=sha(planned))
        upload = pending["upload"]
        assert put(upload["url"], planned[::-1], upload["headers"]).status_code == 200
        with pytest.raises(MaasClientError) as info:
            client.commit_version("iris", pending["version"]["version"], sha(planned), len(planned))
        assert info.value.status == 422 and info.value.title == "Checksum mismatch"
        assert client.get_version("iris", pending["version"]["version"])["status"] == "PENDING"
        client.delete_version("iris", pending["version"]["version"])

    s3 = moto.client("s3")
    keys = sorted(v["Key"] for v in s3.list_object_versions(Bucket=TEST_BUCKET).get("Versions", []))
    assert keys[:2] == ["models/big/1/model.onnx", "models/iris/1/model.onnx"]  # committed uploads are gone
    assert len(keys) == 4 and all(key.startswith("uploads/") for key in keys[2:])  # the refused one (cleanup's)
    assert s3.list_multipart_uploads(Bucket=TEST_BUCKET).get("Uploads", []) == []


def test_cli_style_push_through_the_api_lambda_is_served_by_the_inference_lambda(
        moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole AWS path with real HTTP where a client uses it: the API Lambda (Mangum) hands out a
    presigned multipart upload, the parts go to S3 over HTTP exactly as ``Client.push`` sends them,
    the API Lambda commits and deploys, and the inference Lambda (another container) serves it."""
    import base64
    import json

    import orjson

    from tests.functions import LambdaContext, api_event, load_handler

    create_table(moto.client("dynamodb"), TEST_TABLE)
    for name, value in {"MAAS_BUCKET": TEST_BUCKET, "MAAS_TABLE": TEST_TABLE, "MAAS_AWS_ENDPOINT_URL": moto.url,
                        "MAAS_HOME": str(tmp_path / "home"),
                        "MAAS_ARTIFACT_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    api = load_handler("api", "maas_fn_api_presigned")
    from maas.services.tokens import TokenService

    admin = TokenService(api.backend.registry).create("operator", ["admin"])[1]

    def management(method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        event = api_event("v2_http_json_infer_prod", token=admin, body=orjson.dumps(body), path=path,
                          method=method)
        answer = api.handler(event, LambdaContext(function_name="maas-api"))
        assert answer["statusCode"] in (200, 201), answer["body"]
        payload = base64.b64decode(answer["body"]) if answer["isBase64Encoded"] else answer["body"]
        result: dict[str, Any] = json.loads(payload)
        return result

    data = big_model(tmp_path / "big.onnx", factor=3.0)
    plan = multipart_plan(data)
    management("POST", "/models", {"name": "big"})
    created = management("POST", "/models/big/versions", {
        "size": plan.size, "sha256": plan.sha256, "part_size": plan.part_size, "part_sha256": list(plan.part_sha256)})
    target = created["upload"]
    assert target["url"] is None and len(target["parts"]) == len(plan.part_sha256) == 2
    for part in target["parts"]:
        start = (part["number"] - 1) * PART
        assert put(part["url"], data[start:start + PART], part["headers"]).status_code == 200
    version = created["version"]["version"]
    committed = management("POST", f"/models/big/versions/{version}/commit", {"sha256": plan.sha256,
                                                                               "size": plan.size})
    assert committed["status"] == "READY" and committed["sha256"] == plan.sha256
    assert management("POST", "/models/big/deployments", {"version": version})["status"] == "SUCCEEDED"
    invoke = management("POST", "/tokens", {"name": "app", "scopes": ["invoke"]})["token"]

    inference = load_handler("inference", "maas_fn_inference_presigned")
    features = np.arange(4, dtype=np.float32).reshape(1, 4)
    request = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": features.ravel().tolist()}]}
    answer = inference.handler(api_event("v2_http_json_infer_default", model="big", token=invoke,
                                         body=orjson.dumps(request)), LambdaContext())
    assert answer["statusCode"] == 200, answer["body"]
    outputs = json.loads(answer["body"])["outputs"]
    expected = ort_run(data, features)
    np.testing.assert_allclose(np.array(outputs[0]["data"], dtype=np.float32).reshape(expected.shape), expected)


def ort_run(model: bytes, features: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model)
    result: np.ndarray = session.run(None, {session.get_inputs()[0].name: features})[0]
    return result
