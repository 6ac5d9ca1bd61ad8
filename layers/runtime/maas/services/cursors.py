"""Opaque page cursors and timestamps, shared by the registries so both backends hand out and accept
cursors the same way (a client can never tell which backend it talks to from a cursor's behaviour)."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime

from maas.errors import InvalidInput

MAX_CURSOR_CHARS = 512


def utc_iso(value: datetime) -> str:
    """ISO-8601 in UTC (naive datetimes are taken as UTC): sorts in time order as text."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


def bad_cursor() -> InvalidInput:
    return InvalidInput("cursor is not valid; pass the next_cursor of the previous page", field="cursor")


def encode_cursor(kind: str, value: str | int) -> str:
    raw = json.dumps([kind, value], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, kind: str) -> object:
    """The value of a cursor made by :func:`encode_cursor` for ``kind``; InvalidInput (field
    ``cursor``) for anything else. Callers check the value's type and range for their storage."""
    if not isinstance(cursor, str) or not cursor or len(cursor) > MAX_CURSOR_CHARS or not cursor.isascii():
        raise bad_cursor()
    try:
        decoded = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):
        raise bad_cursor() from None
    if not isinstance(decoded, list) or len(decoded) != 2 or decoded[0] != kind:
        raise bad_cursor()
    return decoded[1]
