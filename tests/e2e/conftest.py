"""A real `maas serve` in a subprocess on 127.0.0.1, driven by the CLI, the SDK and OIP clients."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


@dataclass
class Server:
    url: str
    port: int
    home: Path
    token: str
    process: subprocess.Popen[bytes]
    log: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "MAAS_URL": self.url, "MAAS_HOME": str(self.home), "MAAS_TOKEN": self.token}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "maas", *args], env=self.env(), capture_output=True,
                                text=True, timeout=120, stdin=subprocess.DEVNULL)
        if check:
            assert result.returncode == 0, f"maas {' '.join(args)}\n{result.stdout}\n{result.stderr}"
        return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(home: Path, log: Path, extra_env: dict[str, str] | None = None) -> Server:
    port = free_port()
    env = {**os.environ, "MAAS_HOME": str(home), **(extra_env or {})}
    env.pop("MAAS_ADMIN_TOKEN", None) if not extra_env or "MAAS_ADMIN_TOKEN" not in extra_env else None
    handle = log.open("wb")
    process = subprocess.Popen([sys.executable, "-m", "maas", "serve", "--port", str(port), "--home", str(home)],
                               env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"maas serve exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    else:
        process.kill()
        raise AssertionError(f"maas serve did not start:\n{log.read_text()}")
    token = (extra_env or {}).get("MAAS_ADMIN_TOKEN") or (home / "admin-token").read_text().strip()
    return Server(url=url, port=port, home=home, token=token, process=process, log=log)


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("e2e")
    running = start_server(root / "home", root / "server.log")
    yield running
    stop_server(running)


@pytest.fixture
def run(server: Server, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """The CLI in-process (typer's runner) against the running server: ``run("models", "list")``."""
    from typer.testing import CliRunner

    from maas.cli.main import app

    for key, value in server.env().items():
        if key.startswith("MAAS_"):
            monkeypatch.setenv(key, value)
    runner = CliRunner()

    def invoke(*args: str, code: int = 0) -> str:
        result = runner.invoke(app, list(args), catch_exceptions=False)
        assert result.exit_code == code, f"maas {' '.join(args)} -> {result.exit_code}\n{result.output}"
        return result.output

    return invoke
