"""Request guard (pure ASGI, runs before routing): body caps, content types, Host and Origin.

Browsers can send "simple" cross-site requests (text/plain, forms) without a CORS preflight, and DNS
rebinding lets a page talk to 127.0.0.1 under a foreign Host name (MLflow CVE-2023-43472,
CVE-2025-14279). So mutations must be JSON (or raw bytes where bytes are expected), a foreign Origin
is refused, and the local server only answers to the Host names it is bound to."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from maas.api.problems import PROBLEM_JSON
from maas.errors import PayloadTooLarge

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
JSON_TYPES = frozenset({"application/json"})
BYTES_TYPES = frozenset({"application/octet-stream"})
INFER_TYPES = JSON_TYPES | BYTES_TYPES


class BodyTooLarge(PayloadTooLarge):
    """Raised while streaming a body without Content-Length; the app's MaasError handler answers 413."""


def _media_type(value: bytes | None) -> str | None:
    if value is None:
        return None
    return value.split(b";", 1)[0].strip().lower().decode("latin-1") or None


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class RequestGuard:
    def __init__(self, app: ASGIApp, *, max_request_bytes: int, max_upload_bytes: int,
                 allowed_hosts: Iterable[str] | None = None):
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.max_upload_bytes = max_upload_bytes
        self.allowed_hosts = {h.lower() for h in allowed_hosts} if allowed_hosts else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        method: str = scope["method"]
        path: str = scope["path"]
        if self.allowed_hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1")
            if _host_name(host) not in self.allowed_hosts:
                await _problem(send, 403, "Forbidden", "this server does not answer to that Host name")
                return
        is_upload = path.startswith("/uploads/")
        cap = self.max_upload_bytes if is_upload else self.max_request_bytes
        if method in MUTATING:
            origin = headers.get(b"origin")
            if origin is not None and not _same_origin(origin.decode("latin-1"), headers):
                await _problem(send, 403, "Forbidden", "cross-origin requests are not accepted")
                return
            media = _media_type(headers.get(b"content-type"))
            allowed = BYTES_TYPES if is_upload else INFER_TYPES if path.endswith("/infer") else JSON_TYPES
            has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
            if media is None and (is_upload or (has_body and not path.endswith("/infer"))):
                await _problem(send, 415, "Unsupported media type",
                               f"send the body with Content-Type: {sorted(allowed)[0]}")
                return
            if media is not None and media not in allowed:
                await _problem(send, 415, "Unsupported media type",
                               f"Content-Type {media!r} is not accepted here; use {' or '.join(sorted(allowed))}")
                return
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await _problem(send, 400, "Bad request", "Content-Length is not a number")
                return
            if length > cap:
                await _problem(send, 413, "Payload too large", f"the body exceeds the {cap}-byte limit")
                return
        if declared is None and method in MUTATING:
            await self._call_capped(scope, receive, send, cap)
            return
        await self.app(scope, receive, send)

    async def _call_capped(self, scope: Scope, receive: Receive, send: Send, cap: int) -> None:
        """Stream a body of unknown length, answering 413 once it passes ``cap``, whatever the app
        made of the interrupted read (FastAPI turns body errors into a generic 400)."""
        seen = 0
        exceeded = False
        answered = False

        async def capped_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    exceeded = True
                    raise BodyTooLarge(f"the body exceeds the {cap}-byte limit")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if not exceeded:
                await send(message)
            elif message["type"] == "http.response.start" and not answered:
                answered = True
                await _problem(send, 413, "Payload too large", f"the body exceeds the {cap}-byte limit")

        await self.app(scope, capped_receive, guarded_send)


def _same_origin(origin: str, headers: dict[bytes, bytes]) -> bool:
    host = headers.get(b"host", b"").decode("latin-1").lower()
    _, _, rest = origin.lower().partition("://")
    return bool(rest) and rest.rstrip("/") == host


async def _problem(send: Send, status: int, title: str, detail: str) -> None:
    body: dict[str, Any] = {
        "type": f"https://maas.dev/problems/{title.lower().replace(' ', '-')}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    payload = orjson.dumps(body)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
