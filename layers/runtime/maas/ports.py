"""Ports: what the services need from a backend. The local backend (files + SQLite) and the AWS
backend (S3 + DynamoDB) implement them; services and the API see only these Protocols."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from maas.domain import (
    Alias,
    Deployment,
    DeploymentStatus,
    Model,
    ModelVersion,
    Page,
    Route,
    RunLimits,
    Signature,
    Token,
    UploadPlan,
    UploadTarget,
)


@dataclass(frozen=True)
class StoredArtifact:
    """An artifact that is durably stored and can be served: its bytes hash to ``sha256``."""

    sha256: str
    size: int
    key: str
    version_id: str | None = None


@dataclass(frozen=True)
class StagedUpload:
    """Bytes a client uploaded that are not yet validated nor promoted."""

    upload_id: str
    size: int
    sha256: str


@runtime_checkable
class ArtifactStore(Protocol):
    def create_upload(self, model: str, version: int = 0, plan: UploadPlan | None = None) -> UploadTarget:
        """Reserve a place for the client to upload to; expires after the upload TTL. The version is
        not known yet when the upload is reserved (0): the registry records the upload id instead.
        ``plan`` (checked by the service) lets storage enforce checksums while the bytes arrive; a
        store that needs it (S3) raises InvalidInput naming the missing field."""
        ...

    def receive_upload(self, upload_id: str, body: BinaryIO, max_bytes: int) -> StagedUpload:
        """Accept bytes for an upload (local backend only; S3 receives them by presigned URL)."""
        ...

    def inspect_upload(self, upload_id: str) -> StagedUpload:
        """Size and sha256 of what was uploaded. Raises NotFound if nothing arrived."""
        ...

    def staged_path(self, upload_id: str) -> AbstractContextManager[Path]:
        """A local file holding the staged bytes, for the validator child process."""
        ...

    def upload_model(self, upload_id: str) -> str:
        """The model an upload was reserved for (NotFound if unknown or expired)."""
        ...

    def promote(self, upload_id: str, model: str, version: int, expected_sha256: str) -> StoredArtifact:
        """Durably store the staged bytes where versions are served from (idempotent). The bytes
        stored must hash to ``expected_sha256`` (the ones validated), else Conflict: a re-upload
        racing with a commit can never slip unvalidated bytes in."""
        ...

    def discard_upload(self, upload_id: str) -> None: ...

    def read(self, artifact: StoredArtifact) -> bytes:
        """The artifact's bytes, re-hashed: raises StorageCorrupted if they changed."""
        ...

    def exists(self, artifact: StoredArtifact) -> bool: ...

    def delete(self, artifact: StoredArtifact) -> None: ...

    def list_artifacts(self) -> Iterator[StoredArtifact]: ...

    def modified_at(self, artifact: StoredArtifact) -> datetime:
        """When the artifact was last written or promoted again (cleanup spares young ones)."""
        ...

    def list_uploads(self) -> Iterator[tuple[str, float]]:
        """(upload_id, age in seconds) of every staged upload, for cleanup."""
        ...


@runtime_checkable
class Registry(Protocol):
    # models
    def create_model(self, model: Model) -> Model: ...
    def get_model(self, name: str) -> Model: ...
    def list_models(self, limit: int, cursor: str | None) -> Page[Model]: ...
    def delete_model(self, name: str) -> list[ModelVersion]:
        """Delete a model and everything under it; returns the versions it had (to free artifacts)."""
        ...

    # versions
    def allocate_version(self, model: str, *, created_by: str, upload_id: str, description: str = "",
                         parent_version: int | None = None, limits: RunLimits | None = None) -> ModelVersion:
        """Atomically take the next version number, recorded as PENDING (with its own run limits)."""
        ...

    def get_version(self, model: str, version: int) -> ModelVersion: ...
    def list_versions(self, model: str, limit: int, cursor: str | None) -> Page[ModelVersion]: ...
    def list_versions_by_status(self, status: str) -> list[ModelVersion]: ...
    def mark_ready(self, model: str, version: int, artifact: StoredArtifact,
                   signature: Signature) -> ModelVersion:
        """PENDING -> READY, conditionally: raises Conflict if the version is no longer PENDING."""
        ...

    def mark_failed(self, model: str, version: int, reason: str) -> ModelVersion:
        """PENDING -> FAILED, conditionally."""
        ...

    def delete_version(self, model: str, version: int) -> ModelVersion:
        """Delete a version no alias or deployment references (else Conflict)."""
        ...

    # aliases
    def set_alias(self, model: str, alias: str, version: int) -> Alias:
        """Point an alias at a READY version (Conflict otherwise), in one conditional write."""
        ...

    def get_alias(self, model: str, alias: str) -> Alias: ...
    def list_aliases(self, model: str) -> list[Alias]: ...
    def delete_alias(self, model: str, alias: str) -> None: ...

    # deployments
    def create_deployment(self, deployment: Deployment) -> Deployment:
        """Insert a deployment; Conflict if another is IN_PROGRESS for the model or a referenced
        version is not READY. Assigns ``seq``."""
        ...

    def update_deployment(self, deployment: Deployment, expected: DeploymentStatus) -> Deployment:
        """Replace a deployment if its stored status is still ``expected`` (else Conflict)."""
        ...

    def get_deployment(self, deployment_id: str) -> Deployment: ...
    def list_deployments(self, model: str, limit: int, cursor: str | None) -> Page[Deployment]: ...
    def get_route(self, model: str) -> Route | None: ...

    # tokens
    def create_token(self, token: Token) -> Token: ...
    def find_token(self, token_hash: str) -> Token | None: ...
    def list_tokens(self) -> list[Token]: ...
    def revoke_token(self, token_id: str) -> Token: ...


@dataclass(frozen=True)
class StoredResponse:
    """What an idempotent request answered, kept so that a retry gets the same bytes back."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True)
class IdempotencyRecord:
    """One ``Idempotency-Key`` of one principal (a token id): in progress while ``response`` is None.

    ``key`` is what the service files the client's key under (a digest: stores never see the key
    itself, which seals the stored ``response.body``; see ``maas.services.idempotency``).
    ``claim`` identifies the request holding the key, so that only it can complete or release it;
    ``lease_until`` bounds how long an in-progress claim blocks the key (a crashed holder never
    completes); ``expires_at`` is when the key is forgotten altogether. Times are epoch seconds."""

    principal: str
    key: str
    fingerprint: str
    claim: str
    expires_at: float
    lease_until: float
    response: StoredResponse | None = None

    @property
    def completed(self) -> bool:
        return self.response is not None


@runtime_checkable
class IdempotencyStore(Protocol):
    """Where idempotency keys live (SQLite table locally, DynamoDB items on AWS).

    ``claim`` is the one atomic step that makes "exactly once" hold across threads, processes and
    Lambda containers: of any number of concurrent claims of a key, exactly one succeeds."""

    def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        """Store ``record`` (in progress) unless a live record holds its key: a completed one not
        yet expired, or an in-progress one whose lease has not run out. Returns None when the claim
        was taken, else the record holding the key."""
        ...

    def complete(self, principal: str, key: str, claim: str, response: StoredResponse,
                 expires_at: float) -> bool:
        """Record the response of the claim ``claim``; False (nothing written) if that claim no
        longer holds the key (its lease ran out and another request took it over)."""
        ...

    def release(self, principal: str, key: str, claim: str) -> None:
        """Forget the key if ``claim`` still holds it and has not completed (the request failed
        without a result worth replaying: a retry must run it again)."""
        ...

    def get(self, principal: str, key: str, now: float) -> IdempotencyRecord | None:
        """The live record of a key (expired ones read as absent)."""
        ...


class Validator(Protocol):
    def validate(self, path: Path) -> Signature:
        """Check an artifact is a safe, runnable ONNX model; raises ModelRejected with the reason."""
        ...


class Metrics(Protocol):
    """Per model-version counters and timings (Prometheus locally, EMF/CloudWatch on AWS).

    ``routed`` is False for a request that named its version (``/versions/{v}/infer``): the router did
    not send it, so it never counts toward a deploy's health (a caller could otherwise veto a canary)."""

    def invocation(self, model: str, version: int, *, latency_s: float, error: bool,
                   routed: bool = True) -> None: ...
    def cache(self, model: str, version: int, *, hit: bool) -> None: ...
    def model_load(self, model: str, version: int, *, seconds: float) -> None: ...


class NullMetrics:
    def invocation(self, model: str, version: int, *, latency_s: float, error: bool,
                   routed: bool = True) -> None:
        return None

    def cache(self, model: str, version: int, *, hit: bool) -> None:
        return None

    def model_load(self, model: str, version: int, *, seconds: float) -> None:
        return None


class DeployExecutor(Protocol):
    """Runs the deploy workflow (``maas.services.deploy``) for a deployment just created IN_PROGRESS.

    In-process, ``start`` returns the finished deployment (or raises the error that failed it, after
    the rollback step ran); a remote executor (Step Functions) returns it still IN_PROGRESS and the
    workflow carries on elsewhere. Starting the same deployment twice starts one workflow."""

    def start(self, deployment: Deployment) -> Deployment: ...

    def cancel(self, deployment: Deployment) -> None:
        """A manual rollback ended the deployment: stop its workflow promptly (wake an in-process
        wait; stop a Step Functions execution). The steps already leave a cancelled deployment alone."""
        ...

    def undo_endpoint(self, deployment: Deployment) -> None:
        """A manual rollback ended a deployment whose endpoint target refused to roll back now (an
        endpoint update still runs, and SageMaker cannot stop one): put the endpoint back on its
        previous configuration once the target accepts it, retrying as the rollback step does."""
        ...


@dataclass(frozen=True)
class VersionHealth:
    """What a version did in a window of time: the input of a deploy's health check."""

    requests: int
    errors: int
    p99_latency_ms: float | None  # None: no successful request in the window

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class HealthSource(Protocol):
    """Per model-version request metrics over a window (local counters; CloudWatch on AWS)."""

    def health(self, model: str, version: int, since: datetime, until: datetime) -> VersionHealth: ...


class TargetState(StrEnum):
    UPDATING = "updating"
    IN_SERVICE = "in_service"  # the deployment's version serves all of the endpoint's traffic
    ROLLED_BACK = "rolled_back"  # the target undid the update (e.g. SageMaker's alarm-based auto-rollback)
    FAILED = "failed"


@dataclass(frozen=True)
class TargetStatus:
    state: TargetState
    reason: str = ""


class EndpointTarget(Protocol):
    """A deployment target that shifts traffic itself (SageMaker blue/green with canary or linear
    traffic routing and alarm-based auto-rollback): the deploy workflow starts the update and polls it,
    and the inference path proxies requests to it."""

    def shift(self, deployment: Deployment, version: ModelVersion) -> None:
        """Create or update the model's endpoint to serve ``version`` with the deployment's strategy.
        Idempotent: a second call for the same deployment while its update runs changes nothing."""
        ...

    def status(self, deployment: Deployment) -> TargetStatus: ...

    def rollback(self, deployment: Deployment) -> None:
        """Stop an update in flight / return the endpoint to the deployment's stable version."""
        ...

    def invoke(self, model: str, body: bytes, content_type: str) -> tuple[bytes, str]:
        """Send one OIP v2 request to the model's endpoint; returns the answer and its content type."""
        ...


class Backend(Protocol):
    """What ``create_app`` needs: the storage ports plus the validator, and optionally where deploys
    run (``deploy_executor`` None: in the API's process, as the local backend does)."""

    registry: Registry
    artifacts: ArtifactStore
    validator: Validator
    #: where ``Idempotency-Key``s of mutating API calls are kept (``maas.services.idempotency``)
    idempotency: IdempotencyStore

    @property
    def deploy_executor(self) -> DeployExecutor | None: ...

    @property
    def endpoint_targets(self) -> Mapping[str, EndpointTarget]:
        """Deployment targets that shift traffic themselves, by target name (``sagemaker``); may be empty."""
        ...
