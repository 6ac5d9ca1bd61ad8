"""SageMaker real-time endpoints as a deployment target (``maas.ports.EndpointTarget``) for large or GPU
models, and the proxy the inference function sends such models' requests through.

One endpoint per model, serving the GPU image of ``functions/sagemaker`` (OIP v2 on ``/invocations``).
Every deployment creates its own SageMaker model and endpoint config, then creates the endpoint (the
model's first SageMaker deploy) or updates it with a blue/green ``DeploymentConfig``: the deployment's
strategy becomes SageMaker's traffic routing (``ALL_AT_ONCE``, ``CANARY``, ``LINEAR``, baking
``bake_seconds`` / ``linear_interval_seconds`` per step) and the stack's alarms its
``AutoRollbackConfiguration``, so SageMaker itself shifts traffic and rolls back when an alarm fires.

Names (SageMaker allows 63 characters of ``[a-zA-Z0-9-]``, starting and ending with a letter or digit)
start with the stage's prefix ``<p>``: ``maas-<stage>-`` on AWS (the stack sets ``MAAS_SAGEMAKER_PREFIX``
and grants IAM rights on ``maas-<stage>-*`` only, so two stages in one account share nothing), ``maas-``
where nothing sets it:

=================  ==========================================================================
endpoint           ``<p><model>``
model              ``<p><model>-v<version>-<short id>``
endpoint config    ``<p><model>-<short id>``
previous config    ``<p><model>-<short id>-prev``: a copy of the config the endpoint ran before
                   this deployment's update (what ``rollback`` returns to)
=================  ==========================================================================

``<short id>`` is the first 8 hex digits of the deployment id. A model name that would make a name too
long (model names have up to 63 characters), or end it with ``-``, is cut and followed by ``-`` and the
first 8 hex digits of its sha256: ``<p><first characters of the model>-<hash>...``, the same for every
call, distinct for distinct models.

Idempotency: every create first looks for the resource and tolerates SageMaker's "already existing"
answer; ``shift`` does nothing when the endpoint already runs (or is updating to) this deployment's
config, nor when this deployment's update already ran and was rolled back (its previous config exists).

What SageMaker cannot do, and what this module does instead:

* there is no API to stop a blue/green update in flight, and ``UpdateEndpoint`` is refused while the
  endpoint is updating. ``rollback`` updates the endpoint back to the previous config once SageMaker
  accepts it; while an update runs it raises ``Unavailable`` (retry later: the alarm-based
  auto-rollback keeps guarding that update meanwhile).
* the first deploy of a model has no previous config: rolling it back deletes the endpoint (nothing
  routes to it, and an idle GPU instance costs money).
* ``DescribeEndpoint`` does not say which config an update tried: an endpoint back ``InService`` on
  another config after this deployment's update (its previous config exists) is reported
  ``ROLLED_BACK``.

The SageMaker model reads the version's S3 prefix uncompressed (``ModelDataSource``, the registry's
object as is): S3 copies the current object of ``models/<name>/<version>/``, not the pinned version id,
so the container is given ``MAAS_MODEL_SHA256`` and refuses bytes that do not hash to the registered
digest. Errors never name endpoints, ARNs, accounts or buckets (those go to the log)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from contextlib import suppress
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from maas.backends.aws.clients import make_client
from maas.backends.aws.errors import error_code, translate
from maas.domain import Deployment, ModelVersion, Strategy, VersionStatus, check_model_name
from maas.errors import (
    BadRequest,
    Conflict,
    InferenceFailed,
    InvalidInput,
    MaasError,
    NotReady,
    PayloadTooLarge,
    Throttled,
    Unavailable,
)
from maas.ports import TargetState, TargetStatus
from maas.settings import (
    ENV_ENDPOINT,
    ENV_ROLLBACK_ALARMS,
    ENV_SAGEMAKER_IMAGE,
    ENV_SAGEMAKER_PREFIX,
    ENV_SAGEMAKER_ROLE,
    SAGEMAKER_NAME_PREFIX,
    Settings,
)

log = logging.getLogger("maas.aws")

#: ``Route.target`` / ``Deployment.target`` of models served by a SageMaker endpoint
TARGET = "sagemaker"
WHAT = "the SageMaker endpoint service"
WHAT_INVOKE = "the model's SageMaker endpoint"
VARIANT = "AllTraffic"
MAX_NAME = 63
MAX_PREFIX = 24  # maas-<stage>-: room is left for the model, a version and a deployment id
SHORT_ID = 8
PREVIOUS_SUFFIX = "-prev"
_SAGEMAKER_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
_HEX_ID = re.compile(r"[0-9a-f]{8,}")

# What functions/sagemaker/handler.py reads (the container's environment and media types).
ENV_MODEL_NAME = "MAAS_MODEL_NAME"
ENV_MODEL_VERSION = "MAAS_MODEL_VERSION"
ENV_MODEL_SHA256 = "MAAS_MODEL_SHA256"
JSON = "application/json"
TRITON_BINARY = "application/vnd.sagemaker-triton.binary+json"
HEADER_SIZE_PARAM = "json-header-size"

# SageMaker's limits on a blue/green DeploymentConfig.
MAX_WAIT_S = 3600  # WaitIntervalInSeconds and TerminationWaitInSeconds: 0..3600
MIN_EXECUTION_S, MAX_EXECUTION_S = 600, 14400  # MaximumExecutionTimeoutInSeconds
#: the part of MaximumExecutionTimeoutInSeconds left for provisioning the new fleet (GPU instances,
#: image pull, model download, /ping) on top of the strategy's waits
PROVISIONING_S = 1800
MAX_CANARY_PERCENT = 50  # CanarySize: at most half of the fleet
MIN_LINEAR_PERCENT, MAX_LINEAR_PERCENT = 10, 50  # LinearStepSize: 10-50% of the fleet
MAX_ALARMS = 10

IN_FLIGHT = frozenset({"Creating", "Updating", "SystemUpdating", "RollingBack"})
BROKEN = frozenset({"Failed", "UpdateRollbackFailed", "OutOfService", "Deleting"})
#: the fields of a described production variant that CreateEndpointConfig accepts back
VARIANT_FIELDS = ("VariantName", "ModelName", "InitialInstanceCount", "InstanceType", "InitialVariantWeight",
                  "AcceleratorType", "VolumeSizeInGB", "ModelDataDownloadTimeoutInSeconds",
                  "ContainerStartupHealthCheckTimeoutInSeconds", "InferenceAmiVersion", "ServerlessConfig",
                  "ManagedInstanceScaling", "RoutingConfig", "CoreDumpConfig", "EnableSSMAccess")

_ARN = re.compile(r"arn:aws[a-zA-Z-]*:[^\s'\"<>,;)]*")
_S3_URI = re.compile(r"s3://[^\s'\"<>,;)]*")
_AWS_HOST = re.compile(r"[\w.-]*\.amazonaws\.com(?:\.cn)?[^\s'\"<>,;)]*")
_ACCOUNT = re.compile(r"(?<![0-9])[0-9]{12}(?![0-9])")
_ANSWERED_VERSION = re.compile(rb'"model_version"\s*:\s*"([1-9][0-9]{0,8})"')
MAX_REASON = 500


# ------------------------------------------------------------------------------------------------ names


def _short_id(deployment_id: str) -> str:
    if _HEX_ID.fullmatch(deployment_id):
        return deployment_id[:SHORT_ID]
    return hashlib.sha256(deployment_id.encode()).hexdigest()[:SHORT_ID]


def _name(model: str, suffix: str = "", prefix: str = SAGEMAKER_NAME_PREFIX) -> str:
    """``<prefix><model><suffix>``, or with the model cut and hashed where that is not a valid name."""
    check_model_name(model, field="model")
    full = f"{prefix}{model}{suffix}"
    if len(full) <= MAX_NAME and _SAGEMAKER_NAME.fullmatch(full):
        return full
    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    room = MAX_NAME - len(prefix) - len(suffix) - len(digest) - 1
    stem = model[:room].rstrip("-")
    name = f"{prefix}{stem}-{digest}{suffix}" if stem else f"{prefix}{digest}{suffix}"
    assert len(name) <= MAX_NAME and _SAGEMAKER_NAME.fullmatch(name), name
    return name


def check_name_prefix(prefix: str) -> str:
    """A stage's name prefix (``maas-<stage>-``): a valid start of a SageMaker name, with room left."""
    if not _SAGEMAKER_NAME.fullmatch(f"{prefix}x") or not prefix.endswith("-") or len(prefix) > MAX_PREFIX:
        raise InvalidInput(f"the SageMaker name prefix must be letters, digits and '-', end with '-' and have at "
                           f"most {MAX_PREFIX} characters (got {prefix!r})", field="sagemaker_prefix")
    return prefix


def endpoint_name(model: str, prefix: str = SAGEMAKER_NAME_PREFIX) -> str:
    return _name(model, prefix=prefix)


def model_resource_name(model: str, version: int, deployment_id: str, prefix: str = SAGEMAKER_NAME_PREFIX) -> str:
    return _name(model, f"-v{version}-{_short_id(deployment_id)}", prefix)


def endpoint_config_name(model: str, deployment_id: str, prefix: str = SAGEMAKER_NAME_PREFIX) -> str:
    return _name(model, f"-{_short_id(deployment_id)}", prefix)


def previous_config_name(model: str, deployment_id: str, prefix: str = SAGEMAKER_NAME_PREFIX) -> str:
    return _name(model, f"-{_short_id(deployment_id)}{PREVIOUS_SUFFIX}", prefix)


# ---------------------------------------------------------------------------------------- small helpers


def clean_reason(text: str | None) -> str:
    """A SageMaker status or failure message without ARNs, account ids, S3 locations or AWS hosts."""
    if not text:
        return ""
    text = _ARN.sub("<resource>", text)
    text = _S3_URI.sub("<s3 location>", text)
    text = _AWS_HOST.sub("<aws resource>", text)
    text = _ACCOUNT.sub("<account>", text)
    return text[:MAX_REASON]


def _message(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Message", ""))


def _already_exists(error: ClientError) -> bool:
    return error_code(error) in ("ValidationException", "ValidationError") and "already exist" in _message(
        error).lower()


def _not_found(error: ClientError) -> bool:
    message = _message(error).lower()
    return error_code(error) in ("ValidationException", "ValidationError") and (
        "could not find" in message or "not found" in message or "does not exist" in message)


def _clamp(value: float, low: int, high: int) -> int:
    return max(low, min(high, round(value)))


def request_content_type(header_length: int | None) -> str:
    """The ``ContentType`` of an OIP request: JSON, or the binary extension with its JSON header length
    in the media type (SageMaker forwards no other header to the container)."""
    if header_length is None:
        return JSON
    return f"{TRITON_BINARY};{HEADER_SIZE_PARAM}={header_length}"


def answer_header_length(content_type: str | None) -> int | None:
    """The JSON header length of a binary answer (from ``json-header-size``), None for a JSON one."""
    if not content_type:
        return None
    media, *params = content_type.split(";")
    if media.strip().lower() != TRITON_BINARY:
        return None
    for param in params:
        name, _, raw = param.partition("=")
        raw = raw.strip().strip('"')
        if name.strip().lower() == HEADER_SIZE_PARAM and raw.isascii() and raw.isdigit():
            return int(raw)
    raise InferenceFailed("the model's endpoint answered a binary body without its JSON header length")


def answered_version(payload: bytes, header_length: int | None) -> int | None:
    """The ``model_version`` an OIP answer reports (the container puts it among the first keys)."""
    head = payload[: header_length if header_length is not None else 1024][:1024]
    found = _ANSWERED_VERSION.search(head)
    return int(found.group(1)) if found else None


def _maas_errors_by_slug() -> dict[str, type[MaasError]]:
    found: dict[str, type[MaasError]] = {}
    pending: list[type[MaasError]] = [MaasError]
    while pending:
        cls = pending.pop()
        if cls.__module__ == "maas.errors":
            found.setdefault(cls.slug, cls)
        pending.extend(cls.__subclasses__())
    return found


def _container_problem(status: int, message: str) -> MaasError:
    """The maas error the container answered (its problem+json), rebuilt for the proxy's client."""
    problem: Any = None
    with suppress(ValueError):
        problem = json.loads(message)
    detail = ""
    cls: type[MaasError] | None = None
    field: str | None = None
    extra: dict[str, Any] = {}
    if isinstance(problem, dict):
        detail = clean_reason(str(problem.get("detail") or ""))
        slug = str(problem.get("type") or "").rsplit("/", 1)[-1]
        candidate = _maas_errors_by_slug().get(slug)
        if candidate is not None and candidate.status == status:
            cls = candidate
        raw_field = problem.get("field")
        field = raw_field if isinstance(raw_field, str) else None
        extra = {key: value for key, value in problem.items()
                 if key not in ("type", "title", "status", "detail", "field", "instance")}
    if cls is None:
        cls = {400: BadRequest, 409: NotReady, 413: PayloadTooLarge, 422: InvalidInput, 429: Throttled,
               503: Unavailable}.get(status, BadRequest if 400 <= status < 500 else InferenceFailed)
    if not detail:
        detail = ("the model's endpoint refused the request" if status < 500
                  else "the model's endpoint failed on this request")
    if cls in (Throttled, Unavailable):
        return cls(detail, retry_after=5, field=field, extra=extra)  # type: ignore[call-arg]
    return cls(detail, field=field, extra=extra)


def invoke_error(error: ClientError, model: str) -> MaasError:
    """What a failed ``InvokeEndpoint`` becomes for the client (nothing names the endpoint or account)."""
    code = error_code(error)
    if code == "ModelError":
        response = error.response
        raw_status = response.get("OriginalStatusCode") or response.get("Error", {}).get("OriginalStatusCode")
        try:
            status = int(raw_status) if raw_status is not None else 500
        except (TypeError, ValueError):
            status = 500
        message = response.get("OriginalMessage") or response.get("Error", {}).get("OriginalMessage") or ""
        if not 400 <= status <= 599:
            status = 500
        problem = _container_problem(status, str(message))
        if problem.status >= 500:
            log.error("SageMaker endpoint of %r answered %s: %s", model, status, problem.detail)
        return problem
    if code == "ModelNotReadyException":
        return Unavailable(f"the SageMaker endpoint of model {model!r} is not ready yet; retry in a moment",
                           retry_after=10)
    if code in ("ValidationError", "ValidationException"):
        if _not_found(error):
            log.error("no SageMaker endpoint for %r: %s", model, _message(error))
            return Unavailable(f"model {model!r} is deployed to SageMaker but its endpoint is not running; "
                               "the operator should check the deployment", retry_after=30)
        log.error("SageMaker refused a request for %r: %s", model, _message(error))
        return BadRequest(f"the SageMaker endpoint of model {model!r} refused the request as invalid")
    return translate(error, WHAT_INVOKE)


# ---------------------------------------------------------------------------------------------- invoke


class SageMakerInvoker:
    """``InvokeEndpoint`` for OIP v2 requests: all the inference function needs (it has no role or image)."""

    def __init__(self, runtime_client: Any, *, prefix: str = SAGEMAKER_NAME_PREFIX):
        self.runtime = runtime_client
        self.prefix = check_name_prefix(prefix)

    def invoke(self, model: str, body: bytes, content_type: str) -> tuple[bytes, str]:
        name = endpoint_name(model, self.prefix)
        try:
            answer = self.runtime.invoke_endpoint(EndpointName=name, Body=body, ContentType=content_type)
            payload = answer["Body"].read()
        except ClientError as error:
            raise invoke_error(error, model) from None
        except BotoCoreError as error:
            raise translate(error, WHAT_INVOKE) from None
        return bytes(payload), str(answer.get("ContentType") or JSON)


def sagemaker_invoker_from_env() -> SageMakerInvoker:
    return SageMakerInvoker(make_client("sagemaker-runtime", endpoint_url=os.environ.get(ENV_ENDPOINT) or None),
                            prefix=name_prefix_from_env())


# ---------------------------------------------------------------------------------------------- target


class SageMakerTarget:
    """``maas.ports.EndpointTarget`` on SageMaker real-time endpoints (see the module's docstring).

    ``sagemaker_client`` / ``runtime_client``: boto3 ``sagemaker`` and ``sagemaker-runtime`` clients;
    ``role_arn``: the execution role SageMaker runs the models under; ``image_uri``: the serving image;
    ``alarm_names``: CloudWatch alarms whose ALARM state makes SageMaker roll an update back (at most 10);
    ``bucket``: where the registry keeps the models; ``termination_wait_s``: how long SageMaker keeps the
    old fleet after a successful update (0-3600)."""

    def __init__(self, sagemaker_client: Any, runtime_client: Any, *, role_arn: str, image_uri: str,
                 instance_type: str = "ml.g5.xlarge", initial_instance_count: int = 1,
                 alarm_names: Sequence[str] = (), bucket: str, termination_wait_s: int = 0,
                 prefix: str = SAGEMAKER_NAME_PREFIX):
        if not role_arn or not image_uri or not bucket:
            raise InvalidInput("a SageMaker target needs an execution role, an image and a bucket",
                               field="sagemaker")
        if initial_instance_count < 1:
            raise InvalidInput("initial_instance_count must be at least 1", field="initial_instance_count")
        alarms = tuple(name for name in alarm_names if name)
        if len(alarms) > MAX_ALARMS:
            raise InvalidInput(f"SageMaker watches at most {MAX_ALARMS} alarms per update", field="alarm_names")
        if not 0 <= termination_wait_s <= MAX_WAIT_S:
            raise InvalidInput(f"termination_wait_s must be 0-{MAX_WAIT_S}", field="termination_wait_s")
        self.sagemaker = sagemaker_client
        self.invoker = SageMakerInvoker(runtime_client, prefix=prefix)
        self.prefix = self.invoker.prefix
        self.role_arn = role_arn
        self.image_uri = image_uri
        self.instance_type = instance_type
        self.initial_instance_count = initial_instance_count
        self.alarm_names = alarms
        self.bucket = bucket
        self.termination_wait_s = termination_wait_s

    # -- EndpointTarget

    def shift(self, deployment: Deployment, version: ModelVersion) -> None:
        """Create the deployment's SageMaker model and endpoint config, then create the endpoint or start
        its blue/green update (see the module's docstring for what makes a second call a no-op)."""
        self._check(deployment, version)
        name = endpoint_name(deployment.model, self.prefix)
        ours = endpoint_config_name(deployment.model, deployment.id, self.prefix)
        endpoint = self._describe_endpoint(name)
        if endpoint is not None:
            current, pending, state = _configs(endpoint)
            if ours in (current, pending):
                if pending == ours and current not in (None, ours):
                    self._keep_previous(deployment, current)  # a crash right after UpdateEndpoint
                return
            if self._config_exists(previous_config_name(deployment.model, deployment.id, self.prefix)):
                return  # this deployment's update already ran (and was rolled back): never start it twice
            if state == "Failed":
                log.warning("endpoint %s is Failed; deleting it so that it can be created again", name)
                self._call("DeleteEndpoint", self.sagemaker.delete_endpoint, tolerate_missing=True,
                           EndpointName=name)
                raise Unavailable("the model's previous SageMaker endpoint had failed and is being deleted; "
                                  "retry in a moment", retry_after=30)
            if state != "InService":
                raise Unavailable(f"the model's SageMaker endpoint is {state}; retry when it is in service",
                                  retry_after=30)
        deployment_config = self.deployment_config(deployment)  # refuses impossible strategies before creating
        self._create_model(deployment, version)
        self._create_config(ours, model_resource_name(deployment.model, version.version, deployment.id, self.prefix),
                            deployment)
        if endpoint is None:
            self._call("CreateEndpoint", self.sagemaker.create_endpoint, tolerate_exists=True,
                       EndpointName=name, EndpointConfigName=ours, Tags=self._tags(deployment))
            return
        current = endpoint.get("EndpointConfigName")
        try:
            self.sagemaker.update_endpoint(EndpointName=name, EndpointConfigName=ours,
                                           DeploymentConfig=deployment_config)
        except ClientError as error:
            if error_code(error) in ("ValidationException", "ValidationError") and \
                    "in-progress" in _message(error).lower():
                raise Unavailable("the model's SageMaker endpoint is being updated; retry when it is in service",
                                  retry_after=30) from None
            raise self._translate(error, "UpdateEndpoint") from None
        except BotoCoreError as error:
            raise translate(error, WHAT) from None
        if isinstance(current, str):
            self._keep_previous(deployment, current)

    def status(self, deployment: Deployment) -> TargetStatus:
        endpoint = self._describe_endpoint(endpoint_name(deployment.model, self.prefix))
        if endpoint is None:
            return TargetStatus(TargetState.FAILED, "the model's SageMaker endpoint does not exist")
        ours = endpoint_config_name(deployment.model, deployment.id, self.prefix)
        current, pending, state = _configs(endpoint)
        reason = clean_reason(endpoint.get("FailureReason"))
        if state in BROKEN:
            return TargetStatus(TargetState.FAILED, reason or f"the SageMaker endpoint is {state}")
        if state in IN_FLIGHT:
            return TargetStatus(TargetState.UPDATING, f"the SageMaker endpoint is {state}")
        if state == "InService" and current == ours and pending in (None, ours):
            return TargetStatus(TargetState.IN_SERVICE)
        if state == "InService" and (
                self._config_exists(previous_config_name(deployment.model, deployment.id, self.prefix))
                or "roll" in reason.lower()):
            why = "SageMaker rolled the endpoint back to its previous configuration"
            return TargetStatus(TargetState.ROLLED_BACK, f"{why}: {reason}" if reason else why)
        if state == "InService":
            return TargetStatus(TargetState.FAILED, "the SageMaker endpoint does not run this deployment "
                                                    "(its update never started)")
        return TargetStatus(TargetState.UPDATING, f"the SageMaker endpoint is {state}")

    def rollback(self, deployment: Deployment) -> None:
        """Put the endpoint back on the configuration it ran before this deployment (a blue/green
        all-at-once update without alarms: the alarms may be firing because of the version being
        undone). Nothing to do if the endpoint no longer runs this deployment. A model's first deploy
        has nothing before it: its endpoint is deleted. SageMaker refuses updates while one runs (and
        has no way to stop one): then this raises ``Unavailable``, to be retried, and SageMaker's
        alarm-based auto-rollback keeps guarding the update meanwhile. If the previous configuration is
        unknown this raises ``Conflict`` and leaves the endpoint as it is."""
        name = endpoint_name(deployment.model, self.prefix)
        endpoint = self._describe_endpoint(name)
        if endpoint is None:
            return
        ours = endpoint_config_name(deployment.model, deployment.id, self.prefix)
        current, pending, state = _configs(endpoint)
        if ours not in (current, pending):
            return  # rolled back already (by SageMaker or an earlier call), or never shifted
        previous = previous_config_name(deployment.model, deployment.id, self.prefix)
        if pending == ours and current not in (None, ours):
            self._keep_previous(deployment, current)
        if self._config_exists(previous):
            if state in IN_FLIGHT:
                raise Unavailable("SageMaker cannot change an endpoint while its update runs; its alarm-based "
                                  "auto-rollback still applies. Retry the rollback when the update settles",
                                  retry_after=60)
            try:
                self.sagemaker.update_endpoint(EndpointName=name, EndpointConfigName=previous,
                                               DeploymentConfig=self.rollback_config())
            except ClientError as error:
                if "in-progress" in _message(error).lower():
                    raise Unavailable("the model's SageMaker endpoint is being updated; retry the rollback "
                                      "when it settles", retry_after=60) from None
                raise self._translate(error, "UpdateEndpoint") from None
            except BotoCoreError as error:
                raise translate(error, WHAT) from None
            log.info("endpoint %s rolled back to %s", name, previous)
            return
        if deployment.stable_version is None and current == ours:
            if state in IN_FLIGHT:
                raise Unavailable("the model's SageMaker endpoint is still being created; retry the rollback "
                                  "when it settles", retry_after=60)
            self._call("DeleteEndpoint", self.sagemaker.delete_endpoint, tolerate_missing=True, EndpointName=name)
            log.info("endpoint %s deleted: the model's first deploy was rolled back", name)
            return
        log.error("endpoint %s: no previous configuration recorded for deployment %s", name, deployment.id)
        raise Conflict(f"the SageMaker endpoint of model {deployment.model!r} still serves version "
                       f"{deployment.version}: the configuration it ran before is unknown; deploy the "
                       "stable version again")

    def invoke(self, model: str, body: bytes, content_type: str) -> tuple[bytes, str]:
        return self.invoker.invoke(model, body, content_type)

    # -- what SageMaker is asked

    def deployment_config(self, deployment: Deployment) -> dict[str, Any]:
        """The blue/green ``DeploymentConfig`` of an update for ``deployment``'s strategy (percentages
        are clamped to what SageMaker accepts: canary 1-50%, linear steps 10-50%; waits to 0-3600 s)."""
        wait = _clamp(deployment.bake_seconds, 0, MAX_WAIT_S)
        routing: dict[str, Any]
        if deployment.strategy is Strategy.CANARY:
            routing = {"Type": "CANARY", "WaitIntervalInSeconds": wait,
                       "CanarySize": {"Type": "CAPACITY_PERCENT",
                                      "Value": _clamp(deployment.canary_percent, 1, MAX_CANARY_PERCENT)}}
            waiting = wait
        elif deployment.strategy is Strategy.LINEAR:
            step = _clamp(deployment.linear_step_percent, MIN_LINEAR_PERCENT, MAX_LINEAR_PERCENT)
            interval = deployment.linear_interval_seconds
            wait = _clamp(deployment.bake_seconds if interval is None else interval, 0, MAX_WAIT_S)
            routing = {"Type": "LINEAR", "WaitIntervalInSeconds": wait,
                       "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": step}}
            waiting = math.ceil(100 / step) * wait
        else:
            routing = {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": wait}
            waiting = wait
        needed = PROVISIONING_S + waiting + self.termination_wait_s
        if needed > MAX_EXECUTION_S:
            raise InvalidInput(
                f"this strategy bakes {waiting} s in all; a SageMaker update may last at most {MAX_EXECUTION_S} s "
                f"({PROVISIONING_S} s of which are kept for provisioning): shorten the bake or take larger steps",
                field="bake_seconds")
        config: dict[str, Any] = {"BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": routing,
            "TerminationWaitInSeconds": self.termination_wait_s,
            "MaximumExecutionTimeoutInSeconds": max(MIN_EXECUTION_S, needed),
        }}
        if self.alarm_names:
            config["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": name} for name in self.alarm_names]}
        return config

    @staticmethod
    def rollback_config() -> dict[str, Any]:
        return {"BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0},
            "TerminationWaitInSeconds": 0,
            "MaximumExecutionTimeoutInSeconds": PROVISIONING_S,
        }}

    def model_data_uri(self, version: ModelVersion) -> str:
        """``s3://<bucket>/models/<name>/<version>/``: the prefix holding the version's ``model.onnx``."""
        key = version.storage_key or f"models/{version.model}/{version.version}/model.onnx"
        expected = f"models/{version.model}/{version.version}/"
        if not key.startswith(expected) or "/" in key[len(expected):]:
            raise InvalidInput("the version's artifact is not stored where SageMaker can read it", field="version")
        return f"s3://{self.bucket}/{expected}"

    def _check(self, deployment: Deployment, version: ModelVersion) -> None:
        if version.model != deployment.model or version.version != deployment.version:
            raise InvalidInput("the version given is not the deployment's", field="version")
        if version.status is not VersionStatus.READY or version.sha256 is None:
            raise NotReady(f"version {version.version} of {version.model!r} is not READY")

    def _tags(self, deployment: Deployment) -> list[dict[str, str]]:
        return [{"Key": "maas:model", "Value": deployment.model},
                {"Key": "maas:deployment", "Value": deployment.id}]

    def _create_model(self, deployment: Deployment, version: ModelVersion) -> None:
        name = model_resource_name(deployment.model, version.version, deployment.id, self.prefix)
        if self._exists("DescribeModel", self.sagemaker.describe_model, ModelName=name):
            return
        assert version.sha256 is not None
        self._call("CreateModel", self.sagemaker.create_model, tolerate_exists=True,
                   ModelName=name, ExecutionRoleArn=self.role_arn,
                   PrimaryContainer={
                       "Image": self.image_uri,
                       "Mode": "SingleModel",
                       "ModelDataSource": {"S3DataSource": {"S3Uri": self.model_data_uri(version),
                                                            "S3DataType": "S3Prefix", "CompressionType": "None"}},
                       "Environment": {ENV_MODEL_NAME: version.model, ENV_MODEL_VERSION: str(version.version),
                                       ENV_MODEL_SHA256: version.sha256},
                   },
                   Tags=[*self._tags(deployment), {"Key": "maas:version", "Value": str(version.version)}])

    def _create_config(self, name: str, model_name: str, deployment: Deployment) -> None:
        if self._config_exists(name):
            return
        self._call("CreateEndpointConfig", self.sagemaker.create_endpoint_config, tolerate_exists=True,
                   EndpointConfigName=name,
                   ProductionVariants=[{"VariantName": VARIANT, "ModelName": model_name,
                                        "InitialInstanceCount": self.initial_instance_count,
                                        "InstanceType": self.instance_type, "InitialVariantWeight": 1.0}],
                   Tags=self._tags(deployment))

    def _keep_previous(self, deployment: Deployment, current: str) -> None:
        """Copy the config the endpoint runs before this deployment's update under the deployment's
        previous-config name: what ``rollback`` returns to (and the mark that the update was started)."""
        previous = previous_config_name(deployment.model, deployment.id, self.prefix)
        if self._config_exists(previous):
            return
        described = self._call("DescribeEndpointConfig", self.sagemaker.describe_endpoint_config,
                               EndpointConfigName=current)
        variants = [{key: variant[key] for key in VARIANT_FIELDS if key in variant}
                    for variant in described.get("ProductionVariants", [])]
        self._call("CreateEndpointConfig", self.sagemaker.create_endpoint_config, tolerate_exists=True,
                   EndpointConfigName=previous, ProductionVariants=variants, Tags=self._tags(deployment))

    # -- calls

    def _describe_endpoint(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.sagemaker.describe_endpoint(EndpointName=name))
        except ClientError as error:
            if _not_found(error):
                return None
            raise self._translate(error, "DescribeEndpoint") from None
        except BotoCoreError as error:
            raise translate(error, WHAT) from None

    def _config_exists(self, name: str) -> bool:
        return self._exists("DescribeEndpointConfig", self.sagemaker.describe_endpoint_config,
                            EndpointConfigName=name)

    def _exists(self, operation: str, call: Any, **params: Any) -> bool:
        try:
            call(**params)
        except ClientError as error:
            if _not_found(error):
                return False
            raise self._translate(error, operation) from None
        except BotoCoreError as error:
            raise translate(error, WHAT) from None
        return True

    def _call(self, operation: str, call: Any, *, tolerate_exists: bool = False, tolerate_missing: bool = False,
              **params: Any) -> dict[str, Any]:
        try:
            return dict(call(**params))
        except ClientError as error:
            if (tolerate_exists and _already_exists(error)) or (tolerate_missing and _not_found(error)):
                return {}
            raise self._translate(error, operation) from None
        except BotoCoreError as error:
            raise translate(error, WHAT) from None

    @staticmethod
    def _translate(error: ClientError, operation: str) -> MaasError:
        code = error_code(error)
        if code in ("ValidationException", "ValidationError", "ResourceLimitExceeded", "ResourceInUse"):
            # SageMaker refused what was asked (retrying will not help): say so without the ARNs and
            # accounts its message holds.
            log.error("SageMaker %s refused: %s: %s", operation, code, _message(error))
            return Conflict(f"SageMaker refused {operation} ({code}): {clean_reason(_message(error))}")
        return translate(error, WHAT)


def _configs(endpoint: Mapping[str, Any]) -> tuple[str | None, str | None, str]:
    """(the config the endpoint runs, the config an update in flight moves it to, its status)."""
    current = endpoint.get("EndpointConfigName")
    summary = endpoint.get("PendingDeploymentSummary")
    pending = summary.get("EndpointConfigName") if isinstance(summary, Mapping) else None
    return (current if isinstance(current, str) else None, pending if isinstance(pending, str) else None,
            str(endpoint.get("EndpointStatus") or ""))


# ---------------------------------------------------------------------------------------------- factory


def name_prefix_from_env() -> str:
    """The stage's prefix the stack sets (``maas-<stage>-``), else ``maas-`` (local and tests)."""
    return os.environ.get(ENV_SAGEMAKER_PREFIX, "").strip() or SAGEMAKER_NAME_PREFIX


def rollback_alarms_from_env() -> tuple[str, ...]:
    raw = os.environ.get(ENV_ROLLBACK_ALARMS, "")
    return tuple(name.strip() for name in raw.split(",") if name.strip())


def sagemaker_target_from_env(settings: Settings, bucket: str) -> SageMakerTarget | None:
    """The target the stack configures on the deploy functions (``MAAS_SAGEMAKER_ROLE_ARN``,
    ``MAAS_SAGEMAKER_IMAGE_URI``, ``MAAS_ROLLBACK_ALARMS``), or None where SageMaker is not set up."""
    del settings  # nothing in the limits concerns the endpoints yet; kept for a uniform factory signature
    role_arn = os.environ.get(ENV_SAGEMAKER_ROLE, "").strip()
    image_uri = os.environ.get(ENV_SAGEMAKER_IMAGE, "").strip()
    if not role_arn or not image_uri:
        return None
    endpoint_url = os.environ.get(ENV_ENDPOINT) or None
    return SageMakerTarget(make_client("sagemaker", endpoint_url=endpoint_url),
                           make_client("sagemaker-runtime", endpoint_url=endpoint_url),
                           role_arn=role_arn, image_uri=image_uri, alarm_names=rollback_alarms_from_env(),
                           bucket=bucket, prefix=name_prefix_from_env())
