"""Idempotency keys in the registry's SQLite database (``maas.ports.IdempotencyStore``).

Same file, same connections and the same ``BEGIN IMMEDIATE`` transactions as the registry
(:class:`maas.backends.local.registry.SqliteRegistry`): a claim reads the key and writes it under
the database lock, so of any number of threads or processes claiming one key exactly one wins, and
an acknowledged claim or result survives a crash (``synchronous=FULL``)."""

from __future__ import annotations

import json
import sqlite3

from maas.backends.local.registry import SqliteRegistry
from maas.ports import IdempotencyRecord, StoredResponse

# Created on open whatever the registry's schema version: the table is additive and independent.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_keys (
    principal        TEXT NOT NULL,
    key              TEXT NOT NULL,
    fingerprint      TEXT NOT NULL,
    claim            TEXT NOT NULL,
    expires_at       REAL NOT NULL,
    lease_until      REAL NOT NULL,
    response_status  INTEGER,
    response_headers TEXT,
    response_body    BLOB,
    PRIMARY KEY (principal, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_by_expiry ON idempotency_keys (expires_at);
"""


def _record(row: sqlite3.Row) -> IdempotencyRecord:
    response = None
    if row["response_status"] is not None:
        headers = tuple((str(k), str(v)) for k, v in json.loads(row["response_headers"] or "[]"))
        response = StoredResponse(status=int(row["response_status"]), headers=headers,
                                  body=bytes(row["response_body"] or b""))
    return IdempotencyRecord(principal=row["principal"], key=row["key"], fingerprint=row["fingerprint"],
                             claim=row["claim"], expires_at=float(row["expires_at"]),
                             lease_until=float(row["lease_until"]), response=response)


class SqliteIdempotencyStore:
    """``maas.ports.IdempotencyStore`` in the registry's database."""

    def __init__(self, registry: SqliteRegistry):
        self._registry = registry
        with registry._write() as tx:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    tx.execute(statement)

    def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        with self._registry._write() as tx:
            # Expired keys go here, in the claims' own transactions: no separate sweeper to run.
            tx.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?", (now,))
            row = tx.execute("SELECT * FROM idempotency_keys WHERE principal = ? AND key = ?",
                             (record.principal, record.key)).fetchone()
            if row is not None and (row["response_status"] is not None or float(row["lease_until"]) > now):
                return _record(row)
            tx.execute(
                "INSERT OR REPLACE INTO idempotency_keys (principal, key, fingerprint, claim, expires_at, "
                "lease_until) VALUES (?, ?, ?, ?, ?, ?)",
                (record.principal, record.key, record.fingerprint, record.claim, record.expires_at,
                 record.lease_until),
            )
        return None

    def complete(self, principal: str, key: str, claim: str, response: StoredResponse,
                 expires_at: float) -> bool:
        with self._registry._write() as tx:
            updated = tx.execute(
                "UPDATE idempotency_keys SET response_status = ?, response_headers = ?, response_body = ?, "
                "expires_at = ? WHERE principal = ? AND key = ? AND claim = ? AND response_status IS NULL",
                (response.status, json.dumps([list(pair) for pair in response.headers]), response.body,
                 expires_at, principal, key, claim),
            )
            return updated.rowcount == 1

    def release(self, principal: str, key: str, claim: str) -> None:
        with self._registry._write() as tx:
            tx.execute("DELETE FROM idempotency_keys WHERE principal = ? AND key = ? AND claim = ? "
                       "AND response_status IS NULL", (principal, key, claim))

    def get(self, principal: str, key: str, now: float) -> IdempotencyRecord | None:
        with self._registry._read() as tx:
            row = tx.execute("SELECT * FROM idempotency_keys WHERE principal = ? AND key = ? AND expires_at > ?",
                             (principal, key, now)).fetchone()
        return _record(row) if row is not None else None


__all__ = ["SqliteIdempotencyStore"]
