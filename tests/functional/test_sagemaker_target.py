"""The SageMaker deployment target (maas.backends.aws.sagemaker) and the inference function's proxy to
it, under moto extended by tests/moto_sagemaker.py: UpdateEndpoint recorded and simulated (complete,
held in flight, or rolled back by an alarm), InvokeEndpoint answered by the real serving container app
(functions/sagemaker/handler.py) in-process on CPU with the model read from moto's S3."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import uuid
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as triton
from botocore.stub import Stubber

from maas.backends.aws import AwsBackend
from maas.backends.aws.clients import make_client
from maas.backends.aws.sagemaker import (
    SageMakerInvoker,
    SageMakerTarget,
    answer_header_length,
    clean_reason,
    endpoint_config_name,
    endpoint_name,
    model_resource_name,
    previous_config_name,
    request_content_type,
    sagemaker_target_from_env,
)
from maas.domain import Deployment, DeploymentStatus, ModelVersion, Strategy, UploadPlan
from maas.errors import Conflict, InvalidInput, MaasError, NotReady, Throttled, Unavailable
from maas.examples import EXAMPLE_REQUEST, example_model_path
from maas.ports import EndpointTarget, TargetState
from maas.services.models import ModelService
from maas.services.tokens import TokenService
from maas.settings import ENV_ROLLBACK_ALARMS, ENV_SAGEMAKER_IMAGE, ENV_SAGEMAKER_PREFIX, ENV_SAGEMAKER_ROLE, Settings
from tests.conftest import TEST_BUCKET, TEST_TABLE
from tests.functions import LambdaContext, api_event, load_handler
from tests.models import InProcessValidator, scale_model
from tests.moto_sagemaker import ACCOUNT, SageMakerSim, sagemaker_sim  # noqa: F401  # the fixture

IRIS = example_model_path().read_bytes()
FEATURES = np.array(EXAMPLE_REQUEST["inputs"][0]["data"], dtype=np.float32)
ROLE = f"arn:aws:iam::{ACCOUNT}:role/maas-prod-SageMakerExecutionRole"
IMAGE = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/cdk-hnb659fds-container-assets:abc123"
ALARMS = ("maas-prod-InferenceErrorRate", "maas-prod-ApiLatencyP99")
MODEL = "big"
LEAKS = re.compile(rf"arn:|{ACCOUNT}|s3://|amazonaws\.com|{TEST_BUCKET}|/aws/sagemaker")
SAGEMAKER_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")


@dataclass
class World:
    backend: AwsBackend
    models: ModelService
    target: SageMakerTarget
    sim: SageMakerSim
    sagemaker: Any
    calls: list[str]

    def push(self, data: bytes, name: str = MODEL) -> ModelVersion:
        plan = UploadPlan(size=len(data), sha256=hashlib.sha256(data).hexdigest())
        with suppress(Conflict):
            self.models.create_model(name)
        pending = self.models.begin_version(name, plan=plan)
        self.backend.artifacts.receive_upload(pending.upload.upload_id, io.BytesIO(data), len(data))
        return self.models.commit_version(name, pending.version.version, sha256=plan.sha256 or "", size=len(data))

    def version(self, number: int, name: str = MODEL) -> ModelVersion:
        return self.backend.registry.get_version(name, number)

    def endpoint(self, name: str = MODEL) -> dict[str, Any]:
        return dict(self.sagemaker.describe_endpoint(EndpointName=endpoint_name(name)))


def deployment(version: int, stable: int | None, *, strategy: Strategy = Strategy.ALL_AT_ONCE,
               model: str = MODEL, **fields: Any) -> Deployment:
    return Deployment(id=uuid.uuid4().hex, model=model, version=version, stable_version=stable, target="sagemaker",
                      strategy=strategy, **fields)


@pytest.fixture
def world(sagemaker_sim: SageMakerSim, settings: Settings) -> World:  # noqa: F811
    backend = AwsBackend(settings, bucket=TEST_BUCKET, table=TEST_TABLE, validator=InProcessValidator(settings.limits))
    models = ModelService(backend.registry, backend.artifacts, backend.validator, settings.limits)
    sagemaker = make_client("sagemaker")
    calls: list[str] = []
    sagemaker.meta.events.register("before-call.sagemaker", lambda model, **_: calls.append(model.name))
    target = SageMakerTarget(sagemaker, make_client("sagemaker-runtime"), role_arn=ROLE, image_uri=IMAGE,
                             alarm_names=ALARMS, bucket=TEST_BUCKET)
    world = World(backend, models, target, sagemaker_sim, sagemaker, calls)
    assert world.push(IRIS).version == 1
    assert world.push(scale_model(2.0, name="features")).version == 2
    return world


def test_is_an_endpoint_target(world: World) -> None:
    target: EndpointTarget = world.target
    assert callable(target.shift) and callable(target.status) and callable(target.rollback)


# -------------------------------------------------------------------------------------------- names


def test_names() -> None:
    deployment_id = "0123456789abcdef0123456789abcdef"
    assert endpoint_name("iris") == "maas-iris"
    assert model_resource_name("iris", 3, deployment_id) == "maas-iris-v3-01234567"
    assert endpoint_config_name("iris", deployment_id) == "maas-iris-01234567"
    assert previous_config_name("iris", deployment_id) == "maas-iris-01234567-prev"
    long_a, long_b = "a" * 62 + "b", "a" * 62 + "c"
    for model in ("iris", long_a, long_b, "x", "trailing-", "a-" * 31 + "a", "9" * 63):
        for name in (endpoint_name(model), model_resource_name(model, 999_999_999, deployment_id),
                     endpoint_config_name(model, deployment_id), previous_config_name(model, deployment_id)):
            assert name.startswith("maas-") and len(name) <= 63 and SAGEMAKER_NAME.fullmatch(name), name
    assert endpoint_name(long_a) != endpoint_name(long_b)  # cut, then told apart by the hash
    assert endpoint_name(long_a) == endpoint_name(long_a)
    assert endpoint_name("trailing-") != "maas-trailing-"
    assert endpoint_config_name("iris", "not-hex!") == endpoint_config_name("iris", "not-hex!")
    with pytest.raises(InvalidInput):
        endpoint_name("../etc")


def test_a_stage_prefix_names_everything_and_is_checked() -> None:
    deployment_id = "0123456789abcdef0123456789abcdef"
    assert endpoint_name("iris", "maas-prod-") == "maas-prod-iris"
    assert previous_config_name("iris", deployment_id, "maas-prod-") == "maas-prod-iris-01234567-prev"
    longest = "maas-" + "s" * 16 + "-"  # the longest stage name the stack accepts
    for model in ("a" * 63, "9" * 63):
        for name in (endpoint_name(model, longest), model_resource_name(model, 999_999_999, deployment_id, longest),
                     previous_config_name(model, deployment_id, longest)):
            assert name.startswith(longest) and len(name) <= 63 and SAGEMAKER_NAME.fullmatch(name), name
    for bad in ("maas-dev", "maas_dev-", "-maas-", "maas-" + "s" * 30 + "-"):
        with pytest.raises(InvalidInput):
            SageMakerInvoker(object(), prefix=bad)


def test_the_stage_prefix_reaches_every_resource(world: World) -> None:
    staged = SageMakerTarget(world.sagemaker, make_client("sagemaker-runtime"), role_arn=ROLE, image_uri=IMAGE,
                             bucket=TEST_BUCKET, prefix="maas-dev-")
    first = deployment(1, None)
    staged.shift(first, world.version(1))
    assert world.sagemaker.describe_endpoint(EndpointName="maas-dev-big")["EndpointConfigName"] == (
        endpoint_config_name(MODEL, first.id, "maas-dev-"))
    assert world.sagemaker.describe_model(ModelName=model_resource_name(MODEL, 1, first.id, "maas-dev-"))
    # nothing is named for another stage (nor unprefixed, as the default target would name it)
    assert [e["EndpointName"] for e in world.sagemaker.list_endpoints()["Endpoints"]] == ["maas-dev-big"]


def test_content_types() -> None:
    assert request_content_type(None) == "application/json"
    assert request_content_type(77) == "application/vnd.sagemaker-triton.binary+json;json-header-size=77"
    assert answer_header_length("application/vnd.sagemaker-triton.binary+json;json-header-size=12") == 12
    assert answer_header_length("application/json") is None


# -------------------------------------------------------------------------------------------- shift


def test_first_shift_creates_model_config_and_endpoint(world: World) -> None:
    first = deployment(1, None)
    world.target.shift(first, world.version(1))
    model = world.sagemaker.describe_model(ModelName=model_resource_name(MODEL, 1, first.id))
    assert model["ExecutionRoleArn"] == ROLE
    container = model["PrimaryContainer"]
    assert container["Image"] == IMAGE
    assert container["ModelDataSource"] == {"S3DataSource": {
        "S3Uri": f"s3://{TEST_BUCKET}/models/{MODEL}/1/", "S3DataType": "S3Prefix", "CompressionType": "None"}}
    assert container["Environment"] == {"MAAS_MODEL_NAME": MODEL, "MAAS_MODEL_VERSION": "1",
                                        "MAAS_MODEL_SHA256": hashlib.sha256(IRIS).hexdigest()}
    config = world.sagemaker.describe_endpoint_config(EndpointConfigName=endpoint_config_name(MODEL, first.id))
    [variant] = config["ProductionVariants"]
    assert variant["VariantName"] == "AllTraffic" and variant["ModelName"] == model["ModelName"]
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.g5.xlarge", 1)
    endpoint = world.endpoint()
    assert endpoint["EndpointName"] == "maas-big"
    assert endpoint["EndpointConfigName"] == config["EndpointConfigName"]
    assert world.sim.updates == []  # a new endpoint is created, not updated
    assert world.target.status(first).state is TargetState.IN_SERVICE


def test_a_second_shift_is_a_no_op(world: World) -> None:
    first = deployment(1, None)
    world.target.shift(first, world.version(1))
    created = world.endpoint()["CreationTime"]
    world.calls.clear()
    world.target.shift(first, world.version(1))
    assert all(call.startswith("Describe") for call in world.calls), world.calls
    assert world.endpoint()["CreationTime"] == created and world.sim.updates == []


def test_shift_resumes_after_a_crash_between_creates(world: World) -> None:
    """A first attempt that created the model and died: the retry tolerates what exists (SageMaker
    refuses a second create of a name) and finishes."""
    first = deployment(1, None)
    world.target._create_model(first, world.version(1))
    world.target.shift(first, world.version(1))
    assert world.target.status(first).state is TargetState.IN_SERVICE


@pytest.mark.parametrize(("strategy", "fields", "routing", "execution"), [
    (Strategy.CANARY, {"canary_percent": 10, "bake_seconds": 300},
     {"Type": "CANARY", "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 10}, "WaitIntervalInSeconds": 300},
     1800 + 300),
    (Strategy.LINEAR, {"linear_step_percent": 25, "linear_interval_seconds": 60, "bake_seconds": 999},
     {"Type": "LINEAR", "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 25}, "WaitIntervalInSeconds": 60},
     1800 + 4 * 60),
    (Strategy.LINEAR, {"linear_step_percent": 5, "bake_seconds": 30},  # clamped to SageMaker's 10% minimum
     {"Type": "LINEAR", "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 10}, "WaitIntervalInSeconds": 30},
     1800 + 10 * 30),
    (Strategy.CANARY, {"canary_percent": 80},  # clamped to SageMaker's 50% maximum
     {"Type": "CANARY", "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 50}, "WaitIntervalInSeconds": 0},
     1800),
    (Strategy.ALL_AT_ONCE, {"bake_seconds": 120}, {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 120}, 1920),
])
def test_a_later_deployment_updates_blue_green_with_the_alarms(world: World, strategy: Strategy,
                                                                fields: dict[str, Any], routing: dict[str, Any],
                                                                execution: int) -> None:
    first = deployment(1, None)
    world.target.shift(first, world.version(1))
    second = deployment(2, 1, strategy=strategy, **fields)
    world.target.shift(second, world.version(2))
    [update] = world.sim.updates
    assert update["EndpointName"] == "maas-big"
    assert update["EndpointConfigName"] == endpoint_config_name(MODEL, second.id)
    assert update["DeploymentConfig"] == {
        "BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": routing, "TerminationWaitInSeconds": 0,
                                  "MaximumExecutionTimeoutInSeconds": execution},
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": name} for name in ALARMS]},
    }
    assert world.target.status(second).state is TargetState.IN_SERVICE
    assert world.target.status(first).state is TargetState.FAILED  # the endpoint no longer runs it
    # What a rollback goes back to: a copy of the config the endpoint ran before the update.
    previous = world.sagemaker.describe_endpoint_config(EndpointConfigName=previous_config_name(MODEL, second.id))
    assert previous["ProductionVariants"][0]["ModelName"] == model_resource_name(MODEL, 1, first.id)
    world.target.shift(second, world.version(2))
    assert len(world.sim.updates) == 1


def test_a_strategy_sagemaker_cannot_run_is_refused_before_anything_is_created(world: World) -> None:
    world.target.shift(deployment(1, None), world.version(1))
    world.calls.clear()
    slow = deployment(2, 1, strategy=Strategy.LINEAR, linear_step_percent=10, linear_interval_seconds=3600)
    with pytest.raises(InvalidInput) as caught:
        world.target.shift(slow, world.version(2))
    assert caught.value.field == "bake_seconds"
    assert not [call for call in world.calls if not call.startswith("Describe")]


def test_shift_checks_the_version(world: World) -> None:
    with pytest.raises(InvalidInput):
        world.target.shift(deployment(1, None), world.version(2))


# ------------------------------------------------------------------------------------ status, rollback


def test_status_while_updating_then_in_service(world: World) -> None:
    world.target.shift(deployment(1, None), world.version(1))
    world.sim.on_update = "hold"
    second = deployment(2, 1, strategy=Strategy.CANARY, bake_seconds=60)
    world.target.shift(second, world.version(2))
    status = world.target.status(second)
    assert status.state is TargetState.UPDATING and "Updating" in status.reason
    world.target.shift(second, world.version(2))  # the workflow retried: nothing changes
    assert len(world.sim.updates) == 1
    world.sim.finish("maas-big")
    assert world.target.status(second).state is TargetState.IN_SERVICE


@pytest.mark.parametrize("when", ["at_once", "while_baking"])
def test_an_alarm_rolls_the_update_back(world: World, when: str) -> None:
    first = deployment(1, None)
    world.target.shift(first, world.version(1))
    world.sim.on_update = "roll_back" if when == "at_once" else "hold"
    second = deployment(2, 1, strategy=Strategy.CANARY, bake_seconds=300)
    world.target.shift(second, world.version(2))
    if when == "while_baking":
        assert world.target.status(second).state is TargetState.UPDATING
        world.sim.alarm("maas-big")
    status = world.target.status(second)
    assert status.state is TargetState.ROLLED_BACK
    assert "rolled" in status.reason and "ALARM" in status.reason
    assert not LEAKS.search(status.reason), status.reason
    assert world.endpoint()["EndpointConfigName"] == endpoint_config_name(MODEL, first.id)
    world.target.shift(second, world.version(2))  # a retried shift never starts the update again
    assert len(world.sim.updates) == 1
    world.target.rollback(second)  # nothing left to undo
    assert len(world.sim.updates) == 1


def test_rollback_returns_the_endpoint_to_its_previous_config(world: World) -> None:
    first = deployment(1, None)
    world.target.shift(first, world.version(1))
    second = deployment(2, 1, strategy=Strategy.LINEAR, linear_step_percent=50, bake_seconds=10)
    world.target.shift(second, world.version(2))
    world.target.rollback(second)
    rollback = world.sim.updates[-1]
    assert rollback["EndpointConfigName"] == previous_config_name(MODEL, second.id)
    assert rollback["DeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"] == {
        "Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0}
    assert "AutoRollbackConfiguration" not in rollback["DeploymentConfig"]  # the alarms may be firing
    assert world.target.status(second).state is TargetState.ROLLED_BACK
    config = world.sagemaker.describe_endpoint_config(EndpointConfigName=world.endpoint()["EndpointConfigName"])
    assert config["ProductionVariants"][0]["ModelName"] == model_resource_name(MODEL, 1, first.id)
    world.target.rollback(second)
    assert len(world.sim.updates) == 2  # idempotent


def test_rollback_while_an_update_runs_asks_to_retry(world: World) -> None:
    world.target.shift(deployment(1, None), world.version(1))
    world.sim.on_update = "hold"
    second = deployment(2, 1, strategy=Strategy.CANARY, bake_seconds=300)
    world.target.shift(second, world.version(2))
    with pytest.raises(Unavailable) as caught:
        world.target.rollback(second)
    assert caught.value.retry_after > 0 and "auto-rollback" in caught.value.detail
    world.sim.finish("maas-big")
    world.sim.on_update = "complete"
    world.target.rollback(second)
    assert world.target.status(second).state is TargetState.ROLLED_BACK


def test_rolling_back_a_first_deploy_deletes_its_endpoint(world: World) -> None:
    first = deployment(1, None)
    world.target.shift(first, world.version(1))
    world.target.rollback(first)
    status = world.target.status(first)
    assert status.state is TargetState.FAILED and "does not exist" in status.reason
    world.target.rollback(first)  # idempotent


def test_rollback_without_a_known_previous_config_reports(world: World) -> None:
    first = deployment(1, None)
    world.target.shift(first, world.version(1))
    orphan = first.model_copy(update={"stable_version": 7})  # a stable version this target never saw
    with pytest.raises(Conflict) as caught:
        world.target.rollback(orphan)
    assert not LEAKS.search(caught.value.detail)
    assert world.target.status(first).state is TargetState.IN_SERVICE  # left as it was


def test_a_failed_endpoint_reports_why_without_arns(world: World) -> None:
    first = deployment(1, None)
    world.target.shift(first, world.version(1))
    world.sim.fail("maas-big", f"Failed to download model data for arn:aws:sagemaker:us-east-1:{ACCOUNT}:model/x "
                               f"from s3://{TEST_BUCKET}/models/big/1/ (account {ACCOUNT}); image "
                               f"{IMAGE} did not pass the ping health check.")
    status = world.target.status(first)
    assert status.state is TargetState.FAILED
    assert "Failed to download model data" in status.reason and "ping health check" in status.reason
    assert not LEAKS.search(status.reason), status.reason


def test_clean_reason() -> None:
    assert clean_reason(None) == ""
    assert clean_reason(f"x arn:aws:iam::{ACCOUNT}:role/r y") == "x <resource> y"
    assert clean_reason(f"account {ACCOUNT}.") == "account <account>."


# --------------------------------------------------------------------------------------------- errors


def test_management_errors_name_no_resource(world: World) -> None:
    with Stubber(world.sagemaker) as stub:
        stub.add_client_error("describe_endpoint", service_error_code="ThrottlingException", http_status_code=400)
        with pytest.raises(Throttled):
            world.target.status(deployment(1, None))
        stub.add_client_error("describe_endpoint", service_error_code="ValidationException",
                              service_message=f"Role arn:aws:iam::{ACCOUNT}:role/x cannot be assumed",
                              http_status_code=400)
        with pytest.raises(Conflict) as caught:
            world.target.status(deployment(1, None))
    assert "cannot be assumed" in caught.value.detail and not LEAKS.search(caught.value.detail)


def test_invoke_errors(world: World) -> None:
    with pytest.raises(Unavailable) as missing:
        world.target.invoke(MODEL, orjson.dumps(EXAMPLE_REQUEST), "application/json")
    assert missing.value.status == 503 and not LEAKS.search(missing.value.detail) and "maas-big" not in \
        missing.value.detail
    world.target.shift(deployment(1, None), world.version(1))
    bad = EXAMPLE_REQUEST | {"inputs": [EXAMPLE_REQUEST["inputs"][0] | {"shape": [1, 3], "data": [1.0, 2.0, 3.0]}]}
    with pytest.raises(MaasError) as refused:
        world.target.invoke(MODEL, orjson.dumps(bad), "application/json")
    assert refused.value.status == 422 and refused.value.field is not None  # the container's own problem
    assert not LEAKS.search(refused.value.detail)
    runtime = world.target.invoker.runtime
    with Stubber(runtime) as stub:
        stub.add_client_error("invoke_endpoint", service_error_code="ThrottlingException", http_status_code=400)
        with pytest.raises(Throttled):
            world.target.invoke(MODEL, b"{}", "application/json")
        stub.add_client_error("invoke_endpoint", service_error_code="ModelNotReadyException", http_status_code=429)
        with pytest.raises(Unavailable):
            world.target.invoke(MODEL, b"{}", "application/json")


def test_invoke_answers_what_raw_onnxruntime_does(world: World) -> None:
    world.target.shift(deployment(1, None), world.version(1))
    body, content_type = world.target.invoke(MODEL, orjson.dumps(EXAMPLE_REQUEST), "application/json")
    assert content_type.startswith("application/json")
    answer = json.loads(body)
    assert (answer["model_name"], answer["model_version"]) == (MODEL, "1")
    expected = ort.InferenceSession(IRIS).run(None, {"features": FEATURES})
    np.testing.assert_array_equal(np.array(answer["outputs"][1]["data"]), expected[1].reshape(-1))


# -------------------------------------------------------------------------------------------- factory


def test_factory_reads_the_stack_environment(monkeypatch: pytest.MonkeyPatch, aws_credentials: None,
                                             settings: Settings) -> None:
    monkeypatch.delenv(ENV_SAGEMAKER_PREFIX, raising=False)
    monkeypatch.delenv(ENV_SAGEMAKER_ROLE, raising=False)
    monkeypatch.delenv(ENV_SAGEMAKER_IMAGE, raising=False)
    assert sagemaker_target_from_env(settings, TEST_BUCKET) is None
    monkeypatch.setenv(ENV_SAGEMAKER_ROLE, ROLE)
    assert sagemaker_target_from_env(settings, TEST_BUCKET) is None  # no image: not configured
    monkeypatch.setenv(ENV_SAGEMAKER_IMAGE, IMAGE)
    monkeypatch.setenv(ENV_ROLLBACK_ALARMS, " maas-a, ,maas-b ")
    target = sagemaker_target_from_env(settings, TEST_BUCKET)
    assert target is not None
    assert (target.role_arn, target.image_uri, target.alarm_names, target.bucket) == (
        ROLE, IMAGE, ("maas-a", "maas-b"), TEST_BUCKET)
    assert target.prefix == "maas-"  # nothing set: the unstaged prefix
    monkeypatch.setenv(ENV_SAGEMAKER_PREFIX, "maas-dev-")
    staged = sagemaker_target_from_env(settings, TEST_BUCKET)
    assert staged is not None and staged.prefix == staged.invoker.prefix == "maas-dev-"
    monkeypatch.delenv(ENV_ROLLBACK_ALARMS)
    target = sagemaker_target_from_env(settings, TEST_BUCKET)
    assert target is not None and "AutoRollbackConfiguration" not in target.deployment_config(deployment(1, None))


# ---------------------------------------------------------------------- the inference function's proxy


@pytest.fixture
def proxied(world: World, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[
        ModuleType, str]:
    """``big`` version 1 deployed to SageMaker (the record through the registry, the endpoint through the
    target), an invoke token, and the inference handler loaded as a fresh container."""
    for name, value in {"MAAS_BUCKET": TEST_BUCKET, "MAAS_TABLE": TEST_TABLE, "MAAS_HOME": str(settings.home),
                        "MAAS_ARTIFACT_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    registry = world.backend.registry
    record = registry.create_deployment(deployment(1, None))
    world.target.shift(record, world.version(1))
    assert world.target.status(record).state is TargetState.IN_SERVICE
    registry.update_deployment(record.with_event("succeeded", status=DeploymentStatus.SUCCEEDED, stable_version=1),
                               DeploymentStatus.IN_PROGRESS)
    route = registry.get_route(MODEL)
    assert route is not None and route.target == "sagemaker"
    token = TokenService(registry).create("app", ["invoke"])[1]
    return load_handler("inference", "maas_fn_inference_sagemaker"), token


def call(module: ModuleType, event: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    raw = module.handler(event, LambdaContext())
    body = base64.b64decode(raw["body"]) if raw["isBase64Encoded"] else raw["body"].encode()
    return raw["statusCode"], raw["headers"], body


def test_proxy_json(proxied: tuple[ModuleType, str], world: World) -> None:
    fn, token = proxied
    assert fn.function._endpoints is None  # the SageMaker client loads on the first such request
    for fixture in ("v1_rest_json_infer_prod", "v2_http_json_infer_default"):
        status, headers, body = call(fn, api_event(fixture, model=MODEL, token=token,
                                                   body=orjson.dumps(EXAMPLE_REQUEST | {"id": "r-1"})))
        assert status == 200, body
        assert headers["Content-Type"] == "application/json" and headers["X-Maas-Model-Version"] == "1"
        answer = json.loads(body)
        assert (answer["model_name"], answer["model_version"], answer["id"]) == (MODEL, "1", "r-1")
        expected = dict(zip(["probabilities", "label"], ort.InferenceSession(IRIS).run(None, {"features": FEATURES}),
                            strict=True))
        for output in answer["outputs"]:
            want = expected[output["name"]]
            np.testing.assert_array_equal(np.array(output["data"], dtype=want.dtype).reshape(want.shape), want)
    assert [i["ContentType"] for i in world.sim.invocations] == ["application/json"] * 2
    assert all(i["EndpointName"] == "maas-big" for i in world.sim.invocations)


def test_proxy_binary(proxied: tuple[ModuleType, str], world: World) -> None:
    fn, token = proxied
    features = np.random.default_rng(5).normal(5, 2, size=(32, 4)).astype(np.float32)
    tensor = triton.InferInput("features", list(features.shape), "FP32")
    tensor.set_data_from_numpy(features, binary_data=True)
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=True),
               triton.InferRequestedOutput("label", binary_data=True)]
    body, json_size = triton.InferenceServerClient.generate_request_body([tensor], outputs=outputs)
    status, headers, answer = call(fn, api_event("v2_http_binary_infer_prod", model=MODEL, token=token, body=body,
                                                 header_length=json_size))
    assert status == 200, answer
    assert headers["Content-Type"] == "application/octet-stream" and headers["X-Maas-Model-Version"] == "1"
    assert world.sim.invocations[-1]["ContentType"] == (
        f"application/vnd.sagemaker-triton.binary+json;json-header-size={json_size}")
    result = triton.InferenceServerClient.parse_response_body(
        answer, header_length=int(headers["Inference-Header-Content-Length"]))
    probabilities, label = ort.InferenceSession(IRIS).run(None, {"features": features})
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    np.testing.assert_array_equal(result.as_numpy("label"), label)


def test_proxy_names_the_version_that_answered(proxied: tuple[ModuleType, str], world: World) -> None:
    """While SageMaker shifts traffic the endpoint may answer from the new version: the header says so."""
    fn, token = proxied
    registry = world.backend.registry
    [live] = registry.list_deployments(MODEL, 10, None).items
    second = registry.create_deployment(deployment(2, 1))
    world.target.shift(second, world.version(2))  # the simulated update completes at once
    request = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    status, headers, body = call(fn, api_event("v2_http_json_infer_default", model=MODEL, token=token,
                                               body=orjson.dumps(request)))
    assert status == 200, body
    assert headers["X-Maas-Model-Version"] == "2"
    assert json.loads(body)["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0]
    assert live.status is DeploymentStatus.SUCCEEDED


def test_proxy_errors(proxied: tuple[ModuleType, str], world: World) -> None:
    fn, token = proxied
    bad = EXAMPLE_REQUEST | {"inputs": [EXAMPLE_REQUEST["inputs"][0] | {"shape": [1, 3], "data": [1.0, 2.0, 3.0]}]}
    status, headers, body = call(fn, api_event("v2_http_json_infer_default", model=MODEL, token=token,
                                               body=orjson.dumps(bad)))
    assert status == 422 and headers["Content-Type"] == "application/problem+json"
    assert not LEAKS.search(body.decode()), body
    # a version the endpoint does not serve
    status, _, body = call(fn, api_event("v2_http_json_infer_default", model=MODEL, token=token,
                                         body=orjson.dumps(EXAMPLE_REQUEST),
                                         path=f"/v2/models/{MODEL}/versions/2/infer"))
    assert status == NotReady.status, body
    status, headers, _ = call(fn, api_event("v2_http_json_infer_default", model=MODEL, token=token,
                                            body=orjson.dumps(EXAMPLE_REQUEST),
                                            path=f"/v2/models/{MODEL}/versions/1/infer"))
    assert status == 200 and headers["X-Maas-Model-Version"] == "1"
    # the endpoint is gone: 503 naming neither the endpoint nor the account
    world.sagemaker.delete_endpoint(EndpointName="maas-big")
    status, headers, body = call(fn, api_event("v2_http_json_infer_default", model=MODEL, token=token,
                                               body=orjson.dumps(EXAMPLE_REQUEST)))
    assert status == 503 and "Retry-After" in headers
    assert not LEAKS.search(body.decode()) and b"maas-big" not in body
    # no token: refused before anything reaches SageMaker
    before = len(world.sim.invocations)
    status, _, _ = call(fn, api_event("v2_http_json_infer_default", model=MODEL, token="nope",
                                      body=orjson.dumps(EXAMPLE_REQUEST)))
    assert status == 401 and len(world.sim.invocations) == before


def test_readiness_of_a_sagemaker_model_loads_nothing_here(proxied: tuple[ModuleType, str], tmp_path: Path) -> None:
    fn, token = proxied
    status, _, body = call(fn, api_event("v2_http_json_infer_default", model=MODEL, token=token, method="GET",
                                         path=f"/v2/models/{MODEL}/ready"))
    assert status == 200 and json.loads(body) == {"name": MODEL, "ready": True}
    assert not [path for path in (tmp_path / "cache").rglob("*") if path.is_file()]  # no artifact fetched


def test_lambda_served_models_never_load_the_sagemaker_client(world: World, settings: Settings, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"MAAS_BUCKET": TEST_BUCKET, "MAAS_TABLE": TEST_TABLE,
                        "MAAS_ARTIFACT_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    registry = world.backend.registry
    record = registry.create_deployment(Deployment(id=uuid.uuid4().hex, model=MODEL, version=1, stable_version=None))
    registry.update_deployment(record.with_event("succeeded", status=DeploymentStatus.SUCCEEDED, stable_version=1),
                               DeploymentStatus.IN_PROGRESS)
    token = TokenService(registry).create("app", ["invoke"])[1]
    fn = load_handler("inference", "maas_fn_inference_lambda_only")
    status, headers, _ = call(fn, api_event("v2_http_json_infer_default", model=MODEL, token=token,
                                            body=orjson.dumps(EXAMPLE_REQUEST)))
    assert status == 200 and headers["X-Maas-Model-Version"] == "1"
    assert fn.function._endpoints is None and world.sim.invocations == []



# ------------------------------------------------------------------- with the deploy workflow (in-process)


def test_the_deploy_workflow_drives_the_target(world: World) -> None:
    """maas.services.deploy's steps with this target: a first deploy creates the endpoint and succeeds;
    a canary whose update SageMaker rolls back (an alarm) ends ROLLED_BACK with the endpoint back on the
    stable version's model; a healthy linear deploy is promoted."""
    from maas.services.deploy import DeployWorkflow, InProcessExecutor

    registry = world.backend.registry
    workflow = DeployWorkflow(registry, world.models, lambda version: None, targets={"sagemaker": world.target},
                              poll_seconds=0)
    executor = InProcessExecutor(workflow, background=False, backoff_s=0)
    first = executor.run(registry.create_deployment(deployment(1, None)))
    assert first.status is DeploymentStatus.SUCCEEDED, first.events
    world.sim.on_update = "roll_back"
    canary = registry.create_deployment(deployment(2, 1, strategy=Strategy.CANARY, bake_seconds=60))
    with pytest.raises(MaasError):
        executor.run(canary)
    canary = registry.get_deployment(canary.id)
    assert canary.status is DeploymentStatus.ROLLED_BACK, canary.events
    assert any("rolled" in event.detail for event in canary.events), canary.events
    config = world.sagemaker.describe_endpoint_config(EndpointConfigName=world.endpoint()["EndpointConfigName"])
    assert config["ProductionVariants"][0]["ModelName"] == model_resource_name(MODEL, 1, first.id)
    route = registry.get_route(MODEL)
    assert route is not None and route.stable_version == 1 and route.target == "sagemaker"
    world.sim.on_update = "complete"
    linear = executor.run(registry.create_deployment(deployment(2, 1, strategy=Strategy.LINEAR, bake_seconds=5)))
    assert linear.status is DeploymentStatus.SUCCEEDED, linear.events
    assert world.sim.updates[-1]["DeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"][
        "Type"] == "LINEAR"
    route = registry.get_route(MODEL)
    assert route is not None and route.stable_version == 2
