"""Shared fixtures: a real local backend in a temp home, the real app, and helpers to push models."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from maas.api import create_app
from maas.backends.local import LocalBackend
from maas.examples import example_model_path
from maas.services.tokens import TokenService
from maas.settings import Limits, Settings

HOST = "127.0.0.1"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", limits=Limits(validation_timeout_s=60))


@pytest.fixture
def local_backend(settings: Settings) -> Iterator[LocalBackend]:
    local = LocalBackend(settings)
    yield local
    local.close()


@pytest.fixture(params=["local", "aws"])
def backend(request: pytest.FixtureRequest) -> Any:
    """The contract: every test that takes ``backend`` (or ``app`` / ``client``) runs against both
    the local backend and the AWS one under moto, so the two cannot drift."""
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.fixture
def admin_token(backend: Any) -> str:
    if isinstance(backend, LocalBackend):
        token, _ = backend.ensure_admin_token(None)
        assert token is not None
        return token
    _, secret = TokenService(backend.registry).create("admin", ["admin"], created_by="test")
    return secret


@pytest.fixture
def app(backend: Any, settings: Settings) -> Any:
    return create_app(backend, settings)


@pytest.fixture
def client(app: Any, admin_token: str) -> Iterator[TestClient]:
    with TestClient(app, base_url=f"http://{HOST}") as test_client:
        test_client.headers["Authorization"] = f"Bearer {admin_token}"
        yield test_client


@pytest.fixture
def example_bytes() -> bytes:
    return example_model_path().read_bytes()


def push(client: TestClient, name: str, data: bytes, *, create: bool = True,
         limits: dict[str, Any] | None = None) -> dict[str, Any]:
    """Create (if needed), reserve, upload and commit one version through the HTTP API."""
    if create:
        created = client.post("/models", json={"name": name})
        assert created.status_code in (201, 409), created.text
    plan: dict[str, Any] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if limits is not None:
        plan["limits"] = limits
    reserved = client.post(f"/models/{name}/versions", json=plan)
    assert reserved.status_code == 201, reserved.text
    target = reserved.json()
    # Through the API's upload route on both backends (on AWS it streams to S3); the presigned S3
    # URLs themselves are exercised against moto's server in test_s3_presigned.py.
    uploaded = client.put(f"/uploads/{target['upload']['upload_id']}", content=data,
                          headers={"Content-Type": "application/octet-stream"})
    assert uploaded.status_code == 200, uploaded.text
    version = target["version"]["version"]
    return client.post(f"/models/{name}/versions/{version}/commit",
                       json={"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}).json()


# --- AWS under moto ---------------------------------------------------------------------------------
TEST_BUCKET = "maas-test-models"
TEST_TABLE = "maas-test-registry"


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials and a region: nothing can reach real AWS from a test."""
    for variable, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(variable, value)
    for variable in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")


def _serialize_moto_dynamodb(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto's DynamoDB made atomic per request, as DynamoDB is (``infra.local.stack``): concurrency
    tests would otherwise test moto."""
    from infra.local.stack import serialize_moto_dynamodb

    serialize_moto_dynamodb(monkeypatch.setattr)


@pytest.fixture
def moto(aws_credentials: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """moto's in-process AWS with the bucket (versioned) and the table the stack creates."""
    import boto3
    from moto import mock_aws

    from maas.backends.aws.table import create_table

    _serialize_moto_dynamodb(monkeypatch)
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=TEST_BUCKET)
        s3.put_bucket_versioning(Bucket=TEST_BUCKET, VersioningConfiguration={"Status": "Enabled"})
        create_table(boto3.client("dynamodb"), TEST_TABLE)
        yield


@pytest.fixture
def aws_backend(moto: None, settings: Settings) -> Any:
    from maas.backends.aws import AwsBackend

    return AwsBackend(settings, bucket=TEST_BUCKET, table=TEST_TABLE)


def reserve(client: TestClient, name: str, data: bytes = b"placeholder") -> tuple[str, int]:
    """Reserve an upload for ``data`` (announcing its size and sha256, which S3 needs up front);
    returns the API upload path and the PENDING version number."""
    plan = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    reserved = client.post(f"/models/{name}/versions", json=plan)
    assert reserved.status_code == 201, reserved.text
    body = reserved.json()
    return f"/uploads/{body['upload']['upload_id']}", int(body["version"]["version"])


def break_artifact(backend: Any, version: dict[str, Any], *, lose: bool = False) -> None:
    """Damage a READY version's stored bytes behind maas's back: lost (``lose``) or corrupted.

    Locally the content-addressed blob is rewritten or unlinked. On S3 a recorded object version
    cannot change, so the damage is that version gone (permanently deleted) and, to corrupt, other
    bytes under the same key."""
    if isinstance(backend, LocalBackend):
        blob = next((backend.settings.home / "artifacts").rglob(version["sha256"]))
        blob.chmod(0o644)
        if lose:
            blob.unlink()
        else:
            blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
        return
    backend.s3.delete_object(Bucket=backend.bucket, Key=version["storage_key"],
                             VersionId=version["storage_version_id"])
    if not lose:
        backend.s3.put_object(Bucket=backend.bucket, Key=version["storage_key"], Body=b"not the model")


@pytest.fixture
def moto_percentiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto's GetMetricData with CloudWatch's percentiles (``infra.local.cloudwatch``)."""
    from infra.local.cloudwatch import with_percentiles

    with_percentiles(monkeypatch.setattr)
