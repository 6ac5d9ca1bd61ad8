"""The registry in SQLite.

Durability and concurrency: WAL journal with ``synchronous=FULL`` (a commit is on disk when it
returns), one connection per thread (re-opened after a fork), and every write inside
``BEGIN IMMEDIATE ... COMMIT`` so writers in any number of threads and processes serialize on the
database lock (waiting up to ``busy_timeout``) and each check-then-write is atomic. Reads that need
more than one statement run in a deferred transaction, which gives them one consistent snapshot.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

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
    VersionStatus,
)
from maas.domain.models import utcnow
from maas.domain.names import MAX_VERSION
from maas.errors import Conflict, InvalidInput, NotFound, Unavailable
from maas.ports import StoredArtifact
from maas.services.cursors import bad_cursor, decode_cursor, encode_cursor, utc_iso

SCHEMA_VERSION = 2
BUSY_TIMEOUT_S = 30.0
_INHERITED: list[sqlite3.Connection] = []  # connections a forked child inherited: see close()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name          TEXT PRIMARY KEY,
    description   TEXT NOT NULL,
    tags          TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    next_version  INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS versions (
    model              TEXT NOT NULL REFERENCES models(name),
    version            INTEGER NOT NULL,
    status             TEXT NOT NULL CHECK (status IN ('PENDING', 'READY', 'FAILED')),
    status_reason      TEXT NOT NULL,
    sha256             TEXT,
    size               INTEGER,
    storage_key        TEXT,
    storage_version_id TEXT,
    framework          TEXT NOT NULL,
    signature          TEXT,
    parent_version     INTEGER,
    upload_id          TEXT,
    description        TEXT NOT NULL,
    limits             TEXT,
    created_by         TEXT NOT NULL,
    created_at         TEXT NOT NULL,
    updated_at         TEXT NOT NULL,
    PRIMARY KEY (model, version),
    CHECK (status != 'READY' OR (sha256 IS NOT NULL AND storage_key IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS versions_by_status ON versions (status);
CREATE TABLE IF NOT EXISTS aliases (
    model       TEXT NOT NULL REFERENCES models(name),
    alias       TEXT NOT NULL,
    version     INTEGER NOT NULL,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (model, alias),
    FOREIGN KEY (model, version) REFERENCES versions (model, version)
);
CREATE TABLE IF NOT EXISTS deployments (
    id      TEXT PRIMARY KEY,
    model   TEXT NOT NULL REFERENCES models(name),
    seq     INTEGER NOT NULL,
    status  TEXT NOT NULL,
    json    TEXT NOT NULL,
    UNIQUE (model, seq)
);
CREATE INDEX IF NOT EXISTS deployments_by_status ON deployments (status);
CREATE UNIQUE INDEX IF NOT EXISTS deployments_one_in_progress
    ON deployments (model) WHERE status = 'IN_PROGRESS';
CREATE TABLE IF NOT EXISTS tokens (
    id          TEXT PRIMARY KEY,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL,
    json        TEXT NOT NULL
);
"""

_VERSION_COLUMNS = (
    "model", "version", "status", "status_reason", "sha256", "size", "storage_key", "storage_version_id",
    "framework", "signature", "parent_version", "upload_id", "description", "limits", "created_by",
    "created_at", "updated_at",
)
#: Columns added since schema 1, by the schema that added them: (table, column, type).
_MIGRATIONS: dict[int, tuple[tuple[str, str, str], ...]] = {2: (("versions", "limits", "TEXT"),)}
assert set(_VERSION_COLUMNS) == set(ModelVersion.model_fields), "versions table out of date"


def _decode_cursor(cursor: str, kind: str, expected: type) -> Any:
    value = decode_cursor(cursor, kind)
    if isinstance(value, bool) or not isinstance(value, expected):
        raise bad_cursor()
    if isinstance(value, int) and not 0 <= value < 2**62:  # SQLite integers are 64-bit
        raise bad_cursor()
    return value


def _model_from_row(row: sqlite3.Row) -> Model:
    return Model(name=row["name"], description=row["description"], tags=json.loads(row["tags"]),
                 created_at=row["created_at"], created_by=row["created_by"])


def _version_from_row(row: sqlite3.Row) -> ModelVersion:
    data = {column: row[column] for column in _VERSION_COLUMNS}
    for column in ("signature", "limits"):
        if data[column] is not None:
            data[column] = json.loads(data[column])
    return ModelVersion.model_validate(data)


def _version_values(version: ModelVersion) -> dict[str, Any]:
    data = version.model_dump(mode="json")
    for column in ("signature", "limits"):
        if data[column] is not None:
            data[column] = json.dumps(data[column], separators=(",", ":"))
    data["created_at"] = utc_iso(version.created_at)
    data["updated_at"] = utc_iso(version.updated_at)
    return {column: data[column] for column in _VERSION_COLUMNS}


def _deployment_from_row(row: sqlite3.Row) -> Deployment:
    return Deployment.model_validate_json(row["json"])


def _token_from_row(row: sqlite3.Row) -> Token:
    return Token.model_validate_json(row["json"])


def _missing_version(model: str, version: int) -> NotFound:
    return NotFound(f"version {version} of model {model!r} not found")


def _missing_model(model: str) -> NotFound:
    return NotFound(f"model {model!r} not found")


class _Handle:
    """Holds a thread's connection; when the thread ends its thread-local drops the handle and the
    finalizer closes the connection, so short-lived worker threads never leak descriptors."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn


def _close_if_owner(conn: sqlite3.Connection, pid: int) -> None:
    if os.getpid() == pid:
        with suppress(sqlite3.Error):
            conn.close()
    else:
        _INHERITED.append(conn)  # inherited through a fork: closing could release the parent's locks


class SqliteRegistry:
    """``maas.ports.Registry`` in one SQLite file, safe across threads and processes."""

    def __init__(self, path: Path, *, page_size_max: int = 1000):
        self.path = Path(path)
        self._page_size_max = max(1, page_size_max)
        self._local = threading.local()
        self._finalizers: list[weakref.finalize[Any, Any]] = []
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with suppress(FileExistsError):
            # Create the file private before SQLite opens it: its -wal and -shm files copy the mode.
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        self._init_schema()

    # --- connections and transactions --------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        handle: _Handle | None = getattr(self._local, "handle", None)
        if handle is None or getattr(self._local, "pid", None) != os.getpid():
            handle = _Handle(self._connect())
            finalizer = weakref.finalize(handle, _close_if_owner, handle.conn, os.getpid())
            with self._lock:
                self._finalizers = [f for f in self._finalizers if f.alive]
                self._finalizers.append(finalizer)
            self._local.handle = handle
            self._local.pid = os.getpid()
        return handle.conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: the database lock is taken up front, so a check and the write
        that depends on it cannot interleave with another writer."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            raise Unavailable("the registry is busy; retry shortly", retry_after=1) from error
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            self._abort(conn)
            raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            self._abort(conn)

    def _abort(self, conn: sqlite3.Connection) -> None:
        """End an open transaction. When even ROLLBACK fails (an I/O error), the connection is dropped:
        closing it rolls back, and this thread's next call opens a fresh one instead of reusing one
        stuck inside the transaction (every later write would answer "busy", every read a stale
        snapshot). The caller's own error, not the rollback's, is what propagates."""
        if not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            if getattr(self._local, "handle", None) is not None and self._local.handle.conn is conn:
                del self._local.handle
            with suppress(sqlite3.Error):
                conn.close()

    def _init_schema(self) -> None:
        conn = self._conn()
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise Unavailable("the registry database cannot use write-ahead logging")
        with self._write() as tx:
            current = tx.execute("PRAGMA user_version").fetchone()[0]
            if current > SCHEMA_VERSION:
                raise Unavailable(f"the registry was written by a newer maas (schema {current}); upgrade")
            if current < SCHEMA_VERSION:
                if current > 0:  # an existing registry: add what later schemas added to its tables
                    for schema in range(current + 1, SCHEMA_VERSION + 1):
                        for table, column, kind in _MIGRATIONS.get(schema, ()):
                            tx.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        tx.execute(statement)
                tx.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close this process's connections (those inherited through a fork are only dropped:
        closing them could release the parent's locks)."""
        with self._lock:
            finalizers, self._finalizers = self._finalizers, []
        for finalizer in finalizers:
            finalizer()
        self._local = threading.local()

    def integrity_check(self) -> str:
        """SQLite's own check of the file ("ok" when sound)."""
        return str(self._conn().execute("PRAGMA integrity_check").fetchone()[0])

    def _clamp(self, limit: int) -> int:
        return max(1, min(int(limit), self._page_size_max))

    # --- models ------------------------------------------------------------------------------------
    def create_model(self, model: Model) -> Model:
        with self._write() as tx:
            if tx.execute("SELECT 1 FROM models WHERE name = ?", (model.name,)).fetchone():
                raise Conflict(f"model {model.name!r} already exists", field="name")
            tx.execute(
                "INSERT INTO models (name, description, tags, created_at, created_by, next_version) "
                "VALUES (?, ?, ?, ?, ?, 1)",
                (model.name, model.description, json.dumps(model.tags), utc_iso(model.created_at),
                 model.created_by),
            )
        return model

    def get_model(self, name: str) -> Model:
        row = self._conn().execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise _missing_model(name)
        return _model_from_row(row)

    def list_models(self, limit: int, cursor: str | None) -> Page[Model]:
        limit = self._clamp(limit)
        after = _decode_cursor(cursor, "models", str) if cursor else ""
        rows = self._conn().execute(
            "SELECT * FROM models WHERE name > ? ORDER BY name LIMIT ?", (after, limit + 1)
        ).fetchall()
        items = [_model_from_row(row) for row in rows[:limit]]
        next_cursor = encode_cursor("models", items[-1].name) if len(rows) > limit else None
        return Page[Model](items=items, next_cursor=next_cursor)

    def delete_model(self, name: str) -> list[ModelVersion]:
        with self._write() as tx:
            self._require_model(tx, name)
            versions = [_version_from_row(row) for row in tx.execute(
                "SELECT * FROM versions WHERE model = ? ORDER BY version", (name,))]
            tx.execute("DELETE FROM aliases WHERE model = ?", (name,))
            tx.execute("DELETE FROM deployments WHERE model = ?", (name,))
            tx.execute("DELETE FROM versions WHERE model = ?", (name,))
            tx.execute("DELETE FROM models WHERE name = ?", (name,))
        return versions

    # --- versions ----------------------------------------------------------------------------------
    def allocate_version(self, model: str, *, created_by: str, upload_id: str, description: str = "",
                         parent_version: int | None = None, limits: RunLimits | None = None) -> ModelVersion:
        with self._write() as tx:
            row = tx.execute("SELECT next_version FROM models WHERE name = ?", (model,)).fetchone()
            if row is None:
                raise _missing_model(model)
            if parent_version is not None:
                self._require_version(tx, model, parent_version)
            highest = tx.execute("SELECT MAX(version) FROM versions WHERE model = ?", (model,)).fetchone()[0]
            number = max(int(row["next_version"]), int(highest or 0) + 1)
            if number > MAX_VERSION:
                raise Conflict(f"model {model!r} has used every version number")
            now = utcnow()
            version = ModelVersion(model=model, version=number, status=VersionStatus.PENDING,
                                   upload_id=upload_id, description=description, created_by=created_by,
                                   parent_version=parent_version, limits=limits, created_at=now, updated_at=now)
            self._insert_version(tx, version)
            tx.execute("UPDATE models SET next_version = ? WHERE name = ?", (number + 1, model))
        return version

    def get_version(self, model: str, version: int) -> ModelVersion:
        row = self._conn().execute("SELECT * FROM versions WHERE model = ? AND version = ?",
                                   (model, version)).fetchone()
        if row is None:
            raise _missing_version(model, version)
        return _version_from_row(row)

    def list_versions(self, model: str, limit: int, cursor: str | None) -> Page[ModelVersion]:
        limit = self._clamp(limit)
        before = _decode_cursor(cursor, "versions", int) if cursor else MAX_VERSION + 1
        with self._read() as tx:
            self._require_model(tx, model)
            rows = tx.execute(
                "SELECT * FROM versions WHERE model = ? AND version < ? ORDER BY version DESC LIMIT ?",
                (model, before, limit + 1),
            ).fetchall()
        items = [_version_from_row(row) for row in rows[:limit]]
        next_cursor = encode_cursor("versions", items[-1].version) if len(rows) > limit else None
        return Page[ModelVersion](items=items, next_cursor=next_cursor)

    def list_versions_by_status(self, status: str) -> list[ModelVersion]:
        try:
            wanted = VersionStatus(status)
        except ValueError:
            raise InvalidInput("status must be PENDING, READY or FAILED", field="status") from None
        rows = self._conn().execute(
            "SELECT * FROM versions WHERE status = ? ORDER BY model, version", (wanted.value,)
        ).fetchall()
        return [_version_from_row(row) for row in rows]

    def mark_ready(self, model: str, version: int, artifact: StoredArtifact,
                   signature: Signature) -> ModelVersion:
        with self._write() as tx:
            current = self._pending(tx, model, version)
            ready = current.model_copy(update={
                "status": VersionStatus.READY,
                "status_reason": "",
                "sha256": artifact.sha256,
                "size": artifact.size,
                "storage_key": artifact.key,
                "storage_version_id": artifact.version_id,
                "signature": signature,
                "updated_at": utcnow(),
            })
            self._update_version(tx, ready)
        return ready

    def mark_failed(self, model: str, version: int, reason: str) -> ModelVersion:
        with self._write() as tx:
            current = self._pending(tx, model, version)
            failed = current.model_copy(update={
                "status": VersionStatus.FAILED, "status_reason": reason, "updated_at": utcnow(),
            })
            self._update_version(tx, failed)
        return failed

    def delete_version(self, model: str, version: int) -> ModelVersion:
        with self._write() as tx:
            current = self._require_version(tx, model, version)
            alias = tx.execute("SELECT alias FROM aliases WHERE model = ? AND version = ? ORDER BY alias",
                               (model, version)).fetchone()
            if alias is not None:
                raise Conflict(f"version {version} of model {model!r} is referenced by alias "
                               f"{alias['alias']!r}; move or delete the alias first")
            for row in tx.execute("SELECT json FROM deployments WHERE model = ? ORDER BY seq DESC", (model,)):
                deployment = _deployment_from_row(row)
                if version in deployment.referenced_versions():
                    raise Conflict(f"version {version} of model {model!r} is referenced by deployment "
                                   f"{deployment.id!r}")
            tx.execute("DELETE FROM versions WHERE model = ? AND version = ?", (model, version))
        return current

    # --- aliases -----------------------------------------------------------------------------------
    def set_alias(self, model: str, alias: str, version: int) -> Alias:
        with self._write() as tx:
            self._require_model(tx, model)
            self._require_ready(tx, model, version)
            record = Alias(model=model, alias=alias, version=version, updated_at=utcnow())
            tx.execute(
                "INSERT INTO aliases (model, alias, version, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (model, alias) DO UPDATE SET version = excluded.version, "
                "updated_at = excluded.updated_at",
                (model, alias, version, utc_iso(record.updated_at)),
            )
        return record

    def get_alias(self, model: str, alias: str) -> Alias:
        with self._read() as tx:
            self._require_model(tx, model)
            row = tx.execute("SELECT * FROM aliases WHERE model = ? AND alias = ?", (model, alias)).fetchone()
        if row is None:
            raise NotFound(f"alias {alias!r} of model {model!r} not found")
        return Alias(model=row["model"], alias=row["alias"], version=row["version"],
                     updated_at=row["updated_at"])

    def list_aliases(self, model: str) -> list[Alias]:
        with self._read() as tx:
            self._require_model(tx, model)
            rows = tx.execute("SELECT * FROM aliases WHERE model = ? ORDER BY alias", (model,)).fetchall()
        return [Alias(model=row["model"], alias=row["alias"], version=row["version"],
                      updated_at=row["updated_at"]) for row in rows]

    def delete_alias(self, model: str, alias: str) -> None:
        with self._write() as tx:
            self._require_model(tx, model)
            deleted = tx.execute("DELETE FROM aliases WHERE model = ? AND alias = ?", (model, alias))
            if deleted.rowcount == 0:
                raise NotFound(f"alias {alias!r} of model {model!r} not found")

    # --- deployments -------------------------------------------------------------------------------
    def create_deployment(self, deployment: Deployment) -> Deployment:
        with self._write() as tx:
            self._require_model(tx, deployment.model)
            if tx.execute("SELECT 1 FROM deployments WHERE id = ?", (deployment.id,)).fetchone():
                raise Conflict(f"deployment {deployment.id!r} already exists")
            running = tx.execute(
                "SELECT id FROM deployments WHERE model = ? AND status = 'IN_PROGRESS'", (deployment.model,)
            ).fetchone()
            if running is not None:
                raise Conflict(f"model {deployment.model!r} already has deployment {running['id']!r} in "
                               "progress; wait for it or roll it back")
            for number in sorted(deployment.referenced_versions()):
                self._require_ready(tx, deployment.model, number)
            top = tx.execute("SELECT MAX(seq) FROM deployments WHERE model = ?",
                             (deployment.model,)).fetchone()[0]
            stored = deployment.model_copy(update={"seq": int(top or 0) + 1})
            tx.execute(
                "INSERT INTO deployments (id, model, seq, status, json) VALUES (?, ?, ?, ?, ?)",
                (stored.id, stored.model, stored.seq, stored.status.value, stored.model_dump_json()),
            )
        return stored

    def update_deployment(self, deployment: Deployment, expected: DeploymentStatus) -> Deployment:
        expected = DeploymentStatus(expected)
        with self._write() as tx:
            row = tx.execute("SELECT * FROM deployments WHERE id = ?", (deployment.id,)).fetchone()
            if row is None:
                raise NotFound(f"deployment {deployment.id!r} not found")
            current = _deployment_from_row(row)
            if current.model != deployment.model:
                raise InvalidInput("a deployment cannot move to another model", field="model")
            if current.status is not expected:
                raise Conflict(f"deployment {deployment.id!r} is {current.status.value}, "
                               f"not {expected.value}")
            if deployment.status is DeploymentStatus.IN_PROGRESS and current.status.terminal:
                running = tx.execute(
                    "SELECT id FROM deployments WHERE model = ? AND status = 'IN_PROGRESS' AND id != ?",
                    (deployment.model, deployment.id),
                ).fetchone()
                if running is not None:
                    raise Conflict(f"model {deployment.model!r} already has deployment "
                                   f"{running['id']!r} in progress")
            for number in sorted(deployment.referenced_versions()):
                self._require_ready(tx, deployment.model, number)
            stored = deployment.model_copy(update={"seq": current.seq})
            tx.execute("UPDATE deployments SET status = ?, json = ? WHERE id = ?",
                       (stored.status.value, stored.model_dump_json(), stored.id))
        return stored

    def get_deployment(self, deployment_id: str) -> Deployment:
        row = self._conn().execute("SELECT json FROM deployments WHERE id = ?", (deployment_id,)).fetchone()
        if row is None:
            raise NotFound(f"deployment {deployment_id!r} not found")
        return _deployment_from_row(row)

    def list_deployments(self, model: str, limit: int, cursor: str | None) -> Page[Deployment]:
        limit = self._clamp(limit)
        before = _decode_cursor(cursor, "deployments", int) if cursor else 2**62
        with self._read() as tx:
            self._require_model(tx, model)
            rows = tx.execute(
                "SELECT json FROM deployments WHERE model = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                (model, before, limit + 1),
            ).fetchall()
        items = [_deployment_from_row(row) for row in rows[:limit]]
        next_cursor = encode_cursor("deployments", items[-1].seq) if len(rows) > limit else None
        return Page[Deployment](items=items, next_cursor=next_cursor)

    def get_route(self, model: str) -> Route | None:
        with self._read() as tx:
            row = tx.execute(
                "SELECT json FROM deployments WHERE model = ? AND status = 'IN_PROGRESS' "
                "ORDER BY seq DESC LIMIT 1", (model,)
            ).fetchone()
            if row is None:
                row = tx.execute(
                    "SELECT json FROM deployments WHERE model = ? AND status = 'SUCCEEDED' "
                    "ORDER BY seq DESC LIMIT 1", (model,)
                ).fetchone()
        if row is None:
            return None
        return _deployment_from_row(row).live_route()

    # --- tokens ------------------------------------------------------------------------------------
    def create_token(self, token: Token) -> Token:
        with self._write() as tx:
            clash = tx.execute("SELECT id FROM tokens WHERE id = ? OR token_hash = ?",
                               (token.id, token.token_hash)).fetchone()
            if clash is not None:
                raise Conflict("a token with this id or secret already exists")
            tx.execute("INSERT INTO tokens (id, token_hash, created_at, json) VALUES (?, ?, ?, ?)",
                       (token.id, token.token_hash, utc_iso(token.created_at), token.model_dump_json()))
        return token

    def find_token(self, token_hash: str) -> Token | None:
        row = self._conn().execute("SELECT json FROM tokens WHERE token_hash = ?", (token_hash,)).fetchone()
        return _token_from_row(row) if row is not None else None

    def list_tokens(self) -> list[Token]:
        rows = self._conn().execute("SELECT json FROM tokens ORDER BY created_at, id").fetchall()
        return [_token_from_row(row) for row in rows]

    def revoke_token(self, token_id: str) -> Token:
        with self._write() as tx:
            row = tx.execute("SELECT json FROM tokens WHERE id = ?", (token_id,)).fetchone()
            if row is None:
                raise NotFound(f"token {token_id!r} not found")
            revoked = _token_from_row(row).model_copy(update={"revoked": True})
            tx.execute("UPDATE tokens SET json = ? WHERE id = ?", (revoked.model_dump_json(), token_id))
        return revoked

    # --- helpers (inside a transaction) ------------------------------------------------------------
    @staticmethod
    def _require_model(tx: sqlite3.Connection, model: str) -> None:
        if tx.execute("SELECT 1 FROM models WHERE name = ?", (model,)).fetchone() is None:
            raise _missing_model(model)

    @staticmethod
    def _require_version(tx: sqlite3.Connection, model: str, version: int) -> ModelVersion:
        row = tx.execute("SELECT * FROM versions WHERE model = ? AND version = ?",
                         (model, version)).fetchone()
        if row is None:
            raise _missing_version(model, version)
        return _version_from_row(row)

    def _require_ready(self, tx: sqlite3.Connection, model: str, version: int) -> ModelVersion:
        found = self._require_version(tx, model, version)
        if found.status is not VersionStatus.READY:
            raise Conflict(f"version {version} of model {model!r} is {found.status.value}, not READY",
                           field="version")
        return found

    def _pending(self, tx: sqlite3.Connection, model: str, version: int) -> ModelVersion:
        found = self._require_version(tx, model, version)
        if found.status is not VersionStatus.PENDING:
            raise Conflict(f"version {version} of model {model!r} is {found.status.value}, not PENDING")
        return found

    @staticmethod
    def _insert_version(tx: sqlite3.Connection, version: ModelVersion) -> None:
        values = _version_values(version)
        columns = ", ".join(values)
        marks = ", ".join(f":{column}" for column in values)
        tx.execute(f"INSERT INTO versions ({columns}) VALUES ({marks})", values)

    @staticmethod
    def _update_version(tx: sqlite3.Connection, version: ModelVersion) -> None:
        values = _version_values(version)
        assignments = ", ".join(f"{column} = :{column}" for column in values
                                if column not in ("model", "version"))
        updated = tx.execute(
            f"UPDATE versions SET {assignments} WHERE model = :model AND version = :version "
            "AND status = 'PENDING'", values,
        )
        if updated.rowcount != 1:  # unreachable under BEGIN IMMEDIATE; kept as a guard
            raise Conflict(f"version {version.version} of model {version.model!r} changed concurrently")


__all__ = ["SCHEMA_VERSION", "SqliteRegistry"]
