"""Input-dependent bombs (``tests/bombs.py``) against both backends, from outside: a real ``maas serve``
on 127.0.0.1 (HTTP, the SDK, an invoke token) and the inference Lambda's handler under moto, each in a
process of its own with its own memory cap.

For each bomb: the harmless request is answered, the hostile one hits its bound with the problem that
names it, the server's resident memory stays near where it was, and the model answers again after.
On ``maas serve`` also: health answers while a Loop bomb runs, and a model that explodes only on the
deploy smoke test's inputs is rolled back without touching the server's memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from maas.client import Client, DeploymentFailed, MaasClientError
from tests.bombs import corpus, smoke_bomb
from tests.e2e.conftest import Server, start_server, stop_server

MIB = 1024 * 1024
SERVE_CAP = 384 * MIB
SLACK = 48 * MIB
ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {"memory": (422, "memory-limit-exceeded", "inference_memory_bytes"),
            "time": (504, "inference-timeout", "max_inference_seconds"),
            "output": (422, "output-too-large", "max_output_bytes")}


def server_rss(server: Server) -> int:
    import os

    with open(f"/proc/{server.process.pid}/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def bombed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Client]]:
    root = tmp_path_factory.mktemp("bombs")
    server = start_server(root / "home", root / "server.log", {
        "MAAS_INFERENCE_MEMORY_BYTES": str(SERVE_CAP), "MAAS_MAX_INFERENCE_SECONDS": "2",
        "MAAS_MAX_OUTPUT_BYTES": str(16 * MIB), "MAAS_VALIDATION_TIMEOUT_S": "30"})
    client = Client(server.url, server.token, timeout=60)
    try:
        for bomb in corpus():
            path = root / f"{bomb.name}.onnx"
            path.write_bytes(bomb.model)
            name = bomb.name.replace("_", "-")
            client.push(name, path)
            client.deploy(name, 1)
        yield server, client
    finally:
        client.close()
        stop_server(server)


def infer(server: Server, name: str, inputs: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{name}/infer", json={"inputs": inputs}, timeout=60,
                      headers={"Authorization": f"Bearer {server.token}"})


@pytest.mark.parametrize("bomb", corpus(), ids=lambda bomb: bomb.name)
def test_each_bomb_hits_its_bound_on_maas_serve_and_the_server_recovers(bombed: tuple[Server, Client],
                                                                        bomb: Any) -> None:
    server, _ = bombed
    name = bomb.name.replace("_", "-")
    harmless = infer(server, name, bomb.harmless)
    assert harmless.status_code == 200, harmless.text
    before = server_rss(server)
    hostile = infer(server, name, bomb.hostile)
    status, kind, bound = EXPECTED[bomb.bound]
    assert hostile.status_code == status, hostile.text
    problem = hostile.json()
    assert problem["type"].endswith(kind) and bound in problem["detail"], problem
    assert server_rss(server) - before < SLACK
    again = infer(server, name, bomb.harmless)
    assert again.status_code == 200 and again.json()["outputs"] == harmless.json()["outputs"]


def test_health_answers_while_a_loop_bomb_runs(bombed: tuple[Server, Client]) -> None:
    server, _ = bombed
    loop = next(bomb for bomb in corpus() if bomb.name == "loop")
    answer: dict[str, httpx.Response] = {}
    worker = threading.Thread(target=lambda: answer.setdefault("loop", infer(server, "loop", loop.hostile)))
    worker.start()
    waits = []
    time.sleep(0.3)  # the loop is running
    while worker.is_alive() and len(waits) < 20:
        started = time.monotonic()
        assert httpx.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200
        waits.append(time.monotonic() - started)
        time.sleep(0.05)
    worker.join()
    assert answer["loop"].status_code == 504
    assert waits and max(waits) < 1.0, waits  # the event loop never ran the model


def test_a_model_that_explodes_on_the_smoke_inputs_is_rolled_back_outside_the_server(
        bombed: tuple[Server, Client], tmp_path: Path) -> None:
    server, client = bombed
    path = tmp_path / "smoke-bomb.onnx"
    path.write_bytes(smoke_bomb())
    client.push("smoke-bomb", path)  # validation runs zeros: accepted
    before = server_rss(server)
    with pytest.raises((DeploymentFailed, MaasClientError)) as failed:
        client.deploy("smoke-bomb", 1)
    reason = json.dumps(failed.value.deployment) if isinstance(failed.value, DeploymentFailed) else str(failed.value)
    assert "smoke test" in reason and ("memory" in reason or "allocate" in reason), reason
    assert server_rss(server) - before < SLACK  # ~8 GB was asked for, in the sandbox's child
    assert infer(server, "smoke-bomb", [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0.0]}]).status_code \
        in (404, 409)  # nothing serves it


@pytest.fixture(scope="module")
def lambda_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("lambda-bombs")
    result = subprocess.run([sys.executable, "-m", "tests.lambda_probe", str(workdir)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("bomb", corpus(), ids=lambda bomb: bomb.name)
def test_each_bomb_hits_its_bound_on_the_inference_lambda(lambda_outcomes: dict[str, Any], bomb: Any) -> None:
    from tests.lambda_probe import LAMBDA_MEMORY_MB

    outcome = lambda_outcomes["bombs"][bomb.name]
    assert outcome["harmless"]["status"] == 200, outcome["harmless"]
    hostile = outcome["hostile"]
    status, kind, bound = EXPECTED[bomb.bound]
    assert (hostile["status"], hostile["type"]) == (status, kind), hostile
    assert bound in hostile["detail"]
    assert hostile["rss_after"] - hostile["rss_before"] < SLACK
    assert outcome["again"]["status"] == 200 and outcome["again"]["outputs"] == outcome["harmless"]["outputs"]
    # the cap follows the function's memory: half of what the process does not keep for itself
    assert lambda_outcomes["cap"] == (LAMBDA_MEMORY_MB - 384) * MIB // 2
