"""The Registry port's contract, run against both implementations: SQLite (local backend) and
DynamoDB (AWS backend, under moto). Same errors, ordering, pagination, numbering, conditional
transitions and route derivation.

moto does not produce races, throttles or transaction conflicts; the DynamoDB-only tests inject them
through a thin proxy around the boto3 client (AWS's behaviour, not our code). moto's own
``transact_write_items`` is not atomic across threads (a cancelled transaction restores a snapshot of
the whole table taken when it started, which can undo a transaction another thread committed
meanwhile), so the fixture serializes moto's write operations the way DynamoDB's are."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import wraps
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from maas.backends.aws.registry import DynamoRegistry
from maas.backends.local import SqliteRegistry
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
from maas.errors import Conflict, InvalidInput, ModelRejected, NotFound, Throttled, Unavailable
from maas.ports import Registry, StoredArtifact
from maas.services.tokens import hash_token
from tests.conftest import TEST_TABLE

SIGNATURE = Signature(
    inputs=(TensorSpec(name="x", datatype="FP32", shape=(-1, 4)),),
    outputs=(TensorSpec(name="y", datatype="INT64", shape=(-1,)),),
)
_MOTO_WRITES = ("transact_write_items", "put_item", "update_item", "delete_item", "batch_write_item")


# --- fixtures and helpers ----------------------------------------------------------------------------
@pytest.fixture
def serialized_moto(moto: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """DynamoDB applies each write (and each transaction) atomically; moto does not under threads."""
    from moto.dynamodb.models import DynamoDBBackend

    lock = threading.RLock()
    for name in _MOTO_WRITES:
        original = getattr(DynamoDBBackend, name)

        def locked(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            with lock:
                return _original(*args, **kwargs)

        monkeypatch.setattr(DynamoDBBackend, name, wraps(original)(locked))


@pytest.fixture(params=["sqlite", "dynamodb"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    if request.param == "sqlite":
        reg = SqliteRegistry(tmp_path / "registry.db")
        yield reg
        reg.close()
    else:
        request.getfixturevalue("serialized_moto")
        yield DynamoRegistry(boto3.client("dynamodb"), TEST_TABLE)


@pytest.fixture
def dynamo(serialized_moto: None) -> DynamoRegistry:
    return DynamoRegistry(boto3.client("dynamodb"), TEST_TABLE)


def reopen(registry: Registry) -> Registry:
    """A second registry on the same storage (another process or Lambda container would be one)."""
    if isinstance(registry, SqliteRegistry):
        return SqliteRegistry(registry.path)
    return DynamoRegistry(boto3.client("dynamodb"), TEST_TABLE)


def fake_artifact(seed: str = "a") -> StoredArtifact:
    sha = hashlib.sha256(seed.encode()).hexdigest()
    return StoredArtifact(sha256=sha, size=len(seed), key=f"sha256/{sha}")


def ready(reg: Registry, model: str = "m") -> int:
    version = reg.allocate_version(model, created_by="t", upload_id=os.urandom(16).hex()).version
    reg.mark_ready(model, version, fake_artifact(f"{model}{version}"), SIGNATURE)
    return version


def deployment(model: str, version: int, stable: int | None = None, *, canary: int | None = None,
               weight: float = 0.0, status: DeploymentStatus = DeploymentStatus.IN_PROGRESS,
               dep_id: str | None = None) -> Deployment:
    return Deployment(id=dep_id or os.urandom(8).hex(), model=model, version=version, stable_version=stable,
                      canary_version=canary, canary_weight=weight, status=status,
                      strategy=Strategy.CANARY if canary else Strategy.ALL_AT_ONCE)


def promoted(dep: Deployment, stable: int) -> Deployment:
    return dep.with_event("promoted", status=DeploymentStatus.SUCCEEDED, stable_version=stable,
                          canary_version=None, canary_weight=0.0)


def client_error(code: str, operation: str, reasons: tuple[str, ...] = ()) -> ClientError:
    response: dict[str, Any] = {"Error": {"Code": code, "Message": f"injected {code}"},
                                "ResponseMetadata": {"HTTPStatusCode": 400}}
    if reasons:
        response["CancellationReasons"] = [{"Code": reason} for reason in reasons]
    return ClientError(response, operation)


Hook = Callable[[dict[str, Any]], None] | None


class FaultyClient:
    """A boto3 client passed through, except for hooks queued per operation: each call of the
    operation first runs (and consumes) the next hook, which may raise an injected AWS error or change
    the table behind the caller's back (a concurrent writer)."""

    def __init__(self, client: Any):
        self._client = client
        self.hooks: dict[str, list[Hook]] = {}
        self.calls: dict[str, int] = {}

    def inject(self, operation: str, *hooks: Hook) -> FaultyClient:
        self.hooks.setdefault(operation, []).extend(hooks)
        return self

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(**kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            queued = self.hooks.get(name)
            if queued:
                hook = queued.pop(0)
                if hook is not None:
                    hook(kwargs)
            return attribute(**kwargs)

        return call


def raising(error: ClientError) -> Hook:
    def hook(_: dict[str, Any]) -> None:
        raise error

    return hook


def doing(action: Callable[[], object]) -> Hook:
    def hook(_: dict[str, Any]) -> None:
        action()

    return hook


def faulty(**kwargs: Any) -> tuple[FaultyClient, DynamoRegistry]:
    client = FaultyClient(boto3.client("dynamodb"))
    return client, DynamoRegistry(client, TEST_TABLE, **kwargs)


def meta_key(model: str) -> dict[str, Any]:
    return {"pk": {"S": f"MODEL#{model}"}, "sk": {"S": "META"}}


def test_implementations_satisfy_the_port(registry: Registry) -> None:
    assert isinstance(registry, Registry)


# --- models ------------------------------------------------------------------------------------------
def test_models_create_get_conflict_and_missing(registry: Registry) -> None:
    model = Model(name="fraud", description="d", tags={"team": "risk"}, created_by="alice")
    assert registry.create_model(model) == model
    assert registry.get_model("fraud") == model
    with pytest.raises(Conflict, match="already exists") as info:
        registry.create_model(Model(name="fraud"))
    assert info.value.field == "name"
    with pytest.raises(NotFound, match="model 'nope' not found"):
        registry.get_model("nope")


def test_list_models_paginates_by_name_and_clamps(registry: Registry) -> None:
    assert registry.list_models(10, None).items == []
    for name in ["e", "a", "d", "b-x", "b", "c"]:
        registry.create_model(Model(name=name))
    names: list[str] = []
    cursor, pages = None, 0
    while True:
        page = registry.list_models(2, cursor)
        names += [m.name for m in page.items]
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert (names, pages) == (["a", "b", "b-x", "c", "d", "e"], 3)
    assert len(registry.list_models(0, None).items) == 1
    assert len(registry.list_models(10**6, None).items) == 6
    assert registry.list_models(6, None).next_cursor is None
    assert registry.list_models(5, None).next_cursor is not None


def _cursor(kind: str, value: object) -> str:
    import base64
    import json

    return base64.urlsafe_b64encode(json.dumps([kind, value]).encode()).rstrip(b"=").decode()


BAD_CURSORS = ["garbage!", "e30", "W10", "x" * 600, "\u00e9", _cursor("models", 1), _cursor("versions", "2"),
               _cursor("versions", True), _cursor("deployments", -1), _cursor("other", 1), _cursor("versions", 2**63)]


def test_invalid_cursor_is_invalid_input(registry: Registry) -> None:
    registry.create_model(Model(name="m"))
    listings: list[Callable[[str], object]] = [lambda c: registry.list_models(1, c),
                                               lambda c: registry.list_versions("m", 1, c),
                                               lambda c: registry.list_deployments("m", 1, c)]
    for cursor in BAD_CURSORS:
        for listing in listings:
            with pytest.raises(InvalidInput) as info:
                listing(cursor)
            assert info.value.field == "cursor", cursor


def test_dynamodb_cursors_must_fit_the_keys(dynamo: DynamoRegistry) -> None:
    """Cursor values become key condition values: they must be names and numbers the keys can hold."""
    dynamo.create_model(Model(name="m"))
    for call in (lambda: dynamo.list_models(1, _cursor("models", "")),
                 lambda: dynamo.list_models(1, _cursor("models", "UPPER")),
                 lambda: dynamo.list_models(1, _cursor("models", "a#b")),
                 lambda: dynamo.list_versions("m", 1, _cursor("versions", 0)),
                 lambda: dynamo.list_versions("m", 1, _cursor("versions", 10**9)),
                 lambda: dynamo.list_deployments("m", 1, _cursor("deployments", 0)),
                 lambda: dynamo.list_deployments("m", 1, _cursor("deployments", 10**12))):
        with pytest.raises(InvalidInput) as info:
            call()
        assert info.value.field == "cursor"


def test_cursor_of_one_listing_is_refused_by_another(registry: Registry) -> None:
    for name in ("a", "b"):
        registry.create_model(Model(name=name))
    models_cursor = registry.list_models(1, None).next_cursor
    assert models_cursor is not None
    with pytest.raises(InvalidInput):
        registry.list_versions("a", 1, models_cursor)
    with pytest.raises(InvalidInput):
        registry.list_deployments("a", 1, models_cursor)


def test_delete_model_removes_everything_and_returns_versions(registry: Registry) -> None:
    registry.create_model(Model(name="m"))
    registry.create_model(Model(name="keep"))
    kept = ready(registry, "keep")
    v1 = ready(registry)
    registry.allocate_version("m", created_by="t", upload_id="u2")
    registry.set_alias("m", "champion", v1)
    registry.create_deployment(deployment("m", v1, dep_id="d-old", status=DeploymentStatus.FAILED))
    registry.create_deployment(deployment("m", v1, dep_id="d-live"))
    removed = registry.delete_model("m")
    assert [v.version for v in removed] == [1, 2]
    assert removed[0].sha256 == fake_artifact("m1").sha256
    assert [v.status for v in removed] == [VersionStatus.READY, VersionStatus.PENDING]
    with pytest.raises(NotFound):
        registry.get_model("m")
    assert [m.name for m in registry.list_models(10, None).items] == ["keep"]
    assert registry.get_route("m") is None
    for dep_id in ("d-old", "d-live"):
        with pytest.raises(NotFound):
            registry.get_deployment(dep_id)
    with pytest.raises(NotFound):
        registry.get_version("m", 1)
    assert registry.list_versions_by_status("PENDING") == []
    with pytest.raises(NotFound):
        registry.delete_model("m")
    registry.create_model(Model(name="m"))  # the name can be used again, from scratch
    assert registry.list_aliases("m") == []
    assert registry.list_deployments("m", 10, None).items == []
    assert registry.list_versions("m", 10, None).items == []
    assert registry.allocate_version("m", created_by="t", upload_id="u").version == 1
    assert registry.create_deployment(deployment("m", ready(registry), dep_id="d-live")).seq == 1
    assert registry.get_version("keep", kept).status is VersionStatus.READY


def test_delete_model_of_many_items_batches(registry: Registry) -> None:
    registry.create_model(Model(name="big"))
    for i in range(12):  # 12 versions + 8 deployments + 8 pointers + 1 alias: two batches of deletes
        registry.allocate_version("big", created_by="t", upload_id=f"u{i}")
    version = ready(registry, "big")
    registry.set_alias("big", "champion", version)
    for i in range(8):
        registry.create_deployment(deployment("big", version, status=DeploymentStatus.FAILED, dep_id=f"d{i}"))
    assert [v.version for v in registry.delete_model("big")] == list(range(1, 14))
    with pytest.raises(NotFound):
        registry.get_deployment("d7")
    registry.create_model(Model(name="big"))
    assert registry.list_versions("big", 100, None).items == []


def test_dynamodb_interrupted_delete_hides_the_model_and_resumes(dynamo: DynamoRegistry) -> None:
    raw = boto3.client("dynamodb")
    dynamo.create_model(Model(name="m"))
    v1 = ready(dynamo)
    v2 = ready(dynamo)
    dynamo.set_alias("m", "champion", v1)
    dynamo.create_deployment(deployment("m", v1, v1, status=DeploymentStatus.SUCCEEDED, dep_id="d1"))
    # A delete that crashed after marking META and removing the alias and version 2.
    raw.update_item(TableName=TEST_TABLE, Key=meta_key("m"), UpdateExpression="SET deleting = :t",
                    ExpressionAttributeValues={":t": {"BOOL": True}})
    raw.delete_item(TableName=TEST_TABLE, Key={"pk": {"S": "MODEL#m"}, "sk": {"S": "ALIAS#champion"}})
    raw.delete_item(TableName=TEST_TABLE, Key={"pk": {"S": "MODEL#m"}, "sk": {"S": f"VERSION#{v2:09d}"}})
    with pytest.raises(NotFound):
        dynamo.get_model("m")
    assert dynamo.list_models(10, None).items == []
    assert dynamo.get_route("m") is None
    for call in (lambda: dynamo.allocate_version("m", created_by="t", upload_id="u"),
                 lambda: dynamo.set_alias("m", "stable", v1),
                 lambda: dynamo.create_deployment(deployment("m", v1, v1)),
                 lambda: dynamo.list_versions("m", 10, None), lambda: dynamo.list_aliases("m"),
                 lambda: dynamo.delete_version("m", v1)):
        with pytest.raises(NotFound, match="model 'm' not found"):
            call()
    with pytest.raises(Conflict, match="being deleted; retry") as info:
        dynamo.create_model(Model(name="m"))
    assert info.value.field == "name"
    assert [v.version for v in dynamo.delete_model("m")] == [v1]  # the retry finishes the job
    left = raw.scan(TableName=TEST_TABLE)["Items"]
    assert left == []
    dynamo.create_model(Model(name="m"))
    assert dynamo.get_model("m").name == "m"


# --- versions ----------------------------------------------------------------------------------------
def test_allocate_get_and_list_versions(registry: Registry) -> None:
    with pytest.raises(NotFound, match="model 'm' not found"):
        registry.allocate_version("m", created_by="t", upload_id="u")
    registry.create_model(Model(name="m"))
    assert registry.list_versions("m", 10, None).items == []
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
    assert registry.list_versions("m", 5, None).next_cursor is None
    assert len(registry.list_versions("m", 0, None).items) == 1
    with pytest.raises(NotFound):
        registry.list_versions("other", 10, None)


def test_mark_ready_and_failed_are_conditional(registry: Registry) -> None:
    registry.create_model(Model(name="m"))
    registry.allocate_version("m", created_by="t", upload_id="u1")
    registry.allocate_version("m", created_by="t", upload_id="u2")
    artifact = StoredArtifact(sha256="b" * 64, size=42, key="sha256/" + "b" * 64, version_id="v7")
    done = registry.mark_ready("m", 1, artifact, SIGNATURE)
    assert (done.status, done.sha256, done.size, done.storage_key, done.storage_version_id,
            done.signature) == (VersionStatus.READY, "b" * 64, 42, "sha256/" + "b" * 64, "v7", SIGNATURE)
    assert registry.get_version("m", 1) == done
    with pytest.raises(Conflict, match="is READY, not PENDING"):
        registry.mark_ready("m", 1, artifact, SIGNATURE)
    with pytest.raises(Conflict):
        registry.mark_failed("m", 1, "late")
    failed = registry.mark_failed("m", 2, "not an ONNX model")
    assert (failed.status, failed.status_reason) == (VersionStatus.FAILED, "not an ONNX model")
    with pytest.raises(Conflict, match="is FAILED, not PENDING"):
        registry.mark_ready("m", 2, artifact, SIGNATURE)
    with pytest.raises(NotFound):
        registry.mark_ready("m", 3, artifact, SIGNATURE)
    with pytest.raises(NotFound):
        registry.mark_failed("other", 1, "x")
    assert registry.get_version("m", 2) == failed
    assert registry.get_version("m", 1) == done


def test_a_signature_too_large_to_record_is_rejected_not_an_outage(registry: Registry) -> None:
    """Input names come from the uploaded model, unbounded: one 500 KB name makes a version item
    over DynamoDB's 400 KB. That is the model's fault (422, version FAILED so a retry gets the
    reason), never a 503 that leaves the version PENDING for every retry. SQLite has no such limit."""
    registry.create_model(Model(name="m"))
    number = registry.allocate_version("m", created_by="t", upload_id="u1").version
    huge = Signature(inputs=(TensorSpec(name="x" * 500_000, datatype="FP32", shape=(-1, 4)),),
                     outputs=SIGNATURE.outputs)
    try:
        done = registry.mark_ready("m", number, fake_artifact(), huge)
    except ModelRejected as rejected:
        assert "signature" in rejected.detail and "xxxxxxxxxx" not in rejected.detail
        failed = registry.get_version("m", number)
        assert (failed.status, failed.status_reason) == (VersionStatus.FAILED, rejected.detail)
        assert isinstance(registry, DynamoRegistry)
    else:
        assert (done.status, done.signature) == (VersionStatus.READY, huge)
        assert registry.get_version("m", number) == done


def test_list_versions_by_status_spans_models(registry: Registry) -> None:
    for name in ("b", "a", "a-b"):
        registry.create_model(Model(name=name))
        ready(registry, name)
        registry.allocate_version(name, created_by="t", upload_id=f"p-{name}")
    registry.allocate_version("a", created_by="t", upload_id="p-a2")
    pending = registry.list_versions_by_status("PENDING")
    assert [(v.model, v.version) for v in pending] == [("a", 2), ("a", 3), ("a-b", 2), ("b", 2)]
    assert [(v.model, v.version) for v in registry.list_versions_by_status(VersionStatus.READY)] == [
        ("a", 1), ("a-b", 1), ("b", 1)]
    assert registry.list_versions_by_status("FAILED") == []
    registry.mark_failed("a", 3, "bad")
    assert [(v.model, v.version) for v in registry.list_versions_by_status("FAILED")] == [("a", 3)]
    assert [(v.model, v.version) for v in registry.list_versions_by_status("PENDING")] == [
        ("a", 2), ("a-b", 2), ("b", 2)]
    with pytest.raises(InvalidInput) as info:
        registry.list_versions_by_status("BOGUS")
    assert info.value.field == "status"


def test_version_numbers_are_never_reused(registry: Registry) -> None:
    registry.create_model(Model(name="m"))
    for _ in range(3):
        registry.allocate_version("m", created_by="t", upload_id="u")
    assert registry.delete_version("m", 3).version == 3
    assert registry.delete_version("m", 2).version == 2
    assert registry.allocate_version("m", created_by="t", upload_id="u").version == 4
    other = reopen(registry)
    assert other.allocate_version("m", created_by="t", upload_id="u").version == 5
    if isinstance(other, SqliteRegistry):
        other.close()


def rewind_counter(registry: Registry, model: str) -> None:
    """Put the model's version counter back to 1 behind the registry's back (a restored backup)."""
    if isinstance(registry, SqliteRegistry):
        raw = sqlite3.connect(registry.path)
        with raw:
            raw.execute("UPDATE models SET next_version = 1 WHERE name = ?", (model,))
        raw.close()
    else:
        boto3.client("dynamodb").update_item(TableName=TEST_TABLE, Key=meta_key(model),
                                             UpdateExpression="SET next_version = :one",
                                             ExpressionAttributeValues={":one": {"N": "1"}})


def test_a_stale_counter_never_overwrites_a_version(registry: Registry) -> None:
    registry.create_model(Model(name="m"))
    registry.allocate_version("m", created_by="t", upload_id="u1")
    registry.allocate_version("m", created_by="t", upload_id="u2")
    rewind_counter(registry, "m")
    assert registry.allocate_version("m", created_by="t", upload_id="u3").version == 3
    assert registry.get_version("m", 1).upload_id == "u1"
    assert registry.allocate_version("m", created_by="t", upload_id="u4").version == 4


def test_delete_version_refuses_referenced_versions(registry: Registry) -> None:
    registry.create_model(Model(name="m"))
    v1, v2, v3, v4 = ready(registry), ready(registry), ready(registry), ready(registry)
    registry.set_alias("m", "champion", v1)
    with pytest.raises(Conflict, match="alias 'champion'"):
        registry.delete_version("m", v1)
    dep = registry.create_deployment(deployment("m", v2, status=DeploymentStatus.ROLLED_BACK))
    with pytest.raises(Conflict, match=dep.id):
        registry.delete_version("m", v2)
    registry.create_deployment(deployment("m", v3, v3, status=DeploymentStatus.SUCCEEDED))
    with pytest.raises(Conflict):
        registry.delete_version("m", v3)
    canary = registry.create_deployment(deployment("m", v4, v3, canary=v4, weight=5))
    with pytest.raises(Conflict, match=canary.id):
        registry.delete_version("m", v4)
    registry.delete_alias("m", "champion")
    assert registry.delete_version("m", v1).version == v1
    with pytest.raises(NotFound):
        registry.delete_version("m", v1)
    with pytest.raises(NotFound):
        registry.delete_version("other", v1)
    assert [v.version for v in registry.list_versions("m", 10, None).items] == [v4, v3, v2]


def test_versions_allocated_by_threads_are_distinct_and_consecutive(registry: Registry) -> None:
    registry.create_model(Model(name="m"))

    def allocate_six(worker: int) -> list[int]:
        return [registry.allocate_version("m", created_by=f"w{worker}", upload_id=f"{worker}-{i}").version
                for i in range(6)]

    with ThreadPoolExecutor(8) as pool:
        numbers = [n for batch in pool.map(allocate_six, range(8)) for n in batch]
    assert sorted(numbers) == list(range(1, 49))
    stored = registry.list_versions("m", 1000, None).items
    assert sorted(v.version for v in stored) == list(range(1, 49))
    assert {v.upload_id for v in stored} == {f"{w}-{i}" for w in range(8) for i in range(6)}


# --- aliases -----------------------------------------------------------------------------------------
def test_aliases_point_only_at_ready_versions(registry: Registry) -> None:
    registry.create_model(Model(name="m"))
    v1 = ready(registry)
    pending = registry.allocate_version("m", created_by="t", upload_id="p").version
    failed = registry.allocate_version("m", created_by="t", upload_id="f").version
    registry.mark_failed("m", failed, "bad")
    with pytest.raises(Conflict, match="PENDING, not READY") as info:
        registry.set_alias("m", "champion", pending)
    assert info.value.field == "version"
    with pytest.raises(Conflict, match="FAILED"):
        registry.set_alias("m", "champion", failed)
    with pytest.raises(NotFound, match="version 99 of model 'm' not found"):
        registry.set_alias("m", "champion", 99)
    with pytest.raises(NotFound, match="model 'other' not found"):
        registry.set_alias("other", "champion", v1)
    alias = registry.set_alias("m", "champion", v1)
    assert (alias.model, alias.alias, alias.version) == ("m", "champion", v1)
    assert registry.get_alias("m", "champion") == alias
    v4 = ready(registry)
    assert registry.set_alias("m", "champion", v4).version == v4
    registry.set_alias("m", "stable", v1)
    registry.set_alias("m", "a-first", v1)
    assert [(a.alias, a.version) for a in registry.list_aliases("m")] == [
        ("a-first", v1), ("champion", v4), ("stable", v1)]
    registry.delete_alias("m", "stable")
    with pytest.raises(NotFound, match="alias 'stable' of model 'm' not found"):
        registry.get_alias("m", "stable")
    with pytest.raises(NotFound):
        registry.delete_alias("m", "stable")
    with pytest.raises(NotFound):
        registry.list_aliases("other")
    with pytest.raises(NotFound, match="model 'other' not found"):
        registry.get_alias("other", "champion")
    with pytest.raises(NotFound, match="model 'other' not found"):
        registry.delete_alias("other", "champion")


# --- deployments and routes --------------------------------------------------------------------------
def test_deployments_are_conditional_and_sequenced(registry: Registry) -> None:
    registry.create_model(Model(name="m"))
    v1, v2 = ready(registry), ready(registry)
    pending = registry.allocate_version("m", created_by="t", upload_id="p").version
    with pytest.raises(Conflict, match="not READY") as info:
        registry.create_deployment(deployment("m", pending))
    assert info.value.field == "version"
    with pytest.raises(NotFound):
        registry.create_deployment(deployment("m", 99))
    with pytest.raises(NotFound, match="model 'other' not found"):
        registry.create_deployment(deployment("other", v1))
    first = registry.create_deployment(deployment("m", v1, dep_id="d1"))
    assert first.seq == 1 and registry.get_deployment("d1") == first
    with pytest.raises(Conflict, match="already has deployment 'd1' in progress"):
        registry.create_deployment(deployment("m", v2))
    with pytest.raises(Conflict, match="in progress"):  # even a finished one cannot be recorded meanwhile
        registry.create_deployment(deployment("m", v2, status=DeploymentStatus.SUCCEEDED))
    with pytest.raises(Conflict, match="already exists"):
        registry.create_deployment(deployment("m", v2, dep_id="d1"))
    done = promoted(first, v1)
    with pytest.raises(Conflict, match="is IN_PROGRESS, not SUCCEEDED"):
        registry.update_deployment(done, DeploymentStatus.SUCCEEDED)
    stored = registry.update_deployment(done, DeploymentStatus.IN_PROGRESS)
    assert stored.status is DeploymentStatus.SUCCEEDED and stored.seq == 1
    assert registry.get_deployment("d1") == stored
    with pytest.raises(Conflict):  # a second writer that read the old status loses
        registry.update_deployment(done, DeploymentStatus.IN_PROGRESS)
    second = registry.create_deployment(deployment("m", v2, v1, dep_id="d2"))
    assert second.seq == 2
    progressed = registry.update_deployment(second.with_event("shifted", canary_version=v2, canary_weight=20),
                                            DeploymentStatus.IN_PROGRESS)
    assert registry.get_deployment("d2") == progressed and progressed.canary_weight == 20
    with pytest.raises(Conflict):  # referenced versions must stay READY
        registry.update_deployment(second.model_copy(update={"canary_version": pending}),
                                   DeploymentStatus.IN_PROGRESS)
    with pytest.raises(NotFound):
        registry.update_deployment(second.model_copy(update={"canary_version": 99}), DeploymentStatus.IN_PROGRESS)
    registry.create_model(Model(name="n"))
    with pytest.raises(InvalidInput) as moved:
        registry.update_deployment(second.model_copy(update={"model": "n"}), DeploymentStatus.IN_PROGRESS)
    assert moved.value.field == "model"
    with pytest.raises(NotFound):
        registry.update_deployment(deployment("m", v1, dep_id="ghost"), DeploymentStatus.IN_PROGRESS)
    with pytest.raises(NotFound, match="deployment 'ghost' not found"):
        registry.get_deployment("ghost")
    finished = registry.update_deployment(promoted(progressed, v2), DeploymentStatus.IN_PROGRESS)
    third = registry.create_deployment(deployment("m", v1, v2, dep_id="d3"))  # in flight released
    assert (finished.seq, third.seq) == (2, 3)
    page = registry.list_deployments("m", 2, None)
    assert [d.id for d in page.items] == ["d3", "d2"]
    page = registry.list_deployments("m", 2, page.next_cursor)
    assert ([d.id for d in page.items], page.next_cursor) == (["d1"], None)
    assert registry.list_deployments("m", 3, None).next_cursor is None
    assert registry.list_deployments("n", 10, None).items == []
    with pytest.raises(NotFound):
        registry.list_deployments("other", 10, None)


def test_only_one_in_progress_deployment_even_via_update(registry: Registry) -> None:
    registry.create_model(Model(name="m"))
    v1 = ready(registry)
    old = registry.create_deployment(deployment("m", v1, status=DeploymentStatus.FAILED))
    live = registry.create_deployment(deployment("m", v1))
    with pytest.raises(Conflict, match=f"already has deployment {live.id!r} in progress"):
        registry.update_deployment(old.model_copy(update={"status": DeploymentStatus.IN_PROGRESS}),
                                   DeploymentStatus.FAILED)
    failed = registry.update_deployment(live.with_event("failed", status=DeploymentStatus.FAILED),
                                        DeploymentStatus.IN_PROGRESS)
    revived = registry.update_deployment(old.model_copy(update={"status": DeploymentStatus.IN_PROGRESS}),
                                         DeploymentStatus.FAILED)
    assert revived.status is DeploymentStatus.IN_PROGRESS
    with pytest.raises(Conflict, match=f"already has deployment {old.id!r} in progress"):
        registry.create_deployment(deployment("m", v1))
    # A terminal deployment can be rewritten (more events) without touching the one in flight.
    again = registry.update_deployment(failed.with_event("note"), DeploymentStatus.FAILED)
    assert len(again.events) == 2
    registry.update_deployment(revived.with_event("failed", status=DeploymentStatus.FAILED),
                               DeploymentStatus.IN_PROGRESS)
    assert registry.create_deployment(deployment("m", v1)).seq == 3


def test_get_route_follows_the_deployments(registry: Registry) -> None:
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
    assert route is not None and (route.stable_version, route.canary_version, route.deployment_id) == (
        n1, None, "n1")
    registry.update_deployment(promoted(first, v1), DeploymentStatus.IN_PROGRESS)
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
    # In flight with a stable and no canary yet: everything to the stable.
    registry.create_deployment(deployment("m", v2, v3, dep_id="d4"))
    route = registry.get_route("m")
    assert route is not None and (route.stable_version, route.canary_version, route.canary_weight,
                                  route.deployment_id) == (v3, None, 0.0, "d4")


def test_get_route_edge_cases(registry: Registry) -> None:
    registry.create_model(Model(name="m"))
    v1, v2 = ready(registry), ready(registry)
    # A first canary at weight 0 sends nothing anywhere yet.
    zero = registry.create_deployment(deployment("m", v1, canary=v1, weight=0, dep_id="z"))
    assert registry.get_route("m") is None
    registry.update_deployment(zero.with_event("failed", status=DeploymentStatus.FAILED), DeploymentStatus.IN_PROGRESS)
    assert registry.get_route("m") is None  # failed and rolled back deployments never route
    # SUCCEEDED without a stable version serves the version it deployed.
    registry.create_deployment(deployment("m", v2, None, status=DeploymentStatus.SUCCEEDED, dep_id="s"))
    route = registry.get_route("m")
    assert route is not None and (route.model, route.stable_version, route.deployment_id) == ("m", v2, "s")
    # Older SUCCEEDED deployments are found past newer finished ones (more than a page of them).
    for i in range(26):
        registry.create_deployment(deployment("m", v1, v2, status=DeploymentStatus.ROLLED_BACK, dep_id=f"r{i}"))
    route = registry.get_route("m")
    assert route is not None and route.deployment_id == "s"


# --- tokens ------------------------------------------------------------------------------------------
def test_tokens(registry: Registry) -> None:
    assert registry.list_tokens() == []
    token = Token(id="t1", name="ci", token_hash=hash_token("secret-1"), scopes=(Scope.DEPLOY,), model="m")
    assert registry.create_token(token) == token
    assert registry.find_token(hash_token("secret-1")) == token
    assert registry.find_token(hash_token("other")) is None
    with pytest.raises(Conflict):  # same secret
        registry.create_token(token.model_copy(update={"id": "t2"}))
    with pytest.raises(Conflict):  # same id
        registry.create_token(token.model_copy(update={"token_hash": hash_token("secret-x")}))
    registry.create_token(Token(id="t2", name="app", token_hash=hash_token("s2"), scopes=(Scope.INVOKE,)))
    assert [t.id for t in registry.list_tokens()] == ["t1", "t2"]
    revoked = registry.revoke_token("t1")
    assert revoked.revoked and registry.find_token(hash_token("secret-1")) == revoked
    assert registry.revoke_token("t1").revoked  # idempotent
    assert [t.revoked for t in registry.list_tokens()] == [True, False]
    with pytest.raises(NotFound, match="token 'nope' not found"):
        registry.revoke_token("nope")


def test_tokens_are_listed_by_creation_time_then_id(registry: Registry) -> None:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    for token_id, at in (("b", t0), ("a", t0 + timedelta(seconds=1)), ("c", t0), ("z", t0 - timedelta(days=1))):
        registry.create_token(Token(id=token_id, name=token_id, token_hash=hash_token(token_id),
                                    scopes=(Scope.INVOKE,), created_at=at))
    assert [t.id for t in registry.list_tokens()] == ["z", "b", "c", "a"]


# --- DynamoDB: races, conflicts and throttles (injected: moto produces none) -------------------------
def test_transaction_conflict_is_retried(serialized_moto: None) -> None:
    client, reg = faulty()
    conflict = client_error("TransactionCanceledException", "TransactWriteItems", ("None", "TransactionConflict"))
    reg.create_model(Model(name="m"))
    client.inject("transact_write_items", raising(conflict))
    assert reg.allocate_version("m", created_by="t", upload_id="u").version == 1
    assert client.calls["transact_write_items"] == 2
    v1 = ready(reg)
    client.inject("transact_write_items", raising(conflict), raising(conflict))
    assert reg.set_alias("m", "champion", v1).version == v1
    assert reg.get_alias("m", "champion").version == v1


def test_persistent_transaction_conflicts_become_unavailable(serialized_moto: None) -> None:
    client, reg = faulty(max_attempts=3)
    reg.create_model(Model(name="m"))
    conflict = client_error("TransactionCanceledException", "TransactWriteItems", ("TransactionConflict", "None"))
    client.inject("transact_write_items", *[raising(conflict)] * 3)
    with pytest.raises(Unavailable) as info:
        reg.allocate_version("m", created_by="t", upload_id="u")
    assert (info.value.status, info.value.retry_after) == (503, 1)
    assert client.calls["transact_write_items"] == 3
    assert reg.list_versions("m", 10, None).items == []


def test_throttles_surface_as_429(serialized_moto: None) -> None:
    client, reg = faulty()
    calls: list[tuple[str, str, Callable[[], object]]] = [
        ("get_item", "ThrottlingException", lambda: reg.get_model("m")),
        ("get_item", "ProvisionedThroughputExceededException", lambda: reg.find_token("x")),
        ("query", "ProvisionedThroughputExceededException", lambda: reg.list_models(10, None)),
        ("query", "ThrottlingException", lambda: reg.list_tokens()),
        ("put_item", "ThrottlingException", lambda: reg.create_model(Model(name="m"))),
    ]
    for operation, code, call in calls:
        client.inject(operation, raising(client_error(code, operation)))
        with pytest.raises(Throttled) as info:
            call()
        assert info.value.status == 429 and info.value.retry_after >= 1
        assert "maas-test" not in info.value.detail  # no table name leaks to users
    assert reg.create_model(Model(name="m")).name == "m"  # nothing was left half done


def test_throttled_transaction_surfaces_as_429(serialized_moto: None) -> None:
    client, reg = faulty()
    reg.create_model(Model(name="m"))
    client.inject("transact_write_items", raising(
        client_error("TransactionCanceledException", "TransactWriteItems", ("ThrottlingError", "None"))))
    with pytest.raises(Throttled) as info:
        reg.allocate_version("m", created_by="t", upload_id="u")
    assert info.value.retry_after >= 1


def test_other_aws_errors_become_unavailable(serialized_moto: None) -> None:
    client, reg = faulty()
    client.inject("get_item", raising(client_error("InternalServerError", "GetItem")))
    with pytest.raises(Unavailable):
        reg.get_model("m")
    with pytest.raises(Unavailable):  # the table does not exist: the operator's problem, said without names
        DynamoRegistry(boto3.client("dynamodb"), "missing-table").get_model("m")


def test_delete_version_rechecks_when_a_reference_appears_meanwhile(dynamo: DynamoRegistry) -> None:
    dynamo.create_model(Model(name="m"))
    v1 = ready(dynamo)
    client, reg = faulty()
    client.inject("transact_write_items", doing(lambda: dynamo.set_alias("m", "champion", v1)))
    with pytest.raises(Conflict, match="alias 'champion'"):
        reg.delete_version("m", v1)
    assert dynamo.get_version("m", v1).status is VersionStatus.READY
    assert client.calls["transact_write_items"] == 1  # the retry's fresh check refused it


def test_set_alias_on_a_version_deleted_meanwhile_is_not_found(dynamo: DynamoRegistry) -> None:
    dynamo.create_model(Model(name="m"))
    v1 = ready(dynamo)
    client, reg = faulty()
    client.inject("transact_write_items", doing(lambda: dynamo.delete_version("m", v1)))
    with pytest.raises(NotFound, match=f"version {v1} of model 'm' not found"):
        reg.set_alias("m", "champion", v1)
    assert dynamo.list_aliases("m") == []


def test_create_deployment_loses_to_a_concurrent_one(dynamo: DynamoRegistry) -> None:
    dynamo.create_model(Model(name="m"))
    v1 = ready(dynamo)
    client, reg = faulty()
    client.inject("transact_write_items", doing(lambda: dynamo.create_deployment(deployment("m", v1, dep_id="a"))))
    with pytest.raises(Conflict, match="already has deployment 'a' in progress"):
        reg.create_deployment(deployment("m", v1, dep_id="b"))
    assert [d.id for d in dynamo.list_deployments("m", 10, None).items] == ["a"]
    with pytest.raises(NotFound):
        dynamo.get_deployment("b")


def test_update_deployment_loses_to_a_concurrent_update(dynamo: DynamoRegistry) -> None:
    dynamo.create_model(Model(name="m"))
    v1 = ready(dynamo)
    dep = dynamo.create_deployment(deployment("m", v1, dep_id="d"))
    client, reg = faulty()
    client.inject("transact_write_items", doing(lambda: dynamo.update_deployment(
        dep.with_event("rolled_back", status=DeploymentStatus.ROLLED_BACK), DeploymentStatus.IN_PROGRESS)))
    with pytest.raises(Conflict, match="is ROLLED_BACK, not IN_PROGRESS"):
        reg.update_deployment(promoted(dep, v1), DeploymentStatus.IN_PROGRESS)
    assert dynamo.get_deployment("d").status is DeploymentStatus.ROLLED_BACK
    assert dynamo.create_deployment(deployment("m", v1)).seq == 2  # in flight was released once


def test_mark_ready_loses_to_a_concurrent_transition(dynamo: DynamoRegistry) -> None:
    dynamo.create_model(Model(name="m"))
    dynamo.allocate_version("m", created_by="t", upload_id="u1")
    dynamo.allocate_version("m", created_by="t", upload_id="u2")
    client, reg = faulty()
    client.inject("update_item", doing(lambda: dynamo.mark_failed("m", 1, "cleanup")))
    with pytest.raises(Conflict, match="is FAILED, not PENDING"):
        reg.mark_ready("m", 1, fake_artifact(), SIGNATURE)
    client.inject("update_item", doing(lambda: dynamo.delete_version("m", 2)))
    with pytest.raises(NotFound, match="version 2 of model 'm' not found"):
        reg.mark_failed("m", 2, "bad")
    assert dynamo.list_versions_by_status("PENDING") == []


def test_get_route_while_the_deployment_in_flight_finishes(dynamo: DynamoRegistry) -> None:
    dynamo.create_model(Model(name="m"))
    v1, v2 = ready(dynamo), ready(dynamo)
    base = dynamo.create_deployment(deployment("m", v1, v1, status=DeploymentStatus.SUCCEEDED, dep_id="d1"))
    assert base.seq == 1
    canary = dynamo.create_deployment(deployment("m", v2, v1, canary=v2, weight=10, dep_id="d2"))
    # META is read while d2 is in flight; d2 is rolled back before the route reads it.
    client, reg = faulty()
    client.inject("get_item", None, doing(lambda: dynamo.update_deployment(
        canary.with_event("rolled_back", status=DeploymentStatus.ROLLED_BACK), DeploymentStatus.IN_PROGRESS)))
    route = reg.get_route("m")
    assert route is not None and (route.stable_version, route.canary_version, route.deployment_id) == (
        v1, None, "d1")
    again = dynamo.create_deployment(deployment("m", v2, v1, canary=v2, weight=10, dep_id="d3"))
    client.inject("get_item", None, doing(lambda: dynamo.update_deployment(
        promoted(again, v2), DeploymentStatus.IN_PROGRESS)))
    route = reg.get_route("m")
    assert route is not None and (route.stable_version, route.canary_version, route.deployment_id) == (
        v2, None, "d3")


def test_dynamodb_items_follow_the_key_design(dynamo: DynamoRegistry) -> None:
    """The table layout other components (infra, cleanup, operators) rely on."""
    raw = boto3.client("dynamodb")
    dynamo.create_model(Model(name="m"))
    v1 = ready(dynamo)
    dynamo.allocate_version("m", created_by="t", upload_id="p")
    dynamo.set_alias("m", "champion", v1)
    dynamo.create_deployment(deployment("m", v1, dep_id="d1"))
    dynamo.create_token(Token(id="t1", name="ci", token_hash="ab" * 32, scopes=(Scope.ADMIN,)))
    items = {(i["pk"]["S"], i["sk"]["S"]): i for i in raw.scan(TableName=TEST_TABLE)["Items"]}
    assert set(items) == {("MODEL#m", "META"), ("MODEL#m", "VERSION#000000001"), ("MODEL#m", "VERSION#000000002"),
                          ("MODEL#m", "ALIAS#champion"), ("MODEL#m", "DEPLOYMENT#000000000001"),
                          ("DEPLOYMENT#d1", "META"), ("TOKEN#" + "ab" * 32, "META")}
    meta = items[("MODEL#m", "META")]
    assert (meta["gsi1pk"]["S"], meta["gsi1sk"]["S"], meta["next_version"]["N"], meta["next_seq"]["N"],
            meta["in_flight"]["S"]) == ("MODELS", "m", "3", "2", "d1")
    assert int(meta["rev"]["N"]) == 2  # one alias write, one deployment write
    ready_item = items[("MODEL#m", "VERSION#000000001")]
    assert (ready_item["status"]["S"], ready_item["gsi1pk"]["S"], ready_item["gsi1sk"]["S"]) == (
        "READY", "STATUS#READY", "m#000000001")
    assert items[("MODEL#m", "VERSION#000000002")]["gsi1pk"]["S"] == "STATUS#PENDING"
    token = items[("TOKEN#" + "ab" * 32, "META")]
    assert (token["gsi1pk"]["S"], token["gsi1sk"]["S"]) == ("TOKENS", "t1")
