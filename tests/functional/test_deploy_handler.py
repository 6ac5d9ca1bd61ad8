"""The deploy Lambda (functions/deploy/handler.py) under moto. The scheduled cleanup: an abandoned
register (a PENDING version whose upload never committed) expires, a promoted-but-never-READY
artifact is removed, a READY version is untouched, and the invariants hold. The workflow's step
entries, called as the state machine calls them (tests/functional/test_deploy_state_machine.py runs
them under moto's Step Functions)."""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from maas import errors
from maas.api import create_app
from maas.backends.aws import AwsBackend
from maas.domain import Deployment, DeploymentStatus, UploadPlan, VersionStatus
from maas.services.deploy import ROLLBACK, WORKFLOW, StepName
from maas.services.invariants import check_invariants
from maas.services.models import ModelService
from maas.services.tokens import TokenService
from maas.settings import Limits, Settings
from tests.conftest import HOST, TEST_BUCKET, TEST_TABLE, break_artifact
from tests.functions import LambdaContext, load_handler
from tests.models import InProcessValidator, scale_model

TTL_S = 1


def test_cleanup_expires_abandoned_registers_and_keeps_ready_versions(
        moto: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(home=tmp_path / "home", limits=Limits(upload_ttl_s=TTL_S))
    for name, value in {"MAAS_BUCKET": TEST_BUCKET, "MAAS_TABLE": TEST_TABLE, "MAAS_HOME": str(settings.home),
                        "MAAS_UPLOAD_TTL_S": str(TTL_S), "POWERTOOLS_METRICS_NAMESPACE": "maas"}.items():
        monkeypatch.setenv(name, value)
    backend = AwsBackend(settings, bucket=TEST_BUCKET, table=TEST_TABLE, validator=InProcessValidator(settings))
    models = ModelService(backend.registry, backend.artifacts, backend.validator, settings.limits)
    models.create_model("m")
    ready_bytes, stuck_bytes = scale_model(1.0), scale_model(2.0)

    def begin(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        pending = models.begin_version("m", plan=UploadPlan(size=len(data), sha256=digest))
        backend.artifacts.receive_upload(pending.upload.upload_id, io.BytesIO(data), len(data))
        return pending.upload.upload_id, pending.version.version

    upload, ready = begin(ready_bytes)
    models.commit_version("m", ready, sha256=hashlib.sha256(ready_bytes).hexdigest(), size=len(ready_bytes))
    stuck_upload, stuck = begin(stuck_bytes)
    # a commit that crashed between the copy into place and mark_ready
    backend.artifacts.promote(stuck_upload, "m", stuck, hashlib.sha256(stuck_bytes).hexdigest())
    time.sleep(TTL_S + 0.2)

    cleanup = load_handler("deploy").cleanup
    first = cleanup({}, LambdaContext(function_name="maas-cleanup"))
    assert first["expired_versions"] == [f"m/{stuck}"]
    assert first["removed_uploads"] == [stuck_upload]
    assert first["removed_artifacts"] == [f"models/m/{stuck}/model.onnx"]
    assert backend.registry.get_version("m", stuck).status is VersionStatus.FAILED
    assert backend.registry.get_version("m", ready).status is VersionStatus.READY
    assert check_invariants(backend.registry, backend.artifacts) == []
    emitted = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    assert any(doc.get("CleanupExpiredVersions") == [1.0] for doc in emitted), emitted

    time.sleep(TTL_S + 0.2)
    second = cleanup({}, LambdaContext(function_name="maas-cleanup"))
    assert second["removed_failed"] == [f"m/{stuck}"]  # the FAILED record goes one TTL later
    assert [v.version for v in backend.registry.list_versions("m", 10, None).items] == [ready]
    assert upload not in second["removed_uploads"]
    assert check_invariants(backend.registry, backend.artifacts) == []


def test_workflow_steps_as_lambda_entries(moto: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """validate -> smoke_test -> promote as the state machine calls them; a corrupted version fails its
    smoke test with the maas error's class name (what Retry/Catch match), and rollback, given the
    Catch's ``$.failure``, leaves it FAILED with the stable version still live."""
    settings = Settings(home=tmp_path / "home")
    for name, value in {"MAAS_BUCKET": TEST_BUCKET, "MAAS_TABLE": TEST_TABLE, "MAAS_HOME": str(settings.home),
                        "POWERTOOLS_METRICS_NAMESPACE": "maas"}.items():
        monkeypatch.setenv(name, value)
    backend = AwsBackend(settings, bucket=TEST_BUCKET, table=TEST_TABLE, validator=InProcessValidator(settings))
    models = ModelService(backend.registry, backend.artifacts, backend.validator, settings.limits)
    models.create_model("m")

    def push(data: bytes) -> int:
        digest = hashlib.sha256(data).hexdigest()
        pending = models.begin_version("m", plan=UploadPlan(size=len(data), sha256=digest))
        backend.artifacts.receive_upload(pending.upload.upload_id, io.BytesIO(data), len(data))
        return models.commit_version("m", pending.version.version, sha256=digest, size=len(data)).version

    def start(version: int) -> dict[str, str]:
        route = backend.registry.get_route("m")
        record = backend.registry.create_deployment(Deployment(
            id=uuid.uuid4().hex, model="m", version=version,
            stable_version=route.stable_version if route else None).with_event("started"))
        return {"model": "m", "deployment_id": record.id}

    fn = load_handler("deploy")
    for step in (*WORKFLOW, ROLLBACK):  # one entry per step, named as the state machine's tasks call it
        assert callable(getattr(fn, step.name.value))
    context = LambdaContext(function_name="maas-deploy")

    state = start(push(scale_model(1.0)))
    for step in WORKFLOW:
        out = {**state, "wait_seconds": 0, "done": step.name is StepName.CHECK_HEALTH}
        assert getattr(fn, step.name.value)(state, context) == out
        assert getattr(fn, step.name.value)(state, context) == out  # a retried task: no change
    first = backend.registry.get_deployment(state["deployment_id"])
    assert first.status is DeploymentStatus.SUCCEEDED
    assert [e.kind for e in first.events] == ["started", "validated", "smoke_test_passed", "promoted"]
    _, secret = TokenService(backend.registry).create("invoker", ["invoke"], created_by="test")
    with TestClient(create_app(backend, settings), base_url=f"http://{HOST}") as api:
        ones = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}
        answer = api.post("/v2/models/m/infer", json=ones, headers={"Authorization": f"Bearer {secret}"})
        assert answer.status_code == 200 and answer.headers["X-Maas-Model-Version"] == "1"

    broken = push(scale_model(2.0))
    break_artifact(backend, backend.registry.get_version("m", broken).model_dump(mode="json"))
    state = start(broken)
    fn.validate(state, context)
    with pytest.raises(errors.MaasError) as raised:
        fn.smoke_test(state, context)
    assert type(raised.value) is errors.StorageCorrupted  # not wrapped: Lambda reports "StorageCorrupted"
    caught = {**state, "failure": {"Error": type(raised.value).__name__,
                                   "Cause": json.dumps({"errorMessage": str(raised.value),
                                                        "errorType": type(raised.value).__name__})}}
    assert fn.rollback(caught, context) == {**state, "wait_seconds": 0, "done": False}
    assert fn.rollback(caught, context) == {**state, "wait_seconds": 0, "done": False}
    failed = backend.registry.get_deployment(state["deployment_id"])
    assert failed.status is DeploymentStatus.FAILED
    assert [e.kind for e in failed.events] == ["started", "validated", "smoke_test_failed"]
    assert failed.events[-1].detail == str(raised.value)
    route = backend.registry.get_route("m")
    assert route is not None and route.stable_version == 1
    with pytest.raises(errors.Conflict):  # a finished deployment: the Catch path, which changes nothing
        fn.promote(state, context)
    with pytest.raises(errors.InvalidInput):
        fn.validate({"model": "m", "deployment_id": "../../etc"}, context)
