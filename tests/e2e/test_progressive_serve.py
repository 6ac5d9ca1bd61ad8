"""Progressive delivery end to end against a real `maas serve`: a broken canary (it answers NaN) is
rolled back while the stable version answers every request, `maas status` says why, and a healthy
linear deploy shifts traffic in steps and promotes."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import httpx

from tests.e2e.conftest import Server
from tests.functional.test_progressive_deploy import nan_model
from tests.models import scale_model

REQUEST = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}


class Traffic:
    """Unversioned requests in a loop (bounded) while a deploy runs: which version answered each."""

    def __init__(self, server: Server, model: str, limit: int = 5000):
        self.answered: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(server, model, limit), daemon=True)

    def _run(self, server: Server, model: str, limit: int) -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"},
                          timeout=30) as http:
            for _ in range(limit):
                if self._stop.is_set():
                    return
                answer = http.post(f"/v2/models/{model}/infer", json=REQUEST)
                if answer.status_code == 200:
                    self.answered[answer.headers["X-Maas-Model-Version"]] += 1
                else:
                    self.failures.append(f"{answer.status_code} {answer.text[:200]}")

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def test_a_broken_canary_is_rolled_back_while_the_stable_version_serves(server: Server, tmp_path: Path) -> None:
    for number, data in ((1, scale_model(1.0)), (2, nan_model()), (3, scale_model(3.0))):
        path = tmp_path / f"v{number}.onnx"
        path.write_bytes(data)
        server.cli("models", "push", "canary-e2e", str(path))
    server.cli("deploy", "canary-e2e", "1")

    with Traffic(server, "canary-e2e") as traffic:
        broken = server.cli("deploy", "canary-e2e", "2", "--strategy", "canary", "--canary-percent", "50",
                            "--bake", "1", check=False)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "-> ROLLED_BACK" in broken.stdout and "NaN" in broken.stderr and "Traceback" not in broken.stderr
    assert traffic.failures == [] and set(traffic.answered) == {"1"}  # the NaN version never got traffic

    status = server.cli("status", "canary-e2e")
    assert "ROLLED_BACK" in status.stdout and "smoke_test_failed" in status.stdout and "NaN" in status.stdout

    with Traffic(server, "canary-e2e") as traffic:
        healthy = server.cli("deploy", "canary-e2e", "3", "--strategy", "linear", "--step-percent", "50",
                             "--bake", "1", "--max-error-rate", "0.05")
    assert "-> SUCCEEDED" in healthy.stdout
    assert traffic.failures == [] and set(traffic.answered) <= {"1", "3"}
    status = server.cli("status", "canary-e2e").stdout
    assert "50% to version 3" in status and "health_checked" in status and "promoted" in status
