"""The deploy workflow (maas.services.deploy): each step on its own (idempotent, harmless on a cancelled
deployment, rollback from a Step Functions Catch payload), the in-process executor behind
DeploymentService (retries, rollback that keeps the stable version serving), on both backends; and on
AWS the Step Functions executor under moto, with the API answering 202 while the workflow runs."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from fastapi.testclient import TestClient

from maas import errors
from maas.api import create_app
from maas.backends.aws import AwsBackend
from maas.backends.aws.workflow import StepFunctionsExecutor
from maas.domain import Deployment, DeploymentStatus, ModelVersion, UploadPlan
from maas.errors import (
    Conflict,
    InferenceFailed,
    InvalidInput,
    MaasError,
    NotFound,
    StorageCorrupted,
    Throttled,
    Unavailable,
)
from maas.inference.engine import InferenceEngine
from maas.ports import NullMetrics
from maas.services.deploy import (
    DONE_EVENTS,
    DONE_PATH,
    LOOP_CHOICE_AFTER,
    LOOP_START,
    ROLLBACK,
    TRANSIENT_ERRORS,
    WAIT_AFTER,
    WAIT_SECONDS_PATH,
    WORKFLOW,
    DeployWorkflow,
    InProcessExecutor,
    StepFailure,
    StepInput,
    StepName,
)
from maas.services.deployments import DeploymentService
from maas.services.invariants import artifact_of, check_invariants
from maas.services.models import ModelService
from maas.services.tokens import TokenService
from maas.settings import ENV_STATE_MACHINE, Settings
from tests.conftest import HOST, TEST_BUCKET, TEST_TABLE, break_artifact, push
from tests.models import InProcessValidator, scale_model
from tests.security.test_faults import FaultyClient

ONES = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}
STATE_MACHINE = "arn:aws:states:us-east-1:123456789012:stateMachine:maas-test-deploy"
ROLE = "arn:aws:iam::123456789012:role/maas-test-deploy"
DEFINITION = json.dumps({"StartAt": "Done", "States": {"Done": {"Type": "Succeed"}}})


@dataclass
class World:
    backend: Any
    models: ModelService
    workflow: DeployWorkflow
    deployments: DeploymentService

    def push(self, data: bytes, name: str = "m") -> ModelVersion:
        digest = hashlib.sha256(data).hexdigest()
        pending = self.models.begin_version(name, plan=UploadPlan(size=len(data), sha256=digest))
        self.backend.artifacts.receive_upload(pending.upload.upload_id, io.BytesIO(data), len(data))
        return self.models.commit_version(name, pending.version.version, sha256=digest, size=len(data))

    def started(self, version: int, name: str = "m") -> Deployment:
        """A deployment as ``DeploymentService.deploy`` records it before the first step runs."""
        route = self.backend.registry.get_route(name)
        record = Deployment(id=uuid.uuid4().hex, model=name, version=version,
                            stable_version=route.stable_version if route else None)
        return self.backend.registry.create_deployment(record.with_event("started", f"deploying version {version}"))

    def get(self, deployment: Deployment | str) -> Deployment:
        return self.backend.registry.get_deployment(deployment if isinstance(deployment, str) else deployment.id)

    def history(self, name: str = "m") -> list[Deployment]:
        return self.backend.registry.list_deployments(name, 100, None).items

    def stable(self, name: str = "m") -> int | None:
        route = self.backend.registry.get_route(name)
        return None if route is None else route.stable_version


def engine_for(backend: Any, settings: Settings) -> InferenceEngine:
    def read(version: ModelVersion) -> bytes:
        assert version.sha256 is not None
        try:
            return backend.artifacts.read(artifact_of(version.sha256, version.size, version.storage_key,
                                                      version.storage_version_id))
        except NotFound:
            raise StorageCorrupted("the artifact is missing") from None

    return InferenceEngine(read, settings.limits, NullMetrics())


def make_world(backend: Any, settings: Settings, smoke_test: Callable[[ModelVersion], None] | None = None,
               executor: Any = None) -> World:
    models = ModelService(backend.registry, backend.artifacts, InProcessValidator(settings), settings.limits)
    smoke = smoke_test or engine_for(backend, settings).warm
    return World(backend=backend, models=models, workflow=DeployWorkflow(backend.registry, models, smoke),
                 deployments=DeploymentService(backend.registry, models, smoke_test=smoke, executor=executor))


@pytest.fixture
def world(backend: Any, settings: Settings) -> World:
    made = make_world(backend, settings)
    made.models.create_model("m")
    return made


def payload(deployment: Deployment, failure: dict[str, str] | None = None, *, done: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": deployment.model, "deployment_id": deployment.id, "wait_seconds": 0,
                            "done": done}
    if failure is not None:
        body["failure"] = failure
    return body


def kinds(deployment: Deployment) -> list[str]:
    return [event.kind for event in deployment.events]


# -- the step list -----------------------------------------------------------------------------------


def test_the_step_list_names_real_errors_and_steps() -> None:
    assert [step.name for step in WORKFLOW] == [StepName.VALIDATE, StepName.OPTIMIZE, StepName.SMOKE_TEST,
                                                StepName.SHIFT_TRAFFIC, StepName.CHECK_HEALTH, StepName.PROMOTE]
    assert (WAIT_AFTER, LOOP_CHOICE_AFTER, LOOP_START) == (StepName.SHIFT_TRAFFIC, StepName.CHECK_HEALTH,
                                                           StepName.SHIFT_TRAFFIC)
    assert (WAIT_SECONDS_PATH, DONE_PATH) == ("$.wait_seconds", "$.done")
    assert ROLLBACK.name is StepName.ROLLBACK
    for step in (*WORKFLOW, ROLLBACK):
        assert step.description and "\n" not in step.description
        for name in step.retry_on:
            assert issubclass(getattr(errors, name), MaasError), name
    assert TRANSIENT_ERRORS == ("Throttled", "Unavailable")
    assert all(issubclass(getattr(errors, name), MaasError) for name in TRANSIENT_ERRORS)
    assert set(DONE_EVENTS) == {step.name for step in WORKFLOW}


@pytest.mark.parametrize(("body", "field"), [
    ({"model": "Bad!", "deployment_id": "abc"}, "model"),
    ({"deployment_id": "abc"}, "model"),
    ({"model": 7, "deployment_id": "abc"}, "model"),
    ({"model": "m", "deployment_id": "../etc"}, "deployment_id"),
    ({"model": "m", "deployment_id": "a" * 65}, "deployment_id"),
    ({"model": "m", "deployment_id": ""}, "deployment_id"),
    ({"model": "m", "deployment_id": "abc", "failure": {"Cause": "no error name"}}, "failure.Error"),
    ("not an object", "input"),
])
def test_step_input_errors_name_the_field(body: Any, field: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        StepInput.from_payload(body)
    assert raised.value.field == field


def test_step_input_round_trips_the_state_json() -> None:
    state = {"model": "m", "deployment_id": "abc123", "failure": {"Error": "Unavailable", "Cause": "{}"},
             "ignored": {"extra": True}}
    parsed = StepInput.from_payload(state)
    assert parsed.failure == StepFailure(Error="Unavailable", Cause="{}")
    assert parsed.dump() == {"model": "m", "deployment_id": "abc123", "wait_seconds": 0, "done": False,
                             "failure": {"Error": "Unavailable", "Cause": "{}"}}
    assert parsed.forward().dump() == {"model": "m", "deployment_id": "abc123", "wait_seconds": 0, "done": False}
    assert parsed.forward(wait_seconds=5, done=True).dump() == {"model": "m", "deployment_id": "abc123",
                                                                "wait_seconds": 5, "done": True}
    assert StepInput(model="m", deployment_id="a" * 64).failure is None


# -- each step ---------------------------------------------------------------------------------------


def test_every_step_is_idempotent(world: World) -> None:
    world.deployments.deploy("m", world.push(scale_model(1.0)).version)
    record = world.started(world.push(scale_model(2.0)).version)
    for step in WORKFLOW:
        first = world.workflow.run_step(step.name, payload(record))
        second = world.workflow.run_step(step.name.value, payload(record))  # a Step Functions retry
        assert first == second == payload(record, done=step.name is StepName.CHECK_HEALTH)
    done = world.get(record)
    assert done.status is DeploymentStatus.SUCCEEDED and done.stable_version == 2
    assert kinds(done) == ["started", "validated", "smoke_test_passed", "promoted"]
    assert world.stable() == 2
    # a rollback after the fact (a late Catch) changes nothing
    world.workflow.run_step(StepName.ROLLBACK, payload(record, {"Error": "Unavailable", "Cause": ""}))
    assert world.get(record) == done
    assert check_invariants(world.backend.registry, world.backend.artifacts) == []


def test_steps_leave_a_cancelled_deployment_alone(world: World) -> None:
    world.deployments.deploy("m", world.push(scale_model(1.0)).version)
    record = world.started(world.push(scale_model(2.0)).version)
    world.workflow.validate(StepInput.from_payload(payload(record)))
    world.deployments.rollback("m")  # a manual rollback cancels the deploy in flight
    cancelled = world.get(record)
    assert cancelled.status is DeploymentStatus.ROLLED_BACK
    for step in WORKFLOW:
        with pytest.raises(Conflict):  # so the state machine's Catch takes the rollback path
            world.workflow.run_step(step.name, payload(record))
    world.workflow.run_step(StepName.ROLLBACK, payload(record, {"Error": "Conflict", "Cause": ""}))
    assert world.get(record) == cancelled
    assert world.stable() == 1


def test_rollback_records_the_failure_a_catch_hands_it(world: World) -> None:
    world.deployments.deploy("m", world.push(scale_model(1.0)).version)
    record = world.started(world.push(scale_model(2.0)).version)
    world.workflow.run_step(StepName.VALIDATE, payload(record))
    # What Step Functions' Catch puts at $.failure for a Lambda task that raised
    cause = {"errorMessage": "model storage is temporarily unavailable; retry in a moment",
             "errorType": "Unavailable", "requestId": "7d1c",
             "stackTrace": ['  File "/var/task/handler.py", line 1, in smoke_test\n']}
    caught = payload(record, {"Error": "Unavailable", "Cause": json.dumps(cause)})
    assert world.workflow.run_step(StepName.ROLLBACK, caught) == payload(record)
    failed = world.get(record)
    assert failed.status is DeploymentStatus.FAILED
    assert kinds(failed) == ["started", "validated", "smoke_test_failed"]
    assert failed.events[-1].detail == cause["errorMessage"]
    assert world.workflow.run_step(StepName.ROLLBACK, caught) == payload(record)  # once
    assert world.get(record) == failed
    assert world.stable() == 1  # the stable version keeps serving


@pytest.mark.parametrize(("error", "cause", "detail"), [
    ("States.Timeout", "", "States.Timeout"),
    ("KeyError", '{"errorMessage": "/var/task/secret.py", "errorType": "KeyError"}', "KeyError"),
    ("Conflict", "not JSON", "not JSON"),
])
def test_rollback_never_shows_the_cause_of_foreign_errors(world: World, error: str, cause: str,
                                                          detail: str) -> None:
    record = world.started(world.push(scale_model(1.0)).version)
    world.workflow.run_step(StepName.ROLLBACK, payload(record, {"Error": error, "Cause": cause}))
    failed = world.get(record)
    assert failed.status is DeploymentStatus.FAILED
    assert (failed.events[-1].kind, failed.events[-1].detail) == ("validate_failed", detail)
    assert world.stable() is None  # a first deploy that failed serves nothing


def test_promote_needs_a_passed_smoke_test_and_an_existing_deployment(world: World) -> None:
    record = world.started(world.push(scale_model(1.0)).version)
    with pytest.raises(Conflict):
        world.workflow.run_step(StepName.PROMOTE, payload(record))
    with pytest.raises(NotFound):
        world.workflow.run_step(StepName.VALIDATE, {"model": "m", "deployment_id": "f" * 32})
    with pytest.raises(NotFound):  # a deployment of another model
        world.workflow.run_step(StepName.VALIDATE, {"model": "other", "deployment_id": record.id})
    with pytest.raises(InvalidInput) as raised:
        world.workflow.run_step("deploy_everything", payload(record))
    assert raised.value.field == "step"
    # a rollback of a deployment that no longer exists has nothing to do
    assert world.workflow.run_step(StepName.ROLLBACK, {"model": "m", "deployment_id": "f" * 32}) == {
        "model": "m", "deployment_id": "f" * 32, "wait_seconds": 0, "done": False}
    assert world.get(record).status is DeploymentStatus.IN_PROGRESS


# -- the in-process executor ------------------------------------------------------------------------


def test_a_failed_smoke_test_rolls_back_and_the_stable_version_serves(world: World) -> None:
    world.deployments.deploy("m", world.push(scale_model(1.0)).version)
    broken = world.push(scale_model(2.0))
    break_artifact(world.backend, broken.model_dump(mode="json"))
    with pytest.raises(StorageCorrupted):  # today's answer: the smoke test's error
        world.deployments.deploy("m", broken.version)
    failed = world.history()[0]
    assert failed.status is DeploymentStatus.FAILED
    assert kinds(failed) == ["started", "validated", "smoke_test_failed"]
    assert "sha256" in failed.events[-1].detail or "missing" in failed.events[-1].detail
    assert world.stable() == 1
    # nothing blocks the model: the next deploy runs
    assert world.deployments.deploy("m", world.push(scale_model(3.0)).version).stable_version == 3


def test_transient_errors_are_retried_and_others_are_not(backend: Any, settings: Settings) -> None:
    calls: list[int] = []
    failures: dict[int, MaasError] = {1: Unavailable("storage hiccup"), 3: Throttled("slow down"),
                                      4: Throttled("slow down"), 5: Throttled("slow down"),
                                      6: InferenceFailed("the model does not load")}
    warm = engine_for(backend, settings).warm

    def flaky_storage(version: ModelVersion) -> None:
        calls.append(version.version)
        failure = failures.get(len(calls))
        if failure is not None:
            raise failure
        warm(version)

    made = make_world(backend, settings, smoke_test=flaky_storage)
    made.models.create_model("m")
    slept: list[float] = []
    executor = InProcessExecutor(made.workflow, attempts=3, sleep=slept.append)
    service = DeploymentService(made.backend.registry, made.models, executor=executor)
    assert service.deploy("m", made.push(scale_model(1.0)).version).status is DeploymentStatus.SUCCEEDED
    assert len(calls) == 2 and len(slept) == 1  # Unavailable, then passed
    with pytest.raises(Throttled):  # three attempts, all throttled: the last error is the answer
        service.deploy("m", made.push(scale_model(2.0)).version)
    assert len(calls) == 5 and slept == [0.05, 0.05, 0.1]  # exponential backoff
    assert made.history()[0].events[-1].kind == "smoke_test_failed"
    with pytest.raises(InferenceFailed):  # not transient: one attempt
        service.deploy("m", 2)
    assert len(calls) == 6
    assert made.stable() == 1


def test_a_smoke_test_crash_becomes_a_clear_error(backend: Any, settings: Settings) -> None:
    def crash(version: ModelVersion) -> None:
        raise RuntimeError("/opt/secret/path exploded")

    made = make_world(backend, settings, smoke_test=crash)
    made.models.create_model("m")
    with pytest.raises(InferenceFailed) as raised:
        made.deployments.deploy("m", made.push(scale_model(1.0)).version)
    assert "RuntimeError" in raised.value.detail and "/opt" not in raised.value.detail
    failed = made.history()[0]
    assert failed.status is DeploymentStatus.FAILED and failed.events[-1].kind == "smoke_test_failed"
    assert "/opt" not in failed.events[-1].detail


# -- Step Functions ----------------------------------------------------------------------------------


def state_machine(name: str = "maas-test-deploy") -> str:
    client = boto3.client("stepfunctions")
    return str(client.create_state_machine(name=name, definition=DEFINITION, roleArn=ROLE)["stateMachineArn"])


def test_step_functions_executor_starts_one_execution_per_deployment(aws_backend: AwsBackend,
                                                                     settings: Settings) -> None:
    arn = state_machine()
    client = boto3.client("stepfunctions")
    executor = StepFunctionsExecutor(client, arn)
    made = make_world(aws_backend, settings)
    made.models.create_model("m")
    record = made.started(made.push(scale_model(1.0)).version)
    assert executor.start(record) == record
    assert executor.start(record) == record  # a retried request: the same execution
    executions = client.list_executions(stateMachineArn=arn)["executions"]
    assert [e["name"] for e in executions] == [record.id]
    described = client.describe_execution(executionArn=executions[0]["executionArn"])
    assert executions[0]["executionArn"] == executor.execution_arn(record.id)
    assert json.loads(described["input"]) == {"model": "m", "deployment_id": record.id, "wait_seconds": 0,
                                              "done": False}
    client.stop_execution(executionArn=executor.execution_arn(record.id))
    assert executor.start(record) == record  # finished, same input: still "started", nothing new
    assert len(client.list_executions(stateMachineArn=arn)["executions"]) == 1
    with pytest.raises(Conflict):  # the name is taken by another input
        executor.start(record.model_copy(update={"model": "other"}))


@pytest.mark.parametrize(("code", "error"), [("ThrottlingException", Throttled),
                                             ("ServiceUnavailable", Unavailable)])
def test_step_functions_errors_are_maas_errors(aws_backend: AwsBackend, settings: Settings, code: str,
                                               error: type[MaasError]) -> None:
    arn = state_machine()
    made = make_world(aws_backend, settings)
    made.models.create_model("m")
    record = made.started(made.push(scale_model(1.0)).version)
    with pytest.raises(error) as raised:
        StepFunctionsExecutor(FaultyClient(boto3.client("stepfunctions"), 1, code=code), arn).start(record)
    assert "stateMachine" not in raised.value.detail
    with pytest.raises(Unavailable) as missing:  # a state machine that is not there
        StepFunctionsExecutor(boto3.client("stepfunctions"), arn + "-gone").start(record)
    assert arn not in missing.value.detail


def test_from_env_runs_deploys_on_the_state_machine(moto: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAAS_BUCKET", TEST_BUCKET)
    monkeypatch.setenv("MAAS_TABLE", TEST_TABLE)
    monkeypatch.delenv(ENV_STATE_MACHINE, raising=False)
    assert AwsBackend.from_env().deploy_executor is None
    monkeypatch.setenv(ENV_STATE_MACHINE, STATE_MACHINE)
    executor = AwsBackend.from_env().deploy_executor
    assert isinstance(executor, StepFunctionsExecutor) and executor.state_machine_arn == STATE_MACHINE


@dataclass
class Api:
    client: TestClient
    backend: AwsBackend


@pytest.fixture
def sfn_api(moto: None, settings: Settings) -> Iterator[Api]:
    """The API over an AWS backend whose deploys start executions of a (moto) state machine that
    does not run: the test plays the state machine by calling the steps."""
    backend = AwsBackend(settings, bucket=TEST_BUCKET, table=TEST_TABLE, validator=InProcessValidator(settings),
                         state_machine_arn=state_machine())
    _, secret = TokenService(backend.registry).create("admin", ["admin"], created_by="test")
    with TestClient(create_app(backend, settings), base_url=f"http://{HOST}") as client:
        client.headers["Authorization"] = f"Bearer {secret}"
        yield Api(client, backend)


def test_the_api_answers_202_while_the_workflow_runs(sfn_api: Api, settings: Settings) -> None:
    client, backend = sfn_api.client, sfn_api.backend
    push(client, "m", scale_model(1.0))
    started = client.post("/models/m/deployments", json={"version": 1})
    assert started.status_code == 202, started.text
    body = started.json()
    assert body["status"] == "IN_PROGRESS" and [e["kind"] for e in body["events"]] == ["started"]
    assert client.get(f"/deployments/{body['id']}").json()["status"] == "IN_PROGRESS"
    assert client.post("/models/m/deployments", json={"version": 1}).status_code == 409  # one in flight
    stepfunctions = boto3.client("stepfunctions")
    executions = stepfunctions.list_executions(stateMachineArn=backend.state_machine_arn)["executions"]
    assert [e["name"] for e in executions] == [body["id"]]
    # play the state machine's tasks, from the execution's input
    workflow = make_world(backend, settings).workflow
    state = json.loads(stepfunctions.describe_execution(executionArn=executions[0]["executionArn"])["input"])
    for step in WORKFLOW:
        state = workflow.run_step(step.name, state)
    done = client.get(f"/deployments/{body['id']}").json()
    assert done["status"] == "SUCCEEDED" and done["stable_version"] == 1
    answer = client.post("/v2/models/m/infer", json=ONES)
    assert answer.status_code == 200 and answer.headers["X-Maas-Model-Version"] == "1"
    spec = client.get("/openapi.json").json()["paths"]["/models/{name}/deployments"]["post"]["responses"]
    assert {"201", "202"} <= spec.keys()


def test_a_workflow_that_cannot_start_fails_its_deployment(moto: None, settings: Settings) -> None:
    backend = AwsBackend(settings, bucket=TEST_BUCKET, table=TEST_TABLE, validator=InProcessValidator(settings),
                         state_machine_arn=STATE_MACHINE)  # never created
    _, secret = TokenService(backend.registry).create("admin", ["admin"], created_by="test")
    with TestClient(create_app(backend, settings), base_url=f"http://{HOST}") as client:
        client.headers["Authorization"] = f"Bearer {secret}"
        push(client, "m", scale_model(1.0))
        refused = client.post("/models/m/deployments", json={"version": 1})
        assert refused.status_code == 503 and "stateMachine" not in refused.text
        history = client.get("/models/m/deployments").json()["items"]
        assert [(d["status"], d["events"][-1]["kind"]) for d in history] == [("FAILED", "start_failed")]
