"""The invariants of DESIGN.md section 3 as a checker, run by tests after every injected fault and
available to operators (``maas admin check``) to prove a store is sound."""

from __future__ import annotations

from maas.domain import VersionStatus
from maas.errors import MaasError, NotFound
from maas.ports import ArtifactStore, Registry, StoredArtifact
from maas.services.pagination import all_deployments, all_versions, iterate


def artifact_of(version_sha256: str, size: int | None, key: str | None,
                version_id: str | None) -> StoredArtifact:
    return StoredArtifact(sha256=version_sha256, size=size or 0, key=key or "", version_id=version_id)


def check_invariants(registry: Registry, artifacts: ArtifactStore) -> list[str]:
    """Every violation found, as readable lines; an empty list means the store is sound."""
    problems: list[str] = []
    for model in iterate(registry.list_models):
        name = model.name
        versions = {v.version: v for v in all_versions(registry, name)}
        for version in versions.values():
            if version.status is not VersionStatus.READY:
                continue
            if not version.sha256 or version.signature is None:
                problems.append(f"{name} v{version.version}: READY without sha256 or signature")
                continue
            stored = artifact_of(version.sha256, version.size, version.storage_key,
                                 version.storage_version_id)
            try:
                artifacts.read(stored)
            except NotFound:
                problems.append(f"{name} v{version.version}: READY but its artifact is missing")
            except MaasError as error:
                problems.append(f"{name} v{version.version}: artifact unreadable: {error.detail}")

        ready = {number for number, v in versions.items() if v.status is VersionStatus.READY}

        def is_ready(number: int | None, ready: set[int] = ready) -> bool:
            return number is not None and number in ready

        for alias in registry.list_aliases(name):
            if not is_ready(alias.version):
                problems.append(f"{name} alias {alias.alias}: points at non-READY version {alias.version}")
        for deployment in all_deployments(registry, name):
            for number in deployment.referenced_versions():
                if not is_ready(number):
                    problems.append(f"{name} deployment {deployment.id}: references non-READY "
                                    f"version {number}")
        route = registry.get_route(name)
        if route is not None:
            for served in (route.stable_version, route.canary_version):
                if served is not None and not is_ready(served):
                    problems.append(f"{name} route: serves non-READY version {served}")
    return problems
