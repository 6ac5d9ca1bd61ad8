"""Fault injection on AWS: the S3 or DynamoDB call number k of register / deploy / rollback / delete
fails (a ``ClientError``, as a crash or an outage would make it), then DESIGN.md's invariants are
checked, cleanup runs, and the same store keeps working. Every k, both services."""

from __future__ import annotations

import contextlib
import hashlib
import io
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.exceptions import ClientError

from maas.backends.aws import AwsBackend
from maas.backends.aws.table import create_table
from maas.errors import Conflict, NotFound, Throttled, Unavailable
from maas.services.cleanup import CleanupService
from maas.services.deployments import DeploymentService
from maas.services.invariants import check_invariants
from maas.services.models import MIN_PART_BYTES, ModelService
from maas.settings import Settings
from tests.models import InProcessValidator, large_model, scale_model

LARGE = large_model(3.0)
NOT_CALLS = {"meta", "exceptions", "generate_presigned_url", "can_paginate", "get_waiter"}


class FaultyClient:
    """A boto3 client whose k-th API call raises ``ClientError`` (code ``code``) before reaching AWS."""

    def __init__(self, real: Any, fail_at: int | None, code: str = "InternalError"):
        self._real = real
        self._fail_at = fail_at
        self._code = code
        self.calls = 0
        self.names: list[str] = []

    def _count(self, name: str) -> None:
        self.calls += 1
        self.names.append(name)
        if self._fail_at is not None and self.calls == self._fail_at:
            raise ClientError({"Error": {"Code": self._code, "Message": "injected"},
                               "ResponseMetadata": {"HTTPStatusCode": 500}}, name)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._real, name)
        if name in NOT_CALLS or not callable(target):
            return target
        if name == "get_paginator":
            return lambda operation: _FaultyPaginator(self, operation, target(operation))

        def call(*args: Any, **kwargs: Any) -> Any:
            self._count(name)
            return target(*args, **kwargs)

        return call


class _FaultyPaginator:
    def __init__(self, owner: FaultyClient, operation: str, real: Any):
        self._owner, self._operation, self._real = owner, operation, real

    def paginate(self, **kwargs: Any) -> Any:
        for page in self._real.paginate(**kwargs):
            self._owner._count(f"{self._operation} (page)")
            yield page


def make_backend(index: str, settings: Settings, *, s3: Any = None, dynamodb: Any = None) -> AwsBackend:
    bucket, table = f"maas-faults-{index}", f"maas-faults-{index}"
    real_s3, real_ddb = boto3.client("s3"), boto3.client("dynamodb")
    with contextlib.suppress(ClientError):
        real_s3.create_bucket(Bucket=bucket)
        real_s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        create_table(real_ddb, table)
    return AwsBackend(settings, bucket=bucket, table=table, s3=s3 or real_s3, dynamodb=dynamodb or real_ddb,
                      validator=InProcessValidator(settings))


def push(models: ModelService, backend: AwsBackend, name: str, data: bytes) -> int:
    from maas.domain import UploadPlan

    digest = hashlib.sha256(data).hexdigest()
    pending = models.begin_version(name, plan=UploadPlan(size=len(data), sha256=digest))
    backend.artifacts.receive_upload(pending.upload.upload_id, io.BytesIO(data), len(data))
    return models.commit_version(name, pending.version.version, sha256=digest, size=len(data)).version


def push_multipart(models: ModelService, bucket: str, name: str, data: bytes) -> int:
    """Like ``Client.push`` above 5 MiB: a multipart plan, the parts sent straight to S3 by the client
    (its own S3 connection, which the faults do not touch: they are the server's), then the commit,
    which completes the multipart upload through the server's (faulty) client."""
    from maas.backends.aws.artifacts import upload_key
    from maas.domain import UploadPlan

    part = MIN_PART_BYTES
    hashes = tuple(hashlib.sha256(data[i:i + part]).hexdigest() for i in range(0, len(data), part))
    digest = hashlib.sha256(data).hexdigest()
    pending = models.begin_version(name, plan=UploadPlan(size=len(data), sha256=digest, part_size=part,
                                                         part_sha256=hashes))
    client = boto3.client("s3")
    for target in pending.upload.parts:
        query = parse_qs(urlsplit(target.url).query)
        client.upload_part(Bucket=bucket, Key=upload_key(pending.upload.upload_id), UploadId=query["uploadId"][0],
                           PartNumber=target.number, Body=data[(target.number - 1) * part:target.number * part])
    return models.commit_version(name, pending.version.version, sha256=digest, size=len(data)).version


def scenario(backend: AwsBackend) -> None:
    models = ModelService(backend.registry, backend.artifacts, backend.validator, backend.settings.limits)
    deployments = DeploymentService(backend.registry, models)
    with contextlib.suppress(Conflict):  # left by an earlier run
        models.create_model("m")
    first = push(models, backend, "m", scale_model(1.0))
    second = push(models, backend, "m", scale_model(2.0))
    deployments.deploy("m", first)
    deployments.deploy("m", second)
    deployments.rollback("m")
    third = push_multipart(models, backend.bucket, "m", LARGE)
    models.delete_version("m", third)
    models.delete_model("m", force=True)


def healthy(backend: AwsBackend, wrapped: AwsBackend) -> AwsBackend:
    """The same bucket and table seen through unwrapped clients."""
    return AwsBackend(wrapped.settings, bucket=wrapped.bucket, table=wrapped.table, s3=backend.s3,
                      dynamodb=backend.dynamodb, validator=wrapped.validator)


# Each injected fault replays a whole scenario: ~170 s for DynamoDB's ~100 calls per deploy here, so the
# default 300 s per-test limit is too close on a slower machine.
@pytest.mark.timeout(900)
@pytest.mark.parametrize("service", ["s3", "dynamodb"])
def test_a_failure_at_every_aws_call_keeps_the_invariants(moto: None, settings: Settings, service: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    probe_client = FaultyClient(boto3.client(service), None)
    probe = make_backend("probe", settings, **{service: probe_client})
    scenario(probe)
    total = probe_client.calls
    assert total > 10, probe_client.names
    for k in range(1, total + 1):
        faulty_client = FaultyClient(boto3.client(service), k)
        faulty = make_backend(f"{service}-{k}", settings, **{service: faulty_client})
        caplog.clear()
        try:
            scenario(faulty)
        except Unavailable:
            pass  # the injected 500 surfaces as a 503, never a raw ClientError
        else:
            # or a deploy step (idempotent) met it and the workflow retried the step (TRANSIENT_ERRORS)
            assert "failed (Unavailable); retrying" in caplog.text, f"fault at {probe_client.names[k - 1]}"
        sound = make_backend(f"{service}-{k}", settings)
        assert check_invariants(sound.registry, sound.artifacts) == [], f"fault at {probe_client.names[k - 1]}"
        CleanupService(sound.registry, sound.artifacts, settings.limits).run(datetime.now(UTC) + timedelta(days=3))
        assert check_invariants(sound.registry, sound.artifacts) == [], f"after cleanup, fault {k}"
        # The store keeps working: a deploy the fault interrupted is rolled back, the scenario reruns.
        models = ModelService(sound.registry, sound.artifacts, sound.validator, settings.limits)
        DeploymentService(sound.registry, models).recover_interrupted()
        with contextlib.suppress(NotFound):
            sound.registry.delete_model("m")  # finishes a delete the fault interrupted
        scenario(sound)
        assert check_invariants(sound.registry, sound.artifacts) == []


@pytest.mark.parametrize("code", ["ThrottlingException", "ProvisionedThroughputExceededException",
                                  "RequestLimitExceeded", "SlowDown"])
def test_throttles_become_429_with_retry_after(moto: None, settings: Settings, code: str) -> None:
    service = "s3" if code == "SlowDown" else "dynamodb"
    client = FaultyClient(boto3.client(service), 1, code=code)
    backend = make_backend(f"throttle-{code.lower()}", settings, **{service: client})
    models = ModelService(backend.registry, backend.artifacts, backend.validator, settings.limits)
    with pytest.raises(Throttled) as raised:
        if service == "s3":
            models.create_model("m")
            client._fail_at = client.calls + 1
            push(models, backend, "m", scale_model(1.0))
        else:
            models.create_model("m")
    assert raised.value.status == 429 and raised.value.retry_after >= 1
    assert "maas-faults" not in raised.value.detail  # no bucket or table names in what users see


def test_botocore_retries_a_throttle_a_bounded_number_of_times(moto: None, settings: Settings) -> None:
    """The retries live in botocore's standard mode (jittered exponential backoff), bounded by
    MAX_ATTEMPTS; a throttle that outlasts them reaches the user as a 429, not a hang or a 500."""
    from botocore.awsrequest import AWSResponse

    from maas.backends.aws.clients import MAX_ATTEMPTS, make_client

    dynamodb = make_client("dynamodb")
    attempts: list[str] = []

    def throttle(request: Any, **_: Any) -> AWSResponse:
        attempts.append(request.url)
        body = b'{"__type":"com.amazonaws.dynamodb.v20120810#ThrottlingException","message":"slow down"}'
        return AWSResponse(request.url, 400, {"x-amzn-ErrorType": "ThrottlingException"}, _Raw(body))

    backend = make_backend("retries", settings)
    throttled = AwsBackend(settings, bucket=backend.bucket, table=backend.table, s3=backend.s3,
                           dynamodb=dynamodb, validator=backend.validator)
    dynamodb.meta.events.register_first("before-send.dynamodb.GetItem", throttle)
    with pytest.raises(Throttled):
        throttled.registry.get_model("m")
    assert len(attempts) == MAX_ATTEMPTS


class _Raw:
    def __init__(self, body: bytes):
        self._body = body

    def stream(self, **_: Any) -> Any:
        yield self._body
