"""Idempotency keys for mutating API calls (Stripe's ``Idempotency-Key``, AWS's ``ClientToken``).

Why: a client whose request timed out cannot know whether it ran. Retrying a ``POST`` that registers
a version would then create a second version (DESIGN.md section 3: "an idempotent retry never
creates a second version"). With a key, the first request runs and its response is stored; a retry
with the same key gets that response back without running again, whatever the number of concurrent
copies, because exactly one of them can claim the key in the store (``maas.ports.IdempotencyStore``).

Rules, written once here for every transport (the HTTP glue is ``maas.api.idempotency``):

- keys are scoped per principal (the token id): two tokens never see each other's keys;
- a key remembers a *fingerprint* of the request (method, path and query, principal, canonical
  body): the same key with another request is refused (422), never silently answered with the
  first request's result;
- results are kept for ``ttl_s`` (24 h), then the key may be used again;
- responses with status < 500 are kept (a 4xx is an answer too), except 401/403/429 which say
  nothing about the operation; a 5xx or a crash releases the key so that a retry runs again;
- a request that finds its key still in progress is told so (``Busy``); callers wait for the first
  request's answer, up to ``wait_s``; a holder that crashed stops blocking the key after ``lease_s``;
- the store never holds a key (records are filed under its digest) nor a secret: an answer that
  carries one (a created token's secret, otherwise only stored hashed) is kept with the secret fields
  blanked (``redact``), so a replay says what was created, and the secret stays shown exactly once.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from maas.errors import Conflict, InvalidInput
from maas.ports import IdempotencyRecord, IdempotencyStore, StoredResponse

KEY_HEADER = "Idempotency-Key"
#: Long enough for a UUID, a ULID or a client's own composite key; no ``#`` or ``/`` (store keys).
KEY_MAX_LENGTH = 255
KEY_PATTERN = r"^[A-Za-z0-9._:~+=-]{1,255}$"
_KEY = re.compile(KEY_PATTERN)

DEFAULT_TTL_S = 24 * 3600.0
#: Longer than any mutating call runs (a commit validates in a child process with its own timeout):
#: an in-progress key whose holder crashed blocks retries for at most this long.
DEFAULT_LEASE_S = 600.0
#: How long a concurrent duplicate waits for the first request's answer before getting 409.
DEFAULT_WAIT_S = 25.0
#: Responses bigger than this are not kept (DynamoDB items stop at 400 KB); none of the management
#: routes answers anywhere near it.
MAX_STORED_BODY_BYTES = 256 * 1024
#: Statuses that are not a result of the operation: a retry with other credentials or later may run it.
NOT_KEPT = frozenset({401, 403, 429})


class IdempotencyKeyReused(InvalidInput):
    """The key was used before for another request (another body, path or method)."""

    title = "Idempotency key reused"
    slug = "idempotency-key-reused"


class IdempotencyKeyInProgress(Conflict):
    """Another request with the key is still running and did not finish within the wait."""

    title = "Idempotency key in progress"
    slug = "idempotency-key-in-progress"


@dataclass(frozen=True)
class Claimed:
    """This request holds the key: run the operation, then ``finish`` (or ``abandon``)."""

    claim: str


@dataclass(frozen=True)
class Replay:
    """The key's stored answer: send it back instead of running the operation."""

    response: StoredResponse


@dataclass(frozen=True)
class Busy:
    """Another request holds the key and has not answered yet: wait, then ``begin`` again."""

    lease_until: float


Outcome = Claimed | Replay | Busy


def check_key(raw: str) -> str:
    """The key if well-formed (bounded length and charset: it becomes part of a storage key)."""
    if not _KEY.fullmatch(raw):
        raise InvalidInput(f"{KEY_HEADER} must be 1 to {KEY_MAX_LENGTH} characters from A-Z a-z 0-9 . _ : ~ + = -",
                           field=KEY_HEADER)
    return raw


def canonical_body(body: bytes) -> bytes:
    """JSON bodies with their keys sorted and no insignificant whitespace, so that the same request
    serialized by another client library has the same fingerprint; other bodies as they are."""
    if not body.strip():
        return b""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body
    return json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def fingerprint(method: str, path: str, query: Iterable[tuple[str, str]], principal: str, body: bytes) -> str:
    """What makes two requests "the same request" for a key."""
    digest = hashlib.sha256()
    for part in (method.upper(), path, json.dumps(sorted(query)), principal,
                 hashlib.sha256(canonical_body(body)).hexdigest()):
        digest.update(part.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def store_key(key: str) -> str:
    """What the store files a key under: its digest (a database reader learns no usable key)."""
    return hashlib.sha256(b"maas-idempotency-key\x00" + key.encode()).hexdigest()


def redact(body: bytes, fields: Iterable[str]) -> bytes:
    """A JSON object answer with ``fields`` set to null (what is stored for answers holding secrets)."""
    names = tuple(fields)
    if not names:
        return body
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return b""  # not the JSON a secret-bearing route answers: keep nothing of it
    if not isinstance(parsed, dict):
        return b""
    return json.dumps({name: None if name in names else value for name, value in parsed.items()},
                      separators=(",", ":")).encode()


class IdempotencyService:
    """The idempotency protocol over a store; transport-free (see the module docstring)."""

    def __init__(self, store: IdempotencyStore, *, ttl_s: float = DEFAULT_TTL_S, lease_s: float = DEFAULT_LEASE_S,
                 wait_s: float = DEFAULT_WAIT_S, clock: Callable[[], float] = time.time):
        self.store = store
        self.ttl_s = ttl_s
        self.lease_s = lease_s
        self.wait_s = wait_s
        self.clock = clock

    def begin(self, principal: str, key: str, request_fingerprint: str) -> Outcome:
        """One attempt at taking the key (one atomic store call, plus a read when it is held)."""
        now = self.clock()
        record = IdempotencyRecord(principal=principal, key=store_key(key), fingerprint=request_fingerprint,
                                   claim=uuid.uuid4().hex, expires_at=now + self.ttl_s,
                                   lease_until=now + self.lease_s)
        held = self.store.claim(record, now)
        if held is None:
            return Claimed(record.claim)
        if held.fingerprint != request_fingerprint:
            raise IdempotencyKeyReused(
                f"this {KEY_HEADER} was already used for a different request (another method, path, query or "
                "body); use a new key for a new request", field=KEY_HEADER)
        if held.response is not None:
            return Replay(held.response)
        return Busy(held.lease_until)

    @staticmethod
    def worth_keeping(response: StoredResponse) -> bool:
        """Whether a retry should get this answer back rather than run the operation again."""
        return (response.status < 500 and response.status not in NOT_KEPT
                and len(response.body) <= MAX_STORED_BODY_BYTES)

    def finish(self, principal: str, key: str, claim: str, response: StoredResponse,
               secret_fields: Iterable[str] = ()) -> bool:
        """Store the answer of a claimed request (``secret_fields`` blanked), or release the key when the
        answer must not be replayed (5xx, auth, throttling, oversized). True when stored."""
        if not self.worth_keeping(response):
            self.store.release(principal, store_key(key), claim)
            return False
        kept = StoredResponse(status=response.status, headers=response.headers,
                              body=redact(response.body, secret_fields))
        return self.store.complete(principal, store_key(key), claim, kept, self.clock() + self.ttl_s)

    def abandon(self, principal: str, key: str, claim: str) -> None:
        """The request failed without an answer (crash, cancellation): let a retry run it."""
        self.store.release(principal, store_key(key), claim)

    def in_progress(self) -> IdempotencyKeyInProgress:
        return IdempotencyKeyInProgress(
            f"a request with this {KEY_HEADER} is still being processed; retry after a moment to get its result",
            field=KEY_HEADER)


def poll_delay(attempt: int) -> float:
    """How long a duplicate waits between looks at a key in progress (grows to 0.25 s)."""
    return float(min(0.25, 0.01 * 2 ** min(attempt, 5)))


__all__ = ["DEFAULT_LEASE_S", "DEFAULT_TTL_S", "DEFAULT_WAIT_S", "KEY_HEADER", "KEY_MAX_LENGTH", "KEY_PATTERN",
           "Busy", "Claimed", "IdempotencyKeyInProgress", "IdempotencyKeyReused", "IdempotencyService",
           "Outcome", "Replay", "canonical_body", "check_key", "fingerprint", "poll_delay", "redact", "store_key"]
