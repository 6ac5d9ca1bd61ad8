"""Cleanup: the other half of "nothing lost, nothing orphaned".

A register that crashed or was abandoned leaves a PENDING version, a staged upload or an unreferenced
blob. None of them is ever served; this routine removes them once they are older than the upload
TTL, so a client in the middle of a slow upload is never cut off."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from maas.domain import ModelVersion, VersionStatus
from maas.errors import Conflict, NotFound
from maas.ports import ArtifactStore, Registry
from maas.services.pagination import all_versions, iterate
from maas.settings import Limits


@dataclass
class CleanupReport:
    expired_versions: list[tuple[str, int]] = field(default_factory=list)
    removed_failed: list[tuple[str, int]] = field(default_factory=list)
    removed_uploads: list[str] = field(default_factory=list)
    removed_blobs: list[str] = field(default_factory=list)


class CleanupService:
    def __init__(self, registry: Registry, artifacts: ArtifactStore, limits: Limits):
        self._registry = registry
        self._artifacts = artifacts
        self._ttl = timedelta(seconds=limits.upload_ttl_s)

    def run(self, now: datetime | None = None) -> CleanupReport:
        now = now or datetime.now(UTC)
        report = CleanupReport()
        live_uploads: set[str] = set()
        for version in self._registry.list_versions_by_status(VersionStatus.PENDING.value):
            if now - version.created_at < self._ttl:
                if version.upload_id:
                    live_uploads.add(version.upload_id)
                continue
            try:
                self._registry.mark_failed(version.model, version.version,
                                           "upload was never committed before it expired")
                report.expired_versions.append((version.model, version.version))
            except Conflict:
                continue  # committed meanwhile
        just_expired = set(report.expired_versions)
        for version in self._registry.list_versions_by_status(VersionStatus.FAILED.value):
            if (version.model, version.version) in just_expired:
                continue  # keep the reason visible for one more TTL
            if now - version.updated_at >= self._ttl and self._delete_failed(version):
                report.removed_failed.append((version.model, version.version))
        ttl_s = self._ttl.total_seconds()
        for upload_id, age_s in list(self._artifacts.list_uploads()):
            if upload_id not in live_uploads and age_s >= ttl_s:
                self._artifacts.discard_upload(upload_id)
                report.removed_uploads.append(upload_id)
        report.removed_blobs = self._collect_blobs(now)
        return report

    def _delete_failed(self, version: ModelVersion) -> bool:
        try:
            self._registry.delete_version(version.model, version.version)
        except (Conflict, NotFound):
            return False
        return True

    def _collect_blobs(self, now: datetime) -> list[str]:
        """Delete stored artifacts (by storage key) no version references, once they are older than the TTL.

        The reads are ordered so a commit racing with the sweep is always seen: blobs first, then
        PENDING versions, then the referenced set. A commit's blob is either fresh (promote() writes
        or touches it), or its version is still PENDING (and young) in the second read, or already
        READY in the third."""
        candidates = []
        for artifact in self._artifacts.list_artifacts():
            try:
                candidates.append((artifact, self._artifacts.modified_at(artifact)))
            except NotFound:
                continue  # deleted meanwhile
        pending = self._registry.list_versions_by_status(VersionStatus.PENDING.value)
        if any(now - v.created_at < self._ttl for v in pending):
            return []  # a commit may be between promote() and mark_ready()
        referenced = {
            version.storage_key
            for model in iterate(self._registry.list_models)
            for version in all_versions(self._registry, model.name)
            if version.storage_key
        }
        removed = []
        for artifact, modified in candidates:
            if artifact.key not in referenced and now - modified >= self._ttl:
                self._artifacts.delete(artifact)
                removed.append(artifact.sha256 or artifact.key)
        return removed
