"""The README's demo command, restarts that recover an interrupted deploy, and MAAS_ADMIN_TOKEN."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from maas.backends.local import LocalBackend
from maas.domain import Deployment
from maas.inference.validation import inspect_model_bytes
from maas.services.tokens import new_token_value
from maas.settings import Settings
from tests.e2e.conftest import Server, free_port, start_server, stop_server
from tests.models import scale_model

pytestmark = pytest.mark.e2e


def run_demo(home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MAAS_HOME": str(home)}
    env.pop("MAAS_ADMIN_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "maas", "demo", "--once", "--port", str(free_port())],
                          env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)


def test_demo_once_predicts_and_shows_next_steps(tmp_path: Path) -> None:
    first = run_demo(tmp_path / "home")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "setosa" in first.stdout and "virginica" in first.stdout
    assert "curl" in first.stdout and "status iris" in first.stdout and "/docs" in first.stdout
    second = run_demo(tmp_path / "home")  # same home: reuses the version instead of pushing again
    assert second.returncode == 0, second.stdout + second.stderr
    backend = LocalBackend(Settings(home=tmp_path / "home"))
    assert [v.version for v in backend.registry.list_versions("iris", 10, None).items] == [1]


def test_restart_rolls_back_a_deploy_the_crash_interrupted(tmp_path: Path) -> None:
    home = tmp_path / "home"
    server = start_server(home, tmp_path / "a.log")
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}) as http:
            http.post("/models", json={"name": "m"})
            version = http.post("/models/m/versions", json={}).json()["version"]["version"]
    finally:
        stop_server(server)
    # While the server is down, leave the store as a crash mid-deploy would: a READY version and a
    # deployment record still IN_PROGRESS.
    stuck = LocalBackend(Settings(home=home))
    assert stuck.registry.get_version("m", version).status.value == "PENDING"
    data = scale_model(1.0)
    reserved = stuck.artifacts.create_upload("m")
    stuck.artifacts.receive_upload(reserved.upload_id, io.BytesIO(data), len(data))
    second = stuck.registry.allocate_version("m", created_by="t", upload_id=reserved.upload_id)
    stored = stuck.artifacts.promote(reserved.upload_id, "m", second.version, hashlib.sha256(data).hexdigest())
    stuck.registry.mark_ready("m", second.version, stored, inspect_model_bytes(data, Settings().limits))
    stuck.registry.create_deployment(Deployment(id=uuid.uuid4().hex, model="m", version=second.version,
                                                stable_version=None))
    stuck.close()
    restarted = start_server(home, tmp_path / "b.log")
    try:
        with httpx.Client(base_url=restarted.url, headers={"Authorization": f"Bearer {restarted.token}"}) as http:
            history = http.get("/models/m/deployments").json()["items"]
            assert [d["status"] for d in history] == ["ROLLED_BACK"]
            assert history[0]["events"][-1]["detail"] == "interrupted by a server restart"
            assert http.post("/models/m/deployments", json={"version": second.version}).status_code == 201
    finally:
        stop_server(restarted)
    assert "interrupted by a restart" in (tmp_path / "b.log").read_text()


def test_maas_admin_token_from_the_environment(tmp_path: Path) -> None:
    secret = new_token_value()
    server = start_server(tmp_path / "home", tmp_path / "s.log", {"MAAS_ADMIN_TOKEN": secret})
    try:
        ok = httpx.get(f"{server.url}/models", headers={"Authorization": f"Bearer {secret}"})
        assert ok.status_code == 200
        assert httpx.get(f"{server.url}/models").status_code == 401
        assert secret not in server.log.read_text()
    finally:
        stop_server(server)


def test_demo_keeps_serving_until_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "MAAS_HOME": str(tmp_path / "home")}
    env.pop("MAAS_ADMIN_TOKEN", None)
    demo = subprocess.Popen([sys.executable, "-m", "maas", "demo", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        assert demo.stdout is not None
        printed = []
        for line in demo.stdout:  # bounded by the pytest timeout
            printed.append(line)
            if "press Ctrl-C" in line:
                break
        assert "press Ctrl-C" in printed[-1], "".join(printed)
        token = (tmp_path / "home" / "admin-token").read_text().strip()
        ready = httpx.get(f"http://127.0.0.1:{port}/v2/models/iris/ready",
                          headers={"Authorization": f"Bearer {token}"})
        assert ready.json() == {"name": "iris", "ready": True}
        demo.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/v2/health/live")


def test_a_second_server_on_the_same_home_is_refused(server: Server) -> None:
    env = {**os.environ, "MAAS_HOME": str(server.home)}
    second = subprocess.run([sys.executable, "-m", "maas", "serve", "--port", str(free_port())], env=env,
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert second.returncode == 1
    assert "another maas server is already using" in second.stderr and "Traceback" not in second.stderr
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
