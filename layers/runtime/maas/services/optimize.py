"""Optimize a READY version into a derived one (int8 quantization), registered like any push.

The quantizer is injected (``maas.inference.optimize.quantize`` in the compositions): services never
import onnxruntime. It returns the derived bytes and a report, or raises ``ModelRejected`` when the
derived model fails a check (not portable across CPUs, not smaller, outside the tolerance, not faster:
``extra["check"]`` says which) and ``InvalidInput`` when there is nothing to quantize; all of that
happens before a version number is taken, so a rejected optimization leaves nothing behind.

The derived version goes through the normal register path (``begin_version`` with the parent as
lineage -> upload -> ``commit_version``, which re-validates it in the sandbox); a failure after the
version was reserved aborts it (FAILED, upload discarded) the way a failed commit does. The deploy
workflow's optimize step calls ``OptimizeService.optimize(name, version)``: it is idempotent, a second
call returns the derivative the first one registered, measured again against that call's tolerance and
goal (the quantizer checks a given derivative instead of making one).

A derivative's description names its weight scheme; one without a scheme (made before the schemes were
exact on every CPU) is never reused: optimizing its parent again makes a portable one.
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
from typing import Any, Protocol

from maas.domain import ModelVersion, OptimizeGoal, Signature, UploadPlan, VersionStatus
from maas.errors import InvalidInput, MaasError, ModelRejected
from maas.ports import ArtifactStore
from maas.services.models import ModelService
from maas.services.pagination import iterate
from maas.services.serving import artifact_reader

log = logging.getLogger(__name__)


class Quantizer(Protocol):
    """``maas.inference.optimize.quantize``: ``(model bytes, signature, tolerance, goal=, derived=)``
    -> ``(derived bytes, report)``; with ``derived`` it checks that derivative instead of making one.
    The report is a dataclass, a pydantic model or a dict."""

    def __call__(self, model: bytes, signature: Signature, tolerance: float, /, *, goal: str,
                 derived: bytes | None = None) -> tuple[bytes, Any]: ...


DEFAULT_TOLERANCE = 0.05
GOALS: tuple[str, ...] = tuple(goal.value for goal in OptimizeGoal)
DEFAULT_GOAL = OptimizeGoal.LATENCY.value
METHOD = "int8-dynamic"
_MARK = "int8 dynamic quantization of v"
#: "int8 dynamic quantization of v3 (s7 weights, max relative diff 0.0118, tolerance 0.05)"
_DESCRIPTION = re.compile(r"^int8 dynamic quantization of v(\d+)(?![0-9])(?: \(([a-z0-9-]+) weights\b)?")


def derivative_description(parent: int, scheme: str, max_rel_diff: float | None, tolerance: float) -> str:
    """How a derived version is described; ``derived_from`` and ``scheme_of`` read it back."""
    measured = "" if max_rel_diff is None else f"max relative diff {max_rel_diff:.4g}, "
    return f"{_MARK}{parent} ({scheme} weights, {measured}tolerance {tolerance:g})"


def derived_from(version: ModelVersion) -> int | None:
    """The parent version number if ``version`` is an int8 derivative maas registered, else None."""
    found = _DESCRIPTION.match(version.description)
    if found is None or version.parent_version is None or int(found.group(1)) != version.parent_version:
        return None
    return version.parent_version


def scheme_of(version: ModelVersion) -> str | None:
    """The weight scheme an int8 derivative was made with; None for other versions and for derivatives
    from before schemes were recorded (full-range int8 weights, which saturate on CPUs without VNNI)."""
    found = _DESCRIPTION.match(version.description)
    return found.group(2) if found is not None and derived_from(version) is not None else None


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
                 goal: str = DEFAULT_GOAL, created_by: str = "") -> tuple[ModelVersion, dict[str, Any]]:
        """Quantize READY ``version`` (number or alias) of ``name`` and register the result as a new
        version with the parent as lineage; returns it and the report (scheme, sizes, paired latencies,
        diffs, checks, ``reused``). ``goal`` is "latency" (the derivative must be measurably faster) or
        "size" (smaller and not measurably slower). Idempotent: a READY int8 derivative of that version is
        checked again against this call's tolerance and goal and returned instead of making another
        (``reused: true``; ModelRejected naming the failed check if it no longer passes)."""
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not math.isfinite(tolerance) \
                or tolerance < 0:
            raise InvalidInput("tolerance must be a finite number >= 0", field="tolerance")
        if goal not in GOALS:
            raise InvalidInput(f"goal must be one of {', '.join(GOALS)}", field="goal")
        tolerance = float(tolerance)
        parent = self._models.ready_version(name, version)
        grandparent = derived_from(parent)
        if grandparent is not None:
            raise InvalidInput(f"version {parent.version} of {name!r} is already the int8 quantization of "
                               f"version {grandparent}; optimize version {grandparent} instead", field="version")
        signature = parent.signature
        if signature is None:  # a READY version always has one; a corrupt record is not ours to fix
            raise ModelRejected(f"version {parent.version} of {parent.model!r} has no signature")
        with self._lock(name, parent.version):
            existing = self.find_derivative(name, parent.version)
            if existing is not None:
                return existing, self._reuse(parent, signature, existing, tolerance, goal)
            return self._create(parent, signature, tolerance, goal, created_by)

    def find_derivative(self, name: str, parent: int) -> ModelVersion | None:
        """The oldest READY int8 derivative of version ``parent`` made with a recorded weight scheme."""
        found = [candidate for candidate in iterate(functools.partial(self._models.list_versions, name))
                 if candidate.status is VersionStatus.READY and derived_from(candidate) == parent
                 and scheme_of(candidate) is not None]
        return min(found, key=lambda candidate: candidate.version, default=None)

    # ----------------------------------------------------------------------------------- internals
    def _lock(self, name: str, version: int) -> threading.Lock:
        """One optimization of a given version at a time in this process (two concurrent calls would
        otherwise both find no derivative and register two)."""
        with self._guard:
            return self._locks.setdefault((name, version), threading.Lock())

    def _reuse(self, parent: ModelVersion, signature: Signature, existing: ModelVersion, tolerance: float,
               goal: str) -> dict[str, Any]:
        _, report = self._quantizer(self._read(parent), signature, tolerance, goal=goal,
                                    derived=self._read(existing))
        return {**_as_dict(report), "method": METHOD, "scheme": scheme_of(existing), "reused": True,
                "parent_version": parent.version, "version": existing.version}

    def _create(self, parent: ModelVersion, signature: Signature, tolerance: float, goal: str,
                created_by: str) -> tuple[ModelVersion, dict[str, Any]]:
        derived, report = self._quantizer(self._read(parent), signature, tolerance, goal=goal)
        body = _as_dict(report)
        diff = body.get("max_rel_diff")
        description = derivative_description(parent.version, str(body.get("scheme") or "int8"),
                                             float(diff) if isinstance(diff, int | float) else None, tolerance)
        sha256 = hashlib.sha256(derived).hexdigest()
        pending = self._models.begin_version(parent.model, created_by=created_by, description=description,
                                             plan=UploadPlan(size=len(derived), sha256=sha256),
                                             parent_version=parent.version, limits=parent.limits)
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
