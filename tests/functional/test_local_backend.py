"""The local backend against the port contracts and the invariants of DESIGN.md section 3:
files + SQLite, real threads, real processes, real SIGKILLs."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from maas.backends.local import FileArtifactStore, LocalBackend, SqliteRegistry
from maas.backends.local.backend import ADMIN_TOKEN_FILE, ENV_ADMIN_TOKEN_NAME
from maas.backends.local.registry import SCHEMA_VERSION
from maas.domain import (
    Model,
    Scope,
    Signature,
    TensorSpec,
    VersionStatus,
)
from maas.errors import Conflict, InvalidInput, NotFound, StorageCorrupted, Unauthorized
from maas.ports import ArtifactStore, Registry, StoredArtifact
from maas.services.tokens import TokenService, hash_token
from maas.settings import Limits, Settings

SIGNATURE = Signature(
    inputs=(TensorSpec(name="x", datatype="FP32", shape=(-1, 4)),),
    outputs=(TensorSpec(name="y", datatype="INT64", shape=(-1,)),),
)
MiB = 1024 * 1024


# --- fixtures and helpers ----------------------------------------------------------------------------
@pytest.fixture
def registry(tmp_path: Path) -> Iterator[SqliteRegistry]:
    reg = SqliteRegistry(tmp_path / "registry.db")
    yield reg
    reg.close()


@pytest.fixture
def store(tmp_path: Path) -> FileArtifactStore:
    return FileArtifactStore(tmp_path / "artifacts", Limits())


def upload(store: FileArtifactStore, data: bytes, max_bytes: int = 64 * MiB) -> str:
    target = store.create_upload("m", 1)
    store.receive_upload(target.upload_id, io.BytesIO(data), max_bytes)
    return target.upload_id


def run_child(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_after_line(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    if not line:
        child.wait(10)
        assert child.stderr is not None
        pytest.fail(f"child failed: {child.stderr.read()}")
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(10) == -signal.SIGKILL
    return line


class AcceptAll:
    """A stand-in for the ONNX validator (a port, not our code under test)."""

    def validate(self, path: Path) -> Signature:
        return SIGNATURE


def test_implementations_satisfy_the_ports(registry: SqliteRegistry, store: FileArtifactStore) -> None:
    assert isinstance(registry, Registry)
    assert isinstance(store, ArtifactStore)


# --- registry: versions ----------------------------------------------------------------------------------
def _allocate_in_process(db_path: str, worker: int, count: int) -> list[int]:
    reg = SqliteRegistry(Path(db_path))
    try:
        return [reg.allocate_version("m", created_by=f"p{worker}", upload_id=f"{worker}-{i}").version
                for i in range(count)]
    finally:
        reg.close()


def test_versions_allocated_by_processes_are_distinct_and_none_lost(registry: SqliteRegistry) -> None:
    registry.create_model(Model(name="m"))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_allocate_in_process, [(str(registry.path), w, 25) for w in range(2)])
    numbers = [n for batch in results for n in batch]
    assert sorted(numbers) == list(range(1, 51))
    stored = registry.list_versions("m", 1000, None).items
    assert sorted(v.version for v in stored) == list(range(1, 51))
    assert {v.upload_id for v in stored} == {f"{w}-{i}" for w in range(2) for i in range(25)}


# --- registry: SQLite-specific (the shared contract is in test_registry_contract.py) ------------------
def test_schema_is_idempotent_and_durable_settings(registry: SqliteRegistry) -> None:
    registry.create_model(Model(name="m"))
    again = SqliteRegistry(registry.path)
    assert again.get_model("m").name == "m"
    again.close()
    raw = sqlite3.connect(registry.path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        stored = raw.execute("SELECT created_at FROM models").fetchone()[0]
        assert stored.endswith("+00:00")
    finally:
        raw.close()
    assert registry.integrity_check() == "ok"
    assert stat.S_IMODE(registry.path.stat().st_mode) == 0o600


ACK_SCRIPT = """
import sys, time
from pathlib import Path
from maas.backends.local import SqliteRegistry
from maas.domain import Model
reg = SqliteRegistry(Path(sys.argv[1]))
reg.create_model(Model(name="durable"))
v = reg.allocate_version("durable", created_by="child", upload_id="u")
print(v.version, flush=True)
time.sleep(60)
"""


def test_acknowledged_write_survives_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    line = kill_after_line(run_child(ACK_SCRIPT, str(db)))
    assert line == "1"
    reopened = SqliteRegistry(db)
    try:
        assert reopened.get_model("durable").name == "durable"
        assert reopened.get_version("durable", 1).status is VersionStatus.PENDING
        assert reopened.integrity_check() == "ok"
    finally:
        reopened.close()


PROMOTE_SCRIPT = """
import io, sys, time
from pathlib import Path
from maas.backends.local import FileArtifactStore, SqliteRegistry
from maas.settings import Limits
home = Path(sys.argv[1])
reg = SqliteRegistry(home / "registry.db")
store = FileArtifactStore(home / "artifacts", Limits())
target = store.create_upload("m")
version = reg.allocate_version("m", created_by="child", upload_id=target.upload_id)
store.receive_upload(target.upload_id, io.BytesIO(Path(sys.argv[2]).read_bytes()), 1 << 30)
artifact = store.promote(target.upload_id, "m", version.version, store.inspect_upload(target.upload_id).sha256)
print(artifact.sha256, artifact.size, artifact.key, flush=True)
time.sleep(60)
reg.mark_ready("m", version.version, artifact, None)
"""


def test_kill_between_promote_and_mark_ready_leaves_pending_and_complete_blob(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    reg = SqliteRegistry(home / "registry.db")
    reg.create_model(Model(name="m"))
    payload = os.urandom(3 * MiB + 17)
    (tmp_path / "payload").write_bytes(payload)
    sha, size, key = kill_after_line(run_child(PROMOTE_SCRIPT, str(home), str(tmp_path / "payload"))).split()
    assert sha == hashlib.sha256(payload).hexdigest() and int(size) == len(payload)
    try:
        assert reg.integrity_check() == "ok"
        version = reg.get_version("m", 1)
        assert version.status is VersionStatus.PENDING and version.sha256 is None
        assert [v.version for v in reg.list_versions_by_status("PENDING")] == [1]
        store = FileArtifactStore(home / "artifacts", Limits())
        artifact = StoredArtifact(sha256=sha, size=len(payload), key=key)
        assert store.read(artifact) == payload
        assert list(store.list_artifacts()) == [artifact]
        assert not [p for p in (home / "artifacts" / "blobs").rglob("*.tmp")]
    finally:
        reg.close()


# --- artifact store ------------------------------------------------------------------------------------


def test_promote_is_durable_idempotent_and_read_only(store: FileArtifactStore) -> None:
    data = os.urandom(MiB + 1)
    upload_id = upload(store, data)
    sha = hashlib.sha256(data).hexdigest()
    artifact = store.promote(upload_id, "m", 1, sha)
    assert artifact == StoredArtifact(sha256=sha, size=len(data), key=f"sha256/{sha}", version_id=None)
    blob = store.root / "blobs" / "sha256" / sha[:2] / sha
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert store.promote(upload_id, "m", 1, sha) == artifact
    same_bytes = upload(store, data)
    assert store.promote(same_bytes, "m", 2, sha) == artifact
    assert store.exists(artifact) and store.read(artifact) == data
    assert list(store.list_artifacts()) == [artifact]
    store.delete(artifact)
    assert not store.exists(artifact)
    with pytest.raises(NotFound):
        store.read(artifact)
    store.delete(artifact)  # deleting twice is fine
    assert store.promote(upload_id, "m", 1, sha) == artifact  # a retry rewrites a deleted blob
    assert store.read(artifact) == data


def test_promote_verifies_the_staged_bytes(store: FileArtifactStore) -> None:
    upload_id = upload(store, b"A" * 1000)
    staged = store.root / "uploads" / upload_id
    st = staged.stat()
    os.chmod(staged, 0o644)
    with staged.open("r+b") as handle:  # same inode, size and mtime: only the hash can tell
        handle.write(b"B")
    os.utime(staged, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(Conflict):
        store.promote(upload_id, "m", 1, hashlib.sha256(b"A" * 1000).hexdigest())
    assert list(store.list_artifacts()) == []


def test_corrupted_blob_is_detected_and_healed(tmp_path: Path, store: FileArtifactStore) -> None:
    data = os.urandom(4096)
    upload_id = upload(store, data)
    artifact = store.promote(upload_id, "m", 1, hashlib.sha256(data).hexdigest())
    blob = store.root / "blobs" / "sha256" / artifact.sha256[:2] / artifact.sha256
    os.chmod(blob, 0o644)
    with blob.open("r+b") as handle:
        handle.seek(100)
        handle.write(bytes([data[100] ^ 0xFF]))
    with pytest.raises(StorageCorrupted) as info:
        store.read(artifact)
    assert str(tmp_path) not in info.value.detail and "/blobs" not in info.value.detail
    assert store.promote(upload_id, "m", 1, artifact.sha256) == artifact  # promoting again replaces the bad copy
    assert store.read(artifact) == data


# --- LocalBackend ----------------------------------------------------------------------------------------
def test_local_backend_layout(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with LocalBackend(Settings(home=home), validator=AcceptAll()) as backend:
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        assert isinstance(backend.registry, SqliteRegistry)
        assert isinstance(backend.artifacts, FileArtifactStore)
        assert (home / "registry.db").exists() and (home / "artifacts" / "uploads").is_dir()
        assert backend.settings.home == home


def test_ensure_admin_token_generates_and_reuses(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    with LocalBackend(settings, validator=AcceptAll()) as backend:
        secret, created = backend.ensure_admin_token()
        assert created and secret and secret.startswith("maas_")
        path = settings.home / ADMIN_TOKEN_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().strip() == secret
        token = backend.registry.find_token(hash_token(secret))
        assert token is not None and token.scopes == (Scope.ADMIN,) and token.name == "admin"
        assert backend.ensure_admin_token() == (secret, False)
    with LocalBackend(settings, validator=AcceptAll()) as backend:
        assert backend.ensure_admin_token() == (secret, False)
        backend.registry.revoke_token(token.id)
        fresh, created = backend.ensure_admin_token()
        assert created and fresh != secret
        assert (settings.home / ADMIN_TOKEN_FILE).read_text().strip() == fresh
        assert len(backend.registry.list_tokens()) == 2


def test_ensure_admin_token_from_environment(tmp_path: Path) -> None:
    explicit = "maas_" + "k" * 40
    with LocalBackend(Settings(home=tmp_path / "home"), validator=AcceptAll()) as backend:
        assert backend.ensure_admin_token(explicit) == (explicit, False)
        assert backend.ensure_admin_token(explicit) == (explicit, False)
        tokens = backend.registry.list_tokens()
        assert [(t.name, t.scopes) for t in tokens] == [(ENV_ADMIN_TOKEN_NAME, (Scope.ADMIN,))]
        assert not (tmp_path / "home" / ADMIN_TOKEN_FILE).exists()
        with pytest.raises(InvalidInput):
            backend.ensure_admin_token("too-short")
        backend.registry.revoke_token(tokens[0].id)
        with pytest.raises(Conflict):
            backend.ensure_admin_token(explicit)


def test_rotating_the_admin_token_from_the_environment_revokes_the_previous_one(tmp_path: Path) -> None:
    """A restart with a new MAAS_ADMIN_TOKEN once left the previous value a live admin token."""
    first, second = "maas_" + "a" * 40, "maas_" + "b" * 40
    with LocalBackend(Settings(home=tmp_path / "home"), validator=AcceptAll()) as backend:
        backend.ensure_admin_token(first)
        _, other_secret = TokenService(backend.registry).create("ops", ["admin"], created_by="someone")
        backend.ensure_admin_token(second)
        tokens = TokenService(backend.registry)
        with pytest.raises(Unauthorized):
            tokens.authenticate(f"Bearer {first}")
        assert tokens.authenticate(f"Bearer {second}").name == ENV_ADMIN_TOKEN_NAME
        assert tokens.authenticate(f"Bearer {other_secret}").name == "ops"  # tokens made by people stay


def test_ensure_admin_token_is_safe_when_started_concurrently(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    results: list[tuple[str | None, bool]] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        with LocalBackend(settings, validator=AcceptAll()) as backend:
            barrier.wait()
            results.append(backend.ensure_admin_token())

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({secret for secret, _ in results}) == 1
    assert sorted(created for _, created in results) == [False, False, False, True]
