"""Housekeeping for a local store: run at `maas serve` start and then periodically.

On AWS the same services run from the deploy workflow and a scheduled Lambda; locally nothing else
would ever call them, so the server does."""

from __future__ import annotations

import logging
import threading

from maas.backends.local.artifacts import FileArtifactStore
from maas.backends.local.backend import LocalBackend
from maas.domain import Deployment
from maas.services.cleanup import CleanupReport, CleanupService
from maas.services.deployments import DeploymentService
from maas.services.models import ModelService

log = logging.getLogger("maas.maintenance")


def recover_interrupted_deploys(backend: LocalBackend) -> list[Deployment]:
    """A deploy left IN_PROGRESS by a killed server is rolled back, so the model is never stuck."""
    models = ModelService(backend.registry, backend.artifacts, backend.validator, backend.settings.limits)
    return DeploymentService(backend.registry, models).recover_interrupted()


def clean(backend: LocalBackend) -> CleanupReport:
    report = CleanupService(backend.registry, backend.artifacts, backend.settings.limits).run()
    if isinstance(backend.artifacts, FileArtifactStore):
        # Temp files of writers that crashed; anything younger may belong to a live upload or commit.
        backend.artifacts.remove_stale_temp_files(backend.settings.limits.upload_ttl_s)
    return report


class Maintenance:
    """A daemon thread that cleans the store every ``interval_s`` until stopped."""

    def __init__(self, backend: LocalBackend, interval_s: float = 3600.0):
        self._backend = backend
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="maas-maintenance", daemon=True)

    def start(self) -> Maintenance:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                report = clean(self._backend)
            except Exception:  # keep serving; the next round retries
                log.exception("store cleanup failed")
                continue
            if report.removed_blobs or report.expired_versions or report.removed_uploads:
                log.info("cleanup: %d expired versions, %d uploads, %d blobs removed",
                         len(report.expired_versions), len(report.removed_uploads), len(report.removed_blobs))
