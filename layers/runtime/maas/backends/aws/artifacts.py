"""Artifacts in S3: a versioned bucket, written by presigned URLs and read by version id.

Layout::

    uploads/<upload_id>/reservation.json   written by create_upload: model, expiry, plan, multipart upload id
    uploads/<upload_id>/model.onnx         the client's bytes (presigned PUT, presigned parts, or the API)
    models/<name>/<version>/model.onnx     promoted artifacts

Why it is shaped like this:

- Clients send their bytes straight to S3 with presigned URLs that sign ``x-amz-checksum-sha256``: S3
  itself refuses bytes other than the ones announced in the upload plan (for a multipart upload, each
  part is checked against its own sha256). The commit still hashes what it validates: a presigned URL
  can be re-used until it expires, and S3 emulators do not enforce checksums.
- The bucket is versioned and the registry records the S3 ``VersionId`` of every promoted artifact.
  Every read names that version, so neither an overwrite of the key nor a delete can change or remove
  what a READY version serves: ``delete`` only adds a delete marker, and the bytes stay as a
  noncurrent version until the bucket's lifecycle rule expires them.
- ``promote`` is a server-side copy that asks S3 for the sha256 of the copy (``ChecksumAlgorithm``):
  the bytes that become servable are proven to be the ones that were validated, or the copy is
  removed and the commit answers Conflict.
- The validator needs a local file (on Lambda, under /tmp). The file downloaded by ``inspect_upload``
  is kept for ``staged_path`` and ``promote`` of the same commit, keyed by the upload object's
  VersionId, so a commit downloads the bytes at most once; a small bound keeps /tmp from filling up.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from botocore.exceptions import BotoCoreError, ClientError

from maas.backends.aws.errors import aws_errors, error_code, translated
from maas.domain import UploadPart, UploadPlan, UploadTarget, check_model_name, check_version_number
from maas.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge, StorageCorrupted
from maas.ports import StagedUpload, StoredArtifact
from maas.settings import Limits

log = logging.getLogger("maas.aws")

WHAT = "model storage"
CHUNK = 1024 * 1024
UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
MODEL_KEY = re.compile(r"models/[a-z0-9][a-z0-9-]{0,62}/[1-9][0-9]{0,8}/model\.onnx")
UPLOADS = "uploads/"
MODELS = "models/"
RESERVATION = "reservation.json"
UPLOAD_OBJECT = "model.onnx"
#: SigV4 presigned URLs are valid for at most 7 days (and never longer than the signing credentials).
MAX_PRESIGN_S = 7 * 24 * 3600
#: Downloaded uploads kept on local disk between inspect, staged_path and promote of a commit.
MAX_CACHED_FILES = 2
MAX_CACHED_ENTRIES = 256
CONTENT_TYPE = "application/octet-stream"
#: Error codes that mean "this key, version or multipart upload is not there". S3 answers 405
#: (MethodNotAllowed) for a version id that names a delete marker.
MISSING = frozenset({"NoSuchKey", "NoSuchVersion", "NoSuchUpload", "NotFound", "404", "MethodNotAllowed", "405"})
#: CompleteMultipartUpload refusals that mean the parts are not a valid whole (the client's fault).
BAD_PARTS = frozenset({"InvalidPart", "InvalidPartOrder", "EntityTooSmall", "InvalidRequest", "BadDigest"})


def check_upload_id(upload_id: str) -> str:
    """Upload ids are ``uuid4().hex``; anything else never reaches a storage key."""
    if not isinstance(upload_id, str) or not UPLOAD_ID.fullmatch(upload_id):
        raise InvalidInput("upload id must be 32 lowercase hex characters", field="upload_id")
    return upload_id


def upload_key(upload_id: str) -> str:
    return f"{UPLOADS}{upload_id}/{UPLOAD_OBJECT}"


def reservation_key(upload_id: str) -> str:
    return f"{UPLOADS}{upload_id}/{RESERVATION}"


def model_key(model: str, version: int) -> str:
    return f"{MODELS}{check_model_name(model, field='model')}/{check_version_number(version)}/model.onnx"


def hex_to_b64(sha256_hex: str) -> str:
    """S3 speaks base64 of the raw digest; maas speaks hex."""
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode("ascii")


def b64_to_hex(checksum: str) -> str | None:
    try:
        raw = base64.b64decode(checksum, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def is_missing(error: ClientError) -> bool:
    """An object, version or upload that is not there. A missing *bucket* is not one: that is the
    stack broken (an outage, 503), not the user's upload gone."""
    code = error_code(error)
    status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return code in MISSING or (status in (404, 405) and code != "NoSuchBucket")


def full_object_sha256(head: dict[str, Any]) -> str | None:
    """The sha256 (hex) S3 verified for the whole object, or None when it does not know one.

    A multipart object only has a *composite* checksum (a hash of the part hashes): S3 marks it with a
    ``-<parts>`` suffix and ``ChecksumType: COMPOSITE``; moto leaves both out, but its multipart ETag
    still ends in ``-<parts>``. None of these may be mistaken for the hash of the bytes."""
    checksum = head.get("ChecksumSHA256")
    if not isinstance(checksum, str) or "-" in checksum:
        return None
    if str(head.get("ChecksumType") or "FULL_OBJECT") != "FULL_OBJECT" or "-" in str(head.get("ETag") or ""):
        return None
    return b64_to_hex(checksum)


def _unlink(path: Path | None) -> None:
    if path is not None:
        with suppress(FileNotFoundError):
            path.unlink()


def _spool(body: BinaryIO, path: Path, max_bytes: int) -> tuple[str, int]:
    """Copy a stream to ``path`` while hashing it, refusing more than ``max_bytes`` (PayloadTooLarge);
    returns (sha256 hex, size). The file is removed if anything fails: /tmp is small on Lambda."""
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("wb") as out:
            while chunk := body.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"the upload is larger than the limit of {max_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        _unlink(path)
        raise
    return digest.hexdigest(), size


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class _Staged:
    """What is known about one version of an upload object; ``path`` holds its bytes when downloaded."""

    version_id: str
    size: int
    sha256: str
    path: Path | None = None


class S3ArtifactStore:
    """``maas.ports.ArtifactStore`` on a versioned S3 bucket (``client`` is a boto3 ``s3`` client)."""

    def __init__(self, client: Any, bucket: str, limits: Limits, *, tmp_dir: Path | None = None):
        self.client = client
        self.bucket = bucket
        self.limits = limits
        self.tmp_dir = Path(tmp_dir) if tmp_dir is not None else Path(tempfile.gettempdir()) / "maas-s3"
        self._lock = threading.Lock()
        self._staged: OrderedDict[str, _Staged] = OrderedDict()

    # --- uploads ---------------------------------------------------------------------------------
    @translated(WHAT)
    def create_upload(self, model: str, version: int = 0, plan: UploadPlan | None = None) -> UploadTarget:
        """Reserve an upload and presign where the bytes go. S3 checks a checksum only if it is told it
        before the bytes arrive, so the plan's sha256 (and size) are required here; a multipart plan
        gets one presigned URL per part, each bound to that part's sha256.

        The URLs live ``min(upload TTL, 7 days)`` (SigV4's maximum); signed with temporary credentials
        (a Lambda role), they also stop working when those credentials expire."""
        if plan is None or plan.sha256 is None:
            raise InvalidInput("uploads to S3 need size and sha256 up front", field="sha256")
        if plan.size is None:
            raise InvalidInput("uploads to S3 need size and sha256 up front", field="size")
        if plan.part_sha256 and plan.part_size is None:
            raise InvalidInput("a multipart upload needs part_size", field="part_size")
        upload_id = uuid.uuid4().hex
        key = upload_key(upload_id)
        now = datetime.now(UTC)
        url_ttl_s = min(self.limits.upload_ttl_s, MAX_PRESIGN_S)
        url_expires_at = now + timedelta(seconds=url_ttl_s)
        record: dict[str, Any] = {
            "model": model, "version": version, "size": plan.size, "sha256": plan.sha256,
            "expires_at": (now + timedelta(seconds=self.limits.upload_ttl_s)).isoformat(),
        }
        if not plan.part_sha256:
            self._put_reservation(upload_id, record)
            checksum = hex_to_b64(plan.sha256)
            url = self.client.generate_presigned_url(
                "put_object", ExpiresIn=url_ttl_s,
                Params={"Bucket": self.bucket, "Key": key, "ChecksumSHA256": checksum, "ContentType": CONTENT_TYPE},
            )
            return UploadTarget(upload_id=upload_id, url=url, method="PUT",
                                headers={"Content-Type": CONTENT_TYPE, "x-amz-checksum-sha256": checksum},
                                expires_at=url_expires_at)
        multipart = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ChecksumAlgorithm="SHA256", ContentType=CONTENT_TYPE
        )
        multipart_id = str(multipart["UploadId"])
        try:
            self._put_reservation(upload_id, {**record, "multipart_upload_id": multipart_id,
                                              "part_size": plan.part_size, "parts": len(plan.part_sha256)})
        except BaseException:
            with suppress(ClientError, BotoCoreError):  # else list_uploads finds it for cleanup
                self._abort(key, multipart_id)
            raise
        parts = []
        for number, part_sha256 in enumerate(plan.part_sha256, start=1):
            checksum = hex_to_b64(part_sha256)
            url = self.client.generate_presigned_url(
                "upload_part", ExpiresIn=url_ttl_s,
                Params={"Bucket": self.bucket, "Key": key, "UploadId": multipart_id, "PartNumber": number,
                        "ChecksumSHA256": checksum},
            )
            parts.append(UploadPart(number=number, url=url, headers={"x-amz-checksum-sha256": checksum}))
        return UploadTarget(upload_id=upload_id, url=None, method="PUT", parts=tuple(parts),
                            part_size=plan.part_size, expires_at=url_expires_at)

    @translated(WHAT)
    def receive_upload(self, upload_id: str, body: BinaryIO, max_bytes: int) -> StagedUpload:
        """Bytes proxied by the API (``PUT /uploads/{id}``): spooled to a local file while hashed, then
        written to the upload key with that checksum. A multipart upload still open for this
        reservation is aborted: this complete upload is the client's latest word."""
        check_upload_id(upload_id)
        record = self._reservation(upload_id)
        path = self._new_file(upload_id, "recv")
        sha256, size = _spool(body, path, max_bytes)
        try:
            if record.get("multipart_upload_id"):
                self._abort(upload_key(upload_id), str(record["multipart_upload_id"]))
            with path.open("rb") as handle:
                response = self.client.put_object(
                    Bucket=self.bucket, Key=upload_key(upload_id), Body=handle, ContentType=CONTENT_TYPE,
                    ChecksumAlgorithm="SHA256", ChecksumSHA256=hex_to_b64(sha256),
                )
        except BaseException:
            _unlink(path)
            raise
        version_id = response.get("VersionId")
        if version_id:
            self._remember(upload_id, _Staged(str(version_id), size, sha256, path))
        else:
            _unlink(path)
        return StagedUpload(upload_id=upload_id, size=size, sha256=sha256)

    @translated(WHAT)
    def inspect_upload(self, upload_id: str) -> StagedUpload:
        """Size and sha256 of the current upload object, completing an open multipart upload first.

        The sha256 comes from S3 when it verified one for the whole object (a single PUT), else from
        hashing a download of that exact object version, which is kept for ``staged_path``."""
        check_upload_id(upload_id)
        record = self._reservation_record(upload_id)
        if record is not None and record.get("multipart_upload_id"):
            self._complete_multipart(upload_id, str(record["multipart_upload_id"]), int(record.get("parts") or 0))
        head = self._head(upload_key(upload_id), None, checksums=True,
                          missing=f"nothing was uploaded for upload {upload_id!r}")
        size = int(head.get("ContentLength") or 0)
        if size > self.limits.max_model_bytes:
            raise PayloadTooLarge(f"the upload is larger than the limit of {self.limits.max_model_bytes} bytes")
        version_id = head.get("VersionId")
        if version_id is not None:
            known = self._entry(upload_id)
            if known is not None and known.version_id == version_id:
                return StagedUpload(upload_id=upload_id, size=known.size, sha256=known.sha256)
            sha256 = full_object_sha256(head)
            if sha256 is not None:
                self._remember(upload_id, _Staged(str(version_id), size, sha256))
                return StagedUpload(upload_id=upload_id, size=size, sha256=sha256)
        staged, owned = self._download(upload_id, version_id)
        if owned:
            _unlink(staged.path)
        return StagedUpload(upload_id=upload_id, size=staged.size, sha256=staged.sha256)

    @contextmanager
    def staged_path(self, upload_id: str) -> Iterator[Path]:
        """A local file with the bytes of the upload version last inspected (else the current one).
        The cached download is handed out as a hard link, so an eviction or a discard running
        meanwhile cannot pull the file away from the validator."""
        check_upload_id(upload_id)
        with aws_errors(WHAT):
            entry = self._entry(upload_id)
            path = self._view(entry.path) if entry is not None else None
            if path is None:
                version_id = entry.version_id if entry is not None else None
                if version_id is None:
                    head = self._head(upload_key(upload_id), None,
                                      missing=f"nothing was uploaded for upload {upload_id!r}")
                    version_id = head.get("VersionId")
                downloaded, owned = self._download(upload_id, version_id)
                path = downloaded.path if owned else self._view(downloaded.path)
                if path is None:  # evicted at once by a concurrent commit: a private copy
                    path = self._download(upload_id, version_id, cache=False)[0].path
        assert path is not None
        try:
            yield path
        finally:
            _unlink(path)

    @translated(WHAT)
    def upload_model(self, upload_id: str) -> str:
        check_upload_id(upload_id)
        return str(self._reservation(upload_id)["model"])

    @translated(WHAT)
    def promote(self, upload_id: str, model: str, version: int, expected_sha256: str) -> StoredArtifact:
        """Copy the upload to ``models/<model>/<version>/model.onnx`` inside S3, pinned to the upload
        version that was inspected when it holds the expected bytes, and prove the copy's sha256.

        Idempotent: a retry copies again into a new S3 version; the registry keeps whichever version
        ``mark_ready`` recorded, and every version under the key holds the same validated bytes."""
        check_upload_id(upload_id)
        key = model_key(model, version)
        expected_b64 = hex_to_b64(expected_sha256)
        source: dict[str, str] = {"Bucket": self.bucket, "Key": upload_key(upload_id)}
        entry = self._entry(upload_id)
        if entry is not None and entry.sha256 == expected_sha256:
            source["VersionId"] = entry.version_id
        try:
            response = self.client.copy_object(
                Bucket=self.bucket, Key=key, CopySource=source, ChecksumAlgorithm="SHA256",
                MetadataDirective="REPLACE", Metadata={"sha256": expected_sha256}, ContentType=CONTENT_TYPE,
            )
        except ClientError as error:
            if is_missing(error):
                raise NotFound(f"nothing was uploaded for upload {upload_id!r}") from None
            raise
        new_version = response.get("VersionId")
        new_version = str(new_version) if new_version else None
        checksum = (response.get("CopyObjectResult") or {}).get("ChecksumSHA256")
        size: int | None = entry.size if "VersionId" in source and entry is not None else None
        if isinstance(checksum, str) and "-" not in checksum:
            matches = checksum == expected_b64
        else:  # no checksum in the answer: read the copy back
            sha256, size = self._hash_object(key, new_version)
            matches = sha256 == expected_sha256
        if not matches:
            self._hide_rejected_copy(key)
            raise Conflict(f"upload {upload_id!r} changed while it was being committed; retry the commit")
        if size is None:
            size = int(self._head(key, new_version, missing="the promoted artifact vanished").get("ContentLength") or 0)
        return StoredArtifact(sha256=expected_sha256, size=size, key=key, version_id=new_version)

    @translated(WHAT)
    def discard_upload(self, upload_id: str) -> None:
        """Abort any multipart upload and delete every version of every object of the upload (delete
        markers included): staged bytes are never served, so nothing of them needs to be kept."""
        check_upload_id(upload_id)
        prefix = f"{UPLOADS}{upload_id}/"
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                self._abort(str(upload["Key"]), str(upload["UploadId"]))
        doomed: list[dict[str, str]] = []
        for page in self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
                doomed.append({"Key": str(item["Key"]), "VersionId": str(item["VersionId"])})
        for start in range(0, len(doomed), 1000):
            answer = self.client.delete_objects(Bucket=self.bucket,
                                                Delete={"Objects": doomed[start:start + 1000], "Quiet": True})
            failed = [error for error in answer.get("Errors", []) if error.get("Code") not in MISSING]
            if failed:
                raise ClientError({"Error": {"Code": str(failed[0].get("Code") or "InternalError")},
                                   "ResponseMetadata": {"HTTPStatusCode": 500}}, "DeleteObjects")
        self._forget(upload_id)

    def list_uploads(self) -> Iterator[tuple[str, float]]:
        """Every upload with its age: from its reservation when it has one, else from the oldest trace
        it left (an upload object, a delete marker, an open multipart upload), so cleanup also finds
        what a crash in the middle of ``create_upload`` or ``discard_upload`` left behind."""
        now = datetime.now(UTC)
        reserved: dict[str, datetime] = {}
        other: dict[str, datetime] = {}
        with aws_errors(WHAT):
            for page in self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket,
                                                                                   Prefix=UPLOADS):
                for item in page.get("Versions", []):
                    upload_id, name = self._split_upload_key(str(item["Key"]))
                    if upload_id is None:
                        continue
                    modified = _utc(item["LastModified"])
                    if name == RESERVATION and item.get("IsLatest"):
                        reserved[upload_id] = modified
                    else:
                        other[upload_id] = min(modified, other.get(upload_id, modified))
                for item in page.get("DeleteMarkers", []):
                    upload_id, _ = self._split_upload_key(str(item["Key"]))
                    if upload_id is not None:
                        modified = _utc(item["LastModified"])
                        other[upload_id] = min(modified, other.get(upload_id, modified))
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                     Prefix=UPLOADS):
                for upload in page.get("Uploads", []):
                    upload_id, _ = self._split_upload_key(str(upload["Key"]))
                    if upload_id is not None:
                        initiated = _utc(upload["Initiated"])
                        other[upload_id] = min(initiated, other.get(upload_id, initiated))
        for upload_id in sorted(reserved.keys() | other.keys()):
            since = reserved.get(upload_id) or other[upload_id]
            yield upload_id, max(0.0, (now - since).total_seconds())

    # --- artifacts -------------------------------------------------------------------------------
    @translated(WHAT)
    def read(self, artifact: StoredArtifact) -> bytes:
        """The bytes of the recorded version, re-hashed. Should that version be gone (a lifecycle rule
        expired it after another commit of the same version made a newer copy current), the key's
        current bytes are served instead, but only when they hash to the recorded sha256."""
        key = self._artifact_key(artifact)
        missing = f"artifact sha256:{artifact.sha256[:12]} is missing from storage"
        try:
            data = self._get(key, artifact.version_id, missing=missing)
        except NotFound:
            if artifact.version_id is None:
                raise
            data = self._get(key, None, missing=missing)
            if hashlib.sha256(data).hexdigest() != artifact.sha256:
                raise
            log.warning("artifact %s: recorded S3 version is gone; serving the identical current version", key)
            return data
        if hashlib.sha256(data).hexdigest() != artifact.sha256:
            raise StorageCorrupted(f"artifact sha256:{artifact.sha256[:12]} no longer matches its recorded sha256")
        return data

    @translated(WHAT)
    def exists(self, artifact: StoredArtifact) -> bool:
        try:
            key = self._artifact_key(artifact)
            self._head(key, artifact.version_id, missing="")
        except (NotFound, StorageCorrupted):
            return False
        return True

    @translated(WHAT)
    def delete(self, artifact: StoredArtifact) -> None:
        """Hide an artifact no version references, without destroying a byte: ``delete_object``
        without a version id only adds a delete marker, and the bytes stay as a noncurrent version
        (still readable by version id) until the bucket's lifecycle rule for noncurrent versions
        expires them. Nothing happens when the key now holds other bytes (a newer promote)."""
        key = self._artifact_key(artifact)
        if artifact.version_id is not None:
            try:
                current = self._head(key, None, missing="")
            except NotFound:
                return  # already hidden
            if current.get("VersionId") != artifact.version_id:
                return
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def list_artifacts(self) -> Iterator[StoredArtifact]:
        """The current version of every artifact key (keys whose latest version is a delete marker are
        deleted already). The sha256 is left empty: knowing it would mean reading the bytes."""
        with aws_errors(WHAT):
            for page in self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket,
                                                                                   Prefix=MODELS):
                for item in page.get("Versions", []):
                    key = str(item["Key"])
                    if item.get("IsLatest") and MODEL_KEY.fullmatch(key):
                        yield StoredArtifact(sha256="", size=int(item.get("Size") or 0), key=key,
                                             version_id=str(item["VersionId"]) if item.get("VersionId") else None)

    @translated(WHAT)
    def modified_at(self, artifact: StoredArtifact) -> datetime:
        key = self._artifact_key(artifact)
        head = self._head(key, artifact.version_id, missing=f"artifact {key} is missing from storage")
        return _utc(head["LastModified"])

    # --- helpers: S3 calls -----------------------------------------------------------------------
    def _head(self, key: str, version_id: str | None, *, missing: str, checksums: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version_id is not None:
            params["VersionId"] = version_id
        if checksums:
            params["ChecksumMode"] = "ENABLED"
        try:
            head: dict[str, Any] = self.client.head_object(**params)
        except ClientError as error:
            if is_missing(error):
                raise NotFound(missing) from None
            raise
        return head

    def _get(self, key: str, version_id: str | None, *, missing: str) -> bytes:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version_id is not None:
            params["VersionId"] = version_id
        try:
            response = self.client.get_object(**params)
            return bytes(response["Body"].read())
        except ClientError as error:
            if is_missing(error):
                raise NotFound(missing) from None
            raise

    def _hash_object(self, key: str, version_id: str | None) -> tuple[str, int]:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version_id is not None:
            params["VersionId"] = version_id
        try:
            body = self.client.get_object(**params)["Body"]
        except ClientError as error:
            if is_missing(error):
                raise NotFound("the promoted artifact vanished") from None
            raise
        digest = hashlib.sha256()
        size = 0
        while chunk := body.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
        return digest.hexdigest(), size

    def _hide_rejected_copy(self, key: str) -> None:
        """Hide a copy that must never be served (it did not hash to what was validated) behind a delete
        marker. Its bytes stay until the bucket's noncurrent-version lifecycle removes them: no function
        may erase a version under ``models/``, so a pinned READY version can never be lost."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError):
            # Unreferenced: cleanup hides it later, and reads always name a recorded version id.
            log.exception("could not hide a rejected copy of %s", key)

    def _abort(self, key: str, multipart_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=multipart_id)
        except ClientError as error:
            if not is_missing(error):
                raise

    def _complete_multipart(self, upload_id: str, multipart_id: str, expected_parts: int) -> None:
        """Assemble the parts the client sent, once they all arrived. A multipart upload already
        completed or aborted (by a concurrent commit, or a proxied upload) is not an error."""
        key = upload_key(upload_id)
        parts: list[dict[str, Any]] = []
        try:
            for page in self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=key,
                                                                         UploadId=multipart_id):
                parts.extend(page.get("Parts", []))
        except ClientError as error:
            if is_missing(error):
                return
            raise
        if not parts:
            return
        numbers = sorted(int(part["PartNumber"]) for part in parts)
        if expected_parts and numbers != list(range(1, expected_parts + 1)):
            raise NotFound(f"upload {upload_id!r} is incomplete: {len(numbers)} of {expected_parts} parts arrived")
        completed = []
        for part in sorted(parts, key=lambda item: int(item["PartNumber"])):
            entry = {"PartNumber": int(part["PartNumber"]), "ETag": str(part["ETag"])}
            if part.get("ChecksumSHA256"):
                entry["ChecksumSHA256"] = str(part["ChecksumSHA256"])
            completed.append(entry)
        try:
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=multipart_id,
                                                  MultipartUpload={"Parts": completed})
        except ClientError as error:
            if is_missing(error):
                return
            if error_code(error) in BAD_PARTS:
                raise Conflict(f"the parts of upload {upload_id!r} do not form a valid upload "
                               f"({error_code(error)}); create a new version and upload again") from None
            raise

    def _put_reservation(self, upload_id: str, record: dict[str, Any]) -> None:
        self.client.put_object(Bucket=self.bucket, Key=reservation_key(upload_id),
                               Body=json.dumps(record).encode(), ContentType="application/json")

    def _reservation_record(self, upload_id: str) -> dict[str, Any] | None:
        try:
            raw = self._get(reservation_key(upload_id), None, missing="")
        except NotFound:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    def _reservation(self, upload_id: str) -> dict[str, Any]:
        record = self._reservation_record(upload_id)
        if record is None or "model" not in record:
            raise NotFound(f"upload {upload_id!r} not found; create a version to get an upload URL")
        try:
            expires_at: datetime | None = datetime.fromisoformat(str(record["expires_at"]))
        except (KeyError, ValueError):
            expires_at = None
        if expires_at is not None and _utc(expires_at) < datetime.now(UTC):
            raise NotFound(f"upload {upload_id!r} has expired; create a new version")
        return record

    def _artifact_key(self, artifact: StoredArtifact) -> str:
        key = artifact.key or ""
        if not MODEL_KEY.fullmatch(key):
            raise StorageCorrupted(f"artifact sha256:{str(artifact.sha256)[:12]} has an invalid storage key")
        return key

    @staticmethod
    def _split_upload_key(key: str) -> tuple[str | None, str]:
        upload_id, _, name = key.removeprefix(UPLOADS).partition("/")
        return (upload_id, name) if UPLOAD_ID.fullmatch(upload_id) else (None, name)

    # --- helpers: local copies of uploads --------------------------------------------------------
    def _new_file(self, upload_id: str, kind: str) -> Path:
        self.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.tmp_dir / f"{upload_id}.{uuid.uuid4().hex}.{kind}"
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return path

    def _download(self, upload_id: str, version_id: str | None, *, cache: bool = True) -> tuple[_Staged, bool]:
        """Download (and hash) one version of the upload object. Returns the entry and whether the
        caller owns its file (true when it could not be cached: no version id, or ``cache=False``)."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": upload_key(upload_id)}
        if version_id is not None:
            params["VersionId"] = version_id
        try:
            response = self.client.get_object(**params)
        except ClientError as error:
            if is_missing(error):
                raise NotFound(f"nothing was uploaded for upload {upload_id!r}") from None
            raise
        body = response["Body"]
        version_id = str(response.get("VersionId") or version_id or "") or None
        try:
            path = self._new_file(upload_id, "download")
            sha256, size = _spool(body, path, self.limits.max_model_bytes)
        finally:
            body.close()
        entry = _Staged(version_id or "", size, sha256, path)
        if cache and version_id is not None:
            self._remember(upload_id, entry)
            return entry, False
        return entry, True

    def _view(self, path: Path | None) -> Path | None:
        """A hard link to a cached file (None when the file is gone)."""
        if path is None:
            return None
        view = path.with_name(f"{path.name}.{uuid.uuid4().hex}.view")
        try:
            os.link(path, view)
        except FileNotFoundError:
            return None
        except OSError:  # no hard links here: copy
            try:
                with path.open("rb") as source, view.open("xb") as out:
                    while chunk := source.read(CHUNK):
                        out.write(chunk)
            except FileNotFoundError:
                _unlink(view)
                return None
            except BaseException:  # a full disk midway: no partial copy left behind
                _unlink(view)
                raise
        return view

    def _entry(self, upload_id: str) -> _Staged | None:
        with self._lock:
            entry = self._staged.get(upload_id)
            if entry is not None:
                self._staged.move_to_end(upload_id)
            return entry

    def _remember(self, upload_id: str, entry: _Staged) -> None:
        """Cache what is known about an upload's current version; a known file for the same version is
        kept, another version's file is dropped, and the oldest files go beyond the bound."""
        stale: list[Path | None] = []
        with self._lock:
            old = self._staged.pop(upload_id, None)
            if old is not None and old.path is not None and old.path != entry.path:
                if old.version_id == entry.version_id and entry.path is None:
                    entry = replace(entry, path=old.path)  # same bytes, already on disk
                else:
                    stale.append(old.path)
            self._staged[upload_id] = entry
            with_files = [uid for uid, known in self._staged.items() if known.path is not None]
            for uid in with_files[:max(0, len(with_files) - MAX_CACHED_FILES)]:
                stale.append(self._staged.pop(uid).path)
            while len(self._staged) > MAX_CACHED_ENTRIES:
                stale.append(self._staged.popitem(last=False)[1].path)
        for path in stale:
            _unlink(path)

    def _forget(self, upload_id: str) -> None:
        with self._lock:
            entry = self._staged.pop(upload_id, None)
        if entry is not None:
            _unlink(entry.path)


__all__ = ["S3ArtifactStore", "check_upload_id", "full_object_sha256", "model_key", "upload_key"]
