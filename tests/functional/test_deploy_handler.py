"""The scheduled cleanup Lambda (functions/deploy/handler.py: cleanup) under moto: an abandoned
register (a PENDING version whose upload never committed) expires, a promoted-but-never-READY
artifact is removed, a READY version is untouched, and the invariants hold."""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import pytest

from maas.backends.aws import AwsBackend
from maas.domain import UploadPlan, VersionStatus
from maas.services.invariants import check_invariants
from maas.services.models import ModelService
from maas.settings import Limits, Settings
from tests.conftest import TEST_BUCKET, TEST_TABLE
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
