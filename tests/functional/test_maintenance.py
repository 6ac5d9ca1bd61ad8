"""The local server's housekeeping thread expires abandoned uploads on its own."""

from __future__ import annotations

import time
from pathlib import Path

from maas.backends.local import LocalBackend
from maas.backends.local.maintenance import Maintenance, recover_interrupted_deploys
from maas.domain import VersionStatus
from maas.domain.models import Model
from maas.settings import Limits, Settings


def test_maintenance_thread_expires_abandoned_uploads(tmp_path: Path) -> None:
    backend = LocalBackend(Settings(home=tmp_path, limits=Limits(upload_ttl_s=1)))
    backend.registry.create_model(Model(name="m"))
    upload = backend.artifacts.create_upload("m")
    backend.registry.allocate_version("m", created_by="t", upload_id=upload.upload_id)
    maintenance = Maintenance(backend, interval_s=0.1).start()
    try:
        deadline = time.monotonic() + 10
        while backend.registry.get_version("m", 1).status is VersionStatus.PENDING:
            assert time.monotonic() < deadline, "the abandoned version was never expired"
            time.sleep(0.1)
    finally:
        maintenance.stop()
    version = backend.registry.get_version("m", 1)
    assert version.status is VersionStatus.FAILED and "never committed" in version.status_reason
    assert recover_interrupted_deploys(backend) == []
