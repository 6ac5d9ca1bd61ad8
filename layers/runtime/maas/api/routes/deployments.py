"""Aliases, deployments and rollback."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from maas.api.deps import AliasName, Deployer, Invoker, ModelName, ServicesDep
from maas.api.idempotency import IdempotentRoute
from maas.api.schemas import AliasList, DeploymentPage, Rollback, SetAlias, StartDeployment, problem_responses
from maas.domain import Alias, Deployment, DeploymentStatus

# Mutating routes accept ``Idempotency-Key`` (maas.api.idempotency): a retried deploy or rollback runs once.
router = APIRouter(tags=["deployments"], route_class=IdempotentRoute)


@router.get("/models/{name}/aliases", response_model=AliasList, responses=problem_responses(401, 403, 404))
def list_aliases(name: ModelName, services: ServicesDep, _: Invoker) -> AliasList:
    return AliasList(items=services.aliases.list(name))


@router.put("/models/{name}/aliases/{alias}", response_model=Alias,
            responses=problem_responses(401, 403, 404, 409, 415, 422))
def set_alias(name: ModelName, alias: AliasName, body: SetAlias, services: ServicesDep, _: Deployer) -> Alias:
    result = services.aliases.set(name, alias, body.version)
    services.resolver.invalidate(name)
    return result


@router.get("/models/{name}/aliases/{alias}", response_model=Alias,
            responses=problem_responses(401, 403, 404, 422))
def get_alias(name: ModelName, alias: AliasName, services: ServicesDep, _: Invoker) -> Alias:
    return services.aliases.get(name, alias)


@router.delete("/models/{name}/aliases/{alias}", status_code=204,
               responses=problem_responses(401, 403, 404, 422))
def delete_alias(name: ModelName, alias: AliasName, services: ServicesDep, _: Deployer) -> Response:
    services.aliases.delete(name, alias)
    services.resolver.invalidate(name)
    return Response(status_code=204)


@router.post(
    "/models/{name}/deployments", status_code=201, response_model=Deployment,
    responses={
        201: {"description": "The deployment finished (SUCCEEDED): the version serves the model's traffic"},
        202: {"model": Deployment,
              "description": "The deploy workflow started and runs on (IN_PROGRESS: a canary or linear "
                             "deploy, a bake, or Step Functions): poll `GET /deployments/{id}` until its "
                             "status is final"},
        **problem_responses(401, 403, 404, 409, 415, 422),
    },
)
def start_deployment(name: ModelName, body: StartDeployment, services: ServicesDep, token: Deployer,
                     response: Response) -> Deployment:
    deployment = services.deployments.deploy(
        name, body.version, strategy=body.strategy, target=body.target, created_by=token.name,
        thresholds=body.thresholds, canary_percent=body.canary_percent,
        linear_step_percent=body.linear_step_percent, bake_seconds=body.bake_seconds,
        linear_interval_seconds=body.linear_interval_seconds, optimize=body.optimize)
    services.resolver.invalidate(name)
    if deployment.status is DeploymentStatus.IN_PROGRESS:
        response.status_code = 202
    return deployment


@router.get("/models/{name}/deployments", response_model=DeploymentPage,
            responses=problem_responses(401, 403, 404, 422))
def list_deployments(name: ModelName, services: ServicesDep, _: Invoker,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                     cursor: Annotated[str | None, Query(max_length=512)] = None) -> DeploymentPage:
    page = services.deployments.history(name, limit, cursor)
    return DeploymentPage(items=page.items, next_cursor=page.next_cursor)


@router.get("/deployments/{deployment_id}", response_model=Deployment,
            responses=problem_responses(401, 403, 404, 422))
def get_deployment(deployment_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")], services: ServicesDep,
                   _: Invoker) -> Deployment:
    return services.deployments.get(deployment_id)


@router.post("/models/{name}/rollback", response_model=Deployment,
             responses=problem_responses(401, 403, 404, 409, 415, 422))
def rollback(name: ModelName, services: ServicesDep, token: Deployer, body: Rollback | None = None,
             ) -> Deployment:
    live = services.deployments.rollback(name, to_version=body.to_version if body else None,
                                         created_by=token.name)
    services.resolver.invalidate(name)
    return live
