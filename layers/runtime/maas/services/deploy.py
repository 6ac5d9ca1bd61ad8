"""The deploy workflow: one list of steps, two executors (DESIGN.md section 7).

``WORKFLOW`` is the forward path and ``ROLLBACK`` where any failure of it leads. The CDK state machine
in ``infra/`` is built from these specs (one Lambda task per step in ``functions/deploy``, Retry on
``retry_on``, Catch ``States.ALL`` -> ``ROLLBACK`` with the error at ``$.failure``), and
:class:`InProcessExecutor` runs the same :class:`DeployWorkflow` methods in-process (``maas serve``,
and AWS without a state machine).

Every step takes and returns a :class:`StepInput` (the state's JSON) and is idempotent: Step Functions
retries a step and may run it twice, so a step re-reads the deployment, records its event once, and
never changes a deployment that is no longer IN_PROGRESS (a manual rollback cancels a deploy in flight:
the next step raises ``Conflict`` and the Catch path leaves the cancelled record alone)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from maas import errors
from maas.domain import Deployment, DeploymentStatus, ModelVersion, check_model_name
from maas.errors import Conflict, InferenceFailed, InvalidInput, MaasError, NotFound
from maas.ports import Registry
from maas.services.models import ModelService

log = logging.getLogger("maas.deploy")

SmokeTest = Callable[[ModelVersion], None]


class StepName(StrEnum):
    VALIDATE = "validate"
    SMOKE_TEST = "smoke_test"
    PROMOTE = "promote"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class StepSpec:
    """One task of the workflow: ``name`` is the Lambda entry in ``functions/deploy/handler.py`` and
    the :class:`DeployWorkflow` method; ``retry_on`` names ``maas.errors`` classes worth retrying."""

    name: StepName
    description: str
    retry_on: tuple[str, ...]


#: Errors that say "try again shortly" (throttled or unavailable storage): the class names in
#: ``maas.errors``, which is also the ``errorType`` Lambda reports and Step Functions matches.
TRANSIENT_ERRORS: tuple[str, ...] = ("Throttled", "Unavailable")

WORKFLOW: tuple[StepSpec, ...] = (
    StepSpec(StepName.VALIDATE, "Check the deployment is still in progress and its version is READY",
             TRANSIENT_ERRORS),
    StepSpec(StepName.SMOKE_TEST, "Load the version (sha256 verified) before it takes any traffic",
             TRANSIENT_ERRORS),
    StepSpec(StepName.PROMOTE, "Send all traffic to the version: the deployment SUCCEEDED",
             TRANSIENT_ERRORS),
)
ROLLBACK = StepSpec(StepName.ROLLBACK, "Mark the deployment FAILED; the previous stable version keeps serving",
                    TRANSIENT_ERRORS)

#: The event each forward step records (once) when it completes.
DONE_EVENTS: dict[StepName, str] = {
    StepName.VALIDATE: "validated",
    StepName.SMOKE_TEST: "smoke_test_passed",
    StepName.PROMOTE: "promoted",
}
START_FAILED_EVENT = "start_failed"
MAX_DETAIL_CHARS = 500
MAX_DEPLOYMENT_ID_CHARS = 64


class StepFailure(BaseModel):
    """What a Step Functions Catch puts at ``$.failure``: the error name and its cause (for a Lambda
    task, a JSON document with ``errorMessage``, ``errorType`` and ``stackTrace``)."""

    model_config = ConfigDict(populate_by_name=True, frozen=True, extra="ignore")

    error: str = Field(alias="Error")
    cause: str = Field(default="", alias="Cause")

    @classmethod
    def of(cls, error: BaseException) -> StepFailure:
        """The failure an in-process step raised, shaped as Step Functions reports a Lambda's."""
        message = error.detail if isinstance(error, MaasError) else ""
        name = type(error).__name__
        return cls.model_validate({"Error": name, "Cause": json.dumps({"errorMessage": message, "errorType": name})})

    def describe(self) -> str:
        """A user-facing line: a maas error's message (written for users), otherwise only the error's
        name (``States.Timeout``, ``KeyError``...): causes of other errors may hold paths or traces."""
        if not _is_maas_error(self.error):
            return self.error[:MAX_DETAIL_CHARS] or "unknown error"
        message = self.cause
        try:
            parsed = json.loads(self.cause)
        except ValueError:
            parsed = None
        if isinstance(parsed, Mapping):
            raw = parsed.get("errorMessage")
            message = raw if isinstance(raw, str) else ""
        return (message or self.error)[:MAX_DETAIL_CHARS]


def _is_maas_error(name: str) -> bool:
    found = getattr(errors, name, None) if name.isidentifier() else None
    return isinstance(found, type) and issubclass(found, MaasError)


class StepInput(BaseModel):
    """A workflow state's input and output. Extra fields are ignored."""

    model_config = ConfigDict(populate_by_name=True, frozen=True, extra="ignore")

    model: str
    deployment_id: str
    failure: StepFailure | None = None

    @field_validator("model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        return check_model_name(value, field="model")

    @field_validator("deployment_id")
    @classmethod
    def _deployment_id(cls, value: str) -> str:
        if not value.isascii() or not value.isalnum() or len(value) > MAX_DEPLOYMENT_ID_CHARS:
            raise InvalidInput(f"deployment id must be 1-{MAX_DEPLOYMENT_ID_CHARS} letters and digits",
                               field="deployment_id")
        return value

    @classmethod
    def from_payload(cls, payload: Any) -> StepInput:
        """Parse a state's JSON; every problem is an ``InvalidInput`` naming the field."""
        try:
            return cls.model_validate(payload)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "input"
            raise InvalidInput(f"{where}: {first['msg']}", field=where) from None

    def forward(self) -> StepInput:
        """This input for the next state: the same shape, without a failure."""
        return self if self.failure is None else self.model_copy(update={"failure": None})

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class DeployWorkflow:
    """The deploy steps, each ``(StepInput) -> StepInput`` and idempotent."""

    def __init__(self, registry: Registry, models: ModelService, smoke_test: SmokeTest):
        self._registry = registry
        self._models = models
        self._smoke_test = smoke_test
        self._steps: dict[StepName, Callable[[StepInput], StepInput]] = {
            StepName.VALIDATE: self.validate,
            StepName.SMOKE_TEST: self.smoke_test,
            StepName.PROMOTE: self.promote,
            StepName.ROLLBACK: self.rollback,
        }

    # -- the steps

    def validate(self, step: StepInput) -> StepInput:
        """The deployment exists, is IN_PROGRESS, and its version is READY."""
        deployment = self._in_progress(step, StepName.VALIDATE)
        version = self._models.ready_version(deployment.model, deployment.version)
        self._record_once(deployment, DONE_EVENTS[StepName.VALIDATE],
                          f"version {version.version} is READY (sha256 {str(version.sha256)[:12]})")
        return step.forward()

    def smoke_test(self, step: StepInput) -> StepInput:
        """Run the smoke test (load the version, re-hashing its bytes) before any traffic reaches it."""
        deployment = self._in_progress(step, StepName.SMOKE_TEST)
        version = self._models.ready_version(deployment.model, deployment.version)
        try:
            self._smoke_test(version)
        except MaasError:
            raise
        except Exception as crash:
            log.exception("smoke test of %s version %s crashed", version.model, version.version)
            raise InferenceFailed(f"the smoke test of model {version.model!r} version {version.version} "
                                  f"crashed ({type(crash).__name__})") from crash
        # Conditional on IN_PROGRESS: a deploy cancelled while the model loaded raises Conflict here.
        self._record_once(deployment, DONE_EVENTS[StepName.SMOKE_TEST],
                          f"version {version.version} loaded and passed its checks")
        return step.forward()

    def promote(self, step: StepInput) -> StepInput:
        """IN_PROGRESS -> SUCCEEDED with the version as the stable one (quietly done if it already is)."""
        deployment = self._deployment(step)
        if deployment.status is DeploymentStatus.SUCCEEDED:
            return step.forward()
        self._require_in_progress(deployment, StepName.PROMOTE)
        if not _has_event(deployment, DONE_EVENTS[StepName.SMOKE_TEST]):
            raise Conflict(f"deployment {deployment.id} has not passed its smoke test; it cannot be promoted")
        promoted = deployment.with_event(
            DONE_EVENTS[StepName.PROMOTE], f"version {deployment.version} serves 100% of traffic",
            status=DeploymentStatus.SUCCEEDED, stable_version=deployment.version,
        )
        try:
            self._registry.update_deployment(promoted, DeploymentStatus.IN_PROGRESS)
        except Conflict:
            # A retry of a promote whose write landed (its answer lost): done, not a conflict.
            if self._deployment(step).status is not DeploymentStatus.SUCCEEDED:
                raise
        return step.forward()

    def rollback(self, step: StepInput) -> StepInput:
        """Mark a deployment still IN_PROGRESS as FAILED, with an event naming the step that failed
        (``<step>_failed``) and why. The live route then falls back to the previous SUCCEEDED
        deployment: the stable version keeps serving. A finished (or deleted) deployment is left as is."""
        try:
            deployment = self._deployment(step)
        except NotFound:
            return step.forward()
        if deployment.status.terminal:
            return step.forward()
        failed_step = _failed_step(deployment)
        detail = step.failure.describe() if step.failure is not None else "the deploy workflow stopped"
        self._finish_failed(step, deployment, f"{failed_step.value}_failed", detail)
        return step.forward()

    # -- dispatch

    def step(self, name: StepName | str) -> Callable[[StepInput], StepInput]:
        try:
            return self._steps[StepName(name)]
        except ValueError:
            raise InvalidInput(f"unknown deploy step {name!r}; one of "
                               f"{', '.join(s.value for s in StepName)}", field="step") from None

    def run_step(self, name: StepName | str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Parse a state's input, run one step, return the next state's input (what the Lambda tasks
        of ``functions/deploy`` call)."""
        run = self.step(name)
        return run(StepInput.from_payload(payload)).dump()

    def deployment(self, deployment_id: str) -> Deployment:
        return self._registry.get_deployment(deployment_id)

    def abandon(self, deployment: Deployment, error: BaseException) -> None:
        """Best effort, after an executor failed to run the workflow (e.g. Step Functions refused to
        start it): a deployment left IN_PROGRESS becomes FAILED so it does not block the model."""
        step = StepInput(model=deployment.model, deployment_id=deployment.id)
        try:
            current = self._deployment(step)
            if current.status.terminal:
                return
            steps_ran = any(_has_event(current, kind) for kind in DONE_EVENTS.values())
            kind = f"{_failed_step(current).value}_failed" if steps_ran else START_FAILED_EVENT
            self._finish_failed(step, current, kind, StepFailure.of(error).describe())
        except Exception:
            log.exception("could not mark deployment %s FAILED; a restart or rollback will", deployment.id)

    # -- helpers

    def _deployment(self, step: StepInput) -> Deployment:
        deployment = self._registry.get_deployment(step.deployment_id)
        if deployment.model != step.model:
            raise NotFound(f"deployment {step.deployment_id} of model {step.model!r} not found")
        return deployment

    def _in_progress(self, step: StepInput, name: StepName) -> Deployment:
        deployment = self._deployment(step)
        self._require_in_progress(deployment, name)
        return deployment

    @staticmethod
    def _require_in_progress(deployment: Deployment, name: StepName) -> None:
        if deployment.status is not DeploymentStatus.IN_PROGRESS:
            raise Conflict(f"deployment {deployment.id} is {deployment.status.value}, no longer in progress; "
                           f"the {name.value} step leaves it as it is")

    def _record_once(self, deployment: Deployment, kind: str, detail: str) -> None:
        if not _has_event(deployment, kind):
            self._registry.update_deployment(deployment.with_event(kind, detail), DeploymentStatus.IN_PROGRESS)

    def _finish_failed(self, step: StepInput, deployment: Deployment, kind: str, detail: str) -> None:
        failed = deployment.with_event(kind, detail, status=DeploymentStatus.FAILED, canary_weight=0.0)
        try:
            self._registry.update_deployment(failed, DeploymentStatus.IN_PROGRESS)
        except Conflict:
            if not self._deployment(step).status.terminal:
                raise


def _has_event(deployment: Deployment, kind: str) -> bool:
    return any(event.kind == kind for event in deployment.events)


def _failed_step(deployment: Deployment) -> StepName:
    """The first forward step whose completion event is missing: the one that failed."""
    for spec in WORKFLOW:
        if not _has_event(deployment, DONE_EVENTS[spec.name]):
            return spec.name
    return WORKFLOW[-1].name


class InProcessExecutor:
    """Runs ``WORKFLOW`` in this process, step by step, as the state machine would: a step failing
    with an error its spec retries on is retried (at most ``attempts`` runs, short backoff); any
    other failure runs ``ROLLBACK`` with it, then is raised again (the API answers with it)."""

    def __init__(self, workflow: DeployWorkflow, *, attempts: int = 3, backoff_s: float = 0.05,
                 sleep: Callable[[float], None] = time.sleep):
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.workflow = workflow
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._sleep = sleep

    def start(self, deployment: Deployment) -> Deployment:
        step = StepInput(model=deployment.model, deployment_id=deployment.id)
        for spec in WORKFLOW:
            try:
                step = self._run(spec, step)
            except Exception as error:
                failed = step.model_copy(update={"failure": StepFailure.of(error)})
                try:
                    self._run(ROLLBACK, failed)
                except Exception:
                    log.exception("rollback of deployment %s failed", deployment.id)
                raise error
        return self.workflow.deployment(deployment.id)

    def _run(self, spec: StepSpec, step: StepInput) -> StepInput:
        run = self.workflow.step(spec.name)
        for attempt in range(1, self._attempts + 1):
            try:
                return run(step)
            except Exception as error:
                # Matched by class name, as Step Functions matches a Lambda's errorType.
                if type(error).__name__ not in spec.retry_on or attempt == self._attempts:
                    raise
                log.warning("deploy step %s failed (%s); retrying", spec.name.value, type(error).__name__)
                self._sleep(self._backoff_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable")  # pragma: no cover


__all__ = [
    "DONE_EVENTS",
    "ROLLBACK",
    "TRANSIENT_ERRORS",
    "WORKFLOW",
    "DeployWorkflow",
    "InProcessExecutor",
    "SmokeTest",
    "StepFailure",
    "StepInput",
    "StepName",
    "StepSpec",
]
