"""The deploy workflow: one list of steps, two executors (DESIGN.md section 7).

``WORKFLOW`` is the forward path, in execution order, and ``ROLLBACK`` where any failure of it leads:

    validate -> optimize -> smoke_test -> shift_traffic -> [Wait $.wait_seconds] -> check_health
        -> [Choice $.done: true -> promote, false -> back to shift_traffic]

The CDK state machine in ``infra/`` is built from these specs (one Lambda task per step in
``functions/deploy``, Retry on ``retry_on``, Catch ``States.ALL`` -> ``ROLLBACK`` with the error at
``$.failure``, a Wait of ``WAIT_SECONDS_PATH`` after ``WAIT_AFTER`` and a Choice on ``DONE_PATH`` after
``LOOP_CHOICE_AFTER`` that loops back to ``LOOP_START``), and :class:`InProcessExecutor` runs the same
:class:`DeployWorkflow` methods in-process (``maas serve``, and AWS without a state machine).

Strategies live in the steps, so both executors behave alike: ``all_at_once`` promotes directly (with
a bake, it first sends 100% to the new version with the stable one still recorded, so an unhealthy
bake rolls back); ``canary`` sends ``canary_percent`` to the new version, bakes ``bake_seconds``,
checks health, promotes; ``linear`` adds ``linear_step_percent`` every interval, checking health after
each wait, and promotes when the next step would reach 100%. A first deploy (no stable version) runs
as ``all_at_once``: there is nothing else to send traffic to. A target that shifts traffic itself
(``sagemaker``, a ``maas.ports.EndpointTarget``) is started by ``shift_traffic`` and polled by
``check_health``.

Every step takes and returns a :class:`StepInput` (the state's JSON) and is idempotent: Step Functions
retries a step and may run it twice, so a step re-reads the deployment, records its event once, and
never changes a deployment that is no longer IN_PROGRESS (a manual rollback cancels a deploy in flight:
the next step raises ``Conflict`` and the Catch path leaves the cancelled record alone)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from maas import errors
from maas.domain import Deployment, DeploymentStatus, ModelVersion, Strategy, check_model_name
from maas.domain.models import utcnow
from maas.errors import Conflict, InferenceFailed, InvalidInput, MaasError, NotFound, Unhealthy
from maas.ports import EndpointTarget, HealthSource, Registry, TargetState
from maas.services.health import assess
from maas.services.models import ModelService

log = logging.getLogger("maas.deploy")

SmokeTest = Callable[[ModelVersion], None]
#: Quantizes a READY version into a derived READY version, optionally with a report (sizes, latencies,
#: output differences: ``OptimizeService.optimize``).
Optimizer = Callable[[ModelVersion], "ModelVersion | tuple[ModelVersion, Mapping[str, Any]]"]


class StepName(StrEnum):
    VALIDATE = "validate"
    OPTIMIZE = "optimize"
    SMOKE_TEST = "smoke_test"
    SHIFT_TRAFFIC = "shift_traffic"
    CHECK_HEALTH = "check_health"
    PROMOTE = "promote"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class StepSpec:
    """One task of the workflow: ``name`` is the Lambda entry in ``functions/deploy/handler.py`` and
    the :class:`DeployWorkflow` method; ``retry_on`` names ``maas.errors`` classes worth retrying."""

    name: StepName
    description: str
    retry_on: tuple[str, ...]
    #: Step Functions' Retry for ``retry_on``: first wait, attempts after the first, the cap of a wait
    retry_interval_s: int = 2
    retry_attempts: int = 4
    retry_max_delay_s: int | None = None

    def worst_retry_seconds(self) -> int:
        """The longest all retries can wait (backoff doubling up to ``retry_max_delay_s``)."""
        waits = (self.retry_interval_s * 2 ** attempt for attempt in range(self.retry_attempts))
        cap = self.retry_max_delay_s
        return sum(wait if cap is None else min(wait, cap) for wait in waits)


#: Errors that say "try again shortly" (throttled or unavailable storage): the class names in
#: ``maas.errors``, which is also the ``errorType`` Lambda reports and Step Functions matches.
TRANSIENT_ERRORS: tuple[str, ...] = ("Throttled", "Unavailable")

WORKFLOW: tuple[StepSpec, ...] = (
    StepSpec(StepName.VALIDATE, "Check the deployment is still in progress and its version is READY",
             TRANSIENT_ERRORS),
    StepSpec(StepName.OPTIMIZE, "Optionally quantize the version (int8) and deploy the derived version",
             TRANSIENT_ERRORS),
    StepSpec(StepName.SMOKE_TEST, "Run the version on inputs made from its signature before it takes traffic",
             TRANSIENT_ERRORS),
    StepSpec(StepName.SHIFT_TRAFFIC, "Send the strategy's next share of traffic to the version",
             TRANSIENT_ERRORS),
    StepSpec(StepName.CHECK_HEALTH, "Judge the version's error rate and p99 latency since the last shift",
             TRANSIENT_ERRORS),
    StepSpec(StepName.PROMOTE, "Send all traffic to the version: the deployment SUCCEEDED",
             TRANSIENT_ERRORS),
)
#: A rollback waits out what keeps it from acting: SageMaker refuses to change an endpoint while an
#: update runs (``Unavailable``), and updates of GPU fleets take minutes. It retries for up to ~48
#: minutes (30 s, 60 s, then every 2 min), inside the hour the bake bound leaves of the execution.
ROLLBACK = StepSpec(StepName.ROLLBACK, "Mark the deployment FAILED (ROLLED_BACK when judged unhealthy); "
                    "the previous stable version serves", TRANSIENT_ERRORS,
                    retry_interval_s=30, retry_attempts=25, retry_max_delay_s=120)

#: A deploy's whole run (Step Functions' execution timeout): past it the execution stops without its
#: Catch, so nothing would roll back. One day.
EXECUTION_TIMEOUT_SECONDS = 86_400
#: The most a deploy may bake in all (every wait after a traffic shift together): 23 hours, leaving an
#: hour of the execution for the steps themselves, endpoint updates, retries and the rollback.
MAX_TOTAL_BAKE_SECONDS = 82_800
#: A Wait state of ``WAIT_SECONDS_PATH`` seconds follows this step (the bake, or a poll interval).
WAIT_AFTER = StepName.SHIFT_TRAFFIC
#: A Choice follows this step: ``DONE_PATH`` true -> the next step (promote), false -> ``LOOP_START``.
LOOP_CHOICE_AFTER = StepName.CHECK_HEALTH
LOOP_START = StepName.SHIFT_TRAFFIC
WAIT_SECONDS_PATH = "$.wait_seconds"
DONE_PATH = "$.done"

#: The event each forward step records (once per round) when it completes something.
DONE_EVENTS: dict[StepName, str] = {
    StepName.VALIDATE: "validated",
    StepName.OPTIMIZE: "optimized",
    StepName.SMOKE_TEST: "smoke_test_passed",
    StepName.SHIFT_TRAFFIC: "traffic_shifted",
    StepName.CHECK_HEALTH: "health_checked",
    StepName.PROMOTE: "promoted",
}
START_FAILED_EVENT = "start_failed"
#: Poll interval of an endpoint target's update (seconds between two ``check_health`` runs).
TARGET_POLL_SECONDS = 30
#: Failures that judge the version rather than the workflow: the deployment ends ROLLED_BACK.
VERDICT_ERRORS = ("Unhealthy",)
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
    #: shift_traffic's output: seconds the Wait state after it lasts (the bake, a poll interval)
    wait_seconds: int = Field(default=0, ge=0, le=86_400)
    #: check_health's output: true -> promote, false -> shift traffic again
    done: bool = False
    #: a manual rollback's follow-up (``DeployExecutor.undo_endpoint``): only put the endpoint target
    #: back; the deployment itself is already ended (absent from a deploy's own state JSON)
    undo_endpoint: bool | None = None

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

    def forward(self, *, wait_seconds: int = 0, done: bool = False) -> StepInput:
        """This input for the next state: the same identity, without a failure, with the outputs."""
        return StepInput(model=self.model, deployment_id=self.deployment_id, wait_seconds=wait_seconds,
                         done=done)

    def dump(self) -> dict[str, Any]:
        """The state's JSON. ``wait_seconds`` and ``done`` are always there: the Wait state's
        ``SecondsPath`` and the Choice's ``BooleanEquals`` fail on a missing path."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class DeployWorkflow:
    """The deploy steps, each ``(StepInput) -> StepInput`` and idempotent.

    ``health`` judges a canary (None: no metrics here, bakes are not judged and the event says so);
    ``targets`` are the endpoint targets by name (``sagemaker``) whose traffic the target shifts
    itself; ``optimizer`` makes the derived (quantized) version of a deployment asked to optimize;
    ``poll_seconds`` is the wait between two polls of an endpoint target's update."""

    def __init__(self, registry: Registry, models: ModelService, smoke_test: SmokeTest, *,
                 health: HealthSource | None = None, targets: Mapping[str, EndpointTarget] | None = None,
                 optimizer: Optimizer | None = None, poll_seconds: int = TARGET_POLL_SECONDS,
                 clock: Callable[[], datetime] = utcnow):
        self._registry = registry
        self._models = models
        self._smoke_test = smoke_test
        self.health = health
        self.targets: dict[str, EndpointTarget] = dict(targets or {})
        self.optimizer = optimizer
        self._poll_seconds = max(int(poll_seconds), 0)
        self._clock = clock
        #: Told the model's name after each write that moves its traffic (the API's route cache).
        self.on_route_change: Callable[[str], None] | None = None
        self._steps: dict[StepName, Callable[[StepInput], StepInput]] = {
            StepName.VALIDATE: self.validate,
            StepName.OPTIMIZE: self.optimize,
            StepName.SMOKE_TEST: self.smoke_test,
            StepName.SHIFT_TRAFFIC: self.shift_traffic,
            StepName.CHECK_HEALTH: self.check_health,
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

    def optimize(self, step: StepInput) -> StepInput:
        """With ``optimize``: quantize the version and deploy the derived one from here on (the
        deployment's ``version`` changes; the event carries the optimizer's report). Else nothing."""
        deployment = self._in_progress(step, StepName.OPTIMIZE)
        if not deployment.optimize or _has_event(deployment, DONE_EVENTS[StepName.OPTIMIZE]):
            return step.forward()
        if self.optimizer is None:
            raise InvalidInput("this server cannot optimize models; deploy without optimize", field="optimize")
        parent = self._models.ready_version(deployment.model, deployment.version)
        made = self.optimizer(parent)
        derived, facts = made if isinstance(made, tuple) else (made, {})
        report = _report(facts) or derived.description
        report = f": {report}" if report else ""
        optimized = deployment.with_event(
            DONE_EVENTS[StepName.OPTIMIZE],
            f"version {derived.version} derived from version {parent.version}{report}"[:MAX_DETAIL_CHARS],
            version=derived.version,
        )
        self._registry.update_deployment(optimized, DeploymentStatus.IN_PROGRESS)
        return step.forward()

    def smoke_test(self, step: StepInput) -> StepInput:
        """Run the smoke test (load the version, re-hashing its bytes, and run it on inputs made from
        its signature) before any traffic reaches it."""
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

    def shift_traffic(self, step: StepInput) -> StepInput:
        """Send the strategy's next share of traffic to the version (``traffic_shifted``: "10% to
        version 2"), or start an endpoint target's update; ``wait_seconds``: how long to bake."""
        deployment = self._in_progress(step, StepName.SHIFT_TRAFFIC)
        kind = DONE_EVENTS[StepName.SHIFT_TRAFFIC]
        target = self.targets.get(deployment.target)
        if target is not None:
            version = self._models.ready_version(deployment.model, deployment.version)
            target.shift(deployment, version)  # idempotent: a poll round re-asserts the same update
            self._record_once(deployment, kind, f"{deployment.target} endpoint update to version "
                              f"{version.version} started ({deployment.strategy.value})")
            return step.forward(wait_seconds=self._poll_seconds)
        if not _shifts_traffic(deployment):
            return step.forward()  # all_at_once without a bake: promote sends all traffic at once
        if _awaiting_check(deployment):
            # A retry of a shift whose write landed: the same wait, no second step.
            return step.forward(wait_seconds=_wait_seconds(deployment))
        weight, why = _next_weight(deployment)
        shifted = deployment.with_event(kind, f"{weight:g}% to version {deployment.version}{why}",
                                        canary_version=deployment.version, canary_weight=weight)
        self._registry.update_deployment(shifted, DeploymentStatus.IN_PROGRESS)
        self._route_changed(deployment.model)
        return step.forward(wait_seconds=_wait_seconds(shifted))

    def check_health(self, step: StepInput) -> StepInput:
        """Judge the version since the last shift against the thresholds (``Unhealthy`` -> rollback);
        ``done``: promote next (else shift again). For an endpoint target: its update's state."""
        deployment = self._in_progress(step, StepName.CHECK_HEALTH)
        kind = DONE_EVENTS[StepName.CHECK_HEALTH]
        target = self.targets.get(deployment.target)
        if target is not None:
            status = target.status(deployment)
            if status.state is TargetState.UPDATING:
                return step.forward()
            if status.state is not TargetState.IN_SERVICE:
                raise Unhealthy(f"the {deployment.target} endpoint update {status.state.value.replace('_', ' ')}: "
                                f"{status.reason or 'no reason given'}"[:MAX_DETAIL_CHARS])
            self._record_once(deployment, kind, f"the {deployment.target} endpoint serves version "
                              f"{deployment.version} with all its traffic")
            return step.forward(done=True)
        if not _shifts_traffic(deployment):
            return step.forward(done=True)
        if not _awaiting_check(deployment):
            return step.forward(done=_finished(deployment))  # a retry of a check that landed
        since = _last_event(deployment, DONE_EVENTS[StepName.SHIFT_TRAFFIC])
        assert since is not None  # _awaiting_check: a shift happened
        detail = self._judge(deployment, since, self._clock())
        self._registry.update_deployment(deployment.with_event(kind, detail[:MAX_DETAIL_CHARS]),
                                         DeploymentStatus.IN_PROGRESS)
        return step.forward(done=_finished(deployment))

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
            status=DeploymentStatus.SUCCEEDED, stable_version=deployment.version, canary_version=None,
            canary_weight=0.0,
        )
        try:
            self._registry.update_deployment(promoted, DeploymentStatus.IN_PROGRESS)
        except Conflict:
            # A retry of a promote whose write landed (its answer lost): done, not a conflict.
            if self._deployment(step).status is not DeploymentStatus.SUCCEEDED:
                raise
        self._route_changed(deployment.model)
        return step.forward()

    def rollback(self, step: StepInput) -> StepInput:
        """End a deployment still IN_PROGRESS: ROLLED_BACK when the version was judged unhealthy
        (``Unhealthy``), FAILED otherwise, with an event naming the step that failed
        (``<step>_failed``) and why, and no traffic left on the version (an endpoint target is told to
        roll back). The live route then falls back to the previous SUCCEEDED deployment: the stable
        version keeps serving. A finished (or deleted) deployment is left as is, except that an
        ``undo_endpoint`` input rolls its endpoint target back (a manual rollback's follow-up)."""
        try:
            deployment = self._deployment(step)
        except NotFound:
            return step.forward()
        if deployment.status.terminal:
            if step.undo_endpoint and deployment.target in self.targets:
                self.targets[deployment.target].rollback(deployment)
            return step.forward()
        target = self.targets.get(deployment.target)
        if target is not None:
            target.rollback(deployment)
        failed_step = _failed_step(deployment)
        detail = step.failure.describe() if step.failure is not None else "the deploy workflow stopped"
        verdict = step.failure is not None and step.failure.error in VERDICT_ERRORS
        self._finish_failed(step, deployment, f"{failed_step.value}_failed", detail,
                            DeploymentStatus.ROLLED_BACK if verdict else DeploymentStatus.FAILED)
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

    def waits(self, deployment: Deployment) -> bool:
        """Whether the workflow of this deployment waits (bakes, polls a target): an in-process
        executor then runs it in the background."""
        return deployment.target in self.targets or _shifts_traffic(deployment)

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
            self._finish_failed(step, current, kind, StepFailure.of(error).describe(), DeploymentStatus.FAILED)
        except Exception:
            log.exception("could not mark deployment %s FAILED; a restart or rollback will", deployment.id)

    # -- helpers

    def _judge(self, deployment: Deployment, since: datetime, until: datetime) -> str:
        """The health check's event detail, or ``Unhealthy`` with the numbers."""
        if self.health is None:
            return f"no metrics source on this server: version {deployment.version} was not judged"
        canary = self.health.health(deployment.model, deployment.version, since, until)
        stable_number = deployment.stable_version
        stable = None
        if (stable_number is not None and stable_number != deployment.version and canary.requests
                and deployment.thresholds.max_p99_latency_ratio is not None):
            stable = self.health.health(deployment.model, stable_number, since, until)
        verdict = assess(deployment.version, canary, deployment.thresholds, stable, stable_number)
        window = f" over {max((until - since).total_seconds(), 0.0):.0f}s at {deployment.canary_weight:g}%"
        if not verdict.healthy:
            raise Unhealthy(verdict.detail + window)
        return verdict.detail + window

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

    def _finish_failed(self, step: StepInput, deployment: Deployment, kind: str, detail: str,
                       status: DeploymentStatus) -> None:
        failed = deployment.with_event(kind, detail, status=status, canary_weight=0.0)
        try:
            self._registry.update_deployment(failed, DeploymentStatus.IN_PROGRESS)
        except Conflict:
            if not self._deployment(step).status.terminal:
                raise
        self._route_changed(deployment.model)

    def _route_changed(self, model: str) -> None:
        if self.on_route_change is not None:
            try:
                self.on_route_change(model)
            except Exception:
                log.exception("route change listener failed")


def _report(facts: Mapping[str, Any]) -> str:
    """An optimizer's report in one line (what the ``optimized`` event says)."""
    parts = []
    if facts.get("parent_bytes") and facts.get("derived_bytes"):
        parts.append(f"{facts['parent_bytes']} -> {facts['derived_bytes']} bytes")
    if facts.get("parent_p50_ms") is not None and facts.get("derived_p50_ms") is not None:
        parts.append(f"p50 {float(facts['parent_p50_ms']):.2f} -> {float(facts['derived_p50_ms']):.2f} ms")
    if facts.get("speedup") is not None:
        parts.append(f"{float(facts['speedup']):.2f}x as fast")
    if facts.get("max_rel_diff") is not None:
        parts.append(f"max relative output difference {float(facts['max_rel_diff']):.3g}")
    if facts.get("scheme"):
        parts.append(f"{facts['scheme']} weights")
    if facts.get("reused"):
        parts.append("reused an existing derivative")
    method = str(facts.get("method") or "")
    return f"{method + ', ' if method and parts else method}{', '.join(parts)}"


def _has_event(deployment: Deployment, kind: str) -> bool:
    return any(event.kind == kind for event in deployment.events)


def _last_event(deployment: Deployment, kind: str) -> datetime | None:
    return next((event.at for event in reversed(deployment.events) if event.kind == kind), None)


def _shifts_traffic(deployment: Deployment) -> bool:
    """Whether traffic moves in steps before the promote: any strategy but all_at_once, or a bake."""
    return deployment.strategy is not Strategy.ALL_AT_ONCE or deployment.bake_seconds > 0


def _first_deploy(deployment: Deployment) -> bool:
    return deployment.stable_version is None or deployment.stable_version == deployment.version


def _awaiting_check(deployment: Deployment) -> bool:
    """A traffic shift is the newest progress event: its health check has not been recorded yet."""
    progress = {DONE_EVENTS[StepName.SHIFT_TRAFFIC], DONE_EVENTS[StepName.CHECK_HEALTH]}
    last = next((event.kind for event in reversed(deployment.events) if event.kind in progress), None)
    return last == DONE_EVENTS[StepName.SHIFT_TRAFFIC]


def _next_weight(deployment: Deployment) -> tuple[float, str]:
    """The canary weight of the next shift, and why when the strategy does not apply as asked."""
    if _first_deploy(deployment):
        why = "" if deployment.strategy is Strategy.ALL_AT_ONCE else (
            f" ({deployment.strategy.value} runs as all_at_once: "
            + ("the model has no stable version yet, nothing else to send traffic to)"
               if deployment.stable_version is None else "the version is already the stable one)"))
        return 100.0, why
    if deployment.strategy is Strategy.CANARY:
        return deployment.canary_percent, ""
    if deployment.strategy is Strategy.LINEAR:
        current = deployment.canary_weight if deployment.canary_version == deployment.version else 0.0
        return min(current + deployment.linear_step_percent, 100.0), ""
    return 100.0, ""


def _finished(deployment: Deployment) -> bool:
    """After a healthy check: whether the next step is the promote (else another shift)."""
    if deployment.strategy is not Strategy.LINEAR or _first_deploy(deployment):
        return True
    return deployment.canary_weight + deployment.linear_step_percent >= 100.0


def total_bake_seconds(deployment: Deployment) -> int:
    """How long the deployment's strategy bakes in all: the sum of the waits after each traffic shift,
    by the same rules the steps follow (a first deploy runs as all_at_once; linear shifts until the next
    step would reach 100%)."""
    if not _shifts_traffic(deployment):
        return 0
    if deployment.strategy is not Strategy.LINEAR or _first_deploy(deployment):
        return deployment.bake_seconds
    shifts, weight = 0, 0.0
    while True:
        weight = min(weight + deployment.linear_step_percent, 100.0)
        shifts += 1
        if weight + deployment.linear_step_percent >= 100.0:
            break
    interval = deployment.linear_interval_seconds
    return shifts * (interval if interval is not None else deployment.bake_seconds)


def _wait_seconds(deployment: Deployment) -> int:
    if deployment.strategy is Strategy.LINEAR and not _first_deploy(deployment) \
            and deployment.linear_interval_seconds is not None:
        return deployment.linear_interval_seconds
    return deployment.bake_seconds


def _failed_step(deployment: Deployment) -> StepName:
    """The step after the deployment's newest progress event: the one that failed."""
    last = next((event.kind for event in reversed(deployment.events) if event.kind in DONE_EVENTS.values()), None)
    if last is None:
        return StepName.VALIDATE
    step = next(name for name, kind in DONE_EVENTS.items() if kind == last)
    if step is StepName.VALIDATE:
        return StepName.OPTIMIZE if deployment.optimize else StepName.SMOKE_TEST
    if step is StepName.SMOKE_TEST:
        return StepName.SHIFT_TRAFFIC if _shifts_traffic(deployment) else StepName.PROMOTE
    if step is StepName.CHECK_HEALTH:
        return StepName.PROMOTE if _finished(deployment) else StepName.SHIFT_TRAFFIC
    order = [spec.name for spec in WORKFLOW]
    return order[min(order.index(step) + 1, len(order) - 1)]


#: ``wait(seconds, cancelled)``: the in-process Wait state; returns early once ``cancelled`` is set.
Wait = Callable[[float, threading.Event], object]


class InProcessExecutor:
    """Runs ``WORKFLOW`` in this process as the state machine would: a step failing with an error its
    spec retries on is retried (at most ``attempts`` runs, short backoff); after ``WAIT_AFTER`` it
    waits ``wait_seconds`` (interruptibly: :meth:`cancel` or a deployment ended elsewhere wakes it);
    after ``LOOP_CHOICE_AFTER`` it loops back to ``LOOP_START`` until ``done``; any other failure runs
    ``ROLLBACK`` with it.

    A deployment whose workflow waits (a bake, an endpoint target) runs in a background thread:
    :meth:`start` returns it IN_PROGRESS (the API answers 202). Otherwise :meth:`start` runs it here
    and returns it finished, or raises the error that failed it (after the rollback ran)."""

    def __init__(self, workflow: DeployWorkflow, *, attempts: int = 3, backoff_s: float = 0.05,
                 sleep: Callable[[float], None] = time.sleep, wait: Wait | None = None,
                 background: bool = True, check_every_s: float = 1.0):
        """``wait`` replaces the interruptible wait (tests drive traffic in it); ``background`` False
        runs every workflow in the caller's thread; ``check_every_s``: how often a wait re-reads the
        deployment to notice a rollback made by another process."""
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.workflow = workflow
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._sleep = sleep
        self._wait = wait
        self._background = background
        self._check_every_s = check_every_s
        self._lock = threading.Lock()
        self._cancelled: dict[str, threading.Event] = {}
        self._threads: dict[str, threading.Thread] = {}

    def start(self, deployment: Deployment) -> Deployment:
        if not (self._background and self.workflow.waits(deployment)):
            return self.run(deployment)
        with self._lock:
            running = self._threads.get(deployment.id)
            if running is not None and running.is_alive():
                return self.workflow.deployment(deployment.id)  # started twice: one workflow
            self._cancelled.setdefault(deployment.id, threading.Event())
            thread = threading.Thread(target=self._run_in_background, args=(deployment,), daemon=True,
                                      name=f"maas-deploy-{deployment.id[:8]}")
            self._threads[deployment.id] = thread
        thread.start()
        return deployment

    def cancel(self, deployment: Deployment) -> None:
        """Wake the deployment's wait (a manual rollback): its next step sees it no longer IN_PROGRESS
        and stops; nothing is promoted afterwards (promote is conditional on IN_PROGRESS)."""
        with self._lock:
            event = self._cancelled.setdefault(deployment.id, threading.Event())
        event.set()

    def undo_endpoint(self, deployment: Deployment) -> None:
        """Roll the endpoint target back in a background thread, retrying ``ROLLBACK``'s transient
        errors on its schedule (an endpoint update runs for minutes)."""
        def undo() -> None:
            step = StepInput(model=deployment.model, deployment_id=deployment.id, undo_endpoint=True)
            delay = float(ROLLBACK.retry_interval_s)
            for attempt in range(ROLLBACK.retry_attempts + 1):
                try:
                    self.workflow.rollback(step)
                    return
                except Exception as error:
                    if type(error).__name__ not in ROLLBACK.retry_on or attempt == ROLLBACK.retry_attempts:
                        log.exception("could not roll back the endpoint of deployment %s", deployment.id)
                        return
                self._sleep(delay)
                delay = min(delay * 2, float(ROLLBACK.retry_max_delay_s or delay * 2))

        threading.Thread(target=undo, daemon=True, name=f"maas-undo-{deployment.id[:8]}").start()

    def join(self, deployment_id: str, timeout: float | None = None) -> bool:
        """Wait for a background workflow to end; True if none is running."""
        with self._lock:
            thread = self._threads.get(deployment_id)
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def running(self) -> list[str]:
        with self._lock:
            return [deployment_id for deployment_id, thread in self._threads.items() if thread.is_alive()]

    def run(self, deployment: Deployment) -> Deployment:
        """The whole workflow in this thread: the finished deployment, or the error that failed it."""
        with self._lock:
            cancelled = self._cancelled.setdefault(deployment.id, threading.Event())
        try:
            step = StepInput(model=deployment.model, deployment_id=deployment.id)
            index = 0
            while index < len(WORKFLOW):
                spec = WORKFLOW[index]
                try:
                    step = self._run(spec, step)
                except Exception as error:
                    failed = step.model_copy(update={"failure": StepFailure.of(error)})
                    try:
                        self._run(ROLLBACK, failed)
                    except Exception:
                        log.exception("rollback of deployment %s failed", deployment.id)
                    raise error
                if spec.name is WAIT_AFTER and step.wait_seconds > 0:
                    self._wait_for(deployment, step.wait_seconds, cancelled)
                if spec.name is LOOP_CHOICE_AFTER and not step.done:
                    index = next(i for i, s in enumerate(WORKFLOW) if s.name is LOOP_START)
                    continue
                index += 1
            return self.workflow.deployment(deployment.id)
        finally:
            with self._lock:
                self._cancelled.pop(deployment.id, None)

    def _run_in_background(self, deployment: Deployment) -> None:
        try:
            self.run(deployment)
        except Conflict:
            log.info("deploy %s stopped: it was cancelled or ended elsewhere", deployment.id)
        except Exception as error:
            # Recorded on the deployment by the rollback step; this is for the server's log.
            log.warning("deploy %s failed: %s", deployment.id, StepFailure.of(error).describe())
        finally:
            with self._lock:
                if self._threads.get(deployment.id) is threading.current_thread():
                    del self._threads[deployment.id]

    def _wait_for(self, deployment: Deployment, seconds: float, cancelled: threading.Event) -> None:
        if self._wait is not None:
            self._wait(seconds, cancelled)
            return
        deadline = time.monotonic() + seconds
        while not cancelled.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or cancelled.wait(min(remaining, self._check_every_s)):
                return
            try:
                if self.workflow.deployment(deployment.id).status.terminal:
                    return  # rolled back by another process: the next step stops
            except MaasError:
                continue  # the store hiccuped: keep waiting, the next step re-reads it

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
    "DONE_PATH",
    "LOOP_CHOICE_AFTER",
    "LOOP_START",
    "ROLLBACK",
    "TARGET_POLL_SECONDS",
    "TRANSIENT_ERRORS",
    "WAIT_AFTER",
    "WAIT_SECONDS_PATH",
    "WORKFLOW",
    "DeployWorkflow",
    "InProcessExecutor",
    "Optimizer",
    "SmokeTest",
    "StepFailure",
    "StepInput",
    "StepName",
    "StepSpec",
]
