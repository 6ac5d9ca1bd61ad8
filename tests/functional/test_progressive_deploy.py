"""Progressive delivery (issue 4, points 1-5): canary and linear deploys, health-judged bakes with
automatic rollback, the smoke test on inputs made from the signature, manual rollback during a deploy,
a crash mid-deploy then recovery, one deploy in flight per model; on both backends.

Traffic goes through the same objects the API serves with (``ServingResolver`` picking stable or
canary by weight, ``InferenceEngine`` running it, the ``HealthRecorder`` fed by the engine's metrics).
Bakes are driven by the executor's ``wait`` (the in-process Wait state): the tests send their requests
in it, so what happens "during the bake" is deterministic and nothing sleeps."""

from __future__ import annotations

import hashlib
import io
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from maas.backends.aws.health import CloudWatchHealth
from maas.backends.aws.workflow import StepFunctionsExecutor
from maas.cli.main import app as cli_app
from maas.client import Client, DeploymentFailed
from maas.domain import (
    Deployment,
    DeploymentStatus,
    HealthThresholds,
    ModelVersion,
    Signature,
    Strategy,
    TensorSpec,
    UploadPlan,
    VersionStatus,
)
from maas.errors import Conflict, InvalidInput, MaasError, ModelRejected, Unhealthy
from maas.inference.codec import decode_request
from maas.inference.engine import InferenceEngine
from maas.inference.smoke import SmokeTest, smoke_inputs
from maas.ports import TargetState, TargetStatus, VersionHealth
from maas.services.deploy import (
    MAX_TOTAL_BAKE_SECONDS,
    DeployWorkflow,
    InProcessExecutor,
    StepInput,
    StepName,
    total_bake_seconds,
)
from maas.services.deployments import DeploymentService
from maas.services.health import HealthRecorder, assess
from maas.services.models import ModelService
from maas.services.serving import ServingResolver, artifact_reader
from maas.settings import Settings
from tests.conftest import push
from tests.models import InProcessValidator, quantizable_model, scale_model, wide_matmul_model

# -- models ------------------------------------------------------------------------------------------


def _model(nodes: list[Any], initializers: list[Any], out_shape: list[Any], name: str) -> bytes:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def nan_model() -> bytes:
    """y = log(-x): valid ONNX that answers NaN for every positive input."""
    return _model([helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Log", ["n"], ["y"])], [],
                  ["batch", 4], "nan")


def one_row_model(factor: float = 3.0) -> bytes:
    """y = reshape(x, [1, 4]) * factor: answers a batch of one (the smoke test passes) and fails inside
    onnxruntime for any bigger batch (errors at run time, during the bake)."""
    return _model([helper.make_node("Reshape", ["x", "s"], ["r"]), helper.make_node("Mul", ["r", "k"], ["y"])],
                  [numpy_helper.from_array(np.array([1, 4], dtype=np.int64), "s"),
                   numpy_helper.from_array(np.array(factor, dtype=np.float32), "k")], [1, 4], "one_row")


def request(rows: int = 1) -> bytes:
    return orjson.dumps({"inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32",
                                     "data": [1.0] * (4 * rows)}]})


# -- the world ---------------------------------------------------------------------------------------


class Crash(BaseException):
    """The executor's process dies (not an Exception: nothing catches it, no rollback runs)."""


@dataclass
class World:
    backend: Any
    settings: Settings
    models: ModelService
    engine: InferenceEngine
    recorder: HealthRecorder
    resolver: ServingResolver
    workflow: DeployWorkflow
    executor: InProcessExecutor
    service: DeploymentService
    #: what each wait (bake) does: the test's traffic
    during_bake: list[Callable[[], None]] = field(default_factory=list)
    #: canary weight and length of each wait
    weights: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    answered: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def push(self, data: bytes, name: str = "m") -> ModelVersion:
        digest = hashlib.sha256(data).hexdigest()
        pending = self.models.begin_version(name, plan=UploadPlan(size=len(data), sha256=digest))
        self.backend.artifacts.receive_upload(pending.upload.upload_id, io.BytesIO(data), len(data))
        return self.models.commit_version(name, pending.version.version, sha256=digest, size=len(data))

    def infer(self, version: str | None = None, rows: int = 1, name: str = "m") -> str:
        """One request as the inference route runs it (a version named in the URL is not the router's
        traffic); returns the version that answered."""
        chosen = self.resolver.pick(name, version)
        self.engine.infer(chosen, decode_request(request(rows), None, self.settings.limits), routed=version is None)
        return str(chosen.version)

    def traffic(self, count: int = 20) -> None:
        """Unversioned requests (the resolver splits them): every one must succeed."""
        for _ in range(count):
            try:
                self.answered[self.infer()] += 1
            except MaasError as error:
                self.failures.append(f"{type(error).__name__}: {error.detail}")

    def history(self, name: str = "m") -> list[Deployment]:
        return self.backend.registry.list_deployments(name, 100, None).items

    def route(self, name: str = "m") -> tuple[int, int | None, float] | None:
        route = self.backend.registry.get_route(name)
        return None if route is None else (route.stable_version, route.canary_version, route.canary_weight)


def make_world(backend: Any, settings: Settings, *, background: bool = False, real_wait: bool = False,
               create: bool = True) -> World:
    models = ModelService(backend.registry, backend.artifacts, InProcessValidator(settings), settings.limits)
    recorder = HealthRecorder()
    engine = InferenceEngine(artifact_reader(backend.artifacts), settings.limits, recorder)
    resolver = ServingResolver(backend.registry, models, rng=random.Random(7).random)  # a repeatable split
    workflow = DeployWorkflow(backend.registry, models, SmokeTest(engine), health=recorder)
    workflow.on_route_change = resolver.invalidate
    holder: dict[str, World] = {}

    def bake(seconds: float, cancelled: threading.Event) -> None:
        made = holder["world"]
        deployment = next(d for d in made.history() if d.status is DeploymentStatus.IN_PROGRESS)
        made.weights.append(deployment.canary_weight)
        made.waits.append(seconds)
        for action in made.during_bake:
            action()

    executor = InProcessExecutor(workflow, background=background, wait=None if real_wait else bake)
    service = DeploymentService(backend.registry, models, executor=executor, workflow=workflow)
    made = World(backend, settings, models, engine, recorder, resolver, workflow, executor, service)
    holder["world"] = made
    if create:
        models.create_model("m")
    return made


@pytest.fixture
def world(backend: Any, settings: Settings) -> World:
    return make_world(backend, settings)


def kinds(deployment: Deployment) -> list[str]:
    return [event.kind for event in deployment.events]


STRATEGIES = {
    "all_at_once": {"strategy": "all_at_once", "bake_seconds": 1},
    "canary": {"strategy": "canary", "canary_percent": 50, "bake_seconds": 1},
    "linear": {"strategy": "linear", "linear_step_percent": 40, "bake_seconds": 1},
}
#: the traffic steps each strategy takes, and the weights the bakes see
SHIFTS = {"all_at_once": [100.0], "canary": [50.0], "linear": [40.0, 80.0]}


# -- each strategy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_healthy_version_is_promoted(world: World, strategy: str) -> None:
    world.service.deploy("m", world.push(scale_model(1.0)).version)
    world.during_bake.append(world.traffic)
    done = world.service.deploy("m", world.push(scale_model(2.0)).version, **STRATEGIES[strategy])
    assert done.status is DeploymentStatus.SUCCEEDED and done.stable_version == 2
    shifts = SHIFTS[strategy]
    assert world.weights == shifts
    assert kinds(done) == ["started", "validated", "smoke_test_passed",
                           *["traffic_shifted", "health_checked"] * len(shifts), "promoted"]
    shifted = [e.detail for e in done.events if e.kind == "traffic_shifted"]
    assert shifted == [f"{weight:g}% to version 2" for weight in shifts]
    checked = [e.detail for e in done.events if e.kind == "health_checked"]
    assert all(detail.startswith("healthy: version 2:") for detail in checked), checked
    assert world.failures == []
    assert world.answered["2"] > 0 and (strategy == "all_at_once" or world.answered["1"] > 0)
    assert world.route() == (2, None, 0.0)
    assert {world.infer() for _ in range(10)} == {"2"}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_version_failing_the_smoke_test_never_gets_traffic(world: World, strategy: str) -> None:
    world.service.deploy("m", world.push(scale_model(1.0)).version)
    broken = world.push(nan_model())
    assert broken.status is VersionStatus.READY  # valid ONNX: only running it shows the NaNs
    with pytest.raises(Unhealthy) as raised:
        world.service.deploy("m", broken.version, **STRATEGIES[strategy])
    assert "NaN" in raised.value.detail and "'y'" in raised.value.detail
    failed = world.history()[0]
    assert failed.status is DeploymentStatus.ROLLED_BACK
    assert kinds(failed) == ["started", "validated", "smoke_test_failed"]
    assert failed.canary_version is None and world.weights == []
    assert world.route() == (1, None, 0.0)
    world.traffic()
    assert world.failures == [] and set(world.answered) == {"1"}


@pytest.mark.parametrize("strategy", ["canary", "linear"])
def test_requests_that_name_the_canary_cannot_veto_it(world: World, strategy: str) -> None:
    """An invoke token once rolled a byte-identical canary back by sending it failing (or slow)
    requests through ``/versions/{v}/infer``: only the router's traffic is the canary's health."""
    world.service.deploy("m", world.push(scale_model(1.0)).version)
    world.during_bake.append(world.traffic)

    def pinned_failures() -> None:
        for _ in range(20):
            with pytest.raises(MaasError):
                world.infer("2", rows=3)

    world.during_bake.append(pinned_failures)
    done = world.service.deploy("m", world.push(one_row_model()).version, **STRATEGIES[strategy])
    assert done.status is DeploymentStatus.SUCCEEDED, kinds(done)
    checked = [e.detail for e in done.events if e.kind == "health_checked"]
    assert checked and all(" 0 errors" in detail for detail in checked), checked


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_version_erroring_during_the_bake_is_rolled_back_and_stable_serves(world: World, strategy: str) -> None:
    world.service.deploy("m", world.push(scale_model(1.0)).version)
    world.during_bake.append(world.traffic)

    failed_on_canary: list[str] = []

    def canary_errors() -> None:  # requests the canary fails on (a batch of 3), as the router splits them
        for _ in range(20):
            try:
                world.infer(rows=3)
            except MaasError as error:
                failed_on_canary.append(error.detail)

    world.during_bake.append(canary_errors)
    with pytest.raises(Unhealthy) as raised:
        world.service.deploy("m", world.push(one_row_model()).version, **STRATEGIES[strategy])
    assert "error rate" in raised.value.detail and "max 1.00%" in raised.value.detail
    failed = world.history()[0]
    assert failed.status is DeploymentStatus.ROLLED_BACK
    assert kinds(failed) == ["started", "validated", "smoke_test_passed", "traffic_shifted", "check_health_failed"]
    assert "errors" in failed.events[-1].detail and failed.canary_weight == 0.0
    assert failed_on_canary and all("version 2" in detail for detail in failed_on_canary)
    assert world.weights == SHIFTS[strategy][:1]  # the first bake failed: no further step
    # the stable version kept serving: no request failed because of the switch, and it serves all now
    assert world.failures == [] and (strategy == "all_at_once" or world.answered["1"] > 0)  # all_at_once bakes at 100%
    assert world.route() == (1, None, 0.0)
    world.answered.clear()
    world.traffic()
    assert world.failures == [] and set(world.answered) == {"1"}


def test_latency_against_the_stable_version_and_absolute(world: World) -> None:
    world.service.deploy("m", world.push(scale_model(1.0)).version)
    world.push(scale_model(2.0))
    slow = HealthThresholds(max_error_rate=0.5, max_p99_latency_ms=0.000001, max_p99_latency_ratio=None)
    world.during_bake.append(world.traffic)
    with pytest.raises(Unhealthy) as raised:
        world.service.deploy("m", 2, strategy="canary", canary_percent=50, bake_seconds=1, thresholds=slow)
    assert "p99" in raised.value.detail and "> max 1e-06 ms" in raised.value.detail
    assert world.history()[0].status is DeploymentStatus.ROLLED_BACK and world.failures == []


def test_a_bake_without_canary_requests_is_healthy_and_says_so(world: World) -> None:
    world.service.deploy("m", world.push(scale_model(1.0)).version)
    done = world.service.deploy("m", world.push(scale_model(2.0)).version, strategy="canary", bake_seconds=1)
    assert done.status is DeploymentStatus.SUCCEEDED
    (checked,) = [e.detail for e in done.events if e.kind == "health_checked"]
    assert "answered no request" in checked


@pytest.mark.parametrize("strategy", ["canary", "linear"])
def test_a_first_deploy_runs_as_all_at_once(world: World, strategy: str) -> None:
    done = world.service.deploy("m", world.push(scale_model(1.0)).version, strategy=strategy, bake_seconds=1)
    assert done.status is DeploymentStatus.SUCCEEDED and world.weights == [100.0]
    (shifted,) = [e.detail for e in done.events if e.kind == "traffic_shifted"]
    assert f"{strategy} runs as all_at_once" in shifted and "no stable version" in shifted


def test_linear_interval_and_thresholds_are_recorded(world: World) -> None:
    world.service.deploy("m", world.push(scale_model(1.0)).version)
    done = world.service.deploy("m", world.push(scale_model(2.0)).version, strategy="linear",
                                linear_step_percent=30, bake_seconds=7, linear_interval_seconds=2)
    assert done.status is DeploymentStatus.SUCCEEDED
    assert [e.detail for e in done.events if e.kind == "traffic_shifted"] == [
        "30% to version 2", "60% to version 2", "90% to version 2"]
    assert world.waits == [2, 2, 2]
    assert done.events[0].detail == "deploying version 2 (linear, steps of 30%, bake 7s, every 2s)"


@pytest.mark.parametrize(("options", "field"), [
    ({"strategy": "canary", "canary_percent": 0}, "canary_percent"),
    ({"strategy": "linear", "linear_step_percent": 150}, "linear_step_percent"),
    ({"bake_seconds": -1}, "bake_seconds"),
    ({"linear_interval_seconds": 10**6}, "linear_interval_seconds"),
    ({"target": "sagemaker"}, "target"),
    ({"optimize": True}, "optimize"),
])
def test_invalid_options_name_the_field(world: World, options: dict[str, Any], field: str) -> None:
    world.push(scale_model(1.0))
    with pytest.raises(InvalidInput) as raised:
        world.service.deploy("m", 1, **options)
    assert raised.value.field == field
    assert world.history() == []


# -- cancel, crash, concurrency ----------------------------------------------------------------------


def wait_for(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_manual_rollback_cancels_a_deploy_in_flight(backend: Any, settings: Settings, strategy: str) -> None:
    made = make_world(backend, settings, background=True, real_wait=True)
    made.service.deploy("m", made.push(scale_model(1.0)).version)
    options = {**STRATEGIES[strategy], "bake_seconds": 3600}
    started = made.service.deploy("m", made.push(scale_model(2.0)).version, **options)
    assert started.status is DeploymentStatus.IN_PROGRESS  # runs in the background: the API answers 202
    wait_for(lambda: "traffic_shifted" in kinds(made.backend.registry.get_deployment(started.id)))
    live = made.service.rollback("m")
    assert live.stable_version == 1
    assert made.executor.join(started.id, timeout=20)  # woken at once, not after the hour-long bake
    cancelled = made.backend.registry.get_deployment(started.id)
    assert cancelled.status is DeploymentStatus.ROLLED_BACK
    assert kinds(cancelled)[-1] == "rolled_back" and "promoted" not in kinds(cancelled)
    assert made.route() == (1, None, 0.0)
    made.traffic()
    assert made.failures == [] and set(made.answered) == {"1"}


def test_a_crash_mid_deploy_is_rolled_back_on_recovery(world: World) -> None:
    world.service.deploy("m", world.push(scale_model(1.0)).version)

    def crash() -> None:
        raise Crash()

    world.during_bake.append(crash)
    with pytest.raises(Crash):
        world.service.deploy("m", world.push(scale_model(2.0)).version, strategy="canary", canary_percent=25,
                             bake_seconds=60)
    stuck = world.history()[0]
    assert stuck.status is DeploymentStatus.IN_PROGRESS and world.route() == (1, 2, 25.0)
    # a restart: a new process recovers before serving
    restarted = make_world(world.backend, world.settings, create=False)
    recovered = restarted.service.recover_interrupted()
    assert [d.id for d in recovered] == [stuck.id]
    assert recovered[0].status is DeploymentStatus.ROLLED_BACK
    assert "25% of traffic on version 2" in recovered[0].events[-1].detail
    assert restarted.route() == (1, None, 0.0)
    assert restarted.service.recover_interrupted() == []
    # nothing is left blocking the model
    assert restarted.service.deploy("m", 2).status is DeploymentStatus.SUCCEEDED


def test_one_deploy_in_flight_per_model(backend: Any, settings: Settings) -> None:
    made = make_world(backend, settings, background=True, real_wait=True)
    made.service.deploy("m", made.push(scale_model(1.0)).version)
    first = made.service.deploy("m", made.push(scale_model(2.0)).version, strategy="canary", bake_seconds=3600)
    with pytest.raises(Conflict):
        made.service.deploy("m", 2, strategy="linear", bake_seconds=1)
    with pytest.raises(Conflict):
        made.service.deploy("m", 1)
    made.service.rollback("m")
    assert made.executor.join(first.id, timeout=20)
    assert made.service.deploy("m", 2).status is DeploymentStatus.SUCCEEDED


# -- steps on their own ------------------------------------------------------------------------------


def test_traffic_steps_are_idempotent(world: World) -> None:
    world.service.deploy("m", world.push(scale_model(1.0)).version)
    world.push(scale_model(2.0))
    route = world.backend.registry.get_route("m")
    record = world.backend.registry.create_deployment(Deployment(
        id="a" * 32, model="m", version=2, stable_version=route.stable_version, strategy=Strategy.LINEAR,
        linear_step_percent=25, bake_seconds=5).with_event("started"))
    state = {"model": "m", "deployment_id": record.id}
    for name in (StepName.VALIDATE, StepName.OPTIMIZE, StepName.SMOKE_TEST):
        world.workflow.run_step(name, state)
    first = world.workflow.run_step(StepName.SHIFT_TRAFFIC, state)
    assert world.workflow.run_step(StepName.SHIFT_TRAFFIC, state) == first  # a retry: no second step
    assert first["wait_seconds"] == 5 and world.route() == (1, 2, 25.0)
    checked = world.workflow.run_step(StepName.CHECK_HEALTH, first)
    assert world.workflow.run_step(StepName.CHECK_HEALTH, first) == checked and checked["done"] is False
    deployment = world.backend.registry.get_deployment(record.id)
    assert kinds(deployment).count("health_checked") == 1
    world.workflow.run_step(StepName.SHIFT_TRAFFIC, checked)
    assert world.route() == (1, 2, 50.0)
    assert StepInput.from_payload(first).wait_seconds == 5


@dataclass
class FakeEndpoint:
    """The ``EndpointTarget`` port as the SageMaker adapter implements it (that adapter is tested on its
    own): an update that is UPDATING for ``polls`` polls, then ends in ``final``."""

    polls: int = 1
    final: TargetState = TargetState.IN_SERVICE
    calls: list[str] = field(default_factory=list)

    def shift(self, deployment: Deployment, version: ModelVersion) -> None:
        self.calls.append(f"shift {version.version}")

    def status(self, deployment: Deployment) -> TargetStatus:
        self.calls.append("status")
        self.polls -= 1
        if self.polls >= 0:
            return TargetStatus(TargetState.UPDATING)
        return TargetStatus(self.final, "the canary alarm fired" if self.final is not TargetState.IN_SERVICE else "")

    def rollback(self, deployment: Deployment) -> None:
        self.calls.append("rollback")

    def invoke(self, model: str, body: bytes, content_type: str) -> tuple[bytes, str]:
        raise NotImplementedError


@pytest.mark.parametrize("final", [TargetState.IN_SERVICE, TargetState.ROLLED_BACK])
def test_an_endpoint_target_is_shifted_and_polled(world: World, final: TargetState) -> None:
    endpoint = FakeEndpoint(polls=2, final=final)
    workflow = DeployWorkflow(world.backend.registry, world.models, SmokeTest(world.engine), health=world.recorder,
                              targets={"sagemaker": endpoint}, poll_seconds=1)
    waits: list[float] = []
    service = DeploymentService(world.backend.registry, world.models, workflow=workflow,
                                executor=InProcessExecutor(workflow, background=False,
                                                           wait=lambda s, c: waits.append(s)))
    assert "sagemaker" in service.targets
    world.push(scale_model(1.0))
    if final is TargetState.IN_SERVICE:
        done = service.deploy("m", 1, target="sagemaker", strategy="canary")
        assert done.status is DeploymentStatus.SUCCEEDED
        assert endpoint.calls == ["shift 1", "status", "shift 1", "status", "shift 1", "status"]
        assert kinds(done) == ["started", "validated", "smoke_test_passed", "traffic_shifted", "health_checked",
                               "promoted"]
        route = done.live_route()
        assert route is not None and route.target == "sagemaker"
    else:
        with pytest.raises(Unhealthy) as raised:
            service.deploy("m", 1, target="sagemaker", strategy="canary")
        assert "rolled back" in raised.value.detail and "alarm" in raised.value.detail
        assert endpoint.calls[-1] == "rollback"
        assert world.history()[0].status is DeploymentStatus.ROLLED_BACK
    assert waits == [1, 1, 1]  # a poll interval after each shift


# -- the smoke test ----------------------------------------------------------------------------------


def test_smoke_inputs_follow_the_signature() -> None:
    signature = Signature(inputs=(TensorSpec(name="a", datatype="FP32", shape=(-1, 3)),
                                  TensorSpec(name="b", datatype="INT64", shape=(2, -1)),
                                  TensorSpec(name="c", datatype="BOOL", shape=(4,)),
                                  TensorSpec(name="d", datatype="BYTES", shape=(-1,))),
                          outputs=())
    made = smoke_inputs(signature)
    assert {k: (v.shape, v.dtype.name) for k, v in made.items()} == {
        "a": ((1, 3), "float32"), "b": ((2, 1), "int64"), "c": ((4,), "bool"), "d": ((1,), "object")}
    assert np.all(made["a"] > 0) and np.all(np.isin(made["b"], [0, 1]))
    assert all(np.array_equal(made[k], smoke_inputs(signature)[k]) for k in made)  # deterministic


def test_smoke_test_rejects_wrong_output_shapes(world: World) -> None:
    version = world.push(scale_model(1.0))
    assert version.signature is not None
    SmokeTest(world.engine)(version)
    wrong = version.signature.model_copy(update={"outputs": (TensorSpec(name="y", datatype="FP32", shape=(-1, 5)),)})
    with pytest.raises(Unhealthy) as raised:
        SmokeTest(world.engine)(version.model_copy(update={"signature": wrong, "version": 99}))
    assert "output 'y' has shape [1, 4], its signature says [-1, 5]" in raised.value.detail


# -- health sources ----------------------------------------------------------------------------------


def test_the_recorder_is_bounded_and_windowed() -> None:
    now = [1000.0]
    recorder = HealthRecorder(max_samples=3, max_versions=2, clock=lambda: now[0])
    for latency, error in ((0.010, False), (0.020, False), (0.5, True), (0.030, False)):
        recorder.invocation("m", 1, latency_s=latency, error=error)
        now[0] += 1
    at = datetime.fromtimestamp
    assert recorder.health("m", 1, at(1000, UTC), at(1010, UTC)) == VersionHealth(3, 1, 30.0)  # oldest dropped
    assert recorder.health("m", 1, at(1003, UTC), at(1010, UTC)) == VersionHealth(1, 0, 30.0)
    recorder.invocation("m", 2, latency_s=0.001, error=False)
    recorder.invocation("m", 3, latency_s=0.001, error=False)  # a third version: the least recent goes
    assert recorder.health("m", 1, at(0, UTC), at(2000, UTC)).requests == 0
    assert recorder.health("m", 3, at(0, UTC), at(2000, UTC)).requests == 1


def test_assess_names_the_numbers() -> None:
    limits = HealthThresholds(max_error_rate=0.1, max_p99_latency_ms=100, max_p99_latency_ratio=2)
    assert assess(2, VersionHealth(0, 0, None), limits).healthy
    assert assess(2, VersionHealth(10, 1, 50.0), limits, VersionHealth(10, 0, 40.0), 1).healthy
    bad = assess(2, VersionHealth(10, 2, 150.0), limits, VersionHealth(10, 0, 20.0), 1)
    assert not bad.healthy
    assert "error rate 20.00% > max 10.00%" in bad.detail and "p99 150.0 ms > max 100 ms" in bad.detail
    assert "p99 150.0 ms > 2 x stable p99 20.0 ms" in bad.detail
    # sub-5 ms latencies are never judged by ratio (jitter)
    assert assess(2, VersionHealth(10, 0, 3.0), limits, VersionHealth(10, 0, 0.5), 1).healthy


def test_cloudwatch_health_reads_the_emf_metrics(moto: None, moto_percentiles: None) -> None:
    cloudwatch = boto3.client("cloudwatch")
    now = datetime.now(UTC)
    dims = [{"Name": "model", "Value": "m"}, {"Name": "version", "Value": "2"}]

    def point(name: str, value: float, unit: str) -> dict[str, Any]:
        return {"MetricName": name, "Dimensions": dims, "Value": value, "Unit": unit, "Timestamp": now}

    data = [point("Invocations", 1, "Count") for _ in range(10)]
    data += [point("Errors", 1 if i < 2 else 0, "Count") for i in range(10)]
    data += [point("ModelLatency", float(v), "Milliseconds") for v in range(1, 9)]
    cloudwatch.put_metric_data(Namespace="maas", MetricData=data)
    other = [{**point("Invocations", 1, "Count"), "Dimensions": [dims[0], {"Name": "version", "Value": "1"}]}]
    cloudwatch.put_metric_data(Namespace="maas", MetricData=other)
    health = CloudWatchHealth(cloudwatch)
    assert health.health("m", 2, now - timedelta(seconds=5), now + timedelta(seconds=5)) == VersionHealth(10, 2, 8.0)
    assert health.health("m", 1, now - timedelta(seconds=5), now + timedelta(seconds=5)) == VersionHealth(1, 0, None)
    assert health.health("m", 3, now - timedelta(seconds=5), now) == VersionHealth(0, 0, None)


def test_step_functions_executor_cancel_stops_the_execution(moto: None) -> None:
    client = boto3.client("stepfunctions")
    definition = orjson.dumps({"StartAt": "Bake", "States": {"Bake": {"Type": "Wait", "Seconds": 3600,
                                                                       "End": True}}}).decode()
    arn = client.create_state_machine(name="maas-test-deploy", definition=definition,
                                      roleArn="arn:aws:iam::123456789012:role/x")["stateMachineArn"]
    executor = StepFunctionsExecutor(client, arn)
    record = Deployment(id="b" * 32, model="m", version=1, stable_version=None)
    executor.start(record)
    executor.cancel(record)
    described = client.describe_execution(executionArn=executor.execution_arn(record.id))
    assert described["status"] == "ABORTED"
    executor.cancel(record)  # twice: nothing to do
    executor.cancel(record.model_copy(update={"id": "c" * 32}))  # never started: nothing to do


# -- through the API, the SDK and the CLI ------------------------------------------------------------


def test_the_api_runs_a_canary_in_the_background(client: TestClient, admin_token: str) -> None:
    push(client, "m", scale_model(1.0))
    assert client.post("/models/m/deployments", json={"version": 1}).status_code == 201  # synchronous
    push(client, "m", scale_model(2.0), create=False)
    body = {"version": 2, "strategy": "canary", "canary_percent": 20, "bake_seconds": 0,
            "thresholds": {"max_error_rate": 0.05, "max_p99_latency_ms": 5000}}
    with Client(token=admin_token, http_client=client) as sdk:
        done = sdk.deploy("m", 2, "canary", canary_percent=20, bake_seconds=0, poll_interval=0.02,
                          thresholds=body["thresholds"])
        assert done["status"] == "SUCCEEDED", done
        assert [e["kind"] for e in done["events"]] == ["started", "validated", "smoke_test_passed",
                                                         "traffic_shifted", "health_checked", "promoted"]
        assert done["thresholds"]["max_p99_latency_ms"] == 5000
        answer = client.post("/v2/models/m/infer", content=request())
        assert answer.headers["X-Maas-Model-Version"] == "2"
        push(client, "m", nan_model(), create=False)
        with pytest.raises(DeploymentFailed) as raised:
            sdk.deploy("m", 3, "linear", linear_step_percent=50, bake_seconds=0, poll_interval=0.02)
        assert raised.value.deployment["status"] == "ROLLED_BACK"
        assert "NaN" in raised.value.deployment["events"][-1]["detail"]
    accepted = client.post("/models/m/deployments", json={"version": 1, "strategy": "canary", "bake_seconds": 3600})
    assert accepted.status_code == 202 and accepted.json()["status"] == "IN_PROGRESS"
    assert client.post("/models/m/deployments", json={"version": 1}).status_code == 409
    rolled = client.post("/models/m/rollback")
    assert rolled.status_code == 200 and rolled.json()["stable_version"] == 2
    executor = client.app.state.services.deployments.executor  # type: ignore[attr-defined]
    assert executor.join(accepted.json()["id"], timeout=20)  # woken by the rollback, not after an hour
    final = client.get(f"/deployments/{accepted.json()['id']}").json()
    assert final["status"] == "ROLLED_BACK" and final["events"][-1]["kind"] == "rolled_back"


def test_maas_deploy_help_explains_every_option() -> None:
    result = CliRunner().invoke(cli_app, ["deploy", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--strategy", "--canary-percent", "--bake", "--step-percent", "--interval", "--max-error-rate",
                   "--max-p99-ms", "--max-p99-ratio", "--optimize", "--target", "--no-wait"):
        assert option in result.stdout, option


# -- the optimize step -------------------------------------------------------------------------------


def test_the_optimize_step_deploys_the_derived_version(world: World) -> None:
    import functools

    from maas.inference.optimize import quantize
    from maas.services.optimize import OptimizeService

    optimizer = OptimizeService(world.models, world.backend.artifacts,
                                functools.partial(quantize, limits=world.settings.limits))
    world.workflow.optimizer = lambda version: optimizer.optimize(version.model, version.version)
    parent = world.push(quantizable_model(inputs=4))
    done = world.service.deploy("m", parent.version, optimize=True)
    assert done.status is DeploymentStatus.SUCCEEDED and done.version != parent.version
    assert kinds(done) == ["started", "validated", "optimized", "smoke_test_passed", "promoted"]
    optimized = next(e.detail for e in done.events if e.kind == "optimized")
    assert f"derived from version {parent.version}" in optimized and "bytes" in optimized
    derived = world.backend.registry.get_version("m", done.version)
    assert derived.parent_version == parent.version and world.route() == (done.version, None, 0.0)
    assert world.infer() == str(done.version)


def test_an_optimize_step_that_cannot_improve_the_model_leaves_the_route_alone(world: World) -> None:
    import functools

    from maas.inference.optimize import quantize
    from maas.services.optimize import OptimizeService

    optimizer = OptimizeService(world.models, world.backend.artifacts,
                                functools.partial(quantize, limits=world.settings.limits))
    world.workflow.optimizer = lambda version: optimizer.optimize(version.model, version.version)
    world.service.deploy("m", world.push(scale_model(1.0)).version)
    small = world.push(wide_matmul_model())  # its int8 graph is smaller but never faster
    with pytest.raises(ModelRejected) as raised:
        world.service.deploy("m", small.version, optimize=True)
    assert raised.value.extra["check"] == "latency" and "not faster" in raised.value.detail
    failed = world.history()[0]
    assert failed.status in {DeploymentStatus.FAILED, DeploymentStatus.ROLLED_BACK}
    assert "optimized" not in kinds(failed) and failed.version == small.version
    assert world.route() == (1, None, 0.0)
    assert sorted(v.version for v in world.backend.registry.list_versions("m", 10, None).items) == [1, 2]



# -- the total bake bound ----------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "field", "total"), [
    # 10% steps: nine shifts (10% .. 90%), each baking a day: nine days
    ({"strategy": "linear", "linear_step_percent": 10, "linear_interval_seconds": 86_400},
     "linear_interval_seconds", 9 * 86_400),
    ({"strategy": "linear", "linear_step_percent": 25, "bake_seconds": 30_000}, "bake_seconds", 3 * 30_000),
    ({"strategy": "canary", "bake_seconds": MAX_TOTAL_BAKE_SECONDS + 1}, "bake_seconds", MAX_TOTAL_BAKE_SECONDS + 1),
    ({"strategy": "all_at_once", "bake_seconds": 86_400}, "bake_seconds", 86_400),
])
def test_a_deploy_that_would_outlast_the_workflow_is_refused(world: World, options: dict[str, Any], field: str,
                                                             total: int) -> None:
    world.service.deploy("m", world.push(scale_model(1.0)).version)
    new = world.push(scale_model(2.0))
    with pytest.raises(InvalidInput) as raised:
        world.service.deploy("m", new.version, **options)
    assert raised.value.field == field and f"bake for {total} s in all" in raised.value.detail
    assert raised.value.extra == {"total_bake_seconds": total, "max_total_bake_seconds": MAX_TOTAL_BAKE_SECONDS}
    assert len(world.history()) == 1 and world.route() == (1, None, 0.0)  # nothing started


def test_total_bake_follows_the_steps() -> None:
    from maas.domain import Deployment

    def total(**options: Any) -> int:
        return total_bake_seconds(Deployment(id="d", model="m", version=2, stable_version=1, **options))

    assert total(strategy=Strategy.ALL_AT_ONCE) == 0
    assert total(strategy=Strategy.ALL_AT_ONCE, bake_seconds=60) == 60
    assert total(strategy=Strategy.CANARY, bake_seconds=60) == 60
    assert total(strategy=Strategy.LINEAR, linear_step_percent=10, bake_seconds=60) == 9 * 60
    assert total(strategy=Strategy.LINEAR, linear_step_percent=30, linear_interval_seconds=7, bake_seconds=60) == 21
    assert total(strategy=Strategy.LINEAR, linear_step_percent=100, bake_seconds=60) == 60
    assert total(strategy=Strategy.LINEAR, linear_step_percent=33.4, bake_seconds=1) == 2  # 33.4%, 66.8%
    # A first deploy runs as all_at_once: only its bake counts.
    first = Deployment(id="d", model="m", version=1, stable_version=None, strategy=Strategy.LINEAR,
                       linear_step_percent=1, linear_interval_seconds=86_400, bake_seconds=5)
    assert total_bake_seconds(first) == 5
    # The longest accepted: 23 h of bake leaves an hour of the one-day execution.
    assert total(strategy=Strategy.CANARY, bake_seconds=MAX_TOTAL_BAKE_SECONDS) == MAX_TOTAL_BAKE_SECONDS
