"""SageMaker, as the local stack and the tests run it: moto's, extended for maas's SageMaker target.

moto 5.2 creates models, endpoint configs and endpoints (InService at once), but raises
NotImplementedError for ``UpdateEndpoint`` and answers ``InvokeEndpoint`` with canned bodies.
``install`` patches (through the ``setattr`` it is given: pytest's monkeypatch, or ``Patches``):

* ``UpdateEndpoint``: records the request (``DeploymentConfig`` included) and, as chosen
  (``SageMakerSim.on_update``), switches the endpoint to the new config at once (``"complete"``),
  after ``update_seconds`` in ``Updating`` (``"delayed"``, the local stack's default: SageMaker's
  blue/green update takes minutes), leaves it ``Updating`` with a ``PendingDeploymentSummary`` until
  ``finish`` or ``alarm`` (``"hold"``), or simulates an alarm-triggered auto-rollback (``"roll_back"``:
  back ``InService`` on the old config, with a ``FailureReason`` naming the alarm by ARN). While an
  endpoint is updating a second update is refused as SageMaker does ("Cannot update in-progress
  endpoint").
* ``InvokeEndpoint``: runs the real serving app of ``functions/sagemaker/handler.py`` in-process on CPU
  with the endpoint's current model: its bytes are read from moto's S3 at the model's
  ``ModelDataSource`` prefix, its environment (name, version, sha256) is the SageMaker model's. Answers
  other than 2xx come back as SageMaker's ``ModelError`` (424 with ``OriginalStatusCode`` /
  ``OriginalMessage`` and a message naming the account and log group); a missing endpoint as
  SageMaker's ``ValidationError`` ("Endpoint ... of account ... not found.").
* creates refuse an existing name ("Cannot create already existing ..."), as SageMaker does (moto
  overwrites), and endpoint configs accept current instance types (moto's list stops at g4dn).

Not simulated: real provisioning time, baking and step timing, CloudWatch alarms (the caller decides
when one "fires"), GPUs."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import unquote

from maas.settings import Limits

ACCOUNT = "123456789012"
REPO = Path(__file__).resolve().parents[2]
SetAttr = Callable[..., None]


@dataclass
class SageMakerSim:
    """What a test controls and observes of the simulated SageMaker."""

    #: what an UpdateEndpoint does: "complete", "delayed", "hold" (until finish/alarm) or "roll_back"
    on_update: str = "complete"
    updates: list[dict[str, Any]] = field(default_factory=list)
    invocations: list[dict[str, Any]] = field(default_factory=list)
    #: where endpoints' models are downloaded (the container's /opt/ml/model)
    workdir: Path = field(default_factory=Path.cwd)
    #: the serving code: functions/sagemaker/handler.py (or the image asset's copy of it)
    container_source: Path = field(default_factory=lambda: REPO / "functions" / "sagemaker" / "handler.py")
    #: "delayed" updates stay Updating this long
    update_seconds: float = 2.0
    container: ModuleType | None = None
    apps: dict[str, Any] = field(default_factory=dict)

    # -- the backends of the current mock

    @staticmethod
    def backend(account: str = ACCOUNT, region: str = "us-east-1") -> Any:
        from moto.sagemaker.models import sagemaker_backends

        return sagemaker_backends[account][region]

    def endpoint(self, name: str) -> Any:
        return self.backend().endpoints[name]

    # -- what the test makes happen

    def finish(self, name: str) -> None:
        """The update in flight succeeds: the endpoint runs the new config."""
        endpoint = self.endpoint(name)
        pending = endpoint.pending_deployment_summary
        assert pending is not None, "no update in flight"
        self._switch(endpoint, pending["EndpointConfigName"])

    def alarm(self, name: str, alarm: str = "maas-InferenceErrorRate") -> None:
        """An alarm of the update's AutoRollbackConfiguration fires: SageMaker rolls the update back."""
        endpoint = self.endpoint(name)
        endpoint.pending_deployment_summary = None
        endpoint.endpoint_status = "InService"
        arn = f"arn:aws:cloudwatch:us-east-1:{ACCOUNT}:alarm:{alarm}"
        endpoint.failure_reason = (f"Deployment was rolled back because alarm {arn} went into ALARM state "
                                   f"(endpoint arn:aws:sagemaker:us-east-1:{ACCOUNT}:endpoint/{name}).")

    def fail(self, name: str, reason: str) -> None:
        endpoint = self.endpoint(name)
        endpoint.endpoint_status = "Failed"
        endpoint.failure_reason = reason

    def _finish_if_pending(self, endpoint: Any, config_name: str) -> None:
        pending = endpoint.pending_deployment_summary
        if pending is not None and pending["EndpointConfigName"] == config_name:
            self._switch(endpoint, config_name)

    def _switch(self, endpoint: Any, config_name: str) -> None:
        config = self.backend().endpoint_configs[config_name]
        endpoint.endpoint_config_name = config_name
        endpoint.production_variants = endpoint._process_production_variants(config.production_variants)
        endpoint.pending_deployment_summary = None
        endpoint.endpoint_status = "InService"
        endpoint.failure_reason = None

    # -- the patched operations

    def update_endpoint(self, backend: Any, name: str, config_name: str, deployment_config: Any) -> str:
        from moto.sagemaker.exceptions import ValidationError
        from moto.sagemaker.models import FakeEndpoint, FakeEndpointConfig

        endpoint = backend.endpoints.get(name)
        if endpoint is None:
            arn = FakeEndpoint.arn_formatter(name, backend.account_id, backend.region_name)
            raise ValidationError(message=f"Could not find endpoint '{arn}'.")
        if config_name not in backend.endpoint_configs:
            arn = FakeEndpointConfig.arn_formatter(config_name, backend.account_id, backend.region_name)
            raise ValidationError(message=f"Could not find endpoint configuration '{arn}'.")
        if endpoint.endpoint_status != "InService":
            raise ValidationError(message=f'Cannot update in-progress endpoint "{endpoint.arn}".')
        self.updates.append({"EndpointName": name, "EndpointConfigName": config_name,
                             "DeploymentConfig": deployment_config})
        endpoint.last_deployment_config = deployment_config
        if self.on_update == "complete":
            self._switch(endpoint, config_name)
        elif self.on_update == "hold":
            endpoint.endpoint_status = "Updating"
            endpoint.pending_deployment_summary = {"EndpointConfigName": config_name}
        elif self.on_update == "delayed":
            endpoint.endpoint_status = "Updating"
            endpoint.pending_deployment_summary = {"EndpointConfigName": config_name}
            timer = threading.Timer(self.update_seconds, self._finish_if_pending, (endpoint, config_name))
            timer.daemon = True
            timer.start()
        elif self.on_update == "roll_back":
            endpoint.pending_deployment_summary = {"EndpointConfigName": config_name}
            self.alarm(name)
        else:  # pragma: no cover - a test's typo
            raise AssertionError(f"unknown on_update {self.on_update!r}")
        return str(endpoint.arn)

    def invoke(self, account: str, region: str, name: str, body: bytes, content_type: str) -> tuple[int, dict[str, str],
                                                                                                    bytes]:
        self.invocations.append({"EndpointName": name, "ContentType": content_type, "Body": body})
        backend = self.backend(account, region)
        endpoint = backend.endpoints.get(name)
        if endpoint is None or endpoint.endpoint_status not in ("InService", "Updating", "SystemUpdating"):
            message = f"Endpoint {name} of account {account} not found."
            return 400, {"x-amzn-ErrorType": "ValidationError", "Content-Type": "application/json"}, \
                json.dumps({"message": message}).encode()
        config = backend.endpoint_configs[endpoint.endpoint_config_name]
        model = backend._models[config.production_variants[0]["ModelName"]]
        app = self._app(model)
        status, headers, answer = asyncio.run(_asgi_post(app, "/invocations", body, content_type))
        if 200 <= status < 300:
            return status, {"Content-Type": headers.get("content-type", "application/json"),
                            "x-Amzn-Invoked-Production-Variant": "AllTraffic"}, answer
        text = answer.decode("utf-8", "replace")
        log_group = f"/aws/sagemaker/Endpoints/{name}"
        error = {
            "Message": (f'Received client error ({status}) from primary with message "{text}". See '
                        f"https://{region}.console.aws.amazon.com/cloudwatch/home?region={region}#logEventViewer:"
                        f"group={log_group} in account {account} for more information."),
            "OriginalStatusCode": status,
            "OriginalMessage": text,
            "LogStreamArn": f"arn:aws:logs:{region}:{account}:log-group:{log_group}",
        }
        return 424, {"x-amzn-ErrorType": "ModelError", "Content-Type": "application/json"}, json.dumps(error).encode()

    def _app(self, model: Any) -> Any:
        """The container of a SageMaker model, loaded once: what SageMaker's ModelDataSource download puts
        in /opt/ml/model, then the serving app's start-up (sha256 check included)."""
        from moto.s3.models import s3_backends

        cached = self.apps.get(model.model_name)
        if cached is not None:
            return cached
        container = model.primary_container
        source = container["ModelDataSource"]["S3DataSource"]
        assert source["S3DataType"] == "S3Prefix" and source["CompressionType"] == "None", source
        bucket, _, prefix = source["S3Uri"].removeprefix("s3://").partition("/")
        s3 = s3_backends[ACCOUNT]["aws"]
        model_dir = self.workdir / model.model_name
        model_dir.mkdir(parents=True, exist_ok=True)
        keys = s3.get_bucket(bucket).keys
        for key in [name for name in keys if name.startswith(prefix) and "/" not in name[len(prefix):]]:
            (model_dir / key[len(prefix):]).write_bytes(keys[key].value)  # the current object, as S3 copies
        if self.container is None:
            self.container = _load_module(self.container_source, "maas_fn_sagemaker_sim")
        env = container.get("Environment", {})
        app = self.container.SageMakerApp(model_dir, Limits(), providers=["CPUExecutionProvider"],
                                          model_name=env.get("MAAS_MODEL_NAME", "model"),
                                          model_version=int(env.get("MAAS_MODEL_VERSION", "1")),
                                          expected_sha256=env.get("MAAS_MODEL_SHA256"))
        app.load()
        self.apps[model.model_name] = app
        return app


async def _asgi_post(app: Any, path: str, body: bytes, content_type: str) -> tuple[int, dict[str, str], bytes]:
    scope = {"type": "http", "method": "POST", "path": path, "headers": [
        (b"content-type", content_type.encode("latin-1")), (b"content-length", str(len(body)).encode())]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def _load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _refuse_duplicates(setattr_: SetAttr) -> None:
    from moto.sagemaker.exceptions import ValidationError
    from moto.sagemaker.models import SageMakerModelBackend

    def guard(method: str, store: str, argument: str, what: str) -> None:
        original = getattr(SageMakerModelBackend, method)

        def create(self: Any, *args: Any, **kwargs: Any) -> Any:
            name = kwargs.get(argument, args[0] if args else None)
            if name in getattr(self, store):
                raise ValidationError(message=f'Cannot create already existing {what} "arn:aws:sagemaker:'
                                              f'{self.region_name}:{self.account_id}:{name}".')
            return original(self, *args, **kwargs)

        setattr_(SageMakerModelBackend, method, create)

    guard("create_model", "_models", "model_name", "model")
    guard("create_endpoint_config", "endpoint_configs", "endpoint_config_name", "endpoint configuration")
    guard("create_endpoint", "endpoints", "endpoint_name", "endpoint")


def _validate_instance_type(self: Any, instance_type: str) -> None:
    """Any ``ml.<family>.<size>`` (moto's list stops at g4dn; ml.g5, g6, p4d... are real)."""
    from moto.sagemaker.exceptions import ValidationError

    if not re.fullmatch(r"ml\.[a-z0-9-]+\.[a-z0-9]+", instance_type):
        raise ValidationError(message=f"Value '{instance_type}' at 'instanceType' failed to satisfy constraint")


def install(sim: SageMakerSim, setattr_: SetAttr) -> None:
    """Patch moto's SageMaker with ``sim`` (``setattr_(owner, name, value)`` records what it replaces)."""
    from moto.core.responses import ActionResult
    from moto.sagemaker.models import FakeEndpoint, FakeEndpointConfig
    from moto.sagemaker.responses import SageMakerResponse
    from moto.sagemakerruntime.responses import SageMakerRuntimeResponse

    def update_endpoint(self: Any) -> Any:
        arn = sim.update_endpoint(self.sagemaker_backend, self._get_param("EndpointName"),
                                  self._get_param("EndpointConfigName"), self._get_param("DeploymentConfig"))
        return ActionResult({"EndpointArn": arn})

    def invoke_endpoint(self: Any) -> Any:
        name = unquote(self.path.split("/")[2])  # /endpoints/<name>/invocations
        status, headers, body = sim.invoke(self.current_account, self.region, name, self.raw_body,
                                           self.headers.get("Content-Type", "application/json"))
        return status, headers | {"status": str(status)}, body

    original_setup = SageMakerRuntimeResponse.setup_class

    def setup_class(self: Any, request: Any, full_url: str, headers: Any, use_raw_body: bool = False) -> None:
        # InvokeEndpoint bodies are blobs (the binary tensor extension): keep them bytes.
        original_setup(self, request, full_url, headers, use_raw_body=True)

    original_init = FakeEndpoint.__init__

    def endpoint_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.pending_deployment_summary = None
        self.last_deployment_config = None

    setattr_(SageMakerResponse, "update_endpoint", update_endpoint, raising=False)
    setattr_(SageMakerRuntimeResponse, "invoke_endpoint", invoke_endpoint)
    setattr_(SageMakerRuntimeResponse, "setup_class", setup_class)
    setattr_(FakeEndpoint, "__init__", endpoint_init)
    setattr_(FakeEndpointConfig, "validate_instance_type", _validate_instance_type)
    _refuse_duplicates(setattr_)
