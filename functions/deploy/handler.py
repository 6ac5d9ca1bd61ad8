"""Deploy-side Lambda tasks, one entry per task: the deploy workflow's steps (``validate``,
``optimize``, ``smoke_test``, ``shift_traffic``, ``check_health``, ``promote``, ``rollback``: the Step
Functions state machine built from ``maas.services.deploy.WORKFLOW`` invokes them) and the scheduled
store ``cleanup``.

Each step entry takes the state's input (``maas.services.deploy.StepInput``: ``model``,
``deployment_id``, ``wait_seconds`` / ``done`` between the traffic steps and, for rollback, the
Catch's ``failure``) and returns the next state's input. A step's ``MaasError`` propagates unwrapped:
Lambda reports the exception's class name as the error name (``Unavailable``, ``Unhealthy``...), which
the state machine's Retry and Catch match.

The smoke test runs the version with the inference engine (onnxruntime, from the inference layer) on
inputs made from its signature, imported on the first smoke test so the other tasks start without it;
``optimize`` quantizes (onnxruntime.quantization) likewise on first use. ``check_health`` reads the
canary's metrics from CloudWatch (the EMF metrics the inference function publishes).

``cleanup`` is the AWS half of "nothing orphaned": uploads that never committed expire (the bucket's
lifecycle rule on ``uploads/`` is the backstop), PENDING versions past the upload TTL become FAILED
and are removed a TTL later, and artifacts no version references are deleted (a delete marker: the
bytes stay recoverable as a noncurrent S3 version for the stage's retention)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from maas.backends.aws import AwsBackend
from maas.backends.aws.clients import make_client
from maas.backends.aws.health import CloudWatchHealth
from maas.backends.aws.telemetry import get_logger, get_tracer, metrics
from maas.domain import ModelVersion
from maas.ports import NullMetrics
from maas.services.cleanup import CleanupService
from maas.services.deploy import TARGET_POLL_SECONDS, DeployWorkflow, StepName
from maas.services.models import ModelService
from maas.services.serving import artifact_reader
from maas.settings import ENV_ENDPOINT, Settings

if TYPE_CHECKING:
    from maas.inference.smoke import SmokeTest
    from maas.services.optimize import OptimizeService

SERVICE = "maas-deploy"
logger = get_logger(SERVICE)
tracer = get_tracer(SERVICE)

settings = Settings.from_env()
backend = AwsBackend.from_env(settings)
_smoke: SmokeTest | None = None
_optimize: OptimizeService | None = None
models = ModelService(backend.registry, backend.artifacts, backend.validator, settings.limits)
#: Seconds between two polls of an endpoint target's update (``MAAS_TARGET_POLL_S``).
POLL_SECONDS = int(os.environ.get("MAAS_TARGET_POLL_S") or TARGET_POLL_SECONDS)


def load_version(version: ModelVersion) -> None:
    """The smoke test: run the version on inputs made from its signature in the sandbox's child (NaN/Inf
    or wrong output shapes: Unhealthy), then load it as the inference function will (sha256 re-checked,
    session built)."""
    global _smoke
    if _smoke is None:
        from maas.inference.engine import InferenceEngine
        from maas.inference.sandbox import sandbox_of
        from maas.inference.smoke import SmokeTest

        _smoke = SmokeTest(InferenceEngine(artifact_reader(backend.artifacts), settings.limits, NullMetrics()),
                           sandbox_of(backend.validator))
    _smoke(version)


def optimize_version(version: ModelVersion) -> tuple[ModelVersion, Mapping[str, Any]]:
    """The optimize step: dynamic int8 quantization, registered as a derived version."""
    global _optimize
    if _optimize is None:
        import functools

        from maas.inference.optimize import quantize
        from maas.inference.sandbox import sandbox_of
        from maas.services.optimize import OptimizeService

        sandbox = sandbox_of(backend.validator)  # quantizing runs the model many times: in a child
        quantizer = sandbox.quantize if sandbox is not None else functools.partial(quantize, limits=settings.limits)
        _optimize = OptimizeService(models, backend.artifacts, quantizer)
    return _optimize.optimize(version.model, version.version)


workflow = DeployWorkflow(backend.registry, models, load_version,
                          health=CloudWatchHealth(make_client("cloudwatch", endpoint_url=os.environ.get(ENV_ENDPOINT)
                                                              or None)),
                          targets=backend.endpoint_targets, optimizer=optimize_version, poll_seconds=POLL_SECONDS)


def _step(name: StepName, event: dict[str, Any]) -> dict[str, Any]:
    logger.append_keys(deploy_step=name.value, deployment_id=event.get("deployment_id"), model=event.get("model"))
    metric = "Deploy" + name.value.title().replace("_", "")  # e.g. DeploySmokeTest, DeployRollback
    try:
        result = workflow.run_step(name, event)
    except Exception as error:
        # Raised as is: its class name is the error the state machine's Retry/Catch match.
        metrics.add_metric(name=metric + "Failed", unit="Count", value=1)
        logger.warning("deploy step failed", extra={"error": type(error).__name__})
        raise
    metrics.add_metric(name=metric, unit="Count", value=1)
    logger.info("deploy step finished")
    return result


def _entry(name: StepName) -> Callable[[dict[str, Any], Any], dict[str, Any]]:
    """The Lambda entry of one workflow step (the state machine's task of the same name)."""

    @logger.inject_lambda_context(clear_state=True)
    @tracer.capture_lambda_handler(capture_response=False)
    @metrics.log_metrics
    def entry(event: dict[str, Any], context: Any) -> dict[str, Any]:
        return _step(name, event)

    entry.__name__ = entry.__qualname__ = name.value
    return entry


validate = _entry(StepName.VALIDATE)
optimize = _entry(StepName.OPTIMIZE)
smoke_test = _entry(StepName.SMOKE_TEST)
shift_traffic = _entry(StepName.SHIFT_TRAFFIC)
check_health = _entry(StepName.CHECK_HEALTH)
promote = _entry(StepName.PROMOTE)
rollback = _entry(StepName.ROLLBACK)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics
def cleanup(event: dict[str, Any], context: Any) -> dict[str, Any]:
    report = CleanupService(backend.registry, backend.artifacts, settings.limits).run()
    summary = {
        "expired_versions": [f"{model}/{version}" for model, version in report.expired_versions],
        "removed_failed": [f"{model}/{version}" for model, version in report.removed_failed],
        "removed_uploads": report.removed_uploads,
        "removed_artifacts": report.removed_blobs,
    }
    counts = {key: len(value) for key, value in summary.items()}
    for key, count in counts.items():
        # e.g. CleanupRemovedArtifacts: a steady climb means pushes are being abandoned
        metrics.add_metric(name="Cleanup" + key.title().replace("_", ""), unit="Count", value=count)
    logger.info("cleanup finished", extra={"counts": counts})
    return summary
