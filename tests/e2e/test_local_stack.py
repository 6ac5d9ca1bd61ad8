"""The stack as ``cdk synth`` writes it, run by ``python -m infra.local`` (``make stack-local``) and
driven from outside with the CLI, the SDK, httpx and tritonclient, the way a user tries the AWS
topology on a laptop. One local stack serves the whole module (it synthesizes once).

Each wiring defect found by reviewing the template has its test here: the API function's SageMaker
target and rights, each function's log permission (the image pool's included), a rollback that waits
out an endpoint update, the bound on total bake time, per-stage endpoint names, no role that can
erase a committed model version, binary answers for clients without ``Accept``, and the payload
limits answered with a 413 problem."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.models import _serialize, failing_model, mlp_model

pytestmark = pytest.mark.e2e
START_TIMEOUT = 180.0


@dataclass
class Stack:
    url: str
    token: str
    process: subprocess.Popen[str]
    home: Path
    log: Path

    @property
    def root(self) -> str:
        return self.url.rsplit("/", 1)[0]

    def env(self, token: str | None = None) -> dict[str, str]:
        return {**os.environ, "MAAS_URL": self.url, "MAAS_TOKEN": token or self.token, "MAAS_HOME": str(self.home)}

    def cli(self, *args: str, check: bool = True, token: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "maas", *args], env=self.env(token), capture_output=True,
                                text=True, timeout=240, stdin=subprocess.DEVNULL)
        if check:
            assert result.returncode == 0, f"maas {' '.join(args)}\n{result.stdout}\n{result.stderr}"
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli("--json", *args).stdout)

    def local(self, path: str, body: dict[str, Any] | None = None) -> Any:
        if body is None:
            return httpx.get(f"{self.root}/_local/{path}", timeout=60).json()
        return httpx.post(f"{self.root}/_local/{path}", json=body, timeout=60).json()

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def assert_invariants(self) -> None:
        assert self.local("invariants") == []
        assert self.local("iam/denied") == [], "a function was refused an AWS call its code makes"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("stack-local")
    log = workdir / "stack.log"
    env = {**os.environ, "STACK_PORT": "0", "PYTHONUNBUFFERED": "1"}
    for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        env.pop(name, None)  # the local stack needs no credentials of the caller's
    with log.open("w") as errors:
        process = subprocess.Popen([sys.executable, "-m", "infra.local", "--pools", "--workdir", str(workdir)],
                                   stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL, text=True,
                                   env=env)
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()  # type: ignore[union-attr]
    found: dict[str, str] = {}
    deadline = time.monotonic() + START_TIMEOUT
    while len(found) < 2:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            process.kill()
            raise AssertionError(f"the local stack did not start:\n{log.read_text()[-4000:]}") from None
        key, _, value = line.strip().partition("=")
        if key in ("MAAS_URL", "MAAS_TOKEN"):
            found[key] = value
    home = workdir / "home"
    home.mkdir()
    try:
        yield Stack(found["MAAS_URL"], found["MAAS_TOKEN"], process, home, log)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


# -- models ---------------------------------------------------------------------------------------


def add_model(width: int) -> bytes:
    """y = x + c for a float vector x of any length n: c of shape [1] broadcasts to every n, c of
    shape [2] only to n in (1, 2) (``failing_model``): the two are the same model where both answer."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
        initializer=[numpy_helper.from_array(np.ones(width, dtype=np.float32), "c")],
    )
    return _serialize(graph)


def vector(n: int) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [n], "datatype": "FP32", "data": [0.5] * n}]}


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def wait_for(stack: Stack, deployment_id: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, Any] = httpx.get(f"{stack.url}/deployments/{deployment_id}", headers=stack.headers(),
                                          timeout=30).json()
        if found["status"] != "IN_PROGRESS" or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def infer(stack: Stack, model: str, body: dict[str, Any], prefix: str = "") -> httpx.Response:
    return httpx.post(f"{stack.url}{prefix}/v2/models/{model}/infer", json=body, headers=stack.headers(), timeout=60)


def settles_on(stack: Stack, model: str, version: str, timeout: float = 20.0) -> None:
    """Every answer comes from ``version`` once the inference functions' route cache (2 s) has caught
    up with a route change: ten answers in a row, within ``timeout``."""
    deadline = time.monotonic() + timeout
    in_a_row = 0
    while in_a_row < 10:
        answer = infer(stack, model, vector(3))
        fresh = answer.status_code == 200 and answer.headers["x-maas-model-version"] == version
        in_a_row = in_a_row + 1 if fresh else 0
        assert fresh or time.monotonic() < deadline, (answer.status_code, answer.headers, answer.text[:200])
        if not fresh:
            time.sleep(0.5)


# -- the main job: push, deploy, serve -------------------------------------------------------------


def test_multipart_push_deploy_and_both_pools_serve_json_and_binary(stack: Stack, tmp_path: Path) -> None:
    import tritonclient.http as triton

    model = mlp_model((256, 4096, 640), seed=1)  # ~15 MB: three 5 MiB parts, presigned, straight to S3
    assert len(model) > 10 * 1024 * 1024
    pushed = stack.cli_json("models", "push", "mlp", write(tmp_path, "mlp.onnx", model), "--part-size", "5")
    assert pushed["status"] == "READY" and pushed["size"] == len(model)
    done = stack.cli_json("deploy", "mlp", "1")
    assert done["status"] == "SUCCEEDED", done
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    client = triton.InferenceServerClient(stack.url.removeprefix("http://"), network_timeout=60)
    image = triton.InferenceServerClient(stack.url.removeprefix("http://") + "/image", network_timeout=60)
    answers = []
    for pool in (client, image):
        for binary in (True, False):  # tritonclient sends neither Content-Type nor Accept
            tensor = triton.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            output = triton.InferRequestedOutput("y", binary_data=binary)
            answers.append(pool.infer("mlp", [tensor], outputs=[output], headers=stack.headers()).as_numpy("y"))
    from maas.client import Client

    with Client(stack.url, stack.token, timeout=60) as sdk:  # the SDK's JSON path, the same answer
        answers.append(np.array(sdk.predict("mlp", {"x": x.tolist()})["outputs"][0]["data"],
                                dtype=np.float32).reshape(2, 640))
    for answer in answers[1:]:
        np.testing.assert_allclose(answer, answers[0], rtol=1e-6)
    assert answers[0].shape == (2, 640)
    stack.assert_invariants()
    # each function wrote its logs (and so its EMF metrics) with its own role: the image pool too
    assert stack.local("logs/lost") == {}


def test_canaries_promote_and_roll_back_on_their_own_and_by_hand(stack: Stack, tmp_path: Path) -> None:
    good, bad = write(tmp_path, "good.onnx", add_model(1)), write(tmp_path, "bad.onnx", failing_model())
    for path in (good, good, bad):
        stack.cli("models", "push", "adder", path)
    assert stack.cli_json("deploy", "adder", "1")["status"] == "SUCCEEDED"

    def traffic(stop: threading.Event, n: int) -> None:
        while not stop.is_set():
            infer(stack, "adder", vector(n))
            time.sleep(0.05)

    for version, n, expected in (("2", 3, "SUCCEEDED"), ("3", 3, "ROLLED_BACK")):
        stop = threading.Event()
        sender = threading.Thread(target=traffic, args=(stop, n), daemon=True)
        sender.start()
        try:
            started = stack.cli_json("deploy", "adder", version, "--strategy", "canary", "--canary-percent", "50",
                                     "--bake", "8", "--max-error-rate", "0.05", "--no-wait",
                                     # judged on errors only: latencies on a busy 2-core machine vary
                                     "--max-p99-ratio", "1000")
            done = wait_for(stack, started["id"])
        finally:
            stop.set()
            sender.join(10)
        assert done["status"] == expected, done
    settles_on(stack, "adder", "2")
    rolled = stack.cli_json("rollback", "adder", "--to", "1")
    assert rolled["status"] in ("ROLLED_BACK", "SUCCEEDED"), rolled
    settles_on(stack, "adder", "1")
    stack.assert_invariants()


def test_the_sagemaker_target_deploys_and_a_rollback_waits_out_an_endpoint_update(stack: Stack,
                                                                                 tmp_path: Path) -> None:
    for width in (1, 1):
        stack.cli("models", "push", "gpu", write(tmp_path, "add.onnx", add_model(width)))
    # the API function takes the sagemaker target (it has the role, image and prefix the template gives)
    first = stack.cli_json("deploy", "gpu", "1", "--target", "sagemaker")
    assert first["status"] == "SUCCEEDED", first
    endpoints = stack.local("sagemaker")
    assert list(endpoints) == ["maas-dev-gpu"]  # named per stage
    answer = infer(stack, "gpu", vector(3))
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == [1.5, 1.5, 1.5]
    # SageMaker's blue/green update takes minutes (here 12 s): the operator rolls back while it runs
    stack.local("sagemaker", {"update_seconds": 12})
    try:
        started = stack.cli_json("deploy", "gpu", "2", "--target", "sagemaker", "--no-wait")
        deadline = time.monotonic() + 60
        while stack.local("sagemaker")["maas-dev-gpu"]["status"] != "Updating":
            assert time.monotonic() < deadline, stack.local("sagemaker")
            time.sleep(0.5)
        stack.local("sagemaker", {"update_seconds": 2})
        stack.cli("rollback", "gpu")
        done = wait_for(stack, started["id"])
        assert done["status"] == "ROLLED_BACK"
        assert [e["kind"] for e in done["events"]][-2:] == ["rolled_back", "endpoint_rollback_pending"], done
        # the update lands on version 2, then the undo execution puts the endpoint back on version 1
        deadline = time.monotonic() + 240
        while True:
            endpoint = stack.local("sagemaker")["maas-dev-gpu"]
            if endpoint["status"] == "InService" and endpoint["version"] == "1":
                break
            assert time.monotonic() < deadline, endpoint
            time.sleep(1)
    finally:
        stack.local("sagemaker", {"update_seconds": 2})
    answer = infer(stack, "gpu", vector(3))
    assert answer.status_code == 200 and answer.json()["model_version"] == "1", answer.text
    stack.assert_invariants()


# -- the front door: tokens, routes, limits ---------------------------------------------------------


def test_a_revoked_token_is_refused_within_seconds_though_the_authorizer_caches_it(stack: Stack,
                                                                                   tmp_path: Path) -> None:
    stack.cli("models", "push", "door", write(tmp_path, "door.onnx", add_model(1)))
    assert stack.cli_json("deploy", "door", "1")["status"] == "SUCCEEDED"
    created = stack.cli_json("tokens", "create", "app", "--scope", "invoke", "--model", "door")
    token = created["token"]
    answer = httpx.post(f"{stack.url}/v2/models/door/infer", json=vector(2), headers=stack.headers(token), timeout=60)
    assert answer.status_code == 200, answer.text
    # an invoke token manages nothing: the function's own scope check, behind the authorizer
    assert httpx.get(f"{stack.url}/models", headers=stack.headers(token), timeout=60).status_code == 403
    stack.cli("tokens", "revoke", created["id"])
    deadline = time.monotonic() + 30
    while True:  # the authorizer's answer stays cached (300 s); the function re-checks within seconds
        answer = httpx.post(f"{stack.url}/v2/models/door/infer", json=vector(2), headers=stack.headers(token),
                            timeout=60)
        if answer.status_code == 401:
            break
        assert answer.status_code == 200 and time.monotonic() < deadline, answer.text
        time.sleep(1)
    assert answer.headers["content-type"].startswith("application/problem+json")


def test_api_gateway_answers_what_it_refuses_itself(stack: Stack) -> None:
    # no token, a malformed one, an unknown one: 401 problems, from the gateway and the authorizer
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Bearer maas_" + "x" * 40}):
        answer = httpx.get(f"{stack.url}/models", headers=headers, timeout=60)
        assert answer.status_code == 401, (headers, answer.text)
        assert answer.json()["title"] == "Unauthorized"
    # the health probes are the only public routes
    assert httpx.get(f"{stack.url}/v2/health/live", timeout=60).status_code == 200
    assert httpx.get(f"{stack.root}/other-stage/models", timeout=60).status_code == 403


def test_bodies_over_the_real_limits_get_a_413_problem(stack: Stack) -> None:
    """API Gateway takes 10 MB, but Lambda's event is 6 MB and the body arrives in it base64-encoded:
    about 4.5 MB of body get through, JSON or binary."""
    from infra.api import MAX_BODY_BYTES

    headers = {**stack.headers(), "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "2"}
    for size in (MAX_BODY_BYTES + 400_000, 11 * 1024 * 1024):
        answer = httpx.post(f"{stack.url}/v2/models/door/infer", content=b"{}" + b"\0" * size, headers=headers,
                            timeout=60)
        assert answer.status_code == 413, (size, answer.status_code, answer.text[:200])
        problem = answer.json()
        assert problem["title"] == "Payload too large" and "4.5 MB" in problem["detail"]
    # just under the limit the function itself answers (here: a body that is no OIP request)
    answer = httpx.post(f"{stack.url}/v2/models/door/infer", content=b"{}" + b"\0" * (MAX_BODY_BYTES - 300_000),
                        headers=headers, timeout=60)
    assert answer.status_code not in (413, 500, 502), answer.text[:300]


def test_a_deploy_that_would_outlast_its_execution_is_refused_and_changes_nothing(stack: Stack,
                                                                                  tmp_path: Path) -> None:
    for _ in range(2):
        stack.cli("models", "push", "slow", write(tmp_path, "slow.onnx", add_model(1)))
    assert stack.cli_json("deploy", "slow", "1")["status"] == "SUCCEEDED"
    before = httpx.get(f"{stack.url}/models/slow/deployments", headers=stack.headers(), timeout=60).json()
    # ten steps of a day each: nine days, where a Step Functions execution of the stack lasts one
    refused = stack.cli("deploy", "slow", "2", "--strategy", "linear", "--step-percent", "10", "--interval",
                        "86400", check=False)
    assert refused.returncode != 0 and "422" in refused.stdout + refused.stderr, refused
    assert "bake" in (refused.stdout + refused.stderr).lower()
    after = httpx.get(f"{stack.url}/models/slow/deployments", headers=stack.headers(), timeout=60).json()
    assert after == before


def test_no_function_role_can_erase_a_committed_model_version(stack: Stack) -> None:
    bucket = "arn:aws:s3:::maas-dev-modelstoremodelsb220db3a"
    for function in ("FunctionsApi45DE0CE2", "FunctionsCleanupA2D9A62F", "FunctionsDeployOptimizeFA0CC0B6"):
        def may(action: str, key: str, function: str = function) -> bool:
            answer = stack.local("iam/simulate", {"function": function, "action": action,
                                                  "resource": f"{bucket}/{key}"})
            return bool(answer["allowed"])

        assert may("s3:DeleteObject", "models/m/1/model.onnx")  # a delete marker hides a deleted version
        assert not may("s3:DeleteObjectVersion", "models/m/1/model.onnx"), function
        assert may("s3:DeleteObjectVersion", "uploads/abc/model.onnx")  # staged uploads are discarded


def test_the_scheduled_cleanup_runs_with_its_own_role(stack: Stack) -> None:
    (result,) = stack.local("rules/FunctionsCleanupSchedule098115CD/run", {})
    assert result["error"] is None, result
    stack.assert_invariants()
