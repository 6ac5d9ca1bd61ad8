"""Request guard (pure ASGI, runs before routing): body caps, content types, Host and Origin.

The content-type and Origin rules are ``maas.protocol.http_rules`` (shared with the inference Lambda).
DNS rebinding lets a page talk to 127.0.0.1 under a foreign Host name (MLflow CVE-2025-14279), so the
local server also answers only to the Host names it is bound to."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from maas.api.problems import PROBLEM_JSON
from maas.errors import PayloadTooLarge
from maas.protocol.http_rules import MUTATING, is_upload, mutation_problem


class BodyTooLarge(PayloadTooLarge):
    """Raised while streaming a body without Content-Length; the app's MaasError handler answers 413."""


#: ``name[:port]`` or ``[ipv6][:port]``, and nothing else: the name is what ``allowed_hosts`` is matched
#: against, so trailing junk (``127.0.0.1:80@evil.example``, ``[::1]evil.example``) must not parse.
_HOST = re.compile(r"(?P<name>\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::(?P<port>[0-9]{0,5}))?")  # RFC 3986: port may be empty


def _host_name(host: str) -> str | None:
    """The name of a Host header value, lower-cased, or None if the value is not a plain host[:port]."""
    match = _HOST.fullmatch(host.strip().lower())
    if match is None or (match["port"] and int(match["port"]) > 65535):
        return None
    return match["name"]


#: Headers the guard decides on. A second copy would let the guard (last value wins in ``dict``) and
#: the app (Starlette reads the first) see different requests: refused outright.
_SINGLE_HEADERS = (b"host", b"origin", b"content-type", b"content-length", b"transfer-encoding")


def _duplicated(raw: list[tuple[bytes, bytes]], headers: dict[bytes, bytes]) -> bytes | None:
    """The first guarded header that appears more than once, if any (cheap when none repeats)."""
    if len(headers) == len(raw):
        return None
    names = [name for name, _ in raw]
    return next((name for name in _SINGLE_HEADERS if names.count(name) > 1), None)


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
        repeated = _duplicated(scope["headers"], headers)
        if repeated is not None:
            name = repeated.decode("latin-1").title()
            await _problem(send, 400, "Bad request", f"the {name} header must appear once")
            return
        if self.allowed_hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1")
            if _host_name(host) not in self.allowed_hosts:
                await _problem(send, 403, "Forbidden", "this server does not answer to that Host name")
                return
        cap = self.max_upload_bytes if is_upload(path) else self.max_request_bytes
        if method in MUTATING:
            has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
            origin = headers.get(b"origin")
            content_type = headers.get(b"content-type")
            refused = mutation_problem(
                method, path, origin=None if origin is None else origin.decode("latin-1"),
                host=headers.get(b"host", b"").decode("latin-1"),
                content_type=None if content_type is None else content_type.decode("latin-1"), has_body=has_body)
            if refused is not None:
                await _problem(send, refused.status, refused.title, refused.detail)
                return
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():  # int() would take "-1", "+1", " 1" and "1_0"
                await _problem(send, 400, "Bad request", "Content-Length is not a number")
                return
            length = int(declared)
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
