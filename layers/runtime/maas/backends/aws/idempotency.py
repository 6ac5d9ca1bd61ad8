"""Idempotency keys in the registry's DynamoDB table (``maas.ports.IdempotencyStore``).

One item per key: ``pk=IDEMPOTENCY#<principal>#<key>``, ``sk=META`` (see
:mod:`maas.backends.aws.table`). The claim is one conditional ``PutItem`` (the key is absent,
expired, or held by an in-progress claim whose lease ran out), so of any number of concurrent
claims, in any number of Lambda containers, exactly one succeeds. Completing and releasing are
conditioned on the claim id. ``ttl`` lets DynamoDB delete expired items; since it does so lazily
(up to days later), every read and condition also checks ``expires_at`` itself."""

from __future__ import annotations

import json
import math
from typing import Any

from botocore.exceptions import ClientError

from maas.backends.aws.errors import error_code, translated
from maas.backends.aws.table import PK, SK, TTL_ATTRIBUTE
from maas.ports import IdempotencyRecord, StoredResponse

WHAT = "the idempotency store"
PREFIX = "IDEMPOTENCY#"
META = "META"
CLAIM_ATTEMPTS = 5  # a claim only loops when the holder vanished between the put and the read

A_PRINCIPAL = "principal"
A_KEY = "idem_key"
A_FINGERPRINT = "fingerprint"
A_CLAIM = "claim"
A_EXPIRES = "expires_at"
A_LEASE = "lease_until"
A_STATUS = "response_status"
A_HEADERS = "response_headers"
A_BODY = "response_body"

_CONDITION_FAILED = "ConditionalCheckFailedException"
_NAMES = {"#pk": PK, "#claim": A_CLAIM, "#exp": A_EXPIRES, "#lease": A_LEASE, "#status": A_STATUS,
          "#headers": A_HEADERS, "#body": A_BODY, "#ttl": TTL_ATTRIBUTE}


def _key(principal: str, key: str) -> dict[str, Any]:
    return {PK: {"S": f"{PREFIX}{principal}#{key}"}, SK: {"S": META}}


def _number(value: float) -> dict[str, str]:
    return {"N": repr(float(value))}


def _ttl(expires_at: float) -> dict[str, str]:
    return {"N": str(math.ceil(expires_at))}


def _record(item: dict[str, Any]) -> IdempotencyRecord:
    response = None
    if A_STATUS in item:
        headers = tuple((str(k), str(v)) for k, v in json.loads(item[A_HEADERS]["S"]))
        response = StoredResponse(status=int(item[A_STATUS]["N"]), headers=headers, body=bytes(item[A_BODY]["B"]))
    return IdempotencyRecord(principal=item[A_PRINCIPAL]["S"], key=item[A_KEY]["S"],
                             fingerprint=item[A_FINGERPRINT]["S"], claim=item[A_CLAIM]["S"],
                             expires_at=float(item[A_EXPIRES]["N"]), lease_until=float(item[A_LEASE]["N"]),
                             response=response)


def _names(*aliases: str) -> dict[str, str]:
    return {alias: _NAMES[alias] for alias in aliases}


class DynamoIdempotencyStore:
    """``maas.ports.IdempotencyStore`` on the registry's table, through the low-level client."""

    def __init__(self, client: Any, table: str):
        self._client = client
        self._table = table

    @translated(WHAT)
    def claim(self, record: IdempotencyRecord, now: float) -> IdempotencyRecord | None:
        item = {
            **_key(record.principal, record.key),
            A_PRINCIPAL: {"S": record.principal},
            A_KEY: {"S": record.key},
            A_FINGERPRINT: {"S": record.fingerprint},
            A_CLAIM: {"S": record.claim},
            A_EXPIRES: _number(record.expires_at),
            A_LEASE: _number(record.lease_until),
            TTL_ATTRIBUTE: _ttl(record.expires_at),
        }
        for _ in range(CLAIM_ATTEMPTS):
            try:
                self._client.put_item(
                    TableName=self._table, Item=item,
                    ConditionExpression=("attribute_not_exists(#pk) OR #exp <= :now OR "
                                         "(attribute_not_exists(#status) AND #lease <= :now)"),
                    ExpressionAttributeNames=_names("#pk", "#exp", "#status", "#lease"),
                    ExpressionAttributeValues={":now": _number(now)},
                )
                return None
            except ClientError as error:
                if error_code(error) != _CONDITION_FAILED:
                    raise
            held = self._read(record.principal, record.key)
            if held is not None:
                return held
            # Released or deleted between our put and our read: try to claim it again.
        return self._read(record.principal, record.key)

    @translated(WHAT)
    def complete(self, principal: str, key: str, claim: str, response: StoredResponse,
                 expires_at: float) -> bool:
        try:
            self._client.update_item(
                TableName=self._table, Key=_key(principal, key),
                UpdateExpression="SET #status = :status, #headers = :headers, #body = :body, #exp = :exp, "
                                 "#ttl = :ttl",
                ConditionExpression="#claim = :claim AND attribute_not_exists(#status)",
                ExpressionAttributeNames=_names("#status", "#headers", "#body", "#exp", "#ttl", "#claim"),
                ExpressionAttributeValues={
                    ":status": {"N": str(response.status)},
                    ":headers": {"S": json.dumps([list(pair) for pair in response.headers])},
                    ":body": {"B": response.body},
                    ":exp": _number(expires_at),
                    ":ttl": _ttl(expires_at),
                    ":claim": {"S": claim},
                },
            )
        except ClientError as error:
            if error_code(error) == _CONDITION_FAILED:
                return False
            raise
        return True

    @translated(WHAT)
    def release(self, principal: str, key: str, claim: str) -> None:
        try:
            self._client.delete_item(
                TableName=self._table, Key=_key(principal, key),
                ConditionExpression="#claim = :claim AND attribute_not_exists(#status)",
                ExpressionAttributeNames=_names("#claim", "#status"),
                ExpressionAttributeValues={":claim": {"S": claim}},
            )
        except ClientError as error:
            if error_code(error) != _CONDITION_FAILED:
                raise

    @translated(WHAT)
    def get(self, principal: str, key: str, now: float) -> IdempotencyRecord | None:
        record = self._read(principal, key)
        return record if record is not None and record.expires_at > now else None

    def _read(self, principal: str, key: str) -> IdempotencyRecord | None:
        found = self._client.get_item(TableName=self._table, Key=_key(principal, key), ConsistentRead=True)
        item = found.get("Item")
        return _record(item) if item else None


__all__ = ["DynamoIdempotencyStore"]
