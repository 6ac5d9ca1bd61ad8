"""An asyncio HTTP/1.1 load generator (raw protocols, keep-alive), run in its own process on its own core.

``CONCURRENCY`` connections each send the same POST back to back for a warm-up, then for ``DURATION``
seconds; it prints one JSON object: requests, errors (non-200 answers, answers whose bytes differ from
the first one, broken connections), rps, p50/p99 latency in ms, and the first answer's body (the caller
checks its outputs against raw onnxruntime). The warm-up lasts until the first answer has arrived too.
Every request carries the same input, so every answer must carry the same bytes as the first (but for
the per-response ``id`` that KServe and MLServer add).

    python -m bench.load URL PATH BODY_FILE CONCURRENCY DURATION WARMUP [HEADER:VALUE ...]
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.servers import CLIENT_CORE, REPO, taskset

FIRST_ANSWER_TIMEOUT_S = 120.0


class _Connection(asyncio.Protocol):
    def __init__(self, request: bytes, stats: _Stats):
        self.request = request
        self.stats = stats
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.sent_at = 0.0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        if self.stats.stop or self.transport is None or self.transport.is_closing():
            if self.transport is not None:
                self.transport.close()
            return
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
            if len(self.buffer) < end + 4 + length:
                return
            status = int(head[9:12])
            body = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            self.stats.record(time.perf_counter() - self.sent_at, status, body)
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stats.stop:
            self.stats.errors += 1
        if not self.closed.done():
            self.closed.set_result(None)


class _Stats:
    def __init__(self) -> None:
        self.stop = False
        self.measuring = False
        self.latencies: list[float] = []
        self.errors = 0
        self.first: bytes | None = None
        self.first_status = 0

    def record(self, seconds: float, status: int, body: bytes) -> None:
        if self.first is None:
            self.first, self.first_status = body, status
        if not self.measuring:
            return
        self.latencies.append(seconds)
        if status != 200 or (body != self.first and _without_id(body) != _without_id(self.first)):
            self.errors += 1


_ID_FIELD = re.compile(rb'"id":\s*"[^"]*",?\s*')


def _without_id(body: bytes) -> bytes:
    """The answer without its OIP ``id``: KServe and MLServer give every response a fresh one."""
    return _ID_FIELD.sub(b"", body, count=1)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def run(url: str, path: str, body: bytes, concurrency: int, duration: float, warmup: float,
              headers: dict[str, str]) -> dict[str, object]:
    parts = urlsplit(url)
    content_type = "" if any(k.lower() == "content-type" for k in headers) else "Content-Type: application/json"
    lines = [f"POST {path} HTTP/1.1", f"Host: {parts.hostname}:{parts.port}", *([content_type] if content_type else []),
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    stats = _Stats()
    loop = asyncio.get_running_loop()
    connections = [(await loop.create_connection(lambda: _Connection(request, stats), parts.hostname, parts.port))[1]
                   for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    deadline = time.perf_counter() + FIRST_ANSWER_TIMEOUT_S
    while stats.first is None and time.perf_counter() < deadline:  # slow models: warm up until one answer
        await asyncio.sleep(0.01)
    stats.measuring = True
    started = time.perf_counter()
    await asyncio.sleep(duration)
    stats.measuring = False
    elapsed = time.perf_counter() - started
    stats.stop = True
    for connection in connections:
        if connection.transport is not None:
            connection.transport.close()
    await asyncio.gather(*(c.closed for c in connections))
    latencies = sorted(stats.latencies)
    return {
        "requests": len(latencies), "errors": stats.errors, "seconds": elapsed,
        "rps": len(latencies) / elapsed, "p50_ms": _percentile(latencies, 0.5) * 1e3,
        "p99_ms": _percentile(latencies, 0.99) * 1e3, "first_status": stats.first_status,
        "first_body": base64.b64encode(stats.first or b"").decode(),
    }


def measure(url: str, path: str, body_file: Path, concurrency: int, duration: float, warmup: float,
            headers: dict[str, str] | None = None) -> dict[str, object]:
    """Run one load point in a separate process pinned to the client core; its JSON result."""
    command = [*taskset(CLIENT_CORE), sys.executable, "-m", "bench.load", url, path, str(body_file),
               str(concurrency), str(duration), str(warmup), *(f"{k}:{v}" for k, v in (headers or {}).items())]
    done = subprocess.run(command, capture_output=True, check=False, cwd=REPO,
                          timeout=duration + warmup + FIRST_ANSWER_TIMEOUT_S + 60)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.decode(errors='replace')[-2000:]}")
    result: dict[str, object] = json.loads(done.stdout)
    result["first_body"] = base64.b64decode(str(result["first_body"]))
    return result


def main() -> None:
    url, path, body_file, concurrency, duration, warmup, *header_args = sys.argv[1:]
    headers = dict(arg.split(":", 1) for arg in header_args)
    try:
        from uvloop import run as run_loop
    except ModuleNotFoundError:
        run_loop = asyncio.run
    result = run_loop(run(url, path, Path(body_file).read_bytes(), int(concurrency), float(duration),
                             float(warmup), headers))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
