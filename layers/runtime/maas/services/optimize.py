"""Optimize a READY version into a derived one (dynamic int8 quantization), registered like any push.

The quantizer is injected (``maas.inference.optimize.quantize`` in the compositions): services never
import onnxruntime. It returns the derived bytes and a report, or raises ``ModelRejected`` when the
derived model strays outside the tolerance and ``InvalidInput`` when there is nothing to quantize; both
happen before a version number is taken, so a rejected optimization leaves nothing behind.

The derived version goes through the normal register path (``begin_version`` with the parent as
lineage -> upload -> ``commit_version``, which re-validates it in the sandbox); a failure after the
version was reserved aborts it (FAILED, upload discarded) the way a failed commit does. The deploy
workflow's optimize step calls ``OptimizeService.optimize(name, version)``: it is idempotent, a second
call returns the derivative the first one registered.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import math
import re
import threading
from collections.abc import Callable
from typing import Any

from maas.domain import ModelVersion, Signature, UploadPlan, VersionStatus
from maas.errors import InvalidInput, MaasError, ModelRejected
from maas.ports import ArtifactStore
from maas.services.models import ModelService
from maas.services.pagination import iterate
from maas.services.serving import artifact_reader

log = logging.getLogger(__name__)

#: ``(model bytes, signature, tolerance) -> (derived bytes, report)``; the report is a dataclass, a
#: pydantic model or a dict (``maas.inference.optimize.OptimizeReport`` in production).
Quantizer = Callable[[bytes, Signature, float], tuple[bytes, Any]]

DEFAULT_TOLERANCE = 0.05
METHOD = "int8-dynamic"
_MARK = "int8 dynamic quantization of v"
#: "int8 dynamic quantization of v3 (max relative diff 0.0118, tolerance 0.05)"
_DESCRIPTION = re.compile(r"^int8 dynamic quantization of v(\d+)(?![0-9])(?:.*?max relative diff ([0-9.eE+-]+))?")


def derivative_description(parent: int, max_rel_diff: float | None, tolerance: float) -> str:
    """How a derived version is described; ``derived_from`` reads it back."""
    measured = "" if max_rel_diff is None else f"max relative diff {max_rel_diff:.4g}, "
    return f"{_MARK}{parent} ({measured}tolerance {tolerance:g})"


def derived_from(version: ModelVersion) -> int | None:
    """The parent version number if ``version`` is an int8 derivative maas registered, else None."""
    found = _DESCRIPTION.match(version.description)
    if found is None or version.parent_version is None or int(found.group(1)) != version.parent_version:
        return None
    return version.parent_version


def _recorded_diff(version: ModelVersion) -> float | None:
    found = _DESCRIPTION.match(version.description)
    if found is None or found.group(2) is None:
        return None
    try:
        return float(found.group(2))
    except ValueError:
        return None


def _as_dict(report: Any) -> dict[str, Any]:
    if isinstance(report, dict):
        return dict(report)
    as_dict = getattr(report, "as_dict", None)
    if callable(as_dict):
        return dict(as_dict())
    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        return dataclasses.asdict(report)
    model_dump = getattr(report, "model_dump", None)
    if callable(model_dump):
        return dict(model_dump(mode="json"))
    return {}


class OptimizeService:
    def __init__(self, models: ModelService, artifacts: ArtifactStore, quantizer: Quantizer):
        self._models = models
        self._artifacts = artifacts
        self._quantizer = quantizer
        self._read = artifact_reader(artifacts)
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, int], threading.Lock] = {}

    def optimize(self, name: str, version: int | str, *, tolerance: float = DEFAULT_TOLERANCE,
                 created_by: str = "") -> tuple[ModelVersion, dict[str, Any]]:
        """Quantize READY ``version`` (number or alias) of ``name`` and register the result as a new
        version with the parent as lineage; returns it and the report (sizes, p50 latencies, diffs,
        ``reused``). Idempotent: a READY int8 derivative of that version is returned instead of making
        another (``reused: true``; ModelRejected if it was measured outside a stricter ``tolerance``)."""
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not math.isfinite(tolerance) \
                or tolerance < 0:
            raise InvalidInput("tolerance must be a finite number >= 0", field="tolerance")
        tolerance = float(tolerance)
        parent = self._models.ready_version(name, version)
        grandparent = derived_from(parent)
        if grandparent is not None:
            raise InvalidInput(f"version {parent.version} of {name!r} is already the int8 quantization of "
                               f"version {grandparent}; optimize version {grandparent} instead", field="version")
        with self._lock(name, parent.version):
            existing = self.find_derivative(name, parent.version)
            if existing is not None:
                return existing, self._reused_report(parent, existing, tolerance)
            return self._create(parent, tolerance, created_by)

    def find_derivative(self, name: str, parent: int) -> ModelVersion | None:
        """The oldest READY int8 derivative of version ``parent``, if there is one."""
        found = [candidate for candidate in iterate(functools.partial(self._models.list_versions, name))
                 if candidate.status is VersionStatus.READY and derived_from(candidate) == parent]
        return min(found, key=lambda candidate: candidate.version, default=None)

    # ----------------------------------------------------------------------------------- internals
    def _lock(self, name: str, version: int) -> threading.Lock:
        """One optimization of a given version at a time in this process (two concurrent calls would
        otherwise both find no derivative and register two)."""
        with self._guard:
            return self._locks.setdefault((name, version), threading.Lock())

    def _reused_report(self, parent: ModelVersion, existing: ModelVersion, tolerance: float) -> dict[str, Any]:
        recorded = _recorded_diff(existing)
        if recorded is not None and recorded > tolerance:
            raise ModelRejected(f"version {existing.version}, the int8 quantization of version {parent.version}, "
                                f"differs from it by {recorded:g} (relative to the output's scale), over the "
                                f"tolerance of {tolerance:g}")
        return {
            "method": METHOD, "reused": True, "parent_version": parent.version, "version": existing.version,
            "parent_bytes": parent.size, "derived_bytes": existing.size, "max_rel_diff": recorded,
            "tolerance": tolerance, "parent_p50_ms": None, "derived_p50_ms": None,
        }

    def _create(self, parent: ModelVersion, tolerance: float, created_by: str) -> tuple[ModelVersion, dict[str, Any]]:
        if parent.signature is None:  # a READY version always has one; a corrupt record is not ours to fix
            raise ModelRejected(f"version {parent.version} of {parent.model!r} has no signature")
        derived, report = self._quantizer(self._read(parent), parent.signature, tolerance)
        body = _as_dict(report)
        diff = body.get("max_rel_diff")
        description = derivative_description(parent.version, float(diff) if isinstance(diff, int | float) else None,
                                             tolerance)
        sha256 = hashlib.sha256(derived).hexdigest()
        pending = self._models.begin_version(parent.model, created_by=created_by, description=description,
                                             plan=UploadPlan(size=len(derived), sha256=sha256),
                                             parent_version=parent.version)
        number = pending.version.version
        try:
            self._artifacts.receive_upload(pending.upload.upload_id, io.BytesIO(derived), len(derived))
            ready = self._models.commit_version(parent.model, number, sha256=sha256, size=len(derived))
        except BaseException as exc:
            reason = exc.detail if isinstance(exc, MaasError) else "the optimization stopped before its commit"
            try:
                self._models.abort_version(parent.model, number, reason)
            except Exception:  # the original error matters more; cleanup expires what is left
                log.warning("could not abort version %s of %r after a failed optimization", number, parent.model,
                            exc_info=True)
            raise
        return ready, {**body, "method": body.get("method", METHOD), "reused": False,
                       "parent_version": parent.version, "version": ready.version}
