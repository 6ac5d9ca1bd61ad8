"""Faults (issue 5, class 9): DESIGN.md's invariants hold after a failure injected at every step of
push / commit / alias / deploy / rollback / delete / cleanup, on both backends, checked by the one
checker (``maas.services.invariants.check_invariants``); then cleanup runs, the invariants are checked
again, and retrying the interrupted operation takes effect (the store keeps working).

Where the faults are injected (never in maas's own code):

- local: at the k-th call of a port (registry / artifact store), at the k-th SQLite statement (a
  ``sqlite3.Connection`` that fails as a disk error would), at the k-th file operation of the artifact
  store (``os.open/fsync/replace/link/utime/chmod`` failing with EIO), and a real SIGKILL of a child
  process in the middle of pushes and deploys;
- AWS (moto): the k-th S3 or DynamoDB call raises ``ClientError`` (a 500), for every k.

Every operation is replayed from a snapshot of the store taken just before it (a copy of the home
directory; a deep copy of moto's bucket and table, in one moto session), so a fault at call k re-runs
only that operation, not the whole scenario before it: the AWS replay fails each of its ~160 calls once
in ~30 s on two cores, where replaying the whole scenario for each call took ~170 s. A second push of
the same kind is set-up only (its calls are the first push's)."""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import io
import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from maas.backends.local import LocalBackend
from maas.domain import UploadPlan, VersionStatus
from maas.errors import Conflict, MaasError, NotFound, Throttled
from maas.ports import ArtifactStore, Registry
from maas.services.aliases import AliasService
from maas.services.cleanup import CleanupReport, CleanupService
from maas.services.deploy import DeployWorkflow, InProcessExecutor
from maas.services.deployments import DeploymentService
from maas.services.invariants import check_invariants
from maas.services.models import MIN_PART_BYTES, ModelService
from maas.settings import Limits, Settings
from tests.models import InProcessValidator, scale_model

LATER = timedelta(days=3)  # past every TTL: cleanup removes whatever a fault abandoned


# --- the operations, as a client drives them ---------------------------------------------------------
@dataclass
class World:
    """One view of a store: the ports (possibly wrapped by a fault injector) and the services on them."""

    backend: Any  # LocalBackend | AwsBackend: settings, validator, bucket
    registry: Registry
    artifacts: ArtifactStore
    numbers: dict[str, int] = field(default_factory=dict)
    validator: Any = None  # default: the backend's

    def __post_init__(self) -> None:
        limits = self.backend.settings.limits
        self.models = ModelService(self.registry, self.artifacts, self.validator or self.backend.validator, limits)
        workflow = DeployWorkflow(self.registry, self.models, lambda _version: None)
        # In the caller's thread (no bake runs in the background), step retries without sleeping.
        executor = InProcessExecutor(workflow, background=False, sleep=lambda _seconds: None)
        self.deployments = DeploymentService(self.registry, self.models, executor=executor, workflow=workflow)
        self.aliases = AliasService(self.registry)


def push(world: World, name: str, data: bytes) -> int:
    digest = hashlib.sha256(data).hexdigest()
    pending = world.models.begin_version(name, plan=UploadPlan(size=len(data), sha256=digest))
    world.artifacts.receive_upload(pending.upload.upload_id, io.BytesIO(data), len(data))
    return world.models.commit_version(name, pending.version.version, sha256=digest, size=len(data)).version


def push_multipart(world: World, name: str, data: bytes) -> int:
    """As ``Client.push`` does above 64 MiB, with one (last, so small) part: the plan, the part sent
    straight to S3 by the client (its own connection, which no fault touches: faults are the server's),
    then the commit, which completes the multipart upload through the server's client."""
    from maas.backends.aws.artifacts import upload_key

    digest = hashlib.sha256(data).hexdigest()
    plan = UploadPlan(size=len(data), sha256=digest, part_size=MIN_PART_BYTES, part_sha256=(digest,))
    pending = world.models.begin_version(name, plan=plan)
    for target in pending.upload.parts:
        upload_id = parse_qs(urlsplit(target.url).query)["uploadId"][0]
        real_client("s3").upload_part(Bucket=world.backend.bucket, Key=upload_key(pending.upload.upload_id),
                                       UploadId=upload_id, PartNumber=target.number, Body=data)
    return world.models.commit_version(name, pending.version.version, sha256=digest, size=len(data)).version


@dataclass(frozen=True)
class Op:
    """A step of the scenario: ``run`` it (possibly under a fault); ``retry`` is what a client does after a
    failure (every maas operation is safe to retry); ``done`` asserts its effect is there."""

    name: str
    run: Callable[[World], None]
    retry: Callable[[World], None]
    done: Callable[[World], None]
    faulted: bool = True
    aws_only: bool = False
    local_only: bool = False


def _create(world: World) -> None:
    with contextlib.suppress(Conflict):
        world.models.create_model("m")


def _pusher(label: str, factor: float, *, multipart: bool = False) -> Callable[[World], None]:
    def run(world: World) -> None:
        send = push_multipart if multipart else push
        world.numbers[label] = send(world, "m", scale_model(factor))
    return run


def _pushed(label: str, factor: float) -> Callable[[World], None]:
    def done(world: World) -> None:
        version = world.registry.get_version("m", world.numbers[label])
        assert version.status is VersionStatus.READY
        assert version.sha256 == hashlib.sha256(scale_model(factor)).hexdigest()
    return done


def _deployer(label: str, **options: Any) -> Callable[[World], None]:
    def run(world: World) -> None:
        world.deployments.deploy("m", world.numbers[label], **options)
    return run


def _redeployer(label: str, **options: Any) -> Callable[[World], None]:
    def retry(world: World) -> None:
        world.deployments.recover_interrupted()  # a restart rolls back a deploy the fault cut short
        route = world.registry.get_route("m")
        if route is None or route.stable_version != world.numbers[label] or route.canary_version is not None:
            world.deployments.deploy("m", world.numbers[label], **options)
    return retry


def _serving(label: str) -> Callable[[World], None]:
    def done(world: World) -> None:
        route = world.registry.get_route("m")
        assert route is not None and route.stable_version == world.numbers[label], route
        assert route.canary_version is None, route
    return done


def _model_exists(world: World) -> None:
    world.registry.get_model("m")


def _rollback(world: World) -> None:
    world.deployments.rollback("m")


def _rollback_retry(world: World) -> None:
    world.deployments.recover_interrupted()
    route = world.registry.get_route("m")
    if route is None or route.stable_version != world.numbers["v1"]:
        world.deployments.rollback("m", to_version=world.numbers["v1"])


def _alias(world: World) -> None:
    world.aliases.set("m", "champion", world.numbers["v2"])


def _aliased(world: World) -> None:
    assert world.registry.get_alias("m", "champion").version == world.numbers["v2"]


def _delete_version(world: World) -> None:
    with contextlib.suppress(NotFound):
        world.models.delete_version("m", world.numbers["v3"])


def _version_gone(world: World) -> None:
    with pytest.raises(NotFound):
        world.registry.get_version("m", world.numbers["v3"])


def _delete_model(world: World) -> None:
    with contextlib.suppress(NotFound):
        world.models.delete_model("m", force=True)


def _delete_model_retry(world: World) -> None:
    _delete_model(world)
    # An interrupted delete on DynamoDB leaves the model marked "deleting" (hidden from readers, so the
    # service's delete answers 404: see test_an_interrupted_model_delete_can_be_retried); the registry's
    # own delete resumes it.
    with contextlib.suppress(NotFound):
        world.registry.delete_model("m")


def _model_gone(world: World) -> None:
    with pytest.raises(NotFound):
        world.registry.get_model("m")
    # the name is free again, and nothing of the old model shows through
    world.models.create_model("m")
    assert world.registry.list_versions("m", 10, None).items == []
    world.registry.delete_model("m")


def _cleanup(world: World) -> None:
    """The scheduled cleanup, past every TTL: the deleted model's artifacts are now garbage."""
    CleanupService(world.registry, world.artifacts, world.backend.settings.limits).run(datetime.now(UTC) + LATER)


def _swept(world: World) -> None:
    assert list(world.artifacts.list_artifacts()) == []
    assert list(world.artifacts.list_uploads()) == []


def _nothing(world: World) -> None:
    return None


OPS = (
    Op("create model", _create, _create, _model_exists),
    Op("push", _pusher("v1", 1.0), _pusher("v1", 1.0), _pushed("v1", 1.0)),
    Op("first deploy", _deployer("v1"), _redeployer("v1"), _serving("v1")),
    Op("push v2", _pusher("v2", 2.0), _nothing, _nothing, faulted=False),
    Op("push multipart", _pusher("v3", 3.0, multipart=True), _pusher("v3", 3.0, multipart=True),
       _pushed("v3", 3.0), aws_only=True),
    Op("push v3", _pusher("v3", 3.0), _nothing, _nothing, faulted=False, local_only=True),
    Op("alias", _alias, _alias, _aliased),
    Op("canary deploy", _deployer("v2", strategy="canary", canary_percent=50.0, bake_seconds=0),
       _redeployer("v2"), _serving("v2")),
    Op("rollback", _rollback, _rollback_retry, _serving("v1")),
    Op("delete version", _delete_version, _delete_version, _version_gone),
    Op("delete model", _delete_model, _delete_model_retry, _model_gone),
    Op("cleanup", _cleanup, _cleanup, _swept),
)


def ops_for(kind: str) -> list[Op]:
    return [op for op in OPS if not (op.aws_only and kind != "aws") and not (op.local_only and kind != "local")]


def settle(world: World, op: Op, where: str, *, check_retry: bool = True) -> None:
    """After a fault: the invariants hold; after cleanup they still do; the retried operation takes
    effect (and, with ``check_retry``, leaves the invariants true: the next replay checks that too)."""
    assert check_invariants(world.registry, world.artifacts) == [], where
    report = CleanupService(world.registry, world.artifacts, world.backend.settings.limits).run(
        datetime.now(UTC) + LATER)
    if report != CleanupReport():  # (a cleanup that changed nothing leaves the state just checked)
        assert check_invariants(world.registry, world.artifacts) == [], f"after cleanup, {where}"
    op.retry(world)
    op.done(world)
    if check_retry:
        assert check_invariants(world.registry, world.artifacts) == [], f"after the retry, {where}"


# --- local backend ----------------------------------------------------------------------------------
class InjectedFault(Exception):
    pass


class Counter:
    """Counts the calls of one layer and fails the ``fail_at``-th (None: counts only)."""

    def __init__(self, fail_at: int | None = None, error: Callable[[str], BaseException] = InjectedFault,
                 *, fail_on: str = ""):
        """``fail_on``: fail the first call of that name instead."""
        self.fail_at = fail_at
        self.fail_on = fail_on
        self.calls = 0
        self.names: list[str] = []
        self.armed = True
        self._error = error

    def tick(self, name: str) -> None:
        if not self.armed:
            return
        self.calls += 1
        self.names.append(name)
        if name == self.fail_on:
            self.fail_on, self.fail_at = "", self.calls
        if self.fail_at is not None and self.calls == self.fail_at:
            raise self._error(name)


class FaultyPort:
    """Wraps a port: its k-th method call raises (the crash of a backend call mid-operation)."""

    def __init__(self, real: Any, counter: Counter):
        self._real, self._counter = real, counter

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._real, name)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            self._counter.tick(name)
            return target(*args, **kwargs)

        return call


def _disk_error(name: str) -> sqlite3.OperationalError:
    return sqlite3.OperationalError(f"disk I/O error (injected at {name})")


def _io_error(name: str) -> OSError:
    return OSError(errno.EIO, f"injected I/O error in os.{name}")


class FaultyOs:
    """The ``os`` module as the artifact store sees it: each call that writes or publishes a file counts."""

    WRITES = frozenset({"open", "fsync", "replace", "link", "utime", "chmod"})

    def __init__(self, counter: Counter):
        self._counter = counter

    def __getattr__(self, name: str) -> Any:
        target = getattr(os, name)
        if name not in self.WRITES:
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            self._counter.tick(name)
            return target(*args, **kwargs)

        return call


@contextlib.contextmanager
def sqlite_faults(counter: Counter, *, rollbacks: bool = False) -> Iterator[None]:
    """Connections opened meanwhile fail their k-th statement (BEGIN and COMMIT included). ROLLBACK is
    not counted unless ``rollbacks``: a failed ROLLBACK poisons the connection (see
    test_a_failed_rollback_does_not_poison_the_connection), which would fail every later step."""

    class FaultyConnection(sqlite3.Connection):
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
            verb = sql.split(None, 1)[0].upper() if sql.strip() else sql
            if rollbacks or verb != "ROLLBACK":
                counter.tick(verb)
            return super().execute(sql, *args)

    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        return real_connect(*args, factory=FaultyConnection, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite3, "connect", connect)
        yield


def local_backend(home: Path) -> LocalBackend:
    settings = Settings(home=home, limits=Limits(validation_timeout_s=60))
    return LocalBackend(settings, validator=InProcessValidator(settings))


@contextlib.contextmanager
def local_world(home: Path, layer: str, counter: Counter, numbers: dict[str, int]) -> Iterator[World]:
    """A local store at ``home`` whose ``layer`` fails as ``counter`` says."""
    from maas.backends.local import artifacts as files

    with contextlib.ExitStack() as stack:
        if layer == "sqlite":
            stack.enter_context(sqlite_faults(counter))
        counter.armed = False  # opening the store is not part of the operation
        backend = local_backend(home)
        stack.callback(backend.close)
        counter.armed = True
        if layer == "files":
            patch = stack.enter_context(pytest.MonkeyPatch.context())
            patch.setattr(files, "os", FaultyOs(counter))
        registry = FaultyPort(backend.registry, counter) if layer == "registry" else backend.registry
        artifacts = FaultyPort(backend.artifacts, counter) if layer == "artifacts" else backend.artifacts
        yield World(backend, registry, artifacts, dict(numbers))


LOCAL_LAYERS: dict[str, Callable[[str], BaseException]] = {
    "registry": InjectedFault, "artifacts": InjectedFault, "sqlite": _disk_error, "files": _io_error,
}


@pytest.mark.parametrize("layer", list(LOCAL_LAYERS))
def test_local_fault_at_every_call_keeps_the_invariants(tmp_path: Path, layer: str) -> None:
    """Each operation from a copy of the home taken just before it, failing at each of its calls."""
    ops = ops_for("local")
    snapshots: list[tuple[Path, dict[str, int], int]] = []
    home, numbers = tmp_path / "clean", dict[str, int]()
    for index, op in enumerate(ops):
        snapshot = tmp_path / f"before-{index}"
        if home.exists():
            shutil.copytree(home, snapshot)
        counter = Counter(error=LOCAL_LAYERS[layer])
        with local_world(home, layer, counter, numbers) as world:
            op.run(world)
        snapshots.append((snapshot, numbers, counter.calls))
        numbers = world.numbers
        if op.faulted and layer in ("registry", "sqlite"):
            assert counter.calls > 0, op.name
    failed = 0
    for index, op in enumerate(ops):
        snapshot, before, calls = snapshots[index]
        for k in range(1, calls + 1 if op.faulted else 1):
            home = tmp_path / f"{index}-{k}"
            if snapshot.exists():
                shutil.copytree(snapshot, home)
            where = f"{layer} fault at call {k} of {op.name}"
            counter = Counter(k, LOCAL_LAYERS[layer])
            with local_world(home, layer, counter, before) as world:
                # Either the operation fails, or it absorbed the fault: a deploy step retried it, or
                # the call was best effort (a hard link for the validator's view falls back to a copy).
                with contextlib.suppress(InjectedFault, sqlite3.Error, OSError, MaasError):
                    op.run(world)
                assert counter.calls >= k, where
                failed += 1
            with local_world(home, "none", Counter(), world.numbers) as sound:
                settle(sound, op, where)
            shutil.rmtree(home)
    print(f"local {layer}: {failed} injected faults")
    assert failed >= (5 if layer in ("artifacts", "files") else 30), failed


def _push_forever(home: str, seed: int, pipe: Any) -> None:
    """A client pushing (and now and then deploying) versions until it is killed; each acknowledged
    write is reported to the parent once maas has answered it."""
    backend = local_backend(Path(home))
    world = World(backend, backend.registry, backend.artifacts)
    with contextlib.suppress(Conflict):
        world.models.create_model("m")
    pipe.send(("ready", 0, ""))
    rng = random.Random(seed)
    while True:
        factor = rng.uniform(0.5, 100.0)
        number = push(world, "m", scale_model(factor))
        pipe.send(("pushed", number, hashlib.sha256(scale_model(factor)).hexdigest()))
        if rng.random() < 0.4:
            world.deployments.deploy("m", number)
            pipe.send(("deployed", number, ""))


def test_sigkill_in_the_middle_of_pushes_loses_no_acknowledged_write(tmp_path: Path) -> None:
    """A real process kill at arbitrary points of push / commit / deploy, three times on one home:
    after each, the store reopens sound, every acknowledged version is READY with its bytes, the last
    acknowledged deploy (or a later one) serves, and cleanup removes only what was never acknowledged."""
    home = tmp_path / "home"
    context = multiprocessing.get_context("spawn")
    acked: dict[int, str] = {}
    last_deployed = 0
    rng = random.Random(5)
    for round_ in range(3):
        parent, child_end = context.Pipe()
        child = context.Process(target=_push_forever, args=(str(home), round_, child_end), daemon=True)
        child.start()
        assert parent.poll(60), "the pushing child did not start"
        parent.recv()
        wanted, deadline = rng.randint(2, 5), time.monotonic() + 60
        pushed = 0
        while pushed < wanted and time.monotonic() < deadline:
            if parent.poll(1):
                kind, number, digest = parent.recv()
                if kind == "pushed":
                    acked[number], pushed = digest, pushed + 1
                elif kind == "deployed":
                    last_deployed = max(last_deployed, number)
        time.sleep(rng.uniform(0.0, 0.05))  # somewhere inside the next push or deploy
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(30)
        assert child.exitcode == -signal.SIGKILL
        while parent.poll():  # what was acknowledged before the kill landed
            kind, number, digest = parent.recv()
            if kind == "pushed":
                acked[number] = digest
            elif kind == "deployed":
                last_deployed = max(last_deployed, number)
        assert pushed >= 2
        with local_backend(home) as backend:
            world = World(backend, backend.registry, backend.artifacts)
            assert backend.registry.integrity_check() == "ok"  # type: ignore[attr-defined]
            assert check_invariants(backend.registry, backend.artifacts) == [], f"round {round_}"

            def acknowledged_writes_survive(world: World = world, last_deployed: int = last_deployed) -> None:
                for number, digest in acked.items():
                    version = world.registry.get_version("m", number)
                    assert version.status is VersionStatus.READY and version.sha256 == digest
                route = world.registry.get_route("m")
                assert last_deployed == 0 or (route is not None and route.stable_version >= last_deployed)

            acknowledged_writes_survive()
            world.deployments.recover_interrupted()
            CleanupService(backend.registry, backend.artifacts, backend.settings.limits).run(
                datetime.now(UTC) + LATER)
            assert check_invariants(backend.registry, backend.artifacts) == [], f"after cleanup, round {round_}"
            acknowledged_writes_survive()
    print(f"SIGKILL: 3 kills, {len(acked)} acknowledged pushes survived, last acknowledged deploy v{last_deployed}")
    assert len(acked) >= 6


def test_a_failed_rollback_does_not_poison_the_connection(tmp_path: Path) -> None:
    from maas.domain import Model

    counter = Counter(error=_disk_error, fail_on="ROLLBACK")
    with sqlite_faults(counter, rollbacks=True):
        backend = local_backend(tmp_path / "home")
    with backend:
        backend.registry.create_model(Model(name="m"))
        with pytest.raises(Conflict):  # a Conflict whose ROLLBACK fails (an I/O error): still a Conflict
            backend.registry.create_model(Model(name="m"))
        backend.registry.create_model(Model(name="n"))  # the next write on the same thread
        assert [m.name for m in backend.registry.list_models(10, None).items] == ["m", "n"]


def _commit_then_die(home: str, data: bytes) -> None:
    backend = LocalBackend(Settings(home=Path(home)))
    models = ModelService(backend.registry, backend.artifacts, backend.validator, backend.settings.limits)
    models.create_model("m")
    pending = models.begin_version("m")
    backend.artifacts.receive_upload(pending.upload.upload_id, io.BytesIO(data), len(data))
    backend.artifacts.promote(pending.upload.upload_id, "m", pending.version.version,
                              hashlib.sha256(data).hexdigest())
    os.kill(os.getpid(), signal.SIGKILL)  # between the artifact write and the registry commit


def test_kill_between_artifact_write_and_registry_commit(tmp_path: Path) -> None:
    data = scale_model(5.0)
    child = multiprocessing.get_context("spawn").Process(target=_commit_then_die, args=(str(tmp_path), data))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    backend = LocalBackend(Settings(home=tmp_path))
    version = backend.registry.get_version("m", 1)
    assert version.status is VersionStatus.PENDING
    assert check_invariants(backend.registry, backend.artifacts) == []
    assert [a.sha256 for a in backend.artifacts.list_artifacts()] == [hashlib.sha256(data).hexdigest()]
    report = CleanupService(backend.registry, backend.artifacts, backend.settings.limits).run(
        datetime.now(UTC) + timedelta(days=1, minutes=1))
    assert report.expired_versions == [("m", 1)]
    assert report.removed_blobs == [hashlib.sha256(data).hexdigest()]
    assert backend.registry.get_version("m", 1).status is VersionStatus.FAILED
    assert check_invariants(backend.registry, backend.artifacts) == []
    report = CleanupService(backend.registry, backend.artifacts, backend.settings.limits).run(
        datetime.now(UTC) + LATER)
    assert report.removed_failed == [("m", 1)]
    backend.close()


# --- AWS under moto ---------------------------------------------------------------------------------
NOT_CALLS = {"meta", "exceptions", "generate_presigned_url", "can_paginate", "get_waiter"}


class FaultyClient:
    """A boto3 client whose k-th API call raises ``ClientError`` (code ``code``) before reaching AWS."""

    def __init__(self, real: Any, fail_at: int | None, code: str = "InternalError", *, fail_on: str = ""):
        """``fail_on``: fail the first call of that operation instead."""
        self._real = real
        self._fail_at = fail_at
        self._fail_on = fail_on
        self._code = code
        self.calls = 0
        self.names: list[str] = []

    def _count(self, name: str) -> None:
        from botocore.exceptions import ClientError

        self.calls += 1
        self.names.append(name)
        if name == self._fail_on:
            self._fail_on, self._fail_at = "", self.calls
        if self._fail_at is not None and self.calls == self._fail_at:
            raise ClientError({"Error": {"Code": self._code, "Message": "injected"},
                               "ResponseMetadata": {"HTTPStatusCode": 500}}, name)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._real, name)
        if name in NOT_CALLS or not callable(target):
            return target
        if name == "get_paginator":
            return lambda operation: _FaultyPaginator(self, operation, target(operation))

        def call(*args: Any, **kwargs: Any) -> Any:
            self._count(name)
            return target(*args, **kwargs)

        return call


class _FaultyPaginator:
    def __init__(self, owner: FaultyClient, operation: str, real: Any):
        self._owner, self._operation, self._real = owner, operation, real

    def paginate(self, **kwargs: Any) -> Any:
        for page in self._real.paginate(**kwargs):
            self._owner._count(f"{self._operation} (page)")
            yield page


_CLIENTS: dict[str, Any] = {}


def real_client(service: str) -> Any:
    """One boto3 client per service for the whole module (making one costs ~30 ms); moto's mock
    intercepts whichever ``mock_aws`` is active. DynamoDB's is unsigned: moto checks no signature, and
    signing is a tenth of each call's cost here."""
    if service not in _CLIENTS:
        import boto3
        import botocore
        from botocore.config import Config

        config = Config(signature_version=botocore.UNSIGNED) if service == "dynamodb" else None
        _CLIENTS[service] = boto3.client(service, region_name="us-east-1", config=config)
    return _CLIENTS[service]


def aws_backend_with(settings: Settings, *, s3: Any = None, dynamodb: Any = None) -> Any:
    from maas.backends.aws import AwsBackend
    from tests.conftest import TEST_BUCKET, TEST_TABLE

    return AwsBackend(settings, bucket=TEST_BUCKET, table=TEST_TABLE, s3=s3 or real_client("s3"),
                      dynamodb=dynamodb or real_client("dynamodb"), validator=InProcessValidator(settings))


class MotoSnapshot:
    """moto's bucket and table as they are now, to put back before each replay (a deep copy: S3
    object versions and ids, multipart uploads in flight, every DynamoDB item)."""

    def __init__(self) -> None:
        from moto.core import DEFAULT_ACCOUNT_ID  # type: ignore[attr-defined]
        from moto.dynamodb.models import dynamodb_backends
        from moto.s3.models import s3_backends

        from tests.conftest import TEST_BUCKET, TEST_TABLE

        self._s3 = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets
        self._tables = dynamodb_backends[DEFAULT_ACCOUNT_ID]["us-east-1"].tables
        self._bucket, self._table = TEST_BUCKET, TEST_TABLE
        self._saved = copy.deepcopy((self._s3[TEST_BUCKET], self._tables[TEST_TABLE]))

    def restore(self) -> None:
        bucket, table = copy.deepcopy(self._saved)
        self._s3[self._bucket], self._tables[self._table] = bucket, table


@pytest.mark.parametrize("service", ["s3", "dynamodb"])
def test_aws_failure_at_every_call_keeps_the_invariants(moto: None, settings: Settings, service: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Every S3 / DynamoDB call of every operation fails once (a 500 ``ClientError``): the user sees a
    503 (``Unavailable``) or a deploy step retried it, never a raw ``ClientError``; the invariants hold."""
    ops = ops_for("aws")
    snapshots: list[tuple[MotoSnapshot, dict[str, int], int, list[str]]] = []
    numbers: dict[str, int] = {}
    for op in ops:
        snapshot = MotoSnapshot()
        counting = FaultyClient(real_client(service), None)
        backend = aws_backend_with(settings, **{service: counting})
        world = World(backend, backend.registry, backend.artifacts, dict(numbers))
        op.run(world)
        snapshots.append((snapshot, numbers, counting.calls, counting.names))
        numbers = world.numbers
    total = absorbed = 0
    for index, op in enumerate(ops):
        snapshot, before, calls, names = snapshots[index]
        if not op.faulted:
            continue
        for k in range(1, calls + 1):
            snapshot.restore()
            where = f"{service} fault at call {k} ({names[k - 1]}) of {op.name}"
            faulty = aws_backend_with(settings, **{service: FaultyClient(real_client(service), k)})
            world = World(faulty, faulty.registry, faulty.artifacts, dict(before))
            caplog.clear()
            try:
                op.run(world)
            except MaasError as error:
                assert error.status == 503, where  # never a raw ClientError, never a 500
                sound = aws_backend_with(settings)
                settle(World(sound, sound.registry, sound.artifacts, world.numbers), op, where, check_retry=False)
            else:
                # a deploy step (idempotent) met it and the workflow retried the step (TRANSIENT_ERRORS):
                # the operation took effect as if nothing had happened
                assert "failed (Unavailable); retrying" in caplog.text, where
                sound = aws_backend_with(settings)
                op.done(World(sound, sound.registry, sound.artifacts, world.numbers))
                assert check_invariants(sound.registry, sound.artifacts) == [], where
                absorbed += 1
            total += 1
    print(f"aws {service}: {total} injected faults, {absorbed} absorbed by a retried deploy step")
    assert total > 15


def test_an_interrupted_model_delete_can_be_retried(moto: None, settings: Settings) -> None:
    """What a client does after ``DELETE /models/m`` failed with a 503: it retries the same call."""
    backend = aws_backend_with(settings)
    world = World(backend, backend.registry, backend.artifacts)
    world.models.create_model("m")
    push(world, "m", scale_model(1.0))
    faulty = aws_backend_with(settings, dynamodb=FaultyClient(real_client("dynamodb"), None,
                                                              fail_on="batch_write_item"))
    with pytest.raises(MaasError):
        World(faulty, faulty.registry, faulty.artifacts).models.delete_model("m", force=True)
    assert check_invariants(backend.registry, backend.artifacts) == []
    world.models.delete_model("m", force=True)  # the retry resumes the delete
    world.models.create_model("m")  # and the name is free again
    assert world.registry.list_versions("m", 10, None).items == []


# --- on both backends (``backend`` is parametrized: local, and AWS under moto) ------------------------
def test_cleanup_spares_young_uploads_and_referenced_blobs(backend: Any) -> None:
    world = World(backend, backend.registry, backend.artifacts)
    world.models.create_model("m")
    push(world, "m", scale_model(1.0))
    pending = world.models.begin_version("m", plan=UploadPlan(size=len(b"partial"), sha256="0" * 64))
    backend.artifacts.receive_upload(pending.upload.upload_id, io.BytesIO(b"partial"), 100)
    report = CleanupService(backend.registry, backend.artifacts, backend.settings.limits).run()
    assert report.removed_blobs == [] and report.removed_uploads == [] and report.expired_versions == []
    assert backend.artifacts.inspect_upload(pending.upload.upload_id).size == len(b"partial")


class OneS3CallAtATime:
    """moto's in-memory S3 is not thread-safe (``list_object_versions`` deep-copies a bucket's keys while
    another thread adds one, and fails): its calls are serialized here, as real S3 needs no help with. The
    race the test is after is in allocating version numbers (DynamoDB's conditional counter)."""

    def __init__(self, client: Any):
        self._client = client
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._client, name)
        if name in NOT_CALLS or not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return target(*args, **kwargs)

        return call


def test_concurrent_pushes_get_distinct_versions(backend: Any) -> None:
    # validated in this process: the race is in allocating numbers, not in the sandbox
    if not isinstance(backend, LocalBackend):
        backend.artifacts.client = OneS3CallAtATime(backend.artifacts.client)
    world = World(backend, backend.registry, backend.artifacts, validator=InProcessValidator(backend.settings))
    world.models.create_model("m")
    payloads = [scale_model(float(i)) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        numbers = list(pool.map(lambda data: push(world, "m", data), payloads))
    assert sorted(numbers) == list(range(1, 7))
    for number, data in zip(numbers, payloads, strict=True):
        assert backend.registry.get_version("m", number).sha256 == hashlib.sha256(data).hexdigest()
    assert check_invariants(backend.registry, backend.artifacts) == []


def test_failed_validation_leaves_no_ready_version(backend: Any) -> None:
    world = World(backend, backend.registry, backend.artifacts)
    world.models.create_model("m")
    with pytest.raises(MaasError):
        push(world, "m", b"PK\x03\x04" + b"\x00" * 100)
    versions = backend.registry.list_versions("m", 10, None).items
    assert [v.status for v in versions] == [VersionStatus.FAILED]
    assert list(backend.artifacts.list_artifacts()) == []
    assert check_invariants(backend.registry, backend.artifacts) == []


# --- AWS errors as users see them -------------------------------------------------------------------
@pytest.mark.parametrize("code", ["ThrottlingException", "ProvisionedThroughputExceededException",
                                  "RequestLimitExceeded", "SlowDown"])
def test_throttles_become_429_with_retry_after(moto: None, settings: Settings, code: str) -> None:
    import boto3

    service = "s3" if code == "SlowDown" else "dynamodb"
    client = FaultyClient(boto3.client(service), 1, code=code)
    backend = aws_backend_with(settings, **{service: client})
    world = World(backend, backend.registry, backend.artifacts)
    with pytest.raises(Throttled) as raised:
        if service == "s3":
            world.models.create_model("m")
            client._fail_at = client.calls + 1
            push(world, "m", scale_model(1.0))
        else:
            world.models.create_model("m")
    assert raised.value.status == 429 and raised.value.retry_after >= 1
    assert backend.bucket not in raised.value.detail and backend.table not in raised.value.detail


def test_botocore_retries_a_throttle_a_bounded_number_of_times(moto: None, settings: Settings,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The retries live in botocore's standard mode (jittered exponential backoff), bounded by
    MAX_ATTEMPTS; a throttle that outlasts them reaches the user as a 429, not a hang or a 500. The
    backoff botocore asks for is recorded instead of slept (several seconds of idle CI time)."""
    import types

    import botocore.endpoint
    from botocore.awsrequest import AWSResponse

    slept: list[float] = []
    monkeypatch.setattr(botocore.endpoint, "time", types.SimpleNamespace(sleep=slept.append))

    from maas.backends.aws import AwsBackend
    from maas.backends.aws.clients import MAX_ATTEMPTS, make_client

    dynamodb = make_client("dynamodb")
    attempts: list[str] = []

    def throttle(request: Any, **_: Any) -> AWSResponse:
        attempts.append(request.url)
        body = b'{"__type":"com.amazonaws.dynamodb.v20120810#ThrottlingException","message":"slow down"}'
        return AWSResponse(request.url, 400, {"x-amzn-ErrorType": "ThrottlingException"}, _Raw(body))

    backend = aws_backend_with(settings)
    throttled = AwsBackend(settings, bucket=backend.bucket, table=backend.table, s3=backend.s3,
                           dynamodb=dynamodb, validator=backend.validator)
    dynamodb.meta.events.register_first("before-send.dynamodb.GetItem", throttle)
    with pytest.raises(Throttled):
        throttled.registry.get_model("m")
    assert len(attempts) == MAX_ATTEMPTS
    assert len(slept) == MAX_ATTEMPTS - 1 and all(0 <= delay <= 20 for delay in slept), slept


class _Raw:
    def __init__(self, body: bytes):
        self._body = body

    def stream(self, **_: Any) -> Any:
        yield self._body
