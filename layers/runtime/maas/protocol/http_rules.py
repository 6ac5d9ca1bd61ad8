"""Rules every HTTP front door applies before routing (the ASGI guard of ``maas serve`` and the API
Lambda, and the lean inference Lambda), kept in one place so they cannot drift.

Browsers send "simple" cross-site requests (text/plain, forms) without a CORS preflight (MLflow
CVE-2023-43472), so mutations must be JSON, or raw bytes where bytes are expected, and a foreign
``Origin`` is refused."""

from __future__ import annotations

from maas.errors import Forbidden, MaasError, UnsupportedMediaType

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
JSON_TYPES = frozenset({"application/json"})
BYTES_TYPES = frozenset({"application/octet-stream"})
INFER_TYPES = JSON_TYPES | BYTES_TYPES


def media_type(value: str | None) -> str | None:
    """``application/json; charset=utf-8`` -> ``application/json``."""
    if value is None:
        return None
    return value.split(";", 1)[0].strip().lower() or None


def same_origin(origin: str, host: str) -> bool:
    _, _, rest = origin.lower().partition("://")
    return bool(rest) and rest.rstrip("/") == host.lower()


def is_upload(path: str) -> bool:
    return path.startswith("/uploads/")


def mutation_problem(method: str, path: str, *, origin: str | None, host: str, content_type: str | None,
                     has_body: bool) -> MaasError | None:
    """Why a request must be refused before it reaches a route, or None. Only mutations are checked:
    reads cannot change anything, and their answers are not readable cross-origin without CORS."""
    if method not in MUTATING:
        return None
    if origin is not None and not same_origin(origin, host):
        return Forbidden("cross-origin requests are not accepted")
    media = media_type(content_type)
    infer = path.endswith("/infer")
    allowed = BYTES_TYPES if is_upload(path) else INFER_TYPES if infer else JSON_TYPES
    if media is None and (is_upload(path) or (has_body and not infer)):
        return UnsupportedMediaType(f"send the body with Content-Type: {sorted(allowed)[0]}")
    if media is not None and media not in allowed:
        return UnsupportedMediaType(f"Content-Type {media!r} is not accepted here; use {' or '.join(sorted(allowed))}")
    return None
