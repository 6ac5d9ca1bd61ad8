"""Artifacts in a local directory.

Layout under ``root``::

    uploads/<upload_id>.reserved   reservation made by create_upload (JSON: model, expiry)
    uploads/<upload_id>            the staged bytes of the last complete upload (read-only)
    uploads/<upload_id>.meta       size + sha256 of those bytes, tied to the file's inode and mtime
    uploads/.<name>.tmp            a file being written (never listed, removed on failure)
    blobs/sha256/<aa>/<sha256>     content-addressed artifacts (read-only)

Every file that is published is first written completely to a temporary file in the same directory
and then renamed over its final name, so a reader (or a crash) never sees a partial file. Blobs are
also fsynced, and so is their directory after the rename: once ``promote`` returns, the artifact
survives a power loss. Upload ids are checked against a strict pattern before they touch a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from maas.domain import UploadPlan, UploadTarget
from maas.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge, StorageCorrupted
from maas.ports import StagedUpload, StoredArtifact
from maas.services.digests import sha256_file
from maas.settings import Limits

CHUNK = 1024 * 1024
UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
SHA256 = re.compile(r"[0-9a-f]{64}")
KEY = re.compile(r"sha256/([0-9a-f]{64})")
RESERVED = ".reserved"
META = ".meta"


def check_upload_id(upload_id: str) -> str:
    if not isinstance(upload_id, str) or not UPLOAD_ID.fullmatch(upload_id):
        raise InvalidInput("upload id must be 32 lowercase hex characters", field="upload_id")
    return upload_id


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    with suppress(FileNotFoundError):
        path.unlink()


class FileArtifactStore:
    """``maas.ports.ArtifactStore`` on a local directory."""

    def __init__(self, root: Path, limits: Limits):
        self.root = Path(root)
        self.limits = limits
        self._uploads = self.root / "uploads"
        self._blobs = self.root / "blobs" / "sha256"
        for directory in (self.root, self._uploads, self._blobs):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    # --- uploads ---------------------------------------------------------------------------------
    def create_upload(self, model: str, version: int = 0, plan: UploadPlan | None = None) -> UploadTarget:
        """Reserve an upload. ``version`` is informational (0: not allocated yet): services reserve the
        upload before the version number exists, and the registry records the upload id. The plan is
        not needed here: the bytes come through the server, which hashes them, and commit checks."""
        upload_id = uuid.uuid4().hex
        expires_at = datetime.now(UTC) + timedelta(seconds=self.limits.upload_ttl_s)
        record = {"model": model, "version": version, "expires_at": expires_at.isoformat()}
        self._write_small(self._uploads / f"{upload_id}{RESERVED}", record, exclusive=True)
        return UploadTarget(
            upload_id=upload_id,
            url=f"/uploads/{upload_id}",
            method="PUT",
            headers={"Content-Type": "application/octet-stream"},
            expires_at=expires_at,
        )

    def receive_upload(self, upload_id: str, body: BinaryIO, max_bytes: int) -> StagedUpload:
        check_upload_id(upload_id)
        self._reservation(upload_id)
        final = self._uploads / upload_id
        tmp = self._uploads / f".{upload_id}.{uuid.uuid4().hex}.tmp"
        digest = hashlib.sha256()
        size = 0
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := body.read(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLarge(f"the upload is larger than the limit of {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
                written = os.fstat(out.fileno())  # the inode keeps its identity through the rename
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
        except BaseException:
            _unlink(tmp)
            raise
        sha256 = digest.hexdigest()
        self._write_meta(upload_id, written, sha256, size)
        return StagedUpload(upload_id=upload_id, size=size, sha256=sha256)

    def inspect_upload(self, upload_id: str) -> StagedUpload:
        check_upload_id(upload_id)
        path = self._uploads / upload_id
        try:
            st = path.stat()
        except FileNotFoundError:
            raise NotFound(f"nothing was uploaded for upload {upload_id!r}") from None
        meta = self._read_json(self._uploads / f"{upload_id}{META}")
        if meta is not None and self._meta_matches(meta, st):
            return StagedUpload(upload_id=upload_id, size=int(meta["size"]), sha256=str(meta["sha256"]))
        # The metadata is missing or belongs to another upload of the same id: hash the file.
        try:
            with path.open("rb") as handle:
                st = os.fstat(handle.fileno())
                digest = hashlib.sha256()
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
        except FileNotFoundError:
            raise NotFound(f"nothing was uploaded for upload {upload_id!r}") from None
        sha256, size = digest.hexdigest(), st.st_size
        self._write_meta(upload_id, st, sha256, size)
        return StagedUpload(upload_id=upload_id, size=size, sha256=sha256)

    @contextmanager
    def staged_path(self, upload_id: str) -> Iterator[Path]:
        """A stable view of the staged bytes: a hard link that a concurrent re-upload cannot replace."""
        check_upload_id(upload_id)
        path = self._uploads / upload_id
        if not path.exists():
            raise NotFound(f"nothing was uploaded for upload {upload_id!r}")
        view = self._uploads / f".{upload_id}.{uuid.uuid4().hex}.view.tmp"
        try:
            os.link(path, view)
            linked = True
        except FileNotFoundError:
            raise NotFound(f"nothing was uploaded for upload {upload_id!r}") from None
        except OSError:  # no hard links on this filesystem: fall back to the file itself
            linked = False
        try:
            yield view if linked else path
        finally:
            if linked:
                _unlink(view)

    def upload_model(self, upload_id: str) -> str:
        check_upload_id(upload_id)
        return str(self._reservation(upload_id)["model"])

    def promote(self, upload_id: str, model: str, version: int, expected_sha256: str) -> StoredArtifact:
        check_upload_id(upload_id)
        staged = self.inspect_upload(upload_id)
        if staged.sha256 != expected_sha256:
            raise Conflict(f"upload {upload_id!r} changed while it was being committed; retry the commit")
        final = self._blob_path(staged.sha256)
        artifact = StoredArtifact(sha256=staged.sha256, size=staged.size, key=f"sha256/{staged.sha256}")
        if final.exists() and sha256_file(final) == (staged.sha256, staged.size):
            os.utime(final)  # fresh again: cleanup spares blobs a commit just (re)used
            return artifact  # already stored (a retry, or the same bytes under another version)
        created = not final.parent.exists()
        final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if created:
            _fsync_dir(self._blobs)
        tmp = final.parent / f".{uuid.uuid4().hex}.tmp"
        digest = hashlib.sha256()
        size = 0
        try:
            with (self._uploads / upload_id).open("rb") as source, \
                    os.fdopen(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "wb") as out:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if (digest.hexdigest(), size) != (expected_sha256, staged.size):
                raise Conflict(f"upload {upload_id!r} changed while it was being committed; retry the commit")
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
        except FileNotFoundError:
            _unlink(tmp)
            raise NotFound(f"nothing was uploaded for upload {upload_id!r}") from None
        except BaseException:
            _unlink(tmp)
            raise
        _fsync_dir(final.parent)
        return artifact

    def discard_upload(self, upload_id: str) -> None:
        check_upload_id(upload_id)
        for suffix in ("", META, RESERVED):
            _unlink(self._uploads / f"{upload_id}{suffix}")

    def list_uploads(self) -> Iterator[tuple[str, float]]:
        """Every reservation or staged upload with its age (from the reservation when there is one)."""
        now = time.time()
        reserved: dict[str, float] = {}
        other: dict[str, float] = {}
        try:
            entries = list(os.scandir(self._uploads))
        except FileNotFoundError:
            return
        for entry in entries:
            upload_id, dot, suffix = entry.name.partition(".")
            if not UPLOAD_ID.fullmatch(upload_id) or (dot + suffix) not in ("", RESERVED, META):
                continue
            try:
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            if dot + suffix == RESERVED:
                reserved[upload_id] = mtime
            else:
                other[upload_id] = min(mtime, other.get(upload_id, mtime))
        for upload_id in sorted(reserved.keys() | other.keys()):
            mtime = reserved.get(upload_id, other.get(upload_id, now))
            yield upload_id, max(0.0, now - mtime)

    def remove_stale_temp_files(self, max_age_s: float) -> int:
        """Delete temporary files left by crashed writers (older than ``max_age_s``)."""
        removed = 0
        cutoff = time.time() - max_age_s
        for directory in [self._uploads, *self._blobs.iterdir()]:
            if not directory.is_dir():
                continue
            for entry in directory.iterdir():
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    with suppress(FileNotFoundError):
                        if entry.stat().st_mtime < cutoff:
                            entry.unlink()
                            removed += 1
        return removed

    # --- artifacts -------------------------------------------------------------------------------
    def read(self, artifact: StoredArtifact) -> bytes:
        path = self._artifact_path(artifact)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"artifact sha256:{artifact.sha256[:12]} is missing from storage") from None
        if hashlib.sha256(data).hexdigest() != artifact.sha256:
            raise StorageCorrupted(
                f"artifact sha256:{artifact.sha256[:12]} no longer matches its recorded sha256"
            )
        return data

    def exists(self, artifact: StoredArtifact) -> bool:
        try:
            return self._artifact_path(artifact).is_file()
        except StorageCorrupted:
            return False

    def delete(self, artifact: StoredArtifact) -> None:
        path = self._artifact_path(artifact)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)

    def list_artifacts(self) -> Iterator[StoredArtifact]:
        for prefix in sorted(self._blobs.iterdir()):
            if not prefix.is_dir() or len(prefix.name) != 2:
                continue
            for entry in sorted(prefix.iterdir()):
                if not SHA256.fullmatch(entry.name) or entry.name[:2] != prefix.name:
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield StoredArtifact(sha256=entry.name, size=st.st_size, key=f"sha256/{entry.name}")

    def modified_at(self, artifact: StoredArtifact) -> datetime:
        try:
            return datetime.fromtimestamp(self._artifact_path(artifact).stat().st_mtime, UTC)
        except FileNotFoundError:
            raise NotFound(f"artifact sha256:{artifact.sha256[:12]} is missing from storage") from None

    # --- helpers ---------------------------------------------------------------------------------
    def _blob_path(self, sha256: str) -> Path:
        return self._blobs / sha256[:2] / sha256

    def _artifact_path(self, artifact: StoredArtifact) -> Path:
        match = KEY.fullmatch(artifact.key or "")
        if match is None or match.group(1) != artifact.sha256:
            raise StorageCorrupted(f"artifact sha256:{str(artifact.sha256)[:12]} has an invalid storage key")
        return self._blob_path(artifact.sha256)

    def _reservation(self, upload_id: str) -> dict[str, Any]:
        record = self._read_json(self._uploads / f"{upload_id}{RESERVED}")
        if record is None:
            raise NotFound(f"upload {upload_id!r} not found; create a version to get an upload URL")
        try:
            expires_at = datetime.fromisoformat(str(record["expires_at"]))
        except (KeyError, ValueError):
            expires_at = None
        if expires_at is not None and expires_at < datetime.now(UTC):
            raise NotFound(f"upload {upload_id!r} has expired; create a new version")
        return record

    def _write_meta(self, upload_id: str, st: os.stat_result, sha256: str, size: int) -> None:
        """Remember the hash of one particular file (inode, size, mtime): a later upload under the
        same id is a different inode, so stale metadata is never trusted."""
        record = {"sha256": sha256, "size": size, "ino": st.st_ino, "dev": st.st_dev,
                  "mtime_ns": st.st_mtime_ns, "file_size": st.st_size}
        self._write_small(self._uploads / f"{upload_id}{META}", record)

    @staticmethod
    def _meta_matches(meta: dict[str, Any], st: os.stat_result) -> bool:
        return (meta.get("ino") == st.st_ino and meta.get("dev") == st.st_dev
                and meta.get("mtime_ns") == st.st_mtime_ns and meta.get("file_size") == st.st_size
                and meta.get("size") == st.st_size and isinstance(meta.get("sha256"), str)
                and SHA256.fullmatch(meta["sha256"]) is not None)

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        try:
            value = json.loads(path.read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _write_small(self, path: Path, record: dict[str, Any], *, exclusive: bool = False) -> None:
        data = json.dumps(record).encode()
        if exclusive:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            return
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise


__all__ = ["FileArtifactStore", "check_upload_id"]
