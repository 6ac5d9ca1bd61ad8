"""The ArtifactStore contract, run against every implementation: files (FileArtifactStore) and S3
(S3ArtifactStore on moto's versioned bucket), followed by what only one of them promises."""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from maas.backends.aws.artifacts import S3ArtifactStore, full_object_sha256
from maas.backends.local import FileArtifactStore
from maas.domain import UploadPlan
from maas.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    StorageCorrupted,
    Throttled,
    Unavailable,
)
from maas.ports import ArtifactStore, StoredArtifact
from maas.settings import Limits
from tests.conftest import TEST_BUCKET

MiB = 1024 * 1024


@dataclass
class Kit:
    """A store plus the few things a test must do behind its back, per implementation."""

    kind: str
    store: Any
    tmp_path: Path
    s3: Any = None

    def other_instance(self) -> Any:
        """Another process's view of the same storage (no in-memory state shared)."""
        if self.kind == "file":
            return FileArtifactStore(self.store.root, self.store.limits)
        return S3ArtifactStore(self.s3, TEST_BUCKET, self.store.limits, tmp_dir=self.tmp_path / "other-tmp")

    def expire(self, upload_id: str) -> None:
        past = "2000-01-01T00:00:00+00:00"
        if self.kind == "file":
            marker = self.store.root / "uploads" / f"{upload_id}.reserved"
            marker.write_text(json.dumps({**json.loads(marker.read_text()), "expires_at": past}))
            return
        key = f"uploads/{upload_id}/reservation.json"
        record = json.loads(self.s3.get_object(Bucket=TEST_BUCKET, Key=key)["Body"].read())
        self.s3.put_object(Bucket=TEST_BUCKET, Key=key, Body=json.dumps({**record, "expires_at": past}).encode())

    def snapshot(self) -> set[str]:
        """Everything stored, to prove an operation left nothing behind."""
        if self.kind == "file":
            return {str(p.relative_to(self.tmp_path)) for p in self.tmp_path.rglob("*")}
        listed = self.s3.list_object_versions(Bucket=TEST_BUCKET)
        objects = {f"{v['Key']}@{v['VersionId']}" for v in [*listed.get("Versions", []),
                                                            *listed.get("DeleteMarkers", [])]}
        uploads = {u["UploadId"] for u in self.s3.list_multipart_uploads(Bucket=TEST_BUCKET).get("Uploads", [])}
        tmp = self.tmp_path / "s3-tmp"
        files = {p.name for p in tmp.rglob("*")} if tmp.exists() else set()
        return objects | uploads | files

    def missing_artifact(self) -> StoredArtifact:
        sha = hashlib.sha256(b"never stored").hexdigest()
        if self.kind == "file":
            return StoredArtifact(sha256=sha, size=12, key=f"sha256/{sha}")
        return StoredArtifact(sha256=sha, size=12, key="models/ghost/9/model.onnx", version_id="not-a-version")


def make_kit(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Kit:
    if kind == "file":
        return Kit("file", FileArtifactStore(tmp_path / "artifacts", Limits()), tmp_path)
    request.getfixturevalue("moto")
    s3 = boto3.client("s3", config=Config(signature_version="s3v4"))  # as maas.backends.aws.clients
    return Kit("s3", S3ArtifactStore(s3, TEST_BUCKET, Limits(), tmp_dir=tmp_path / "s3-tmp"), tmp_path, s3)


@pytest.fixture(params=["file", "s3"])
def kit(request: pytest.FixtureRequest, tmp_path: Path) -> Kit:
    return make_kit(request.param, request, tmp_path)


@pytest.fixture
def s3kit(request: pytest.FixtureRequest, tmp_path: Path) -> Kit:
    return make_kit("s3", request, tmp_path)


def plan(data: bytes) -> UploadPlan:
    return UploadPlan(size=len(data), sha256=hashlib.sha256(data).hexdigest())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def reserve(store: Any, data: bytes, model: str = "m") -> str:
    return str(store.create_upload(model, plan=plan(data)).upload_id)


def upload(store: Any, data: bytes, model: str = "m") -> str:
    upload_id = reserve(store, data, model)
    store.receive_upload(upload_id, io.BytesIO(data), 64 * MiB)
    return upload_id


def committed(store: Any, data: bytes, model: str = "m", version: int = 1) -> StoredArtifact:
    upload_id = upload(store, data, model)
    staged = store.inspect_upload(upload_id)
    artifact: StoredArtifact = store.promote(upload_id, model, version, staged.sha256)
    store.discard_upload(upload_id)
    return artifact


# --- the contract ----------------------------------------------------------------------------------------
def test_implements_the_port(kit: Kit) -> None:
    assert isinstance(kit.store, ArtifactStore)


def test_upload_inspect_stage_and_replace(kit: Kit) -> None:
    store = kit.store
    data = os.urandom(2 * MiB + 5)
    target = store.create_upload("m", 1, plan(data))
    assert len(target.upload_id) == 32 and int(target.upload_id, 16) >= 0
    assert target.expires_at > datetime.now(UTC)
    if kit.kind == "file":
        assert (target.url, target.method) == (f"/uploads/{target.upload_id}", "PUT")
        assert target.headers == {"Content-Type": "application/octet-stream"}
    else:
        assert target.url is not None and target.url.startswith("https://") and target.method == "PUT"
        assert "x-amz-checksum-sha256" in target.url.lower()  # signed, so S3 checks the bytes
        assert target.headers["x-amz-checksum-sha256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()
    with pytest.raises(NotFound):
        store.inspect_upload(target.upload_id)
    with pytest.raises(NotFound):
        store.staged_path(target.upload_id).__enter__()
    assert store.upload_model(target.upload_id) == "m"
    staged = store.receive_upload(target.upload_id, io.BytesIO(data), 10 * MiB)
    assert (staged.upload_id, staged.size, staged.sha256) == (target.upload_id, len(data), sha(data))
    assert store.inspect_upload(target.upload_id) == staged
    assert kit.other_instance().inspect_upload(target.upload_id) == staged  # no help from local state
    with store.staged_path(target.upload_id) as path:
        assert path.read_bytes() == data
    assert not path.exists()  # the view is gone, the upload is not
    with kit.other_instance().staged_path(target.upload_id) as path:
        assert path.read_bytes() == data
    assert not path.exists()
    assert store.inspect_upload(target.upload_id) == staged
    again = store.receive_upload(target.upload_id, io.BytesIO(b"second"), 10 * MiB)
    assert store.inspect_upload(target.upload_id) == again != staged  # the last complete upload wins
    assert kit.other_instance().inspect_upload(target.upload_id) == again
    with store.staged_path(target.upload_id) as path:
        assert path.read_bytes() == b"second"
    ages = list(store.list_uploads())
    assert [upload_id for upload_id, _ in ages] == [target.upload_id]
    assert all(0 <= age < 60 for _, age in ages)
    store.discard_upload(target.upload_id)
    store.discard_upload(target.upload_id)  # idempotent
    assert list(store.list_uploads()) == []
    for call in (lambda: store.receive_upload(target.upload_id, io.BytesIO(b"x"), 10),
                 lambda: store.inspect_upload(target.upload_id), lambda: store.upload_model(target.upload_id),
                 lambda: store.promote(target.upload_id, "m", 1, sha(data))):
        with pytest.raises(NotFound):
            call()


def test_list_uploads_reports_every_upload_with_its_age(kit: Kit) -> None:
    first = reserve(kit.store, b"a")
    second = upload(kit.store, b"b")
    listed = dict(kit.store.list_uploads())
    assert set(listed) == {first, second}
    assert all(0 <= age < 60 for age in listed.values())
    kit.store.discard_upload(first)
    assert [uid for uid, _ in kit.store.list_uploads()] == [second]


def test_unknown_and_expired_uploads_are_refused(kit: Kit) -> None:
    with pytest.raises(NotFound):
        kit.store.receive_upload("0" * 32, io.BytesIO(b"x"), 10)
    with pytest.raises(NotFound):
        kit.store.upload_model("0" * 32)
    upload_id = reserve(kit.store, b"x")
    kit.expire(upload_id)
    with pytest.raises(NotFound, match="expired"):
        kit.store.receive_upload(upload_id, io.BytesIO(b"x"), 10)
    with pytest.raises(NotFound, match="expired"):
        kit.store.upload_model(upload_id)


def test_payload_too_large_leaves_nothing(kit: Kit) -> None:
    upload_id = reserve(kit.store, b"\0" * (3 * MiB))
    before = kit.snapshot()
    with pytest.raises(PayloadTooLarge):
        kit.store.receive_upload(upload_id, io.BytesIO(b"\0" * (3 * MiB)), MiB)
    assert kit.snapshot() == before
    with pytest.raises(NotFound):
        kit.store.inspect_upload(upload_id)


BAD_UPLOAD_IDS = ["../x", "%2e%2e", "../" + "0" * 29, "a" * 31 + "\0", "\uff10" * 32, "A" * 32, "0" * 33, "",
                  "0" * 31 + "/", "0" * 16 + "/../" + "0" * 12]


def test_bad_upload_ids_are_refused_and_create_nothing(kit: Kit) -> None:
    store = kit.store
    before = kit.snapshot()
    calls: list[Callable[[str], object]] = [
        lambda bad: store.receive_upload(bad, io.BytesIO(b"data"), 100),
        store.inspect_upload,
        lambda bad: store.promote(bad, "m", 1, "0" * 64),
        store.discard_upload,
        store.upload_model,
        lambda bad: store.staged_path(bad).__enter__(),
    ]
    for bad in BAD_UPLOAD_IDS:
        for call in calls:
            with pytest.raises(InvalidInput) as info:
                call(bad)
            assert info.value.field == "upload_id", bad
    assert kit.snapshot() == before


def test_promote_read_list_and_retry(kit: Kit) -> None:
    store = kit.store
    data = os.urandom(MiB + 1)
    upload_id = upload(store, data)
    assert store.inspect_upload(upload_id).sha256 == sha(data)
    artifact = store.promote(upload_id, "m", 1, sha(data))
    assert (artifact.sha256, artifact.size) == (sha(data), len(data))
    if kit.kind == "s3":
        assert artifact.key == "models/m/1/model.onnx" and artifact.version_id
    assert store.exists(artifact) and store.read(artifact) == data
    assert kit.other_instance().read(artifact) == data
    retry = store.promote(upload_id, "m", 1, sha(data))  # a retried commit
    assert (retry.sha256, retry.size, retry.key) == (artifact.sha256, artifact.size, artifact.key)
    assert store.read(retry) == store.read(artifact) == data  # whichever one the registry recorded
    listed = list(store.list_artifacts())
    assert [a.key for a in listed] == [artifact.key]
    assert listed[0].size == len(data) and listed[0].version_id == retry.version_id
    assert abs(store.modified_at(listed[0]) - datetime.now(UTC)) < timedelta(minutes=1)
    store.discard_upload(upload_id)
    assert store.read(artifact) == data  # promoted bytes do not depend on the upload
    with pytest.raises(NotFound):
        store.promote(upload_id, "m", 1, sha(data))


def test_promote_refuses_bytes_that_changed_after_inspection(kit: Kit) -> None:
    original, replacement = b"A" * 1000, b"B" * 1000
    upload_id = upload(kit.store, original)
    assert kit.store.inspect_upload(upload_id).sha256 == sha(original)
    kit.store.receive_upload(upload_id, io.BytesIO(replacement), MiB)  # a re-upload races with the commit
    with pytest.raises(Conflict, match="retry the commit"):
        kit.store.promote(upload_id, "m", 1, sha(original))
    assert list(kit.store.list_artifacts()) == []
    assert kit.store.promote(upload_id, "m", 1, sha(replacement)).sha256 == sha(replacement)


def test_read_detects_a_wrong_checksum(kit: Kit) -> None:
    data = os.urandom(4096)
    artifact = committed(kit.store, data)
    lying = StoredArtifact(sha256=sha(b"other bytes"), size=artifact.size, key=artifact.key,
                           version_id=artifact.version_id)
    with pytest.raises(StorageCorrupted) as info:
        kit.store.read(lying)
    assert str(kit.tmp_path) not in info.value.detail and TEST_BUCKET not in info.value.detail


def test_missing_artifacts_are_not_found(kit: Kit) -> None:
    ghost = kit.missing_artifact()
    assert not kit.store.exists(ghost)
    with pytest.raises(NotFound):
        kit.store.read(ghost)
    with pytest.raises(NotFound):
        kit.store.modified_at(ghost)
    kit.store.delete(ghost)  # nothing to delete is fine


def test_artifact_keys_are_checked(kit: Kit) -> None:
    digest = "c" * 64
    keys = ["/etc/passwd", f"sha256/../{digest}", f"sha256/{'d' * 64}", "", "models/../x/1/model.onnx",
            "models/m/1/../../../etc/passwd", "uploads/" + "0" * 32 + "/model.onnx", "models/M/1/model.onnx"]
    keys.append("models/m/1/model.onnx" if kit.kind == "file" else f"sha256/{digest}")
    for key in keys:
        bad = StoredArtifact(sha256=digest, size=1, key=key)
        assert not kit.store.exists(bad)
        with pytest.raises(StorageCorrupted):
            kit.store.read(bad)
        with pytest.raises(StorageCorrupted):
            kit.store.delete(bad)


def test_delete_frees_the_artifact_and_is_idempotent(kit: Kit) -> None:
    data = os.urandom(1000)
    artifact = committed(kit.store, data)
    kit.store.delete(artifact)
    kit.store.delete(artifact)
    assert list(kit.store.list_artifacts()) == []
    if kit.kind == "file":
        assert not kit.store.exists(artifact)
        with pytest.raises(NotFound):
            kit.store.read(artifact)
    else:
        # S3 never destroys a model's bytes on delete: a delete marker hides the key, and the version
        # stays readable by id until the bucket's noncurrent-version lifecycle rule expires it.
        assert kit.store.read(artifact) == data
        with pytest.raises(ClientError):
            kit.s3.head_object(Bucket=TEST_BUCKET, Key=artifact.key)


# --- S3 only ---------------------------------------------------------------------------------------------
def test_s3_uploads_need_a_plan(s3kit: Kit) -> None:
    for given, field in [(None, "sha256"), (UploadPlan(size=3), "sha256"), (UploadPlan(sha256="a" * 64), "size")]:
        with pytest.raises(InvalidInput, match="size and sha256 up front") as info:
            s3kit.store.create_upload("m", plan=given)
        assert info.value.field == field
    assert list(s3kit.store.list_uploads()) == []


def multipart_plan(data: bytes, part_size: int) -> UploadPlan:
    parts = tuple(sha(data[i:i + part_size]) for i in range(0, len(data), part_size))
    return UploadPlan(size=len(data), sha256=sha(data), part_size=part_size, part_sha256=parts)


def send_parts(kit: Kit, upload_id: str, data: bytes, part_size: int, numbers: list[int] | None = None) -> None:
    """What a client does with the presigned part URLs (in-process moto has no HTTP: same calls)."""
    key = f"uploads/{upload_id}/model.onnx"
    multipart_id = kit.s3.list_multipart_uploads(Bucket=TEST_BUCKET, Prefix=key)["Uploads"][0]["UploadId"]
    chunks = [data[i:i + part_size] for i in range(0, len(data), part_size)]
    for number in numbers or range(1, len(chunks) + 1):
        kit.s3.upload_part(Bucket=TEST_BUCKET, Key=key, UploadId=multipart_id, PartNumber=number,
                           Body=chunks[number - 1])


def test_s3_multipart_upload_is_completed_by_inspect(s3kit: Kit) -> None:
    store, part = s3kit.store, 5 * MiB
    data = os.urandom(2 * part + 123)
    target = store.create_upload("m", plan=multipart_plan(data, part))
    assert target.url is None and target.part_size == part and [p.number for p in target.parts] == [1, 2, 3]
    assert all("x-amz-checksum-sha256" in p.headers and "partNumber" in p.url for p in target.parts)
    send_parts(s3kit, target.upload_id, data, part, [1, 3])
    with pytest.raises(NotFound, match="2 of 3 parts"):
        store.inspect_upload(target.upload_id)  # not completed: the client can still send part 2
    send_parts(s3kit, target.upload_id, data, part, [2])
    staged = store.inspect_upload(target.upload_id)
    assert (staged.size, staged.sha256) == (len(data), sha(data))
    assert s3kit.s3.list_multipart_uploads(Bucket=TEST_BUCKET).get("Uploads", []) == []
    # moto reports a composite checksum (of the part checksums) for the assembled object; it is not
    # the object's sha256 and must never be taken for it.
    assembled = s3kit.s3.head_object(Bucket=TEST_BUCKET, Key=f"uploads/{target.upload_id}/model.onnx",
                                     ChecksumMode="ENABLED")
    assert full_object_sha256(assembled) is None
    assert s3kit.other_instance().inspect_upload(target.upload_id) == staged
    with store.staged_path(target.upload_id) as path:
        assert path.read_bytes() == data
    artifact = store.promote(target.upload_id, "m", 1, sha(data))
    assert store.read(artifact) == data
    store.discard_upload(target.upload_id)
    assert s3kit.snapshot() == {f"models/m/1/model.onnx@{artifact.version_id}"}


def test_s3_discard_aborts_multipart_and_removes_every_version(s3kit: Kit) -> None:
    data = os.urandom(6 * MiB)
    target = s3kit.store.create_upload("m", plan=multipart_plan(data, 5 * MiB))
    send_parts(s3kit, target.upload_id, data, 5 * MiB, [1])
    s3kit.s3.put_object(Bucket=TEST_BUCKET, Key=f"uploads/{target.upload_id}/model.onnx", Body=b"x")
    s3kit.s3.delete_object(Bucket=TEST_BUCKET, Key=f"uploads/{target.upload_id}/model.onnx")
    assert [uid for uid, _ in s3kit.store.list_uploads()] == [target.upload_id]
    s3kit.store.discard_upload(target.upload_id)
    assert s3kit.snapshot() == set() and list(s3kit.store.list_uploads()) == []


def test_s3_receive_upload_replaces_an_open_multipart_upload(s3kit: Kit) -> None:
    data = os.urandom(6 * MiB)
    target = s3kit.store.create_upload("m", plan=multipart_plan(data, 5 * MiB))
    send_parts(s3kit, target.upload_id, data, 5 * MiB, [1])
    staged = s3kit.store.receive_upload(target.upload_id, io.BytesIO(b"proxied"), MiB)
    assert s3kit.s3.list_multipart_uploads(Bucket=TEST_BUCKET).get("Uploads", []) == []
    assert s3kit.other_instance().inspect_upload(target.upload_id) == staged


def test_s3_orphans_are_listed_for_cleanup(s3kit: Kit) -> None:
    orphan, multipart = "a" * 32, "b" * 32
    s3kit.s3.put_object(Bucket=TEST_BUCKET, Key=f"uploads/{orphan}/model.onnx", Body=b"x")
    s3kit.s3.create_multipart_upload(Bucket=TEST_BUCKET, Key=f"uploads/{multipart}/model.onnx")
    s3kit.s3.put_object(Bucket=TEST_BUCKET, Key="uploads/not-an-upload/model.onnx", Body=b"x")
    listed = dict(s3kit.store.list_uploads())
    assert set(listed) == {orphan, multipart}
    for upload_id in listed:
        s3kit.store.discard_upload(upload_id)
    assert set(dict(s3kit.store.list_uploads())) == set()


def test_s3_promote_copies_exactly_the_inspected_version(s3kit: Kit) -> None:
    """A presigned URL can be used again while a commit runs: the commit promotes the upload version
    it inspected and validated. Another process that did not inspect it copies the current version,
    and the copy's checksum turns the difference into a Conflict."""
    original, replacement = b"A" * 1000, b"B" * 1000
    upload_id = upload(s3kit.store, original)
    other = s3kit.other_instance()
    assert other.inspect_upload(upload_id).sha256 == sha(original)
    with other.staged_path(upload_id) as path:
        assert path.read_bytes() == original
    s3kit.s3.put_object(Bucket=TEST_BUCKET, Key=f"uploads/{upload_id}/model.onnx", Body=replacement)
    with pytest.raises(Conflict):
        s3kit.other_instance().promote(upload_id, "m", 1, sha(original))
    artifact = other.promote(upload_id, "m", 1, sha(original))
    assert other.read(artifact) == original
    listed = s3kit.s3.list_object_versions(Bucket=TEST_BUCKET, Prefix="models/")
    versions = listed.get("Versions", [])
    assert [v["VersionId"] for v in versions if v["IsLatest"]] == [artifact.version_id]
    # The refused copy is hidden behind a delete marker, not erased: no function may erase a version
    # under models/ (the bucket's lifecycle expires it), so a pinned READY version can never be lost.
    assert len(versions) == 2 and len(listed.get("DeleteMarkers", [])) == 1


def test_s3_reads_are_pinned_to_the_recorded_version(s3kit: Kit) -> None:
    data = os.urandom(4096)
    artifact = committed(s3kit.store, data)
    s3kit.s3.put_object(Bucket=TEST_BUCKET, Key=artifact.key, Body=b"tampered")  # overwrite the key
    assert s3kit.store.read(artifact) == data  # the recorded version id still names the original bytes
    unpinned = StoredArtifact(sha256=artifact.sha256, size=artifact.size, key=artifact.key)
    with pytest.raises(StorageCorrupted):
        s3kit.store.read(unpinned)
    # delete() leaves a key alone once it holds other bytes than the artifact's version
    s3kit.store.delete(artifact)
    assert s3kit.s3.get_object(Bucket=TEST_BUCKET, Key=artifact.key)["Body"].read() == b"tampered"
    assert [a.key for a in s3kit.store.list_artifacts()] == [artifact.key]


def test_s3_read_survives_the_recorded_version_expiring_if_an_identical_copy_is_current(s3kit: Kit) -> None:
    data = os.urandom(4096)
    upload_id = upload(s3kit.store, data)
    first = s3kit.store.promote(upload_id, "m", 1, sha(data))
    s3kit.store.promote(upload_id, "m", 1, sha(data))  # a concurrent commit copied again: now current
    s3kit.s3.delete_object(Bucket=TEST_BUCKET, Key=first.key, VersionId=first.version_id)  # lifecycle
    assert s3kit.store.read(first) == data
    s3kit.s3.put_object(Bucket=TEST_BUCKET, Key=first.key, Body=b"other")
    with pytest.raises(NotFound):
        s3kit.store.read(first)


def test_s3_local_copies_are_bounded_and_removed(s3kit: Kit) -> None:
    tmp = s3kit.tmp_path / "s3-tmp"
    other = s3kit.other_instance()
    ids = [upload(s3kit.store, os.urandom(1000)) for _ in range(4)]
    for upload_id in ids:
        other.inspect_upload(upload_id)  # S3 knows the sha256 of a single PUT: nothing downloaded yet
        with other.staged_path(upload_id) as path:
            assert path.exists()
    assert len(list((s3kit.tmp_path / "other-tmp").iterdir())) <= 2
    assert len(list(tmp.iterdir())) <= 2
    for upload_id in ids:
        s3kit.store.discard_upload(upload_id)
        other.discard_upload(upload_id)
    assert list(tmp.iterdir()) == [] and list((s3kit.tmp_path / "other-tmp").iterdir()) == []


def test_s3_errors_are_translated(s3kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
    upload_id = upload(s3kit.store, b"x")
    store = s3kit.other_instance()

    def failing(code: str, status: int) -> Callable[..., Any]:
        def call(**_: Any) -> Any:
            raise ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "HeadObject")
        return call

    monkeypatch.setattr(store.client, "head_object", failing("SlowDown", 503))
    with pytest.raises(Throttled):
        store.inspect_upload(upload_id)
    monkeypatch.setattr(store.client, "head_object", failing("InternalError", 500))
    with pytest.raises(Unavailable) as info:
        store.inspect_upload(upload_id)
    assert TEST_BUCKET not in info.value.detail


def test_s3_a_local_copy_that_fails_midway_leaves_no_file(s3kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without hard links the cached download is copied for the validator; a full disk midway must
    not leave the partial copy behind in /tmp (a Lambda's /tmp is small and outlives the request)."""
    upload_id = upload(s3kit.store, os.urandom(3000))
    s3kit.store.inspect_upload(upload_id)
    tmp = s3kit.tmp_path / "s3-tmp"
    before = set(tmp.iterdir())

    def no_links(*_: Any) -> None:
        raise PermissionError(errno.EPERM, "hard links not supported")

    real_open = Path.open

    def full_disk(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(self, mode, *args, **kwargs)
        if "x" in mode:
            def write(_: bytes) -> int:
                raise OSError(errno.ENOSPC, "No space left on device")
            handle.write = write
        return handle

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(Path, "open", full_disk)
    with pytest.raises(OSError), s3kit.store.staged_path(upload_id):
        pass
    monkeypatch.undo()
    assert set(tmp.iterdir()) == before
    s3kit.store.discard_upload(upload_id)
    assert list(tmp.iterdir()) == []
