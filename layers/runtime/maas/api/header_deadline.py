"""A deadline on request headers for uvicorn's httptools protocol: a connection that has not finished
sending its request line and headers in time is answered 408 and closed.

Why: uvicorn arms no timer when a connection opens, and cancels its keep-alive timer as soon as any
byte arrives. A stranger who opens connections and sends nothing, or a header byte now and then
(slowloris), holds a socket, a protocol object and its parser for ever; enough of them exhaust the
server's file descriptors. The body has its own timeouts (``maas.api.guard``); this covers what comes
before the application sees the request. The deadline runs from the moment the connection opens, or
from the end of the previous response on a kept-alive connection, to the end of the headers.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from maas.errors import RequestTimeout

__all__ = ["header_deadline_protocol"]

_BODY = json.dumps(RequestTimeout("the request line and headers did not arrive in time (header_timeout_s); the "
                                  "connection is closed").to_problem(), separators=(",", ":")).encode()
_ANSWER = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/problem+json\r\n"
           b"content-length: " + str(len(_BODY)).encode() + b"\r\nconnection: close\r\n\r\n" + _BODY)


class _HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with ``header_timeout_s`` (set by :func:`header_deadline_protocol`).

    Per request it only stamps the time headers became due (``loop.time()``, ~0.1 µs) and clears it when
    they are complete; one sweep per server, every quarter of the timeout, closes the connections
    whose headers are overdue. A timer armed and cancelled per request cost 2.6 µs under uvloop."""

    header_timeout_s: float = 10.0
    _headers_due_since: float | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._headers_due_since = self.loop.time()
        if getattr(self.server_state, "_maas_header_sweep", None) is None:
            self._schedule_sweep()

    def on_headers_complete(self) -> None:
        self._headers_due_since = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._headers_due_since = self.loop.time()  # the next request's headers, if one comes

    def _schedule_sweep(self) -> None:
        period = max(0.05, self.header_timeout_s / 4)
        self.server_state._maas_header_sweep = self.loop.call_later(  # type: ignore[attr-defined]
            period, _sweep, self.server_state, self.loop, self.header_timeout_s, period)

    def _headers_too_slow(self) -> None:
        self._headers_due_since = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # no request of ours is being answered
            self.transport.write(_ANSWER)
        self.transport.close()


def _sweep(server_state: Any, loop: asyncio.AbstractEventLoop, timeout_s: float, period: float) -> None:
    """Close every connection of the server whose request headers are overdue, then sweep again later."""
    cutoff = loop.time() - timeout_s
    for connection in list(server_state.connections):
        since = getattr(connection, "_headers_due_since", None)
        if since is not None and since <= cutoff:
            connection._headers_too_slow()
    server_state._maas_header_sweep = loop.call_later(period, _sweep, server_state, loop, timeout_s, period)


def header_deadline_protocol(header_timeout_s: float) -> type[Any]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``."""
    return type("HeaderDeadlineProtocol", (_HeaderDeadlineProtocol,), {"header_timeout_s": float(header_timeout_s)})
