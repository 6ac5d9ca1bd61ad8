"""The front door spends nothing on strangers (a real uvicorn on 127.0.0.1, raw sockets): a body is
never read without a live token, a body that stops arriving is answered 408, and the bodies held in
memory across connections stay under a budget (503 with Retry-After past it), while the health probe
answers at once. Before: 200 connections without a token, each sending 6 MiB less one byte and
holding, grew the server from 87 MB to 1.32 GB."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from maas.api import create_app
from maas.backends.local import LocalBackend
from maas.cli.serve import bind_socket, make_server
from maas.settings import Limits, Settings
from tests.models import InProcessValidator

IDLE_S = 1.0
TOTAL_S = 3.0
BUDGET = 1024 * 1024
HEADER_S = 1.0


@dataclass
class Server:
    port: int
    token: str

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.settimeout(10)
        return sock

    def head(self, length: int, *, token: str | None, path: str = "/v2/models/m/infer") -> bytes:
        auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
        return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {length}\r\n{auth}\r\n").encode()

    def health_ms(self) -> float:
        started = time.perf_counter()
        assert httpx.get(f"http://127.0.0.1:{self.port}/v2/health/live", timeout=5).status_code == 200
        return (time.perf_counter() - started) * 1000


def status_of(sock: socket.socket) -> tuple[int, bytes]:
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head + b"\r\n\r\n" + rest


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    limits = Limits(body_idle_timeout_s=IDLE_S, body_timeout_s=TOTAL_S, max_buffered_request_bytes=BUDGET,
                    header_timeout_s=HEADER_S)
    settings = Settings(home=tmp_path / "home", limits=limits)
    backend = LocalBackend(settings, validator=InProcessValidator(settings.limits))
    token, _ = backend.ensure_admin_token()
    assert token is not None
    app = create_app(backend, settings, allowed_hosts=["127.0.0.1"])
    sock = bind_socket("127.0.0.1", 0)
    uvicorn = make_server(app, "127.0.0.1", sock.getsockname()[1], "warning", header_timeout_s=limits.header_timeout_s)
    thread = threading.Thread(target=uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uvicorn.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield Server(sock.getsockname()[1], token)
    finally:
        uvicorn.should_exit = True
        thread.join(10)
        backend.close()


def test_a_strangers_body_is_never_read(server: Server) -> None:
    """No token, or a dead one: 401 right after the headers, while the client has sent no body."""
    connections = []
    for token in (None, "maas_" + "x" * 40, "not-a-token"):
        for _ in range(10):
            sock = server.connect()
            sock.sendall(server.head(6 * 1024 * 1024 - 1, token=token))
            connections.append(sock)
    started = time.monotonic()
    for sock in connections:
        status, answer = status_of(sock)
        assert status == 401, answer[:300]
        assert b"application/problem+json" in answer
        sock.close()
    assert time.monotonic() - started < 5  # answered, not waiting for 180 MiB that never come
    # the same for the management routes: no body is read before the token is checked
    sock = server.connect()
    sock.sendall(server.head(1024 * 1024, token=None, path="/models"))
    assert status_of(sock)[0] == 401
    sock.close()


def test_a_body_that_stops_arriving_is_answered_408(server: Server) -> None:
    sock = server.connect()
    sock.sendall(server.head(1000, token=server.token) + b'{"inputs": ')
    started = time.monotonic()
    status, answer = status_of(sock)
    waited = time.monotonic() - started
    assert status == 408, answer[:300]
    assert b"stopped arriving" in answer
    assert IDLE_S * 0.5 < waited < IDLE_S + 5
    sock.close()
    # a trickle (a byte every half second) is cut at the total bound, not held forever
    sock = server.connect()
    sock.sendall(server.head(1000, token=server.token))
    started = time.monotonic()
    sock.settimeout(0.5)
    answer = b""
    while time.monotonic() - started < TOTAL_S + 5 and b"\r\n\r\n" not in answer:
        try:
            sock.sendall(b" ")
            answer += sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
    assert b" 408 " in answer.split(b"\r\n", 1)[0], answer[:300]
    assert time.monotonic() - started < TOTAL_S + 5
    sock.close()


def test_bodies_beyond_the_shared_budget_get_503_and_the_budget_comes_back(server: Server) -> None:
    holder = server.connect()  # holds most of the budget, then stops sending
    holder.sendall(server.head(BUDGET - 1024, token=server.token) + b" " * (BUDGET - 200 * 1024))
    time.sleep(0.3)
    assert server.health_ms() < 1000  # the probe answers meanwhile
    other = server.connect()
    body = orjson.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]})
    other.sendall(server.head(300 * 1024, token=server.token) + body + b" " * (300 * 1024 - len(body)))
    status, answer = status_of(other)
    assert status == 503, answer[:300]
    assert b"retry-after: 1" in answer.lower()
    other.close()
    assert status_of(holder)[0] == 408  # the holder times out and its bytes are released
    holder.close()
    again = server.connect()
    again.sendall(server.head(300 * 1024, token=server.token) + body + b" " * (300 * 1024 - len(body)))
    status, answer = status_of(again)
    assert status not in (503, 408), answer[:300]  # the model is not deployed: its own 404
    again.close()


def test_a_connection_that_sends_no_request_is_answered_408_and_closed(server: Server) -> None:
    """uvicorn arms no timer when a connection opens: a silent one was held for ever."""
    started = time.monotonic()
    sock = server.connect()
    status, answer = status_of(sock)
    assert status == 408 and b"application/problem+json" in answer and b"header_timeout_s" in answer
    assert sock.recv(1) == b""  # closed
    assert HEADER_S - 0.05 <= time.monotonic() - started < HEADER_S + 5  # timers may fire a hair early
    sock.close()


def test_headers_trickling_in_are_cut_off_at_the_header_deadline(server: Server) -> None:
    """Slowloris: a header byte now and then cancelled uvicorn's only timer (keep-alive)."""
    started = time.monotonic()  # the deadline runs from the connection
    sock = server.connect()
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    sock.settimeout(0.1)
    answered, closed = b"", False
    while time.monotonic() - started < HEADER_S + 5 and not closed:
        try:
            sock.sendall(b"X")  # never a complete header line
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:  # reset by the server
            closed = True
            break
        answered += chunk
        closed = not chunk
    assert closed or b" 408 " in answered, "the server kept a trickling connection open"
    assert HEADER_S - 0.05 <= time.monotonic() - started < HEADER_S + 5  # timers may fire a hair early
    sock.close()


def test_a_kept_alive_connection_serves_requests_before_and_after_its_deadline_would_have_passed(
        server: Server) -> None:
    """The deadline covers headers only: a connection reused across requests is not cut short."""
    sock = server.connect()
    for _ in range(3):
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        time.sleep(HEADER_S * 0.6)  # together longer than the deadline, each gap shorter
    sock.close()
