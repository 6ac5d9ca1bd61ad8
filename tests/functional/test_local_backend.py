"""The local backend against the port contracts and the invariants of DESIGN.md section 3:
files + SQLite, real threads, real processes, real SIGKILLs."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from maas.backends.local import FileArtifactStore, LocalBackend, SqliteRegistry
from maas.backends.local.backend import ADMIN_TOKEN_FILE, ENV_ADMIN_TOKEN_NAME
from maas.domain import (
    Deployment,
    DeploymentStatus,
    Model,
    Scope,
    Signature,
    Strategy,
    TensorSpec,
    Token,
    VersionStatus,
)
from maas.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge, StorageCorrupted
from maas.ports import ArtifactStore, Registry, StoredArtifact
from maas.services.tokens import hash_token
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


def fake_artifact(seed: str = "a") -> StoredArtifact:
    sha = hashlib.sha256(seed.encode()).hexdigest()
    return StoredArtifact(sha256=sha, size=len(seed), key=f"sha256/{sha}")


def ready(reg: SqliteRegistry, model: str = "m") -> int:
    version = reg.allocate_version(model, created_by="t", upload_id=os.urandom(16).hex()).version
    reg.mark_ready(model, version, fake_artifact(f"{model}{version}"), SIGNATURE)
    return version


def deployment(model: str, version: int, stable: int | None = None, *, canary: int | None = None,
               weight: float = 0.0, status: DeploymentStatus = DeploymentStatus.IN_PROGRESS,
               dep_id: str | None = None) -> Deployment:
    return Deployment(id=dep_id or os.urandom(8).hex(), model=model, version=version, stable_version=stable,
                      canary_version=canary, canary_weight=weight, status=status,
                      strategy=Strategy.CANARY if canary else Strategy.ALL_AT_ONCE)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


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


# --- registry: models -----------------------------------------------------------------------------------
def test_models_create_get_conflict_and_missing(registry: SqliteRegistry) -> None:
    model = Model(name="fraud", description="d", tags={"team": "risk"}, created_by="alice")
    assert registry.create_model(model) == model
    assert registry.get_model("fraud") == model
    with pytest.raises(Conflict):
        registry.create_model(Model(name="fraud"))
    with pytest.raises(NotFound, match="model 'nope' not found"):
        registry.get_model("nope")


def test_list_models_paginates_by_name_and_clamps(registry: SqliteRegistry) -> None:
    for name in ["e", "a", "d", "b", "c"]:
        registry.create_model(Model(name=name))
    names, cursor, pages = [], None, 0
    while True:
        page = registry.list_models(2, cursor)
        names += [m.name for m in page.items]
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert (names, pages) == (["a", "b", "c", "d", "e"], 3)
    assert len(registry.list_models(0, None).items) == 1
    assert len(registry.list_models(10**6, None).items) == 5
    assert registry.list_models(5, None).next_cursor is None


@pytest.mark.parametrize("cursor", ["garbage!", "e30", "W10", "x" * 600, "\u00e9"])
def test_invalid_cursor_is_invalid_input(registry: SqliteRegistry, cursor: str) -> None:
    registry.create_model(Model(name="m"))
    for call in (lambda: registry.list_models(1, cursor), lambda: registry.list_versions("m", 1, cursor),
                 lambda: registry.list_deployments("m", 1, cursor)):
        with pytest.raises(InvalidInput) as info:
            call()
        assert info.value.field == "cursor"


def test_cursor_of_one_listing_is_refused_by_another(registry: SqliteRegistry) -> None:
    for name in ("a", "b"):
        registry.create_model(Model(name=name))
    models_cursor = registry.list_models(1, None).next_cursor
    assert models_cursor is not None
    with pytest.raises(InvalidInput):
        registry.list_versions("a", 1, models_cursor)


def test_delete_model_removes_everything_and_returns_versions(registry: SqliteRegistry) -> None:
    registry.create_model(Model(name="m"))
    v1 = ready(registry)
    registry.allocate_version("m", created_by="t", upload_id="u2")
    registry.set_alias("m", "champion", v1)
    registry.create_deployment(deployment("m", v1))
    removed = registry.delete_model("m")
    assert [v.version for v in removed] == [1, 2]
    assert removed[0].sha256 == fake_artifact("m1").sha256
    with pytest.raises(NotFound):
        registry.get_model("m")
    assert registry.get_route("m") is None
    with pytest.raises(NotFound):
        registry.delete_model("m")
    registry.create_model(Model(name="m"))  # the name can be used again
    assert registry.list_aliases("m") == []
    assert registry.list_deployments("m", 10, None).items == []


# --- registry: versions ----------------------------------------------------------------------------------
def test_allocate_get_and_list_versions(registry: SqliteRegistry) -> None:
    with pytest.raises(NotFound, match="model 'm' not found"):
        registry.allocate_version("m", created_by="t", upload_id="u")
    registry.create_model(Model(name="m"))
    first = registry.allocate_version("m", created_by="alice", upload_id="u1", description="first")
    assert (first.version, first.status, first.upload_id, first.created_by, first.description) == (
        1, VersionStatus.PENDING, "u1", "alice", "first")
    assert registry.get_version("m", 1) == first
    derived = registry.allocate_version("m", created_by="t", upload_id="u2", parent_version=1)
    assert (derived.version, derived.parent_version) == (2, 1)
    with pytest.raises(NotFound, match="version 9 of model 'm' not found"):
        registry.allocate_version("m", created_by="t", upload_id="u3", parent_version=9)
    with pytest.raises(NotFound, match="version 9 of model 'm' not found"):
        registry.get_version("m", 9)
    for i in range(3):
        registry.allocate_version("m", created_by="t", upload_id=f"x{i}")
    page = registry.list_versions("m", 2, None)
    assert [v.version for v in page.items] == [5, 4]
    page = registry.list_versions("m", 2, page.next_cursor)
    assert [v.version for v in page.items] == [3, 2]
    page = registry.list_versions("m", 2, page.next_cursor)
    assert ([v.version for v in page.items], page.next_cursor) == ([1], None)
    with pytest.raises(NotFound):
        registry.list_versions("other", 10, None)


def test_mark_ready_and_failed_are_conditional(registry: SqliteRegistry) -> None:
    registry.create_model(Model(name="m"))
    registry.allocate_version("m", created_by="t", upload_id="u1")
    registry.allocate_version("m", created_by="t", upload_id="u2")
    artifact = StoredArtifact(sha256="b" * 64, size=42, key="sha256/" + "b" * 64, version_id="v7")
    done = registry.mark_ready("m", 1, artifact, SIGNATURE)
    assert (done.status, done.sha256, done.size, done.storage_key, done.storage_version_id,
            done.signature) == (VersionStatus.READY, "b" * 64, 42, "sha256/" + "b" * 64, "v7", SIGNATURE)
    assert registry.get_version("m", 1) == done
    with pytest.raises(Conflict):
        registry.mark_ready("m", 1, artifact, SIGNATURE)
    with pytest.raises(Conflict):
        registry.mark_failed("m", 1, "late")
    failed = registry.mark_failed("m", 2, "not an ONNX model")
    assert (failed.status, failed.status_reason) == (VersionStatus.FAILED, "not an ONNX model")
    with pytest.raises(Conflict):
        registry.mark_ready("m", 2, artifact, SIGNATURE)
    with pytest.raises(NotFound):
        registry.mark_ready("m", 3, artifact, SIGNATURE)
    assert registry.get_version("m", 2).status is VersionStatus.FAILED


def test_list_versions_by_status_spans_models(registry: SqliteRegistry) -> None:
    for name in ("a", "b"):
        registry.create_model(Model(name=name))
        ready(registry, name)
        registry.allocate_version(name, created_by="t", upload_id=f"p-{name}")
    pending = registry.list_versions_by_status("PENDING")
    assert [(v.model, v.version) for v in pending] == [("a", 2), ("b", 2)]
    assert len(registry.list_versions_by_status(VersionStatus.READY)) == 2
    assert registry.list_versions_by_status("FAILED") == []
    with pytest.raises(InvalidInput):
        registry.list_versions_by_status("BOGUS")


def test_version_numbers_are_never_reused(registry: SqliteRegistry) -> None:
    registry.create_model(Model(name="m"))
    for _ in range(3):
        registry.allocate_version("m", created_by="t", upload_id="u")
    assert registry.delete_version("m", 3).version == 3
    assert registry.delete_version("m", 2).version == 2
    assert registry.allocate_version("m", created_by="t", upload_id="u").version == 4
    reopened = SqliteRegistry(registry.path)
    assert reopened.allocate_version("m", created_by="t", upload_id="u").version == 5
    reopened.close()


def test_delete_version_refuses_referenced_versions(registry: SqliteRegistry) -> None:
    registry.create_model(Model(name="m"))
    v1, v2, v3 = ready(registry), ready(registry), ready(registry)
    registry.set_alias("m", "champion", v1)
    with pytest.raises(Conflict, match="alias 'champion'"):
        registry.delete_version("m", v1)
    dep = registry.create_deployment(deployment("m", v2, status=DeploymentStatus.ROLLED_BACK))
    with pytest.raises(Conflict, match=dep.id):
        registry.delete_version("m", v2)
    registry.create_deployment(deployment("m", v3, v3, status=DeploymentStatus.SUCCEEDED))
    with pytest.raises(Conflict):
        registry.delete_version("m", v3)
    registry.delete_alias("m", "champion")
    assert registry.delete_version("m", v1).version == v1
    with pytest.raises(NotFound):
        registry.delete_version("m", v1)


def test_versions_allocated_by_threads_are_distinct_and_consecutive(registry: SqliteRegistry) -> None:
    registry.create_model(Model(name="m"))

    def allocate_ten(worker: int) -> list[int]:
        return [registry.allocate_version("m", created_by=f"w{worker}", upload_id=f"{worker}-{i}").version
                for i in range(10)]

    with ThreadPoolExecutor(8) as pool:
        numbers = [n for batch in pool.map(allocate_ten, range(8)) for n in batch]
    assert sorted(numbers) == list(range(1, 81))
    assert len(registry.list_versions("m", 1000, None).items) == 80


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


# --- registry: aliases -----------------------------------------------------------------------------------
def test_aliases_point_only_at_ready_versions(registry: SqliteRegistry) -> None:
    registry.create_model(Model(name="m"))
    v1 = ready(registry)
    pending = registry.allocate_version("m", created_by="t", upload_id="p").version
    failed = registry.allocate_version("m", created_by="t", upload_id="f").version
    registry.mark_failed("m", failed, "bad")
    with pytest.raises(Conflict, match="PENDING"):
        registry.set_alias("m", "champion", pending)
    with pytest.raises(Conflict, match="FAILED"):
        registry.set_alias("m", "champion", failed)
    with pytest.raises(NotFound):
        registry.set_alias("m", "champion", 99)
    with pytest.raises(NotFound):
        registry.set_alias("other", "champion", v1)
    alias = registry.set_alias("m", "champion", v1)
    assert (alias.model, alias.alias, alias.version) == ("m", "champion", v1)
    assert registry.get_alias("m", "champion").version == v1
    v4 = ready(registry)
    assert registry.set_alias("m", "champion", v4).version == v4
    registry.set_alias("m", "stable", v1)
    assert [(a.alias, a.version) for a in registry.list_aliases("m")] == [("champion", v4), ("stable", v1)]
    registry.delete_alias("m", "stable")
    with pytest.raises(NotFound, match="alias 'stable' of model 'm' not found"):
        registry.get_alias("m", "stable")
    with pytest.raises(NotFound):
        registry.delete_alias("m", "stable")
    with pytest.raises(NotFound):
        registry.list_aliases("other")


# --- registry: deployments and routes ----------------------------------------------------------------------
def test_deployments_are_conditional_and_sequenced(registry: SqliteRegistry) -> None:
    registry.create_model(Model(name="m"))
    v1, v2 = ready(registry), ready(registry)
    pending = registry.allocate_version("m", created_by="t", upload_id="p").version
    with pytest.raises(Conflict):
        registry.create_deployment(deployment("m", pending))
    with pytest.raises(NotFound):
        registry.create_deployment(deployment("m", 99))
    with pytest.raises(NotFound):
        registry.create_deployment(deployment("other", v1))
    first = registry.create_deployment(deployment("m", v1, dep_id="d1"))
    assert first.seq == 1 and registry.get_deployment("d1") == first
    with pytest.raises(Conflict, match="in progress"):
        registry.create_deployment(deployment("m", v2))
    with pytest.raises(Conflict, match="already exists"):
        registry.create_deployment(deployment("m", v2, dep_id="d1"))
    done = first.with_event("promoted", status=DeploymentStatus.SUCCEEDED, stable_version=v1)
    with pytest.raises(Conflict):
        registry.update_deployment(done, DeploymentStatus.SUCCEEDED)
    stored = registry.update_deployment(done, DeploymentStatus.IN_PROGRESS)
    assert stored.status is DeploymentStatus.SUCCEEDED and stored.seq == 1
    assert registry.get_deployment("d1") == stored
    with pytest.raises(Conflict):  # a second writer that read the old status loses
        registry.update_deployment(done, DeploymentStatus.IN_PROGRESS)
    second = registry.create_deployment(deployment("m", v2, v1, dep_id="d2"))
    assert second.seq == 2
    with pytest.raises(Conflict):  # referenced versions must stay READY
        registry.update_deployment(second.model_copy(update={"canary_version": pending}),
                                   DeploymentStatus.IN_PROGRESS)
    with pytest.raises(NotFound):
        registry.update_deployment(deployment("m", v1, dep_id="ghost"), DeploymentStatus.IN_PROGRESS)
    with pytest.raises(NotFound, match="deployment 'ghost' not found"):
        registry.get_deployment("ghost")
    page = registry.list_deployments("m", 1, None)
    assert [d.id for d in page.items] == ["d2"]
    page = registry.list_deployments("m", 1, page.next_cursor)
    assert ([d.id for d in page.items], page.next_cursor) == (["d1"], None)
    with pytest.raises(NotFound):
        registry.list_deployments("other", 10, None)


def test_only_one_in_progress_deployment_even_via_update(registry: SqliteRegistry) -> None:
    registry.create_model(Model(name="m"))
    v1 = ready(registry)
    old = registry.create_deployment(deployment("m", v1, status=DeploymentStatus.FAILED))
    registry.create_deployment(deployment("m", v1))
    with pytest.raises(Conflict):
        registry.update_deployment(old.model_copy(update={"status": DeploymentStatus.IN_PROGRESS}),
                                   DeploymentStatus.FAILED)


def test_get_route_follows_the_deployments(registry: SqliteRegistry) -> None:
    registry.create_model(Model(name="m"))
    v1, v2, v3 = ready(registry), ready(registry), ready(registry)
    assert registry.get_route("m") is None
    assert registry.get_route("unknown") is None
    first = registry.create_deployment(deployment("m", v1, dep_id="d1"))
    assert registry.get_route("m") is None  # a first deploy serves nothing until it is promoted
    registry.create_model(Model(name="n"))
    n1 = ready(registry, "n")
    registry.create_deployment(deployment("n", n1, canary=n1, weight=10, dep_id="n1"))
    route = registry.get_route("n")  # a first canary takes all traffic: there is no stable to share with
    assert route is not None and (route.stable_version, route.canary_version) == (n1, None)
    registry.update_deployment(first.with_event("promoted", status=DeploymentStatus.SUCCEEDED,
                                                stable_version=v1), DeploymentStatus.IN_PROGRESS)
    route = registry.get_route("m")
    assert route is not None and (route.stable_version, route.canary_version, route.deployment_id) == (
        v1, None, "d1")
    canary = registry.create_deployment(deployment("m", v2, v1, canary=v2, weight=10, dep_id="d2"))
    route = registry.get_route("m")
    assert route is not None and (route.stable_version, route.canary_version, route.canary_weight,
                                  route.deployment_id) == (v1, v2, 10.0, "d2")
    registry.update_deployment(canary.with_event("rolled_back", status=DeploymentStatus.ROLLED_BACK),
                               DeploymentStatus.IN_PROGRESS)
    route = registry.get_route("m")
    assert route is not None and (route.stable_version, route.canary_version, route.deployment_id) == (
        v1, None, "d1")
    registry.create_deployment(deployment("m", v3, v3, status=DeploymentStatus.SUCCEEDED, dep_id="d3"))
    route = registry.get_route("m")
    assert route is not None and (route.stable_version, route.deployment_id) == (v3, "d3")


# --- registry: tokens, schema, durability ------------------------------------------------------------------
def test_tokens(registry: SqliteRegistry) -> None:
    token = Token(id="t1", name="ci", token_hash=hash_token("secret-1"), scopes=(Scope.DEPLOY,), model="m")
    assert registry.create_token(token) == token
    assert registry.find_token(hash_token("secret-1")) == token
    assert registry.find_token(hash_token("other")) is None
    with pytest.raises(Conflict):
        registry.create_token(token.model_copy(update={"id": "t2"}))
    registry.create_token(Token(id="t2", name="app", token_hash=hash_token("s2"), scopes=(Scope.INVOKE,)))
    assert [t.id for t in registry.list_tokens()] == ["t1", "t2"]
    revoked = registry.revoke_token("t1")
    assert revoked.revoked and registry.find_token(hash_token("secret-1")) == revoked
    with pytest.raises(NotFound):
        registry.revoke_token("nope")


def test_schema_is_idempotent_and_durable_settings(registry: SqliteRegistry) -> None:
    registry.create_model(Model(name="m"))
    again = SqliteRegistry(registry.path)
    assert again.get_model("m").name == "m"
    again.close()
    raw = sqlite3.connect(registry.path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 1
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
def test_upload_target_and_staged_upload(store: FileArtifactStore) -> None:
    target = store.create_upload("m", 1)
    assert len(target.upload_id) == 32 and int(target.upload_id, 16) >= 0
    assert (target.url, target.method) == (f"/uploads/{target.upload_id}", "PUT")
    assert target.headers == {"Content-Type": "application/octet-stream"}
    with pytest.raises(NotFound):
        store.inspect_upload(target.upload_id)
    data = os.urandom(2 * MiB + 5)
    staged = store.receive_upload(target.upload_id, io.BytesIO(data), 10 * MiB)
    assert (staged.size, staged.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert store.inspect_upload(target.upload_id) == staged
    with store.staged_path(target.upload_id) as path:
        assert path.read_bytes() == data
    assert not path.exists()  # the view is gone, the upload is not
    assert store.inspect_upload(target.upload_id) == staged
    again = store.receive_upload(target.upload_id, io.BytesIO(b"second"), 10 * MiB)
    assert store.inspect_upload(target.upload_id) == again != staged  # last complete upload wins
    assert [uid for uid, age in store.list_uploads()] == [target.upload_id]
    assert all(age >= 0 for _, age in store.list_uploads())
    store.discard_upload(target.upload_id)
    assert list(store.list_uploads()) == []
    with pytest.raises(NotFound):
        store.receive_upload(target.upload_id, io.BytesIO(b"x"), 10)


def test_unknown_and_expired_uploads_are_refused(store: FileArtifactStore) -> None:
    with pytest.raises(NotFound):
        store.receive_upload("0" * 32, io.BytesIO(b"x"), 10)
    target = store.create_upload("m", 1)
    marker = store.root / "uploads" / f"{target.upload_id}.reserved"
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "expires_at": "2000-01-01T00:00:00+00:00"}))
    with pytest.raises(NotFound, match="expired"):
        store.receive_upload(target.upload_id, io.BytesIO(b"x"), 10)


def test_payload_too_large_leaves_nothing(store: FileArtifactStore) -> None:
    target = store.create_upload("m", 1)
    before = tree(store.root)
    with pytest.raises(PayloadTooLarge):
        store.receive_upload(target.upload_id, io.BytesIO(b"\0" * (3 * MiB)), MiB)
    assert tree(store.root) == before
    with pytest.raises(NotFound):
        store.inspect_upload(target.upload_id)


@pytest.mark.parametrize("bad", ["../x", "%2e%2e", "../" + "0" * 29, "a" * 31 + "\0", "\uff10" * 32,
                                 "A" * 32, "0" * 33, "", "0" * 31 + "/", "0" * 16 + "/../" + "0" * 12])
def test_bad_upload_ids_are_refused_and_create_nothing(tmp_path: Path, bad: str) -> None:
    store = FileArtifactStore(tmp_path / "store" / "artifacts", Limits())
    before = tree(tmp_path)
    calls: list[Callable[[], object]] = [
        lambda: store.receive_upload(bad, io.BytesIO(b"data"), 100),
        lambda: store.inspect_upload(bad),
        lambda: store.promote(bad, "m", 1, "0" * 64),
        lambda: store.discard_upload(bad),
        lambda: store.staged_path(bad).__enter__(),
    ]
    for call in calls:
        with pytest.raises(InvalidInput) as info:
            call()
        assert info.value.field == "upload_id"
    assert tree(tmp_path) == before


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


def test_artifact_keys_are_checked(store: FileArtifactStore) -> None:
    sha = "c" * 64
    for key in ("/etc/passwd", f"sha256/../{sha}", f"sha256/{'d' * 64}", ""):
        bad = StoredArtifact(sha256=sha, size=1, key=key)
        assert not store.exists(bad)
        with pytest.raises(StorageCorrupted):
            store.read(bad)


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
