"""Deploys on AWS end to end under moto: the API (over an AwsBackend with a state machine) answers 202
and starts an execution; moto runs a state machine generated from ``WORKFLOW`` / ``ROLLBACK`` the way
``infra/deploy_workflow.py`` builds it (a Lambda task per step, Retry on ``retry_on``, Catch
``States.ALL`` into rollback with the error at ``$.failure``), and its Lambda tasks run the entries of
``functions/deploy/handler.py`` in-process. Clients see IN_PROGRESS, then the final status: the SDK
and ``maas deploy`` wait for it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from maas.api import create_app
from maas.backends.aws import AwsBackend
from maas.backends.aws.table import create_table
from maas.cli.main import app as cli_app
from maas.cli.serve import bind_socket, make_server
from maas.client import Client, DeploymentFailed
from maas.services.deploy import ROLLBACK, WORKFLOW
from maas.services.tokens import TokenService
from maas.settings import ENV_STATE_MACHINE, Settings
from tests.conftest import HOST, TEST_BUCKET, TEST_TABLE, _serialize_moto_dynamodb, break_artifact, push
from tests.functions import LambdaContext, load_handler
from tests.models import InProcessValidator, scale_model
from tests.state_machine import deploy_definition

ACCOUNT_REGION = "us-east-1:123456789012"
ROLE = "arn:aws:iam::123456789012:role/maas-test-deploy"
FUNCTION_PREFIX = "maas-test-deploy-"
ONES = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}


def definition() -> str:
    """The ASL ``infra/deploy_workflow.py`` generates (the real construct), invoking moto's functions."""
    prefix = f"arn:aws:lambda:{ACCOUNT_REGION}:function:{FUNCTION_PREFIX}"
    return deploy_definition({step.name.value: prefix + step.name.value for step in (*WORKFLOW, ROLLBACK)})


@dataclass
class Aws:
    backend: AwsBackend
    handler: ModuleType
    state_machine_arn: str
    token: str
    invocations: list[str]
    #: cleared: Lambda holds every task until it is set again (a slow cold start, a long model load)
    running: threading.Event
    #: entries whose Lambda dies (a timeout of the function, not an error of the step)
    crashing: set[str]

    def executions(self) -> list[dict[str, Any]]:
        client = boto3.client("stepfunctions")
        return [client.describe_execution(executionArn=e["executionArn"])
                for e in client.list_executions(stateMachineArn=self.state_machine_arn)["executions"]]


@pytest.fixture
def aws(aws_credentials: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, settings: Settings) -> Iterator[Aws]:
    from moto import mock_aws
    from moto.awslambda_simple.models import LambdaSimpleBackend

    _serialize_moto_dynamodb(monkeypatch)
    invocations: list[str] = []
    crashing: set[str] = set()
    modules: dict[str, ModuleType] = {}
    running = threading.Event()
    running.set()

    def invoke(self: Any, function_name: str, qualifier: Any, body: Any, headers: Any,
               response_headers: dict[str, str]) -> bytes:
        """Lambda's synchronous invoke of a deploy task: the handler entry named by the function,
        its exception reported as Lambda does (``errorType`` is the class name)."""
        entry = function_name.rsplit(":", 1)[-1].removeprefix(FUNCTION_PREFIX)
        running.wait(30)
        invocations.append(entry)
        event = json.loads(body) if body else {}
        if entry in crashing:
            response_headers["x-amz-function-error"] = "Unhandled"
            return json.dumps({"errorMessage": "Task timed out after 300.00 seconds",
                               "errorType": "Sandbox.Timedout"}).encode()
        try:
            result = getattr(modules["deploy"], entry)(event, LambdaContext(function_name=function_name))
        except Exception as error:
            response_headers["x-amz-function-error"] = "Unhandled"
            return json.dumps({"errorMessage": str(error), "errorType": type(error).__name__,
                               "stackTrace": ['  File "/var/task/handler.py"']}).encode()
        return json.dumps(result).encode()

    monkeypatch.setattr(LambdaSimpleBackend, "invoke", invoke)
    for name, value in {"MAAS_BUCKET": TEST_BUCKET, "MAAS_TABLE": TEST_TABLE, "MAAS_HOME": str(settings.home),
                        "POWERTOOLS_METRICS_NAMESPACE": "maas"}.items():
        monkeypatch.setenv(name, value)
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}, "lambda": {"use_docker": False}}):
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=TEST_BUCKET)
        s3.put_bucket_versioning(Bucket=TEST_BUCKET, VersioningConfiguration={"Status": "Enabled"})
        create_table(boto3.client("dynamodb"), TEST_TABLE)
        arn = boto3.client("stepfunctions").create_state_machine(
            name="maas-test-deploy", definition=definition(), roleArn=ROLE)["stateMachineArn"]
        monkeypatch.setenv(ENV_STATE_MACHINE, arn)
        modules["deploy"] = load_handler("deploy", "maas_fn_deploy_steps")
        backend = AwsBackend.from_env(settings, validator=InProcessValidator(settings))
        _, token = TokenService(backend.registry).create("admin", ["admin"], created_by="test")
        yield Aws(backend, modules["deploy"], arn, token, invocations, running, crashing)
        running.set()


@pytest.fixture
def api(aws: Aws, settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(aws.backend, settings), base_url=f"http://{HOST}") as client:
        client.headers["Authorization"] = f"Bearer {aws.token}"
        yield client


def finished(client: TestClient, deployment_id: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get(f"/deployments/{deployment_id}").json()
        if body["status"] != "IN_PROGRESS" or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_a_rollback_that_cannot_finish_ends_in_its_own_fail_state(aws: Aws, api: TestClient) -> None:
    """The Rollback task has a Catch of its own: a rollback Lambda that dies ends the execution in
    RollbackFailed (which the FailedRollbacks alarm counts), not in the clean DeployFailed."""
    push(api, "m", scale_model(1.0))
    assert finished(api, api.post("/models/m/deployments", json={"version": 1}).json()["id"])["status"] == "SUCCEEDED"
    broken = push(api, "m", scale_model(2.0), create=False)
    break_artifact(aws.backend, broken)
    aws.crashing.add("rollback")
    started = api.post("/models/m/deployments", json={"version": 2})
    assert started.status_code == 202
    client = boto3.client("stepfunctions")
    deadline = time.monotonic() + 20
    while any(e["status"] == "RUNNING" for e in aws.executions()) and time.monotonic() < deadline:
        time.sleep(0.05)
    failed = [e for e in aws.executions() if e["status"] == "FAILED"]
    assert len(failed) == 1, aws.executions()
    history = client.get_execution_history(executionArn=failed[0]["executionArn"])["events"]
    entered = [e["stateEnteredEventDetails"]["name"] for e in history if e["type"] == "FailStateEntered"]
    assert entered == ["RollbackFailed"]
    assert aws.invocations[-2:] == ["smoke_test", "rollback"]
    # The deployment is left as the rollback found it: in flight, for the alarm and a manual rollback.
    assert api.get(f"/deployments/{started.json()['id']}").json()["status"] == "IN_PROGRESS"


def test_the_state_machine_deploys_and_rolls_back(aws: Aws, api: TestClient) -> None:
    push(api, "m", scale_model(1.0))
    started = api.post("/models/m/deployments", json={"version": 1})
    assert started.status_code == 202 and started.json()["status"] == "IN_PROGRESS", started.text
    done = finished(api, started.json()["id"])
    assert done["status"] == "SUCCEEDED", done
    assert [e["kind"] for e in done["events"]] == ["started", "validated", "smoke_test_passed", "promoted"]
    assert api.post("/v2/models/m/infer", json=ONES).headers["X-Maas-Model-Version"] == "1"

    broken = push(api, "m", scale_model(2.0), create=False)
    break_artifact(aws.backend, broken)
    started = api.post("/models/m/deployments", json={"version": 2})
    assert started.status_code == 202
    failed = finished(api, started.json()["id"])
    assert failed["status"] == "FAILED"
    assert [e["kind"] for e in failed["events"]] == ["started", "validated", "smoke_test_failed"]
    assert "sha256" in failed["events"][-1]["detail"] or "missing" in failed["events"][-1]["detail"]
    assert "/var/task" not in failed["events"][-1]["detail"]
    answer = api.post("/v2/models/m/infer", json=ONES)  # the stable version keeps serving
    assert answer.status_code == 200 and answer.headers["X-Maas-Model-Version"] == "1"
    deadline = time.monotonic() + 10  # the execution ends just after the rollback task's write
    while any(e["status"] == "RUNNING" for e in aws.executions()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(e["status"] for e in aws.executions()) == ["FAILED", "SUCCEEDED"]
    assert aws.invocations == ["validate", "optimize", "smoke_test", "shift_traffic", "check_health", "promote",
                               "validate", "optimize", "smoke_test", "rollback"]


def test_the_sdk_waits_for_a_deployment_the_workflow_runs(aws: Aws, api: TestClient) -> None:
    push(api, "m", scale_model(1.0))
    seen: list[str] = []
    with Client(token=aws.token, http_client=api) as sdk:
        final = sdk.deploy("m", 1, poll_interval=0.05, on_update=lambda d: seen.append(d["status"]))
        assert final["status"] == "SUCCEEDED" and seen[-1] == "SUCCEEDED"
        broken = push(api, "m", scale_model(2.0), create=False)
        break_artifact(aws.backend, broken)
        with pytest.raises(DeploymentFailed) as raised:
            sdk.deploy("m", 2, poll_interval=0.05)
        assert raised.value.deployment["status"] == "FAILED"
        assert "smoke_test_failed" in str(raised.value)
        accepted = sdk.deploy("m", 1, wait=False)
        assert accepted["status"] == "IN_PROGRESS"
        assert sdk.wait_for_deployment(accepted["id"], poll_interval=0.05)["status"] == "SUCCEEDED"


@pytest.fixture
def server(aws: Aws, settings: Settings) -> Iterator[str]:
    """The same API on a real socket (uvicorn in a thread) for the CLI."""
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    uvicorn = make_server(create_app(aws.backend, settings), "127.0.0.1", port, "warning")
    thread = threading.Thread(target=uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uvicorn.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uvicorn.should_exit = True
        thread.join(10)
        sock.close()


def deployment_json(stdout: str) -> dict[str, Any]:
    """The deployment ``maas --json deploy`` printed, among the JSON log lines the deploy tasks (run
    by the state machine's thread in this process) printed to the same stdout meanwhile."""
    decoder, index, found = json.JSONDecoder(), 0, []
    while index < len(stdout):
        if stdout[index].isspace():
            index += 1
            continue
        document, index = decoder.raw_decode(stdout, index)
        found.append(document)
    deployments = [d for d in found if isinstance(d, dict) and "events" in d]
    assert len(deployments) == 1, stdout
    return deployments[0]


def test_maas_deploy_follows_a_202_deployment_to_the_end(aws: Aws, api: TestClient, server: str) -> None:
    push(api, "m", scale_model(1.0))
    runner = CliRunner()

    def maas(*args: str) -> Any:
        return runner.invoke(cli_app, ["--url", server, "--token", aws.token, *args])

    ok = maas("deploy", "m", "1")
    assert ok.exit_code == 0, ok.output
    assert "-> SUCCEEDED" in ok.stdout
    assert finished(api, api.get("/models/m/deployments").json()["items"][0]["id"])["status"] == "SUCCEEDED"

    broken = push(api, "m", scale_model(2.0), create=False)
    break_artifact(aws.backend, broken)
    bad = maas("deploy", "m", "2")
    assert bad.exit_code == 1
    assert "-> FAILED" in bad.stdout
    assert "smoke_test_failed" in bad.stderr and "Traceback" not in bad.output

    as_json = maas("--json", "deploy", "m", "1")
    assert as_json.exit_code == 0 and deployment_json(as_json.stdout)["status"] == "SUCCEEDED"

    no_wait = maas("deploy", "m", "1", "--no-wait")
    assert no_wait.exit_code == 0 and "-> IN_PROGRESS" in no_wait.stdout
    finished(api, api.get("/models/m/deployments").json()["items"][0]["id"])

    # a deployment cancelled while the CLI waits (a manual rollback) ends ROLLED_BACK: exit 1
    aws.running.clear()

    def cancel() -> None:
        api.post("/models/m/rollback")
        aws.running.set()

    timer = threading.Timer(0.5, cancel)
    timer.start()
    cancelled = maas("deploy", "m", "1")
    timer.join()
    assert cancelled.exit_code == 1, cancelled.output
    assert "-> ROLLED_BACK" in cancelled.stdout and "rolled back" in cancelled.stderr

    aws.running.clear()
    timed_out = maas("deploy", "m", "1", "--timeout", "0.3")
    assert timed_out.exit_code == 1 and "still IN_PROGRESS after 0.3s" in timed_out.stderr
    aws.running.set()
    assert finished(api, api.get("/models/m/deployments").json()["items"][0]["id"])["status"] == "SUCCEEDED"


def put_version_metrics(model: str, version: int, *, invocations: int, errors: int, latency_ms: float) -> None:
    """What the inference function's EMF lines become in CloudWatch (namespace maas, model + version)."""
    dimensions = [{"Name": "model", "Value": model}, {"Name": "version", "Value": str(version)}]
    boto3.client("cloudwatch").put_metric_data(Namespace="maas", MetricData=[
        {"MetricName": "Invocations", "Dimensions": dimensions, "Value": invocations, "Unit": "Count"},
        {"MetricName": "Errors", "Dimensions": dimensions, "Value": errors, "Unit": "Count"},
        {"MetricName": "ModelLatency", "Dimensions": dimensions, "Value": latency_ms, "Unit": "Milliseconds"},
    ])


@pytest.mark.parametrize(("strategy", "options", "weights"), [
    ("canary", {"canary_percent": 25}, [25.0]),
    ("linear", {"linear_step_percent": 40, "linear_interval_seconds": 0}, [40.0, 80.0]),
])
def test_the_state_machine_loops_through_traffic_steps_and_promotes(
        aws: Aws, api: TestClient, moto_percentiles: None, strategy: str, options: dict[str, Any],
        weights: list[float]) -> None:
    push(api, "m", scale_model(1.0))
    assert finished(api, api.post("/models/m/deployments", json={"version": 1}).json()["id"])["status"] == "SUCCEEDED"
    push(api, "m", scale_model(2.0), create=False)
    put_version_metrics("m", 2, invocations=50, errors=0, latency_ms=3.0)  # a healthy canary
    aws.invocations.clear()
    started = api.post("/models/m/deployments", json={"version": 2, "strategy": strategy, "bake_seconds": 0,
                                                      **options})
    assert started.status_code == 202, started.text
    done = finished(api, started.json()["id"])
    assert done["status"] == "SUCCEEDED", done
    shifted = [e["detail"] for e in done["events"] if e["kind"] == "traffic_shifted"]
    assert [float(detail.split("%")[0]) for detail in shifted] == weights
    # the real definition's Wait + Choice loop: one shift and one health check per traffic step, then promote
    loop = ["shift_traffic", "check_health"] * len(weights)
    assert aws.invocations == ["validate", "optimize", "smoke_test", *loop, "promote"]
    assert api.post("/v2/models/m/infer", json=ONES).headers["X-Maas-Model-Version"] == "2"


def test_an_unhealthy_bake_is_caught_into_rollback_and_the_stable_version_serves(
        aws: Aws, api: TestClient, moto_percentiles: None) -> None:
    push(api, "m", scale_model(1.0))
    assert finished(api, api.post("/models/m/deployments", json={"version": 1}).json()["id"])["status"] == "SUCCEEDED"
    push(api, "m", scale_model(2.0), create=False)
    put_version_metrics("m", 2, invocations=40, errors=10, latency_ms=3.0)  # 25% errors
    aws.invocations.clear()
    started = api.post("/models/m/deployments", json={"version": 2, "strategy": "canary", "canary_percent": 10,
                                                      "bake_seconds": 0, "thresholds": {"max_error_rate": 0.05}})
    assert started.status_code == 202, started.text
    done = finished(api, started.json()["id"])
    assert done["status"] == "ROLLED_BACK", done
    assert "25.00%" in done["events"][-1]["detail"], done["events"][-1]
    assert aws.invocations == ["validate", "optimize", "smoke_test", "shift_traffic", "check_health", "rollback"]
    answer = api.post("/v2/models/m/infer", json=ONES)
    assert answer.status_code == 200 and answer.headers["X-Maas-Model-Version"] == "1"
    deadline = time.monotonic() + 10
    while any(e["status"] == "RUNNING" for e in aws.executions()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(e["status"] for e in aws.executions()) == ["FAILED", "SUCCEEDED"]  # Rollback -> DeployFailed
