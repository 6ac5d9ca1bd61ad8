"""DESIGN.md's invariants after injected failures: a crash at every port call of push, deploy,
rollback and delete; a process killed between artifact write and registry commit; concurrent pushes."""

from __future__ import annotations

import contextlib
import hashlib
import io
import multiprocessing
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from maas.backends.local import LocalBackend
from maas.domain import UploadPlan, VersionStatus
from maas.errors import MaasError
from maas.ports import ArtifactStore, Registry
from maas.services.cleanup import CleanupService
from maas.services.deployments import DeploymentService
from maas.services.invariants import check_invariants
from maas.services.models import ModelService
from maas.settings import Settings
from tests.models import InProcessValidator, scale_model


def fast_backend(home: Path) -> LocalBackend:
    settings = Settings(home=home)
    return LocalBackend(settings, validator=InProcessValidator(settings))


class InjectedFault(Exception):
    pass


class Faulty:
    """Wraps a port and raises on its k-th call: the crash of a backend call mid-operation."""

    def __init__(self, real: Any, fail_at: int | None):
        self._real = real
        self._fail_at = fail_at
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._real, name)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self._fail_at is not None and self.calls == self._fail_at:
                raise InjectedFault(name)
            return target(*args, **kwargs)

        return call


def push(models: ModelService, artifacts: ArtifactStore, name: str, data: bytes) -> int:
    plan = UploadPlan(size=len(data), sha256=hashlib.sha256(data).hexdigest())  # S3 needs it up front
    pending = models.begin_version(name, plan=plan)
    artifacts.receive_upload(pending.upload.upload_id, io.BytesIO(data), len(data))
    return models.commit_version(name, pending.version.version, sha256=hashlib.sha256(data).hexdigest(),
                                 size=len(data)).version


def scenario(registry: Registry, artifacts: ArtifactStore, backend: LocalBackend) -> None:
    models = ModelService(registry, artifacts, backend.validator, backend.settings.limits)
    deployments = DeploymentService(registry, models)
    with contextlib.suppress(MaasError):
        models.create_model("m")
    first = push(models, artifacts, "m", scale_model(1.0))
    second = push(models, artifacts, "m", scale_model(2.0))
    deployments.deploy("m", first)
    deployments.deploy("m", second)
    deployments.rollback("m")
    third = push(models, artifacts, "m", scale_model(3.0))
    models.delete_version("m", third)
    models.delete_model("m", force=True)


@pytest.mark.parametrize("port", ["registry", "artifacts"])
def test_a_crash_at_every_call_keeps_the_invariants(tmp_path: Path, port: str) -> None:
    probe = fast_backend(tmp_path / "probe")
    counting = Faulty(getattr(probe, port), None)
    scenario(counting if port == "registry" else probe.registry,
             counting if port == "artifacts" else probe.artifacts, probe)
    total = counting.calls
    assert total > 10
    for k in range(1, total + 1):
        backend = fast_backend(tmp_path / f"{port}-{k}")
        faulty = Faulty(getattr(backend, port), k)
        registry = faulty if port == "registry" else backend.registry
        artifacts = faulty if port == "artifacts" else backend.artifacts
        with pytest.raises(InjectedFault):
            scenario(registry, artifacts, backend)  # type: ignore[arg-type]
        assert check_invariants(backend.registry, backend.artifacts) == [], f"fault at call {k}"
        CleanupService(backend.registry, backend.artifacts, backend.settings.limits).run(
            datetime.now(UTC) + timedelta(days=3))
        assert check_invariants(backend.registry, backend.artifacts) == [], f"after cleanup, fault {k}"
        # the store still works after the crash (a restart rolls back a deploy the crash interrupted)
        models = ModelService(backend.registry, backend.artifacts, backend.validator, backend.settings.limits)
        DeploymentService(backend.registry, models).recover_interrupted()
        assert check_invariants(backend.registry, backend.artifacts) == []
        scenario(backend.registry, backend.artifacts, backend)
        backend.close()


def _commit_then_die(home: str, data: bytes) -> None:
    backend = LocalBackend(Settings(home=Path(home)))
    models = ModelService(backend.registry, backend.artifacts, backend.validator, backend.settings.limits)
    models.create_model("m")
    pending = models.begin_version("m")
    backend.artifacts.receive_upload(pending.upload.upload_id, io.BytesIO(data), len(data))
    backend.artifacts.promote(pending.upload.upload_id, "m", pending.version.version,
                              hashlib.sha256(data).hexdigest())
    os.kill(os.getpid(), signal.SIGKILL)  # between the artifact write and the registry commit


def test_kill_between_artifact_write_and_registry_commit(tmp_path: Path) -> None:
    data = scale_model(5.0)
    child = multiprocessing.get_context("spawn").Process(target=_commit_then_die, args=(str(tmp_path), data))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    backend = LocalBackend(Settings(home=tmp_path))
    version = backend.registry.get_version("m", 1)
    assert version.status is VersionStatus.PENDING
    assert check_invariants(backend.registry, backend.artifacts) == []
    assert [a.sha256 for a in backend.artifacts.list_artifacts()] == [hashlib.sha256(data).hexdigest()]
    report = CleanupService(backend.registry, backend.artifacts, backend.settings.limits).run(
        datetime.now(UTC) + timedelta(days=1, minutes=1))
    assert report.expired_versions == [("m", 1)]
    assert report.removed_blobs == [hashlib.sha256(data).hexdigest()]
    assert backend.registry.get_version("m", 1).status is VersionStatus.FAILED
    assert check_invariants(backend.registry, backend.artifacts) == []
    report = CleanupService(backend.registry, backend.artifacts, backend.settings.limits).run(
        datetime.now(UTC) + timedelta(days=3))
    assert report.removed_failed == [("m", 1)]


# --- on both backends (``backend`` is parametrized: local, and AWS under moto) ------------------------
def test_cleanup_spares_young_uploads_and_referenced_blobs(backend: Any) -> None:
    models = ModelService(backend.registry, backend.artifacts, backend.validator, backend.settings.limits)
    models.create_model("m")
    push(models, backend.artifacts, "m", scale_model(1.0))
    pending = models.begin_version("m", plan=UploadPlan(size=len(b"partial"), sha256="0" * 64))
    backend.artifacts.receive_upload(pending.upload.upload_id, io.BytesIO(b"partial"), 100)
    report = CleanupService(backend.registry, backend.artifacts, backend.settings.limits).run()
    assert report.removed_blobs == [] and report.removed_uploads == [] and report.expired_versions == []
    assert backend.artifacts.inspect_upload(pending.upload.upload_id).size == len(b"partial")


def test_concurrent_pushes_get_distinct_versions(backend: Any) -> None:
    models = ModelService(backend.registry, backend.artifacts, backend.validator, backend.settings.limits)
    models.create_model("m")
    payloads = [scale_model(float(i)) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        numbers = list(pool.map(lambda data: push(models, backend.artifacts, "m", data), payloads))
    assert sorted(numbers) == list(range(1, 7))
    for number, data in zip(numbers, payloads, strict=True):
        assert backend.registry.get_version("m", number).sha256 == hashlib.sha256(data).hexdigest()
    assert check_invariants(backend.registry, backend.artifacts) == []


def test_failed_validation_leaves_no_ready_version(backend: Any) -> None:
    models = ModelService(backend.registry, backend.artifacts, backend.validator, backend.settings.limits)
    models.create_model("m")
    with pytest.raises(MaasError):
        push(models, backend.artifacts, "m", b"PK\x03\x04" + b"\x00" * 100)
    versions = backend.registry.list_versions("m", 10, None).items
    assert [v.status for v in versions] == [VersionStatus.FAILED]
    assert list(backend.artifacts.list_artifacts()) == []
    assert check_invariants(backend.registry, backend.artifacts) == []
