"""Request guard (pure ASGI, runs before routing): body caps, content types, Host and Origin, and a
front door that spends nothing on strangers.

The content-type and Origin rules are ``maas.protocol.http_rules`` (shared with the inference Lambda).
DNS rebinding lets a page talk to 127.0.0.1 under a foreign Host name (MLflow CVE-2025-14279), so the
local server also answers only to the Host names it is bound to.

A request with a body must carry a live token before a byte of the body is read (every route that takes
a body needs one), its body must keep arriving (``body_idle_timeout_s`` between chunks, ``body_timeout_s``
in all except uploads, which stream to storage), and the bodies held in memory across all connections
stay under ``max_buffered_request_bytes`` (then 503 with Retry-After). Without these, 200 connections
without a token, each sending 6 MiB less one byte and holding, grew the server by 1.2 GB."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from maas.api.problems import PROBLEM_JSON, maas_error_response
from maas.errors import MaasError, PayloadTooLarge, RequestTimeout, Unavailable
from maas.protocol.http_rules import MUTATING, is_upload, mutation_problem


class BodyTooLarge(PayloadTooLarge):
    """Raised while streaming a body without Content-Length; the app's MaasError handler answers 413."""


class BodyBudget:
    """Request bytes held in memory across every connection (the event loop's thread only)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.max_bytes:
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        self.held -= size


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
                 allowed_hosts: Iterable[str] | None = None,
                 authenticate: Callable[[str | None], object] | None = None,
                 body_idle_timeout_s: float = 30.0, body_timeout_s: float = 120.0,
                 max_buffered_request_bytes: int = 256 * 1024 * 1024):
        """``authenticate(authorization header)`` raises ``MaasError`` for a missing or dead token: it
        runs before the body of any request that has one is read (None: no such check)."""
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.max_upload_bytes = max_upload_bytes
        self.allowed_hosts = {h.lower() for h in allowed_hosts} if allowed_hosts else None
        self.authenticate = authenticate
        self.body_idle_timeout_s = body_idle_timeout_s
        self.body_timeout_s = body_timeout_s
        self.budget = BodyBudget(max_buffered_request_bytes)

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
        has_body = (declared is not None and declared != b"0") or b"transfer-encoding" in headers
        if not has_body:
            await self.app(scope, receive, send)
            return
        if self.authenticate is not None:
            authorization = headers.get(b"authorization")
            try:  # a stranger's body is never read: no token, no bytes held
                self.authenticate(None if authorization is None else authorization.decode("latin-1"))
            except MaasError as error:
                await maas_error_response(error)(scope, receive, send)
                return
        await self._call_guarded(scope, receive, send, cap, upload=is_upload(path))

    async def _call_guarded(self, scope: Scope, receive: Receive, send: Send, cap: int, *, upload: bool) -> None:
        """Stream the body with its bounds (size, idle and total time, the shared memory budget),
        answering the bound's problem whatever the app made of the interrupted read (FastAPI turns body
        errors into a generic 400)."""
        seen = 0
        held = 0
        refused: MaasError | None = None
        answered = False
        complete = False
        loop = asyncio.get_running_loop()
        deadline = None if upload else loop.time() + self.body_timeout_s
        started = time.monotonic()

        async def guarded_receive() -> Message:
            nonlocal seen, held, refused, complete
            if complete:
                return await receive()  # after the body: e.g. waiting for a disconnect
            timeout = self.body_idle_timeout_s
            if deadline is not None:
                timeout = min(timeout, max(deadline - loop.time(), 0.0))
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                waited = time.monotonic() - started
                refused = RequestTimeout(f"the request body stopped arriving ({seen} bytes in {waited:.0f} s; "
                                         f"at most {self.body_idle_timeout_s:g} s between chunks"
                                         + ("" if upload else f", {self.body_timeout_s:g} s in all") + ")")
                raise refused from None
            if message["type"] != "http.request":
                return message
            chunk = len(message.get("body", b""))
            seen += chunk
            if seen > cap:
                refused = BodyTooLarge(f"the body exceeds the {cap}-byte limit")
                raise refused
            if not upload:  # an upload streams to storage: its chunks are not held
                if not self.budget.take(chunk):
                    refused = Unavailable("the server is receiving too many request bodies at once; retry "
                                          "shortly", retry_after=1)
                    raise refused
                held += chunk
            complete = not message.get("more_body", False)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if refused is None:
                await send(message)
            elif message["type"] == "http.response.start" and not answered:
                answered = True
                await maas_error_response(refused)(scope, _no_body, send)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except MaasError:
            if refused is None:
                raise
            if not answered:
                answered = True
                await maas_error_response(refused)(scope, _no_body, send)
        finally:
            self.budget.release(held)


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


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
