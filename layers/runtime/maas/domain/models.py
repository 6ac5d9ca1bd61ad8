"""Domain entities: models, immutable versions, aliases, deployments and tokens."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class VersionStatus(StrEnum):
    PENDING = "PENDING"
    READY = "READY"
    FAILED = "FAILED"


class DeploymentStatus(StrEnum):
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    ROLLED_BACK = "ROLLED_BACK"
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        return self is not DeploymentStatus.IN_PROGRESS


class Strategy(StrEnum):
    ALL_AT_ONCE = "all_at_once"
    CANARY = "canary"
    LINEAR = "linear"


class OptimizeGoal(StrEnum):
    """What an int8 derivative is for. Either way it must be smaller than its parent; ``latency`` also
    demands that it be measurably faster, ``size`` only that it not be measurably slower."""

    LATENCY = "latency"
    SIZE = "size"


class Scope(StrEnum):
    """Token scopes. ``admin`` implies ``deploy`` which implies ``invoke``."""

    ADMIN = "admin"
    DEPLOY = "deploy"
    INVOKE = "invoke"

    def grants(self, needed: Scope) -> bool:
        order = [Scope.INVOKE, Scope.DEPLOY, Scope.ADMIN]
        return order.index(self) >= order.index(needed)


class TensorSpec(Frozen):
    """One graph input or output. ``datatype`` uses OIP v2 names (FP32, INT64, BYTES...);
    ``shape`` uses -1 for dynamic dimensions."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class Signature(Frozen):
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


class Model(Frozen):
    name: str
    description: str = ""
    tags: dict[str, str] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utcnow)
    created_by: str = ""


class RunLimits(Frozen):
    """A version's own bounds on one model run, tighter than the server's (``maas.settings.Limits``),
    never looser: a version that must answer in 2 s, or whose answers are never over 1 MiB, says so at
    registration and a request past it is stopped there. None: the server's limit."""

    max_inference_seconds: float | None = Field(default=None, gt=0, le=3600)
    max_output_bytes: int | None = Field(default=None, gt=0)


class ModelVersion(Frozen):
    """A version is immutable once READY; PENDING and FAILED records carry no servable artifact."""

    model: str
    version: int
    status: VersionStatus = VersionStatus.PENDING
    status_reason: str = ""
    sha256: str | None = None
    size: int | None = None
    storage_key: str | None = None
    storage_version_id: str | None = None
    framework: str = "onnx"
    signature: Signature | None = None
    parent_version: int | None = None
    upload_id: str | None = None
    description: str = ""
    limits: RunLimits | None = None
    created_by: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Alias(Frozen):
    model: str
    alias: str
    version: int
    updated_at: datetime = Field(default_factory=utcnow)


class HealthThresholds(Frozen):
    """Limits a canary must stay within while it bakes (used by progressive strategies)."""

    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    max_p99_latency_ms: float | None = Field(default=None, gt=0)
    max_p99_latency_ratio: float | None = Field(default=2.0, gt=0)


class DeploymentEvent(Frozen):
    at: datetime = Field(default_factory=utcnow)
    kind: str
    detail: str = ""


class Deployment(Frozen):
    """One deploy operation and, while it is live, the model's traffic routing.

    The live route of a model is the newest IN_PROGRESS deployment if there is one (stable plus a
    weighted canary), otherwise the newest SUCCEEDED deployment (stable only). Rolling back marks the
    current deployment ROLLED_BACK, which makes the previous SUCCEEDED one live again.
    """

    id: str
    model: str
    seq: int = 0
    version: int
    target: str = "lambda"
    strategy: Strategy = Strategy.ALL_AT_ONCE
    stable_version: int | None
    canary_version: int | None = None
    canary_weight: float = Field(default=0.0, ge=0, le=100)
    canary_percent: float = Field(default=10.0, gt=0, le=100)
    linear_step_percent: float = Field(default=10.0, gt=0, le=100)
    bake_seconds: int = Field(default=0, ge=0)
    # linear: seconds between two traffic steps (each step bakes that long); None means bake_seconds
    linear_interval_seconds: int | None = Field(default=None, ge=0)
    # quantize the version (int8, checked against the parent's outputs) and deploy the derived version
    optimize: bool = False
    thresholds: HealthThresholds = Field(default_factory=HealthThresholds)
    status: DeploymentStatus = DeploymentStatus.IN_PROGRESS
    events: tuple[DeploymentEvent, ...] = ()
    created_by: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)

    def with_event(self, kind: str, detail: str = "", **changes: object) -> Deployment:
        now = utcnow()
        event = DeploymentEvent(at=now, kind=kind, detail=detail)
        return self.model_copy(update={**changes, "events": (*self.events, event), "updated_at": now})

    def live_route(self) -> Route | None:
        """Where requests go while this deployment is the model's live one (the newest IN_PROGRESS,
        else the newest SUCCEEDED: choosing it is the registry's job, this is the rest)."""
        if self.status is DeploymentStatus.SUCCEEDED:
            stable = self.stable_version if self.stable_version is not None else self.version
            return Route(model=self.model, stable_version=stable, deployment_id=self.id, target=self.target)
        if self.stable_version is None:
            # A first deploy in flight: nothing serves until it is promoted, unless it already shifts
            # traffic to a canary, which then takes all of it (there is nothing else to send it to).
            if self.canary_version is None or self.canary_weight <= 0:
                return None
            return Route(model=self.model, stable_version=self.canary_version, deployment_id=self.id,
                         target=self.target)
        canary = self.canary_version
        return Route(model=self.model, stable_version=self.stable_version, canary_version=canary,
                     canary_weight=self.canary_weight if canary is not None else 0.0, deployment_id=self.id,
                     target=self.target)

    def referenced_versions(self) -> set[int]:
        refs = {self.version}
        if self.stable_version is not None:
            refs.add(self.stable_version)
        if self.canary_version is not None:
            refs.add(self.canary_version)
        return refs


class Route(Frozen):
    """Where a model's unversioned inference requests go right now."""

    model: str
    stable_version: int
    canary_version: int | None = None
    canary_weight: float = 0.0
    deployment_id: str
    # "lambda" (this process or the inference function runs the model) or "sagemaker" (requests are
    # proxied to the model's SageMaker endpoint, which does its own blue/green traffic shifting)
    target: str = "lambda"


class Token(Frozen):
    id: str
    name: str
    token_hash: str
    scopes: tuple[Scope, ...]
    model: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    created_by: str = ""
    revoked: bool = False

    def allows(self, needed: Scope, model: str | None = None) -> bool:
        if self.revoked:
            return False
        if self.model is not None and model != self.model:
            # A model-restricted token acts on that model only, never on global resources.
            return False
        return any(scope.grants(needed) for scope in self.scopes)


class UploadPart(Frozen):
    """One part of a multipart upload: bytes ``[(number - 1) * part_size, number * part_size)``."""

    number: int
    url: str
    headers: dict[str, str] = Field(default_factory=dict)


class UploadPlan(Frozen):
    """What the client says about the bytes before sending them, so storage can enforce it: S3 checks
    the sha256 of a single PUT, or of each part of a multipart upload, as the bytes arrive."""

    size: int | None = None
    sha256: str | None = None
    part_size: int | None = None
    part_sha256: tuple[str, ...] = ()

    @property
    def multipart(self) -> bool:
        return bool(self.part_sha256)


class UploadTarget(Frozen):
    """Where a client sends a version's bytes: a URL on the server (local), a presigned URL (S3), or
    one presigned URL per part (S3 multipart; ``url`` is then None). The commit call finishes it."""

    upload_id: str
    url: str | None
    method: str = "PUT"
    headers: dict[str, str] = Field(default_factory=dict)
    parts: tuple[UploadPart, ...] = ()
    part_size: int | None = None
    expires_at: datetime


class Page(BaseModel, Generic[T]):
    model_config = ConfigDict(defer_build=True)

    items: list[T]
    next_cursor: str | None = None
