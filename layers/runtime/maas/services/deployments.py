"""Deployments: put a version in front of traffic, and take it back.

The live route of a model is derived from its deployment records (see ``maas.domain.Deployment``),
so deploy and rollback are each a short sequence of conditional writes that leaves a valid route
after every step: a crash mid-way never leaves a model pointing at nothing. Strategies
(``all_at_once``, ``canary``, ``linear``) are carried out by the steps of ``maas.services.deploy``.

A deploy creates its IN_PROGRESS record, then hands it to a ``DeployExecutor`` that runs those steps:
in this process by default (the answer is the finished deployment, or for a deploy that bakes the
record still IN_PROGRESS while a background thread runs it), or as a Step Functions execution on AWS
(the answer is the record still IN_PROGRESS)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping

from maas.domain import (
    Deployment,
    DeploymentStatus,
    HealthThresholds,
    ModelVersion,
    Page,
    Route,
    Strategy,
    check_model_name,
    check_version_number,
)
from maas.errors import Conflict, InvalidInput, NotFound, Unavailable
from maas.ports import DeployExecutor, EndpointTarget, HealthSource, Registry
from maas.services.deploy import (
    MAX_TOTAL_BAKE_SECONDS,
    DeployWorkflow,
    InProcessExecutor,
    Optimizer,
    SmokeTest,
    total_bake_seconds,
)
from maas.services.models import ModelService
from maas.services.pagination import all_deployments, iterate

log = logging.getLogger("maas.deploy")

#: Targets every server runs (the inference function pools / this process); endpoint targets
#: (``sagemaker``) are accepted only where one is injected.
SUPPORTED_TARGETS = ("lambda",)
MAX_BAKE_SECONDS = 86_400


def _check_total_bake(deployment: Deployment) -> None:
    """A deploy must end within the workflow's run time: past it nothing would roll back."""
    total = total_bake_seconds(deployment)
    if total <= MAX_TOTAL_BAKE_SECONDS:
        return
    linear = deployment.strategy is Strategy.LINEAR and deployment.linear_interval_seconds is not None
    field = "linear_interval_seconds" if linear else "bake_seconds"
    raise InvalidInput(f"this {deployment.strategy.value} deploy would bake for {total} s in all, over the limit of "
                       f"{MAX_TOTAL_BAKE_SECONDS} s (23 h) that keeps it within the deploy workflow's run time; "
                       "bake less, or take larger linear steps", field=field,
                       extra={"total_bake_seconds": total, "max_total_bake_seconds": MAX_TOTAL_BAKE_SECONDS})


def _no_smoke_test(version: ModelVersion) -> None:
    return None


class DeploymentService:
    def __init__(self, registry: Registry, models: ModelService, smoke_test: SmokeTest = _no_smoke_test,
                 executor: DeployExecutor | None = None, *, health: HealthSource | None = None,
                 targets: Mapping[str, EndpointTarget] | None = None, optimizer: Optimizer | None = None,
                 workflow: DeployWorkflow | None = None):
        """``executor`` runs the deploy workflow (default: in this process, with ``smoke_test``,
        ``health``, ``targets`` and ``optimizer``, or the given ``workflow``)."""
        self._registry = registry
        self._models = models
        self._workflow = workflow or DeployWorkflow(registry, models, smoke_test, health=health, targets=targets,
                                                    optimizer=optimizer)
        self._executor: DeployExecutor = executor if executor is not None else InProcessExecutor(self._workflow)
        self._in_process = isinstance(self._executor, InProcessExecutor)

    @property
    def workflow(self) -> DeployWorkflow:
        return self._workflow

    @property
    def executor(self) -> DeployExecutor:
        return self._executor

    @property
    def targets(self) -> tuple[str, ...]:
        return (*SUPPORTED_TARGETS, *sorted(t for t in self._workflow.targets if t not in SUPPORTED_TARGETS))

    def deploy(self, name: str, version: int | str, *, strategy: str = Strategy.ALL_AT_ONCE.value,
               target: str = "lambda", created_by: str = "",
               thresholds: HealthThresholds | None = None, canary_percent: float | None = None,
               linear_step_percent: float | None = None, bake_seconds: int | None = None,
               linear_interval_seconds: int | None = None, optimize: bool = False) -> Deployment:
        """Start a deploy. Options left None take the domain's defaults (canary 10%, linear steps of
        10%, no bake, linear interval = bake). Refused with 422 naming the field when invalid, 409
        while another deploy of the model is in flight."""
        check_model_name(name)
        try:
            chosen_strategy = Strategy(strategy)
        except ValueError:
            raise InvalidInput("strategy must be one of all_at_once, canary, linear",
                               field="strategy") from None
        if target not in self.targets:
            why = (" (this server has no SageMaker target: on AWS it comes with the stage's container pools)"
                   if target == "sagemaker" else "")
            raise InvalidInput(f"target must be one of {', '.join(self.targets)}{why}", field="target")
        options: dict[str, object] = {}
        for field, value, low, high in (("canary_percent", canary_percent, 0.0, 100.0),
                                        ("linear_step_percent", linear_step_percent, 0.0, 100.0)):
            if value is not None:
                if not isinstance(value, int | float) or isinstance(value, bool) or not low < value <= high:
                    raise InvalidInput(f"{field} must be a number above 0 and at most 100", field=field)
                options[field] = float(value)
        for field, seconds in (("bake_seconds", bake_seconds), ("linear_interval_seconds", linear_interval_seconds)):
            if seconds is not None:
                if not isinstance(seconds, int) or isinstance(seconds, bool) or not 0 <= seconds <= MAX_BAKE_SECONDS:
                    raise InvalidInput(f"{field} must be a whole number of seconds from 0 to {MAX_BAKE_SECONDS}",
                                       field=field)
                options[field] = seconds
        if optimize and self._in_process and self._workflow.optimizer is None:
            raise InvalidInput("this server cannot optimize models; deploy without optimize", field="optimize")
        ready = self._models.ready_version(name, version)
        route = self._registry.get_route(name)
        deployment = Deployment(
            id=uuid.uuid4().hex,
            model=name,
            version=ready.version,
            target=target,
            strategy=chosen_strategy,
            stable_version=route.stable_version if route else None,
            thresholds=thresholds or HealthThresholds(),
            optimize=bool(optimize),
            created_by=created_by,
            **options,  # type: ignore[arg-type]
        ).with_event("started", _started_detail(ready.version, chosen_strategy, options, target))
        _check_total_bake(deployment)
        deployment = self._registry.create_deployment(deployment)
        try:
            return self._executor.start(deployment)
        except Exception as error:
            # The in-process executor has already rolled back; this catches executors that could not
            # start (or finish) the workflow, so no deployment is left blocking the model.
            self._workflow.abandon(deployment, error)
            raise

    def rollback(self, name: str, *, to_version: int | None = None, created_by: str = "") -> Deployment:
        """Cancel a deploy in flight, or return to the previous stable version (or ``to_version``).
        Returns the deployment that is live afterwards."""
        check_model_name(name)
        self._registry.get_model(name)
        if to_version is not None:
            # Check the target before touching anything: a refused rollback changes nothing.
            to_version = self._models.ready_version(
                name, check_version_number(to_version, field="to_version")).version
        history = list(all_deployments(self._registry, name))
        in_flight = next((d for d in history if d.status is DeploymentStatus.IN_PROGRESS), None)
        if in_flight is not None:
            cancelled = in_flight.with_event("rolled_back", "cancelled by a manual rollback",
                                             status=DeploymentStatus.ROLLED_BACK, canary_weight=0.0)
            self._registry.update_deployment(cancelled, DeploymentStatus.IN_PROGRESS)
            self._stop(cancelled)
            history = [cancelled if d.id == in_flight.id else d for d in history]
            if to_version is None:
                live = next((d for d in history if d.status is DeploymentStatus.SUCCEEDED), None)
                return live or cancelled
        succeeded = [d for d in history if d.status is DeploymentStatus.SUCCEEDED]
        if to_version is not None:
            return self._redeploy(name, to_version, succeeded[0] if succeeded else None, created_by)
        if not succeeded:
            raise Conflict(f"model {name!r} has no deployment to roll back")
        current = succeeded[0].stable_version
        previous = next((d for d in succeeded if d.stable_version != current), None)
        if previous is None:
            raise Conflict(f"model {name!r} has no earlier stable version to roll back to; "
                           "name the version to roll back to", field="to_version")
        # Every SUCCEEDED deploy newer than the previous stable one goes (a repeated deploy of the
        # current version included), so the route really falls back to it.
        for deployment in succeeded[: succeeded.index(previous)]:
            self._registry.update_deployment(
                deployment.with_event("rolled_back", f"rolled back to version {previous.stable_version}",
                                      status=DeploymentStatus.ROLLED_BACK),
                DeploymentStatus.SUCCEEDED,
            )
        return self._registry.get_deployment(previous.id)

    def _redeploy(self, name: str, version: int, current: Deployment | None, created_by: str) -> Deployment:
        ready = self._models.ready_version(name, version)
        record = Deployment(
            id=uuid.uuid4().hex, model=name, version=ready.version, strategy=Strategy.ALL_AT_ONCE,
            stable_version=current.stable_version if current else None, created_by=created_by,
        ).with_event("started", f"rollback to version {ready.version}")
        record = self._registry.create_deployment(record)
        live = self._registry.update_deployment(
            record.with_event("promoted", f"version {ready.version} serves 100% of traffic",
                              status=DeploymentStatus.SUCCEEDED, stable_version=ready.version),
            DeploymentStatus.IN_PROGRESS,
        )
        if current is not None:
            self._registry.update_deployment(
                current.with_event("rolled_back", f"rolled back to version {ready.version}",
                                   status=DeploymentStatus.ROLLED_BACK),
                DeploymentStatus.SUCCEEDED,
            )
        return live

    def recover_interrupted(self) -> list[Deployment]:
        """Roll back deploys left IN_PROGRESS by a crash or restart, so none blocks the model."""
        recovered = []
        for model in iterate(self._registry.list_models):
            for deployment in all_deployments(self._registry, model.name):
                if deployment.status is DeploymentStatus.IN_PROGRESS:
                    rolled = deployment.with_event(
                        "rolled_back", "interrupted by a server restart"
                        + (f" with {deployment.canary_weight:g}% of traffic on version {deployment.canary_version}"
                           if deployment.canary_version is not None and deployment.canary_weight else ""),
                        status=DeploymentStatus.ROLLED_BACK, canary_weight=0.0)
                    try:
                        recovered.append(self._registry.update_deployment(rolled,
                                                                          DeploymentStatus.IN_PROGRESS))
                    except Conflict:
                        continue
                    self._stop(rolled)
        return recovered

    def _stop(self, cancelled: Deployment) -> None:
        """Best effort, after a deployment was ended by hand or by a restart: stop its workflow and
        undo an endpoint target's update (the record already sends no traffic to the version)."""
        try:
            self._executor.cancel(cancelled)
        except Exception:
            log.exception("could not stop the workflow of deployment %s; its steps stop on their own", cancelled.id)
        target = self._workflow.targets.get(cancelled.target)
        if target is not None:
            try:
                target.rollback(cancelled)
            except Unavailable as busy:
                # An endpoint update still runs (SageMaker cannot stop one): the executor puts the
                # endpoint back when the update settles, and the deployment's history says so.
                log.info("endpoint of deployment %s busy (%s): rolling it back when it settles", cancelled.id, busy)
                try:
                    self._executor.undo_endpoint(cancelled)
                    self._registry.update_deployment(cancelled.with_event(
                        "endpoint_rollback_pending",
                        f"the {cancelled.target} endpoint is still updating: it goes back to the previous "
                        "version as soon as the update settles"), DeploymentStatus.ROLLED_BACK)
                except Exception:
                    log.exception("could not schedule the endpoint rollback of deployment %s", cancelled.id)
            except Exception:
                log.exception("could not roll back the %s endpoint of deployment %s", cancelled.target,
                              cancelled.id)

    def get(self, deployment_id: str) -> Deployment:
        if not isinstance(deployment_id, str) or not deployment_id.isalnum() or len(deployment_id) > 64:
            raise InvalidInput("deployment id must be alphanumeric", field="deployment_id")
        return self._registry.get_deployment(deployment_id)

    def history(self, name: str, limit: int, cursor: str | None) -> Page[Deployment]:
        check_model_name(name)
        self._registry.get_model(name)
        return self._registry.list_deployments(name, min(max(limit, 1), 1000), cursor)

    def route(self, name: str) -> Route:
        check_model_name(name)
        route = self._registry.get_route(name)
        if route is None:
            self._registry.get_model(name)
            raise NotFound(f"model {name!r} is not deployed; deploy a version first")
        return route


def _started_detail(version: int, strategy: Strategy, options: Mapping[str, object], target: str) -> str:
    parts = [f"deploying version {version} ({strategy.value}"]
    shown = {"canary_percent": "canary {}%", "linear_step_percent": "steps of {}%", "bake_seconds": "bake {}s",
             "linear_interval_seconds": "every {}s"}
    for key, text in shown.items():
        if key in options:
            parts.append(text.format(f"{options[key]:g}" if isinstance(options[key], float) else options[key]))
    detail = ", ".join(parts) + ")"
    return detail if target == "lambda" else f"{detail} on {target}"
