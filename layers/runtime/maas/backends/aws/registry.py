"""The registry in one DynamoDB table (keys and index in :mod:`maas.backends.aws.table`).

Behaves like the SQLite registry (same errors, ordering, cursors' meaning, route derivation), but
DynamoDB has no multi-statement transactions with reads, so every check that a write depends on is
also a *condition* of that write: each mutating method reads what it needs (consistent reads), raises
the user-facing error if a check fails, then writes with conditions that restate those checks in one
``UpdateItem``/``PutItem`` or ``TransactWriteItems``. If a condition fails, the state changed between
the read and the write: the method reads again (the fresh read raises the right error, or the write
is retried), a bounded number of times with jitter; ``TransactionConflict`` cancellations (another
transaction on the same items) are retried the same way. Nothing is ever read-then-written without a
condition, so concurrent writers never lose an update nor get the same version number.

The model's ``META`` item is the lock for everything under it: it carries the version and deploy
counters, the id of the deployment in flight (``in_flight``: at most one per model) and ``rev``,
bumped by every alias or deployment write, which delete_version checks so that no alias or
deployment can start referencing a version while it is being deleted. ``deleting`` marks a model
whose deletion started: every write that adds to the model is conditioned on its absence, and reads
treat such a model as gone until a (repeated) delete_model finishes the job.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from botocore.exceptions import ClientError

from maas.backends.aws.errors import THROTTLE_CODES, error_code, translated
from maas.backends.aws.table import GSI, GSI_PK, GSI_SK, PK, SK
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
from maas.domain.names import MAX_VERSION, MODEL_NAME
from maas.errors import Conflict, InvalidInput, ModelRejected, NotFound, Throttled, Unavailable
from maas.ports import StoredArtifact
from maas.services.cursors import bad_cursor, decode_cursor, encode_cursor, utc_iso

Item = dict[str, Any]  # a DynamoDB item in the low-level client's typed form ({"S": ...}, {"N": ...})

T = TypeVar("T")
WHAT = "the registry"
META = "META"
MODELS = "MODELS"
TOKENS = "TOKENS"
VERSION_PREFIX = "VERSION#"
ALIAS_PREFIX = "ALIAS#"
DEPLOYMENT_PREFIX = "DEPLOYMENT#"
SEQ_DIGITS = 12
MAX_SEQ = 10**SEQ_DIGITS - 1
MAX_ATTEMPTS = 10
BATCH_SIZE = 25  # BatchWriteItem's limit
BACKOFF_BASE_S = 0.01
BACKOFF_CAP_S = 0.25
RACE_BUDGET_S = 5.0  # how long allocate_version keeps retrying races it lost to writers making progress
RACE_JITTER_S = 0.005
#: DynamoDB refuses items over 400 KB; keep a little headroom under it (index key overhead).
MAX_ITEM_BYTES = 400 * 1024 - 1024

# Attribute names (all expressions go through ExpressionAttributeNames: several are reserved words).
A_JSON = "json"
A_STATUS = "status"
A_ID = "id"
A_NEXT_VERSION = "next_version"
A_NEXT_SEQ = "next_seq"
A_IN_FLIGHT = "in_flight"
A_REV = "rev"
A_DELETING = "deleting"
A_VERSION = "version"
A_MODEL = "model"
A_SEQ = "seq"

_CONDITION_FAILED = "ConditionalCheckFailed"
_TX_CONFLICT = "TransactionConflict"
_TX_THROTTLES = frozenset({"ThrottlingError", "ProvisionedThroughputExceeded", "RequestLimitExceeded"})


# --- values, keys and items ----------------------------------------------------------------------------
def _s(value: str) -> dict[str, str]:
    return {"S": value}


def _n(value: int) -> dict[str, str]:
    return {"N": str(value)}


def _str(item: Item, name: str) -> str:
    return str(item[name]["S"])


def _int(item: Item, name: str) -> int:
    return int(item[name]["N"])


def _key(pk: str, sk: str) -> Item:
    return {PK: _s(pk), SK: _s(sk)}


def _model_pk(model: str) -> str:
    return f"MODEL#{model}"


def _version_sk(version: int) -> str:
    return f"{VERSION_PREFIX}{version:09d}"


def _alias_sk(alias: str) -> str:
    return f"{ALIAS_PREFIX}{alias}"


def _deployment_sk(seq: int) -> str:
    return f"{DEPLOYMENT_PREFIX}{seq:0{SEQ_DIGITS}d}"


def _pointer_pk(deployment_id: str) -> str:
    return f"{DEPLOYMENT_PREFIX}{deployment_id}"


def _token_pk(token_hash: str) -> str:
    return f"TOKEN#{token_hash}"


def _meta_key(model: str) -> Item:
    return _key(_model_pk(model), META)


def _version_key(model: str, version: int) -> Item:
    return _key(_model_pk(model), _version_sk(version))


def _version_item(version: ModelVersion) -> Item:
    """A version: JSON for the record, ``status`` on top for conditions, and the status index keys
    (rewritten with every status change) so cleanup can list versions by status."""
    return {
        **_version_key(version.model, version.version),
        GSI_PK: _s(f"STATUS#{version.status.value}"),
        GSI_SK: _s(f"{version.model}#{version.version:09d}"),
        A_STATUS: _s(version.status.value),
        A_JSON: _s(version.model_dump_json()),
    }


def _item_bytes(item: Item) -> int:
    """What DynamoDB counts against its item size limit (an upper bound): attribute names plus
    values, strings in UTF-8, numbers at most 21 bytes."""
    size = 0
    for name, value in item.items():
        size += len(name.encode())
        for kind, raw in value.items():
            size += len(str(raw).encode()) if kind == "S" else 21 if kind == "N" else 1
    return size


def _model_of(item: Item) -> Model:
    return Model.model_validate_json(_str(item, A_JSON))


def _version_of(item: Item) -> ModelVersion:
    return ModelVersion.model_validate_json(_str(item, A_JSON))


def _alias_of(item: Item) -> Alias:
    return Alias.model_validate_json(_str(item, A_JSON))


def _deployment_of(item: Item) -> Deployment:
    return Deployment.model_validate_json(_str(item, A_JSON))


def _token_of(item: Item) -> Token:
    return Token.model_validate_json(_str(item, A_JSON))


# --- cursors ------------------------------------------------------------------------------------------
def _decode_name_cursor(cursor: str, kind: str) -> str:
    """A name cursor must be a valid model name: it becomes a key condition value."""
    value = decode_cursor(cursor, kind)
    if not isinstance(value, str) or not MODEL_NAME.fullmatch(value):
        raise bad_cursor()
    return value


def _decode_int_cursor(cursor: str, kind: str, highest: int) -> int:
    """A number cursor must fit the zero-padded sort keys it becomes part of."""
    value = decode_cursor(cursor, kind)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= highest:
        raise bad_cursor()
    return value


# --- errors -------------------------------------------------------------------------------------------
def _missing_model(model: str) -> NotFound:
    return NotFound(f"model {model!r} not found")


def _missing_version(model: str, version: int) -> NotFound:
    return NotFound(f"version {version} of model {model!r} not found")


def _missing_deployment(deployment_id: str) -> NotFound:
    return NotFound(f"deployment {deployment_id!r} not found")


def _busy() -> Unavailable:
    return Unavailable("the registry is busy with concurrent changes; retry shortly", retry_after=1)


@dataclass(frozen=True)
class _Cancelled:
    """Why DynamoDB cancelled a transaction: one reason code per action, in order."""

    codes: tuple[str, ...]

    def failed(self, index: int) -> bool:
        return index < len(self.codes) and self.codes[index] == _CONDITION_FAILED

    @property
    def conflicted(self) -> bool:
        return _TX_CONFLICT in self.codes


class DynamoRegistry:
    """``maas.ports.Registry`` on one DynamoDB table, through the low-level boto3 ``dynamodb`` client."""

    def __init__(self, client: Any, table: str, *, page_size_max: int = 1000, max_attempts: int = MAX_ATTEMPTS):
        self._client = client
        self._table = table
        self._page_size_max = max(1, page_size_max)
        self._max_attempts = max(1, max_attempts)

    # --- low-level helpers ---------------------------------------------------------------------------
    def _clamp(self, limit: int) -> int:
        return max(1, min(int(limit), self._page_size_max))

    def _attempts(self) -> Iterator[int]:
        """Attempt numbers, sleeping a jittered, growing delay before each retry so that writers that
        collided do not collide again in lockstep."""
        for attempt in range(self._max_attempts):
            if attempt:
                self._backoff(attempt)
            yield attempt

    @staticmethod
    def _backoff(attempt: int) -> None:
        time.sleep(random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)))

    def _get(self, key: Item) -> Item | None:
        """A strongly consistent read: the checks made on it must see every acknowledged write."""
        response = self._client.get_item(TableName=self._table, Key=key, ConsistentRead=True)
        item: Item | None = response.get("Item")
        return item

    def _query(self, *, page_size: int | None = None, **kwargs: Any) -> Iterator[Item]:
        """Every item a query matches, fetching pages lazily (stop iterating to stop reading)."""
        request: dict[str, Any] = {"TableName": self._table, **kwargs}
        if page_size is not None:
            request["Limit"] = page_size
        while True:
            response = self._client.query(**request)
            yield from response.get("Items", [])
            last = response.get("LastEvaluatedKey")
            if not last:
                return
            request["ExclusiveStartKey"] = last

    def _partition(self, model: str, prefix: str = "", **kwargs: Any) -> Iterator[Item]:
        """The items of a model's partition whose sort key starts with ``prefix`` (all of them when
        empty: a key condition cannot hold an empty string), consistently read."""
        condition = "#pk = :pk"
        names = {"#pk": PK, **kwargs.pop("ExpressionAttributeNames", {})}
        values = {":pk": _s(_model_pk(model)), **kwargs.pop("ExpressionAttributeValues", {})}
        if prefix:
            condition += " AND begins_with(#sk, :prefix)"
            names["#sk"] = SK
            values[":prefix"] = _s(prefix)
        return self._query(KeyConditionExpression=condition, ExpressionAttributeNames=names,
                           ExpressionAttributeValues=values, ConsistentRead=True, **kwargs)

    def _between(self, model: str, low: str, high: str, page_size: int) -> Iterator[Item]:
        """A model's items with ``low <= sk <= high``, newest (highest key) first."""
        return self._query(
            KeyConditionExpression="#pk = :pk AND #sk BETWEEN :low AND :high",
            ExpressionAttributeNames={"#pk": PK, "#sk": SK},
            ExpressionAttributeValues={":pk": _s(_model_pk(model)), ":low": _s(low), ":high": _s(high)},
            ScanIndexForward=False,
            ConsistentRead=True,
            page_size=page_size,
        )

    def _index(self, partition: str, *, sort_key: str | None = None, after: str | None = None,
               page_size: int | None = None) -> Iterator[Item]:
        """Items of one ``gsi1`` partition (eventually consistent: an index cannot be read otherwise)."""
        condition = "#gpk = :gpk"
        names = {"#gpk": GSI_PK}
        values: Item = {":gpk": _s(partition)}
        if sort_key is not None:
            condition += " AND #gsk = :gsk"
            names["#gsk"] = GSI_SK
            values[":gsk"] = _s(sort_key)
        elif after is not None:
            condition += " AND #gsk > :gsk"
            names["#gsk"] = GSI_SK
            values[":gsk"] = _s(after)
        return self._query(IndexName=GSI, KeyConditionExpression=condition, ExpressionAttributeNames=names,
                           ExpressionAttributeValues=values, page_size=page_size)

    def _transact(self, actions: list[Item]) -> _Cancelled | None:
        """Run one transaction; None when it committed, else why it was cancelled. Throttled
        cancellations raise Throttled; any other failure propagates (and is translated)."""
        for action in actions:
            next(iter(action.values()))["TableName"] = self._table
        try:
            self._client.transact_write_items(TransactItems=actions)
        except ClientError as error:
            if error_code(error) != "TransactionCanceledException":
                raise
            reasons = error.response.get("CancellationReasons") or []
            codes = tuple(str(reason.get("Code") or "None") for reason in reasons)
            if not codes:  # botocore always parses them; be safe if a proxy did not
                message = str(error.response.get("Error", {}).get("Message", ""))
                codes = (_TX_CONFLICT,) if _TX_CONFLICT in message else ("Unknown",)
            if any(code in _TX_THROTTLES or code in THROTTLE_CODES for code in codes):
                raise Throttled(f"{WHAT} is receiving too many requests; retry in a moment", retry_after=1) from None
            if not set(codes) <= {"None", _CONDITION_FAILED, _TX_CONFLICT}:
                raise
            return _Cancelled(codes)
        return None

    def _live_meta(self, model: str) -> Item:
        """The model's META item; NotFound if the model does not exist or is being deleted."""
        meta = self._get(_meta_key(model))
        if meta is None or A_DELETING in meta:
            raise _missing_model(model)
        return meta

    def _version_record(self, model: str, version: int) -> ModelVersion:
        item = self._get(_version_key(model, version))
        if item is None:
            raise _missing_version(model, version)
        return _version_of(item)

    def _ready(self, model: str, version: int) -> ModelVersion:
        found = self._version_record(model, version)
        if found.status is not VersionStatus.READY:
            raise Conflict(f"version {version} of model {model!r} is {found.status.value}, not READY",
                           field="version")
        return found

    @staticmethod
    def _ready_check(model: str, version: int) -> Item:
        """A transaction action that holds only while the version is READY (it also stops the
        version from being deleted or changed while the transaction commits)."""
        return {"ConditionCheck": {
            "Key": _version_key(model, version),
            "ConditionExpression": "#status = :ready",
            "ExpressionAttributeNames": {"#status": A_STATUS},
            "ExpressionAttributeValues": {":ready": _s(VersionStatus.READY.value)},
        }}

    @staticmethod
    def _bump_rev(model: str, *, sets: str = "", removes: str = "", condition: str = "",
                  names: dict[str, str] | None = None, values: Item | None = None) -> Item:
        """An Update of META that bumps ``rev`` (plus ``sets``/``removes``), conditioned on the
        model existing and not being deleted (plus ``condition``)."""
        expression = "SET #rev = if_not_exists(#rev, :zero) + :one" + (f", {sets}" if sets else "")
        if removes:
            expression += f" REMOVE {removes}"
        return {"Update": {
            "Key": _meta_key(model),
            "UpdateExpression": expression,
            "ConditionExpression": "attribute_exists(#pk) AND attribute_not_exists(#deleting)"
                                   + (f" AND {condition}" if condition else ""),
            "ExpressionAttributeNames": {"#rev": A_REV, "#pk": PK, "#deleting": A_DELETING, **(names or {})},
            "ExpressionAttributeValues": {":zero": _n(0), ":one": _n(1), **(values or {})},
        }}

    # --- models --------------------------------------------------------------------------------------
    @translated(WHAT)
    def create_model(self, model: Model) -> Model:
        item = {
            **_meta_key(model.name),
            GSI_PK: _s(MODELS),
            GSI_SK: _s(model.name),
            A_JSON: _s(model.model_dump_json()),
            A_NEXT_VERSION: _n(1),
            A_NEXT_SEQ: _n(1),
            A_REV: _n(0),
        }
        try:
            self._client.put_item(TableName=self._table, Item=item, ConditionExpression="attribute_not_exists(#pk)",
                                  ExpressionAttributeNames={"#pk": PK}, ReturnValuesOnConditionCheckFailure="ALL_OLD")
        except ClientError as error:
            if error_code(error) != "ConditionalCheckFailedException":
                raise
            old = error.response.get("Item") or self._get(_meta_key(model.name))
            if old is not None and A_DELETING in old:
                raise Conflict(f"model {model.name!r} is being deleted; retry deleting it, then create it again",
                               field="name") from None
            raise Conflict(f"model {model.name!r} already exists", field="name") from None
        return model

    @translated(WHAT)
    def get_model(self, name: str) -> Model:
        return _model_of(self._live_meta(name))

    @translated(WHAT)
    def list_models(self, limit: int, cursor: str | None) -> Page[Model]:
        limit = self._clamp(limit)
        after = _decode_name_cursor(cursor, "models") if cursor else None
        items: list[Model] = []
        for item in self._index(MODELS, after=after, page_size=limit + 1):
            if A_DELETING in item:
                continue  # a deletion in progress: the model is gone for readers
            items.append(_model_of(item))
            if len(items) > limit:
                break
        next_cursor = encode_cursor("models", items[limit - 1].name) if len(items) > limit else None
        return Page[Model](items=items[:limit], next_cursor=next_cursor)

    @translated(WHAT)
    def delete_model(self, name: str) -> list[ModelVersion]:
        """Mark the model ``deleting`` (from then on nothing can be added under it), delete every item
        under it and its deployments' pointers, then META. A crash midway leaves the mark; deleting
        again resumes. Versions deleted by an interrupted attempt are not returned again: their
        artifacts are left to cleanup's orphan sweep."""
        try:
            self._client.update_item(
                TableName=self._table, Key=_meta_key(name), UpdateExpression="SET #deleting = :true",
                ConditionExpression="attribute_exists(#pk)",
                ExpressionAttributeNames={"#deleting": A_DELETING, "#pk": PK},
                ExpressionAttributeValues={":true": {"BOOL": True}},
            )
        except ClientError as error:
            if error_code(error) != "ConditionalCheckFailedException":
                raise
            raise _missing_model(name) from None
        versions: list[ModelVersion] = []
        keys: list[Item] = []
        last: list[Item] = []  # versions go last: an interrupted delete then still returns most of them
        for item in self._partition(name):
            sk = _str(item, SK)
            if sk == META:
                continue
            key = _key(_str(item, PK), sk)
            if sk.startswith(VERSION_PREFIX):
                versions.append(_version_of(item))
                last.append(key)
                continue
            if sk.startswith(DEPLOYMENT_PREFIX):
                keys.append(_key(_pointer_pk(_str(item, A_ID)), META))
            keys.append(key)
        self._batch_delete(keys + last)
        try:
            self._client.delete_item(TableName=self._table, Key=_meta_key(name),
                                     ConditionExpression="attribute_exists(#deleting)",
                                     ExpressionAttributeNames={"#deleting": A_DELETING})
        except ClientError as error:
            if error_code(error) != "ConditionalCheckFailedException":
                raise
            # A concurrent delete finished first (and the name may already be in use again): done.
        return sorted(versions, key=lambda v: v.version)

    def _batch_delete(self, keys: list[Item]) -> None:
        """Delete items 25 at a time, retrying what DynamoDB left unprocessed (with backoff)."""
        for start in range(0, len(keys), BATCH_SIZE):
            pending: dict[str, Any] = {self._table: [{"DeleteRequest": {"Key": key}}
                                                     for key in keys[start:start + BATCH_SIZE]]}
            for _ in self._attempts():
                response = self._client.batch_write_item(RequestItems=pending)
                pending = response.get("UnprocessedItems") or {}
                if not pending:
                    break
            else:
                raise _busy()

    # --- versions ------------------------------------------------------------------------------------
    @translated(WHAT)
    def allocate_version(self, model: str, *, created_by: str, upload_id: str, description: str = "",
                         parent_version: int | None = None, limits: RunLimits | None = None) -> ModelVersion:
        """Take ``next_version`` N and record version N in one transaction conditioned on the counter
        still being N: of concurrent allocators exactly one wins each number, the others retry.

        A race lost on the counter means another writer took the number (progress), so it is retried
        at once with a little jitter, for up to ``RACE_BUDGET_S``: counting those against the attempt
        bound would starve a writer, as the winner of one round reads the counter first for the next.
        Other cancellations (transaction conflicts) use the bounded, backed-off attempts."""
        probe = False
        failures = 0
        deadline = time.monotonic() + RACE_BUDGET_S
        while True:
            meta = self._live_meta(model)
            if parent_version is not None:
                self._version_record(model, parent_version)
            counter = _int(meta, A_NEXT_VERSION)
            number = counter
            if probe:  # a version already holds the counter's number (should not happen): skip past it
                highest = next(self._between(model, _version_sk(0), _version_sk(MAX_VERSION), 1), None)
                if highest is not None:
                    number = max(number, int(_str(highest, SK)[len(VERSION_PREFIX):]) + 1)
            if number > MAX_VERSION:
                raise Conflict(f"model {model!r} has used every version number")
            now = utcnow()
            version = ModelVersion(model=model, version=number, status=VersionStatus.PENDING,
                                   upload_id=upload_id, description=description, created_by=created_by,
                                   parent_version=parent_version, limits=limits, created_at=now, updated_at=now)
            actions: list[Item] = [
                {"Update": {
                    "Key": _meta_key(model),
                    "UpdateExpression": "SET #next = :after",
                    "ConditionExpression": "#next = :counter AND attribute_not_exists(#deleting)",
                    "ExpressionAttributeNames": {"#next": A_NEXT_VERSION, "#deleting": A_DELETING},
                    "ExpressionAttributeValues": {":counter": _n(counter), ":after": _n(number + 1)},
                }},
                {"Put": {"Item": _version_item(version), "ConditionExpression": "attribute_not_exists(#pk)",
                         "ExpressionAttributeNames": {"#pk": PK}}},
            ]
            if parent_version is not None:
                actions.append({"ConditionCheck": {
                    "Key": _version_key(model, parent_version),
                    "ConditionExpression": "attribute_exists(#pk)",
                    "ExpressionAttributeNames": {"#pk": PK},
                }})
            cancelled = self._transact(actions)
            if cancelled is None:
                return version
            probe = probe or cancelled.failed(1)
            if cancelled.failed(0) and not cancelled.conflicted and time.monotonic() < deadline:
                time.sleep(random.uniform(0, RACE_JITTER_S))  # the counter moved (or the model went: re-read)
                continue
            failures += 1
            if failures >= self._max_attempts:
                raise _busy()
            self._backoff(failures)

    @translated(WHAT)
    def get_version(self, model: str, version: int) -> ModelVersion:
        return self._version_record(model, version)

    @translated(WHAT)
    def list_versions(self, model: str, limit: int, cursor: str | None) -> Page[ModelVersion]:
        numbers = self._newest_first(model, "versions", _version_sk, MAX_VERSION, limit, cursor)
        items = [_version_of(item) for item in numbers]
        return self._page(items, limit, "versions", lambda version: version.version)

    @translated(WHAT)
    def list_versions_by_status(self, status: str) -> list[ModelVersion]:
        try:
            wanted = VersionStatus(status)
        except ValueError:
            raise InvalidInput("status must be PENDING, READY or FAILED", field="status") from None
        found = [_version_of(item) for item in self._index(f"STATUS#{wanted.value}")]
        # The index can lag a status change by a moment: keep only records that agree with it.
        return sorted((v for v in found if v.status is wanted), key=lambda v: (v.model, v.version))

    @translated(WHAT)
    def mark_ready(self, model: str, version: int, artifact: StoredArtifact,
                   signature: Signature) -> ModelVersion:
        return self._finish(model, version, lambda current: current.model_copy(update={
            "status": VersionStatus.READY,
            "status_reason": "",
            "sha256": artifact.sha256,
            "size": artifact.size,
            "storage_key": artifact.key,
            "storage_version_id": artifact.version_id,
            "signature": signature,
            "updated_at": utcnow(),
        }))

    @translated(WHAT)
    def mark_failed(self, model: str, version: int, reason: str) -> ModelVersion:
        return self._finish(model, version, lambda current: current.model_copy(update={
            "status": VersionStatus.FAILED, "status_reason": reason, "updated_at": utcnow(),
        }))

    def _finish(self, model: str, version: int, change: Callable[[ModelVersion], ModelVersion]) -> ModelVersion:
        """PENDING -> READY | FAILED as one UpdateItem conditioned on the version still being PENDING."""
        current = self._version_record(model, version)
        if current.status is not VersionStatus.PENDING:
            raise self._not_pending(model, version, current.status.value)
        changed = change(current)
        item = _version_item(changed)
        if _item_bytes(item) > MAX_ITEM_BYTES and changed.status is VersionStatus.READY:
            self._reject_oversized(model, version, changed)
        try:
            self._client.update_item(
                TableName=self._table, Key=_version_key(model, version),
                UpdateExpression="SET #json = :json, #status = :status, #gpk = :gpk",
                ConditionExpression="#status = :pending",
                ExpressionAttributeNames={"#json": A_JSON, "#status": A_STATUS, "#gpk": GSI_PK},
                ExpressionAttributeValues={":json": item[A_JSON], ":status": item[A_STATUS], ":gpk": item[GSI_PK],
                                           ":pending": _s(VersionStatus.PENDING.value)},
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as error:
            if error_code(error) != "ConditionalCheckFailedException":
                raise
            old = error.response.get("Item") or self._get(_version_key(model, version))
            if old is None:
                raise _missing_version(model, version) from None
            raise self._not_pending(model, version, _str(old, A_STATUS)) from None
        return changed

    def _reject_oversized(self, model: str, version: int, ready: ModelVersion) -> NoReturn:
        """A READY record too large for one item: only the signature (its input and output names
        come from the uploaded model) is unbounded. That is the model's fault, like any validation
        failure: the version becomes FAILED with the reason, and ModelRejected (422) is raised."""
        size = len(ready.signature.model_dump_json().encode()) if ready.signature is not None else 0
        reason = (f"the model's signature is too large to record: its inputs and outputs take {size} bytes, "
                  f"over the limit of about {MAX_ITEM_BYTES} bytes; shorten their names or use fewer of them")
        self._finish(model, version, lambda current: current.model_copy(update={
            "status": VersionStatus.FAILED, "status_reason": reason, "updated_at": utcnow(),
        }))
        raise ModelRejected(reason)

    @staticmethod
    def _not_pending(model: str, version: int, status: str) -> Conflict:
        return Conflict(f"version {version} of model {model!r} is {status}, not PENDING")

    @translated(WHAT)
    def delete_version(self, model: str, version: int) -> ModelVersion:
        """Check no alias or deployment references the version, then delete it in a transaction that
        also checks META's ``rev`` is still the one observed: any alias or deployment written since
        the check bumped it, so the delete retries (and re-checks) instead of orphaning a reference."""
        for _ in self._attempts():
            meta = self._live_meta(model)
            current = self._version_record(model, version)
            for item in self._partition(model, ALIAS_PREFIX):
                if _int(item, A_VERSION) == version:
                    raise Conflict(f"version {version} of model {model!r} is referenced by alias "
                                   f"{_alias_of(item).alias!r}; move or delete the alias first")
            for item in self._partition(model, DEPLOYMENT_PREFIX, ScanIndexForward=False):
                deployment = _deployment_of(item)
                if version in deployment.referenced_versions():
                    raise Conflict(f"version {version} of model {model!r} is referenced by deployment "
                                   f"{deployment.id!r}")
            cancelled = self._transact([
                {"Delete": {"Key": _version_key(model, version), "ConditionExpression": "attribute_exists(#pk)",
                            "ExpressionAttributeNames": {"#pk": PK}}},
                {"ConditionCheck": {
                    "Key": _meta_key(model),
                    "ConditionExpression": "#rev = :rev AND attribute_not_exists(#deleting)",
                    "ExpressionAttributeNames": {"#rev": A_REV, "#deleting": A_DELETING},
                    "ExpressionAttributeValues": {":rev": meta[A_REV]},
                }},
            ])
            if cancelled is None:
                return current
        raise _busy()

    # --- aliases -------------------------------------------------------------------------------------
    @translated(WHAT)
    def set_alias(self, model: str, alias: str, version: int) -> Alias:
        """Put the alias in a transaction that checks the version is READY and bumps META's ``rev``."""
        for _ in self._attempts():
            self._live_meta(model)
            self._ready(model, version)
            record = Alias(model=model, alias=alias, version=version, updated_at=utcnow())
            cancelled = self._transact([
                self._ready_check(model, version),
                {"Put": {"Item": {**_key(_model_pk(model), _alias_sk(alias)), A_VERSION: _n(version),
                                  A_JSON: _s(record.model_dump_json())}}},
                self._bump_rev(model),
            ])
            if cancelled is None:
                return record
        raise _busy()

    @translated(WHAT)
    def get_alias(self, model: str, alias: str) -> Alias:
        self._live_meta(model)
        item = self._get(_key(_model_pk(model), _alias_sk(alias)))
        if item is None:
            raise self._missing_alias(model, alias)
        return _alias_of(item)

    @translated(WHAT)
    def list_aliases(self, model: str) -> list[Alias]:
        self._live_meta(model)
        return [_alias_of(item) for item in self._partition(model, ALIAS_PREFIX)]

    @translated(WHAT)
    def delete_alias(self, model: str, alias: str) -> None:
        """Delete the alias and bump ``rev`` (every reference change does), conditionally."""
        for _ in self._attempts():
            self._live_meta(model)
            if self._get(_key(_model_pk(model), _alias_sk(alias))) is None:
                raise self._missing_alias(model, alias)
            cancelled = self._transact([
                {"Delete": {"Key": _key(_model_pk(model), _alias_sk(alias)),
                            "ConditionExpression": "attribute_exists(#pk)", "ExpressionAttributeNames": {"#pk": PK}}},
                self._bump_rev(model),
            ])
            if cancelled is None:
                return
        raise _busy()

    @staticmethod
    def _missing_alias(model: str, alias: str) -> NotFound:
        return NotFound(f"alias {alias!r} of model {model!r} not found")

    # --- deployments ---------------------------------------------------------------------------------
    @translated(WHAT)
    def create_deployment(self, deployment: Deployment) -> Deployment:
        """One transaction: take ``next_seq``, claim ``in_flight`` (none may be in flight), check the
        referenced versions are READY, and put the deployment and its id pointer (new ids only)."""
        model = deployment.model
        for _ in self._attempts():
            meta = self._live_meta(model)
            if self._get(_key(_pointer_pk(deployment.id), META)) is not None:
                raise Conflict(f"deployment {deployment.id!r} already exists")
            if A_IN_FLIGHT in meta:
                raise Conflict(f"model {model!r} already has deployment {_str(meta, A_IN_FLIGHT)!r} in "
                               "progress; wait for it or roll it back")
            referenced = sorted(deployment.referenced_versions())
            for number in referenced:
                self._ready(model, number)
            seq = _int(meta, A_NEXT_SEQ)
            if seq > MAX_SEQ:
                raise Conflict(f"model {model!r} has used every deployment number")
            stored = deployment.model_copy(update={"seq": seq})
            sets = "#next = :after"
            names = {"#next": A_NEXT_SEQ, "#in_flight": A_IN_FLIGHT}
            values: Item = {":seq": _n(seq), ":after": _n(seq + 1)}
            if stored.status is DeploymentStatus.IN_PROGRESS:
                sets += ", #in_flight = :id"
                values[":id"] = _s(stored.id)
            actions = [
                self._bump_rev(model, sets=sets, condition="#next = :seq AND attribute_not_exists(#in_flight)",
                               names=names, values=values),
                *(self._ready_check(model, number) for number in referenced),
                {"Put": {"Item": {**_key(_model_pk(model), _deployment_sk(seq)), A_ID: _s(stored.id),
                                  A_STATUS: _s(stored.status.value), A_JSON: _s(stored.model_dump_json())},
                         "ConditionExpression": "attribute_not_exists(#pk)", "ExpressionAttributeNames": {"#pk": PK}}},
                {"Put": {"Item": {**_key(_pointer_pk(stored.id), META), A_MODEL: _s(model), A_SEQ: _n(seq)},
                         "ConditionExpression": "attribute_not_exists(#pk)", "ExpressionAttributeNames": {"#pk": PK}}},
            ]
            if self._transact(actions) is None:
                return stored
        raise _busy()

    @translated(WHAT)
    def update_deployment(self, deployment: Deployment, expected: DeploymentStatus) -> Deployment:
        """Replace the deployment if its status is still ``expected``; in the same transaction keep
        META's ``in_flight`` in step (claim it moving to IN_PROGRESS, release it moving out), bump
        ``rev`` and check the referenced versions are READY."""
        expected = DeploymentStatus(expected)
        for _ in self._attempts():
            item = self._deployment_item(deployment.id)
            current = _deployment_of(item)
            if current.model != deployment.model:
                raise InvalidInput("a deployment cannot move to another model", field="model")
            if current.status is not expected:
                raise Conflict(f"deployment {deployment.id!r} is {current.status.value}, not {expected.value}")
            meta = self._get(_meta_key(current.model))
            if meta is None or A_DELETING in meta:
                raise _missing_deployment(deployment.id)
            running = _str(meta, A_IN_FLIGHT) if A_IN_FLIGHT in meta else None
            if deployment.status is DeploymentStatus.IN_PROGRESS and running not in (None, deployment.id):
                raise Conflict(f"model {deployment.model!r} already has deployment {running!r} in progress")
            referenced = sorted(deployment.referenced_versions())
            for number in referenced:
                self._ready(deployment.model, number)
            stored = deployment.model_copy(update={"seq": current.seq})
            names = {"#in_flight": A_IN_FLIGHT}
            values: Item = {":id": _s(stored.id)}
            if stored.status is DeploymentStatus.IN_PROGRESS:
                meta_update = self._bump_rev(
                    stored.model, sets="#in_flight = :id",
                    condition="(attribute_not_exists(#in_flight) OR #in_flight = :id)", names=names, values=values)
            elif current.status is DeploymentStatus.IN_PROGRESS:
                meta_update = self._bump_rev(stored.model, removes="#in_flight", condition="#in_flight = :id",
                                             names=names, values=values)
            else:
                meta_update = self._bump_rev(stored.model)
            actions = [
                {"Update": {
                    "Key": _key(_str(item, PK), _str(item, SK)),
                    "UpdateExpression": "SET #json = :json, #status = :status",
                    "ConditionExpression": "#status = :expected",
                    "ExpressionAttributeNames": {"#json": A_JSON, "#status": A_STATUS},
                    "ExpressionAttributeValues": {":json": _s(stored.model_dump_json()),
                                                  ":status": _s(stored.status.value),
                                                  ":expected": _s(expected.value)},
                }},
                meta_update,
                *(self._ready_check(stored.model, number) for number in referenced),
            ]
            if self._transact(actions) is None:
                return stored
        raise _busy()

    def _deployment_item(self, deployment_id: str) -> Item:
        """Follow the id pointer to the deployment's item in its model's partition."""
        pointer = self._get(_key(_pointer_pk(deployment_id), META))
        if pointer is None:
            raise _missing_deployment(deployment_id)
        item = self._get(_key(_model_pk(_str(pointer, A_MODEL)), _deployment_sk(_int(pointer, A_SEQ))))
        if item is None:
            raise _missing_deployment(deployment_id)
        return item

    @translated(WHAT)
    def get_deployment(self, deployment_id: str) -> Deployment:
        return _deployment_of(self._deployment_item(deployment_id))

    @translated(WHAT)
    def list_deployments(self, model: str, limit: int, cursor: str | None) -> Page[Deployment]:
        found = self._newest_first(model, "deployments", _deployment_sk, MAX_SEQ, limit, cursor)
        items = [_deployment_of(item) for item in found]
        return self._page(items, limit, "deployments", lambda deployment: deployment.seq)

    def _newest_first(self, model: str, kind: str, sort_key: Callable[[int], str], highest: int, limit: int,
                      cursor: str | None) -> list[Item]:
        """Up to ``limit + 1`` items of one kind below the cursor's number, highest first (one more
        than a page tells whether there is a next page)."""
        limit = self._clamp(limit)
        before = _decode_int_cursor(cursor, kind, highest) if cursor else highest + 1
        self._live_meta(model)
        found: list[Item] = []
        for item in self._between(model, sort_key(0), sort_key(before - 1), limit + 1):
            found.append(item)
            if len(found) > limit:
                break
        return found

    def _page(self, items: list[T], limit: int, kind: str, number: Callable[[T], int]) -> Page[T]:
        limit = self._clamp(limit)
        next_cursor = encode_cursor(kind, number(items[limit - 1])) if len(items) > limit else None
        return Page(items=items[:limit], next_cursor=next_cursor)

    @translated(WHAT)
    def get_route(self, model: str) -> Route | None:
        """The deployment in flight if any (META names it), else the newest SUCCEEDED one; then the
        same derivation as the SQLite registry."""
        meta = self._get(_meta_key(model))
        if meta is None or A_DELETING in meta:
            return None
        deployment: Deployment | None = None
        if A_IN_FLIGHT in meta:
            try:
                deployment = _deployment_of(self._deployment_item(_str(meta, A_IN_FLIGHT)))
            except NotFound:
                deployment = None
            # Finished since META was read: SUCCEEDED makes it the newest SUCCEEDED (nothing can be
            # created while one is in flight); ROLLED_BACK or FAILED hands back to the previous one.
            if deployment is not None and deployment.status not in (DeploymentStatus.IN_PROGRESS,
                                                                     DeploymentStatus.SUCCEEDED):
                deployment = None
        if deployment is None:
            deployment = self._latest_succeeded(model)
        if deployment is None:
            return None
        return deployment.live_route()

    def _latest_succeeded(self, model: str) -> Deployment | None:
        found = self._partition(model, DEPLOYMENT_PREFIX, ScanIndexForward=False, page_size=25,
                                FilterExpression="#status = :succeeded",
                                ExpressionAttributeNames={"#status": A_STATUS},
                                ExpressionAttributeValues={":succeeded": _s(DeploymentStatus.SUCCEEDED.value)})
        item = next(found, None)
        return _deployment_of(item) if item is not None else None

    # --- tokens --------------------------------------------------------------------------------------
    @translated(WHAT)
    def create_token(self, token: Token) -> Token:
        """Tokens are keyed by the hash of their secret (what authentication looks up); ids are unique
        through the index (ids are random, so the index lag cannot realistically let a clash in)."""
        clash = Conflict("a token with this id or secret already exists")
        if next(self._index(TOKENS, sort_key=token.id, page_size=1), None) is not None:
            raise clash
        item = {**_key(_token_pk(token.token_hash), META), GSI_PK: _s(TOKENS), GSI_SK: _s(token.id),
                A_ID: _s(token.id), A_JSON: _s(token.model_dump_json())}
        try:
            self._client.put_item(TableName=self._table, Item=item, ConditionExpression="attribute_not_exists(#pk)",
                                  ExpressionAttributeNames={"#pk": PK})
        except ClientError as error:
            if error_code(error) != "ConditionalCheckFailedException":
                raise
            raise clash from None
        return token

    @translated(WHAT)
    def find_token(self, token_hash: str) -> Token | None:
        item = self._get(_key(_token_pk(token_hash), META))
        return _token_of(item) if item is not None else None

    @translated(WHAT)
    def list_tokens(self) -> list[Token]:
        tokens = [_token_of(item) for item in self._index(TOKENS)]
        return sorted(tokens, key=lambda token: (utc_iso(token.created_at), token.id))

    @translated(WHAT)
    def revoke_token(self, token_id: str) -> Token:
        missing = NotFound(f"token {token_id!r} not found")
        entry = next(self._index(TOKENS, sort_key=token_id, page_size=1), None)
        if entry is None:
            raise missing
        key = _key(_str(entry, PK), META)
        item = self._get(key)
        if item is None:
            raise missing
        revoked = _token_of(item).model_copy(update={"revoked": True})
        try:
            self._client.update_item(
                TableName=self._table, Key=key, UpdateExpression="SET #json = :json",
                ConditionExpression="#id = :id", ExpressionAttributeNames={"#json": A_JSON, "#id": A_ID},
                ExpressionAttributeValues={":json": _s(revoked.model_dump_json()), ":id": _s(token_id)},
            )
        except ClientError as error:
            if error_code(error) != "ConditionalCheckFailedException":
                raise
            raise missing from None
        return revoked


__all__ = ["DynamoRegistry"]
