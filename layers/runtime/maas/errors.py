"""Error classes shared by every layer.

Each class carries the HTTP status and problem type it maps to, so adapters (FastAPI, the Lambda
handlers, the CLI) translate errors in one place, and the Step Functions workflow can name them in
Retry/Catch clauses. Messages are written for users: they name the offending field and never contain
paths, tracebacks or infrastructure names.
"""

from __future__ import annotations

from typing import Any, ClassVar


class MaasError(Exception):
    """Base of every error maas raises on purpose."""

    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    slug: ClassVar[str] = "internal"

    def __init__(self, detail: str, *, field: str | None = None, extra: dict[str, Any] | None = None):
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.extra = extra or {}

    @property
    def type_uri(self) -> str:
        return f"https://maas.dev/problems/{self.slug}"

    def to_problem(self, instance: str | None = None) -> dict[str, Any]:
        """RFC 9457 problem details body."""
        body: dict[str, Any] = {
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.field is not None:
            body["field"] = self.field
        if instance is not None:
            body["instance"] = instance
        body.update(self.extra)
        return body


class InvalidInput(MaasError):
    status = 422
    title = "Invalid input"
    slug = "invalid-input"


class BadRequest(MaasError):
    status = 400
    title = "Bad request"
    slug = "bad-request"


class NotFound(MaasError):
    status = 404
    title = "Not found"
    slug = "not-found"


class Conflict(MaasError):
    status = 409
    title = "Conflict"
    slug = "conflict"


class Unauthorized(MaasError):
    status = 401
    title = "Unauthorized"
    slug = "unauthorized"


class Forbidden(MaasError):
    status = 403
    title = "Forbidden"
    slug = "forbidden"


class PayloadTooLarge(MaasError):
    status = 413
    title = "Payload too large"
    slug = "payload-too-large"


class UnsupportedMediaType(MaasError):
    status = 415
    title = "Unsupported media type"
    slug = "unsupported-media-type"


class ModelRejected(MaasError):
    """The uploaded artifact failed validation; the version is marked FAILED with this reason."""

    status = 422
    title = "Model rejected"
    slug = "model-rejected"


class ChecksumMismatch(MaasError):
    status = 422
    title = "Checksum mismatch"
    slug = "checksum-mismatch"


class NotReady(MaasError):
    """The model exists but has nothing deployed or its version is not READY."""

    status = 409
    title = "Not ready"
    slug = "not-ready"


class Throttled(MaasError):
    status = 429
    title = "Too many requests"
    slug = "throttled"

    def __init__(self, detail: str, *, retry_after: int = 1, **kw: Any):
        super().__init__(detail, **kw)
        self.retry_after = retry_after


class Unavailable(MaasError):
    status = 503
    title = "Service unavailable"
    slug = "unavailable"

    def __init__(self, detail: str, *, retry_after: int = 1, **kw: Any):
        super().__init__(detail, **kw)
        self.retry_after = retry_after


class RequestTimeout(MaasError):
    """The request body stopped arriving (or took too long in all): the connection is not held open."""

    status = 408
    title = "Request timeout"
    slug = "request-timeout"


class InferenceTimeout(MaasError):
    """A model run passed ``Limits.max_inference_seconds`` and was stopped."""

    status = 504
    title = "Inference timed out"
    slug = "inference-timeout"


class OutputTooLarge(MaasError):
    """A request made the model produce more output than ``Limits.max_output_bytes``: nothing is
    encoded or sent. A property of the request (its sizes or values), not a fault of the version."""

    status = 422
    title = "Output too large"
    slug = "output-too-large"


class MemoryLimitExceeded(MaasError):
    """One model run asked for more memory than ``Limits.inference_memory_bytes`` holds in all: no
    retry can succeed with this input. A property of the request, not a fault of the version."""

    status = 422
    title = "Memory limit exceeded"
    slug = "memory-limit-exceeded"


class MemoryBusy(Unavailable):
    """A model run found the inference memory taken by other runs and sessions: the same request may fit
    in a moment (503, Retry-After). Capacity, not the version's fault: never counted against its health."""

    title = "Inference memory busy"
    slug = "inference-memory-busy"


class InputRejected(MaasError):
    """onnxruntime refused the request's values while running the model (``INVALID_ARGUMENT``: a token
    id beyond the vocabulary, a sequence longer than the model's positions): the caller's input, not a
    server fault, so it never counts against the version's health."""

    status = 400
    title = "Input rejected by the model"
    slug = "input-rejected"


class InferenceFailed(MaasError):
    """onnxruntime raised while running a model on inputs that passed the signature checks."""

    status = 500
    title = "Inference failed"
    slug = "inference-failed"


class StorageCorrupted(MaasError):
    """An artifact's bytes no longer hash to the sha256 recorded at registration."""

    status = 500
    title = "Stored artifact is corrupted"
    slug = "storage-corrupted"


class Unhealthy(MaasError):
    """A version being deployed failed a health verdict: its smoke test produced NaN/Inf or outputs of
    the wrong shape, or during the bake its error rate or p99 latency broke the deployment's
    thresholds (or its endpoint rolled itself back). The deploy workflow rolls it back."""

    status = 422
    title = "Unhealthy"
    slug = "unhealthy"
