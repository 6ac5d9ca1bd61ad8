"""Models and their immutable versions: create, push (reserve upload -> commit), delete.

Registering a version is a two-step protocol so the bytes can go straight to storage (a presigned S3
URL on AWS): the version number is allocated as PENDING with an upload reservation, the client
uploads, and ``commit`` verifies size and sha256, validates the model in a sandboxed child process,
promotes the bytes durably and only then flips the version to READY in one conditional write. A crash
at any point leaves either nothing servable or a PENDING/FAILED record that cleanup removes."""

from __future__ import annotations

import re
from dataclasses import dataclass

from maas.domain import (
    Model,
    ModelVersion,
    Page,
    RunLimits,
    UploadPlan,
    UploadTarget,
    VersionStatus,
    check_alias_name,
    check_model_name,
    check_version_number,
)
from maas.errors import ChecksumMismatch, Conflict, InvalidInput, ModelRejected, NotFound, NotReady
from maas.ports import ArtifactStore, Registry, Validator
from maas.services.digests import sha256_file
from maas.settings import Limits

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
TAG_KEY = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
# S3's multipart rules: parts of 5 MiB to 5 GiB (the last may be smaller), at most 10,000 of them.
MIN_PART_BYTES = 5 * 1024 * 1024
MAX_PART_BYTES = 5 * 1024 * 1024 * 1024
MAX_PARTS = 10_000


@dataclass(frozen=True)
class PendingVersion:
    version: ModelVersion
    upload: UploadTarget


class ModelService:
    def __init__(self, registry: Registry, artifacts: ArtifactStore, validator: Validator, limits: Limits):
        self._registry = registry
        self._artifacts = artifacts
        self._validator = validator
        self._limits = limits

    # --- models -------------------------------------------------------------------------------
    def create_model(self, name: str, *, description: str = "", tags: dict[str, str] | None = None,
                     created_by: str = "") -> Model:
        check_model_name(name)
        if len(description) > 4096:
            raise InvalidInput("description must be at most 4096 characters", field="description")
        tags = dict(tags or {})
        if len(tags) > 50:
            raise InvalidInput("at most 50 tags", field="tags")
        for key, value in tags.items():
            if not TAG_KEY.fullmatch(key) or len(value) > 256:
                raise InvalidInput("tag keys are 1-128 of [A-Za-z0-9_.:/-], values at most 256 characters",
                                   field=f"tags.{key[:32]}")
        return self._registry.create_model(
            Model(name=name, description=description, tags=tags, created_by=created_by)
        )

    def get_model(self, name: str) -> Model:
        return self._registry.get_model(check_model_name(name))

    def list_models(self, limit: int, cursor: str | None) -> Page[Model]:
        return self._registry.list_models(self._clamp(limit), cursor)

    def delete_model(self, name: str, *, force: bool = False) -> None:
        """Delete a model with its versions, aliases and deployments. Refused while it serves traffic
        unless forced, so a typo cannot take a production model offline. Artifacts are freed by
        cleanup (content-addressed blobs may be shared with other versions)."""
        check_model_name(name)
        try:
            self._registry.get_model(name)
        except NotFound:
            # A delete interrupted midway leaves a model that reads as gone but still holds items (and
            # its name): deleting again resumes and finishes it, and NotFound only when nothing is left.
            self._registry.delete_model(name)
            return
        if not force and self._registry.get_route(name) is not None:
            raise Conflict(f"model {name!r} is deployed and serving traffic; force the delete to proceed",
                           field="force")
        self._registry.delete_model(name)

    # --- versions -----------------------------------------------------------------------------
    def begin_version(self, name: str, *, created_by: str = "", description: str = "",
                      plan: UploadPlan | None = None, parent_version: int | None = None,
                      limits: RunLimits | None = None) -> PendingVersion:
        """Reserve the next version (PENDING) and an upload for its bytes. ``parent_version`` records
        lineage for a derived version (e.g. quantized); it must exist (NotFound otherwise). ``limits``:
        the version's own run limits, at most the server's (``InvalidInput`` naming the field above)."""
        check_model_name(name)
        if len(description) > 4096:
            raise InvalidInput("description must be at most 4096 characters", field="description")
        limits = self._check_run_limits(limits)
        if parent_version is not None:
            parent_version = check_version_number(parent_version)
        plan = self._check_plan(plan or UploadPlan())
        self._registry.get_model(name)
        upload = self._artifacts.create_upload(name, plan=plan)
        try:
            version = self._registry.allocate_version(
                name, created_by=created_by, upload_id=upload.upload_id, description=description,
                parent_version=parent_version, limits=limits,
            )
        except BaseException:
            self._artifacts.discard_upload(upload.upload_id)
            raise
        return PendingVersion(version=version, upload=upload)

    def _check_run_limits(self, limits: RunLimits | None) -> RunLimits | None:
        """A version's limits may tighten the server's, never loosen them: a client must not believe a
        looser bound was applied. Limits that set nothing are not recorded."""
        if limits is None or (limits.max_inference_seconds is None and limits.max_output_bytes is None):
            return None
        seconds, server_seconds = limits.max_inference_seconds, self._limits.max_inference_seconds
        if seconds is not None and seconds > server_seconds:
            raise InvalidInput(f"limits.max_inference_seconds is {seconds:g} s, above this server's "
                               f"max_inference_seconds of {server_seconds:g} s: a version's limits can only be "
                               "tighter than the server's", field="limits.max_inference_seconds")
        output, server_output = limits.max_output_bytes, self._limits.max_output_bytes
        if output is not None and output > server_output:
            raise InvalidInput(f"limits.max_output_bytes is {output}, above this server's max_output_bytes of "
                               f"{server_output}: a version's limits can only be tighter than the server's",
                               field="limits.max_output_bytes")
        return limits

    def abort_version(self, name: str, version: int, reason: str) -> None:
        """Give up on a PENDING version, as a failed commit does: FAILED with ``reason`` (cleanup removes
        it) and its staged upload discarded. A version that got READY or FAILED meanwhile is left as is."""
        current = self._registry.get_version(check_model_name(name), check_version_number(version))
        if current.status is VersionStatus.READY:
            return
        if current.status is VersionStatus.PENDING:
            try:
                self._registry.mark_failed(name, version, reason)
            except Conflict:
                return  # committed meanwhile: nothing half done is left
        if current.upload_id is not None:
            self._artifacts.discard_upload(current.upload_id)

    def _check_plan(self, plan: UploadPlan) -> UploadPlan:
        """The upload plan is optional, but what is given must be coherent: S3 enforces it later."""
        if plan.size is not None:
            if plan.size <= 0:
                raise InvalidInput("size must be a positive integer", field="size")
            if plan.size > self._limits.max_model_bytes:
                raise InvalidInput(f"models are limited to {self._limits.max_model_bytes} bytes", field="size")
        if plan.sha256 is not None and not SHA256_HEX.fullmatch(plan.sha256):
            raise InvalidInput("sha256 must be 64 lowercase hex characters", field="sha256")
        if plan.part_size is None and not plan.part_sha256:
            return plan
        if plan.part_size is None or plan.size is None or plan.sha256 is None:
            raise InvalidInput("a multipart upload needs size, sha256, part_size and part_sha256",
                               field="part_size" if plan.part_size is None else "size")
        if not MIN_PART_BYTES <= plan.part_size <= MAX_PART_BYTES:
            raise InvalidInput(f"part_size must be between {MIN_PART_BYTES} and {MAX_PART_BYTES} bytes",
                               field="part_size")
        expected = -(-plan.size // plan.part_size)
        if expected > MAX_PARTS:
            raise InvalidInput(f"at most {MAX_PARTS} parts; choose a larger part_size", field="part_size")
        if len(plan.part_sha256) != expected:
            raise InvalidInput(f"{plan.size} bytes in parts of {plan.part_size} make {expected} parts, "
                               f"but {len(plan.part_sha256)} part checksums were given", field="part_sha256")
        for index, digest in enumerate(plan.part_sha256):
            if not SHA256_HEX.fullmatch(digest):
                raise InvalidInput("part checksums must be 64 lowercase hex characters",
                                   field=f"part_sha256[{index}]")
        return plan

    def commit_version(self, name: str, version: int, *, sha256: str, size: int) -> ModelVersion:
        check_model_name(name)
        version = check_version_number(version)
        if not isinstance(sha256, str) or not SHA256_HEX.fullmatch(sha256):
            raise InvalidInput("sha256 must be 64 lowercase hex characters", field="sha256")
        if not isinstance(size, int) or size <= 0:
            raise InvalidInput("size must be a positive integer", field="size")
        if size > self._limits.max_model_bytes:
            raise InvalidInput(f"models are limited to {self._limits.max_model_bytes} bytes", field="size")
        current = self._registry.get_version(name, version)
        if current.status is VersionStatus.READY:
            if current.sha256 == sha256:
                return current  # an idempotent retry of a commit that already succeeded
            raise Conflict(f"version {version} of {name!r} is already committed with another sha256",
                           field="sha256")
        if current.status is VersionStatus.FAILED:
            raise Conflict(f"version {version} of {name!r} failed validation: {current.status_reason}")
        upload_id = current.upload_id
        if upload_id is None:
            raise Conflict(f"version {version} of {name!r} has no upload reservation")
        try:
            staged = self._artifacts.inspect_upload(upload_id)
        except NotFound:
            raise Conflict(f"nothing was uploaded for version {version} of {name!r} yet; "
                           "send the file to its upload URL first") from None
        if staged.size != size:
            raise ChecksumMismatch(f"uploaded {staged.size} bytes but the commit says {size}", field="size")
        if staged.sha256 != sha256:
            raise ChecksumMismatch("the uploaded bytes do not match the sha256 given", field="sha256")
        try:
            with self._artifacts.staged_path(upload_id) as path:
                # Validate exactly the bytes being committed: a re-upload may land at any moment.
                if sha256_file(path)[0] != sha256:
                    raise ChecksumMismatch("the uploaded bytes changed during the commit; retry it",
                                           field="sha256")
                signature = self._validator.validate(path)
        except ModelRejected as rejected:
            self._registry.mark_failed(name, version, rejected.detail)
            self._artifacts.discard_upload(upload_id)
            raise
        stored = self._artifacts.promote(upload_id, name, version, expected_sha256=sha256)
        try:
            ready = self._registry.mark_ready(name, version, stored, signature)
        except Conflict:
            ready = self._registry.get_version(name, version)
            if ready.status is not VersionStatus.READY or ready.sha256 != sha256:
                raise
        self._artifacts.discard_upload(upload_id)
        return ready

    def get_version(self, name: str, version: int | str) -> ModelVersion:
        return self._registry.get_version(check_model_name(name), self.resolve(name, version))

    def list_versions(self, name: str, limit: int, cursor: str | None) -> Page[ModelVersion]:
        check_model_name(name)
        self._registry.get_model(name)
        return self._registry.list_versions(name, self._clamp(limit), cursor)

    def delete_version(self, name: str, version: int) -> None:
        self._registry.delete_version(check_model_name(name), check_version_number(version))

    def resolve(self, name: str, ref: int | str) -> int:
        """A version number, or an alias name resolved to the version it points at."""
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isascii() and ref.isdigit()):
            return check_version_number(ref)
        alias = check_alias_name(ref, field="version")
        return self._registry.get_alias(name, alias).version

    def ready_version(self, name: str, ref: int | str) -> ModelVersion:
        found = self.get_version(name, ref)
        if found.status is not VersionStatus.READY:
            raise NotReady(f"version {found.version} of {name!r} is {found.status.value}, not READY",
                           field="version")
        return found

    def _clamp(self, limit: int) -> int:
        if limit < 1:
            raise InvalidInput("limit must be at least 1", field="limit")
        return min(limit, self._limits.page_size_max)
