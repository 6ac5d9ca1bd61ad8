"""Models, versions and uploads."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from typing import Annotated, BinaryIO, cast

import anyio.from_thread
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from maas.api.deps import Admin, Deployer, Invoker, ModelName, ServicesDep, VersionNumber
from maas.api.idempotency import IdempotentRoute, exempt
from maas.api.schemas import (
    CommitVersion,
    CreateModel,
    CreateVersion,
    ModelPage,
    ModelStatus,
    PendingVersionInfo,
    StagedUploadInfo,
    VersionPage,
    problem_responses,
)
from maas.domain import DeploymentStatus, Model, ModelVersion, Scope, Token, UploadPlan
from maas.errors import Forbidden
from maas.services.tokens import TokenService

# Mutating routes accept ``Idempotency-Key`` (maas.api.idempotency): a retried create or commit never
# registers a second version.
router = APIRouter(tags=["models"], route_class=IdempotentRoute)
Limit = Annotated[int, Query(ge=1, le=1000, description="Page size")]
Cursor = Annotated[str | None, Query(max_length=512, description="Cursor from the previous page")]


@router.get("/models", response_model=ModelPage, responses=problem_responses(401, 403, 422))
def list_models(services: ServicesDep, _: Invoker, limit: Limit = 100, cursor: Cursor = None) -> ModelPage:
    page = services.models.list_models(limit, cursor)
    return ModelPage(items=page.items, next_cursor=page.next_cursor)


@router.post("/models", status_code=201, response_model=Model,
             responses=problem_responses(401, 403, 409, 415, 422))
def create_model(body: CreateModel, services: ServicesDep, token: Deployer) -> Model:
    return services.models.create_model(body.name, description=body.description, tags=body.tags,
                                        created_by=token.name)


@router.get("/models/{name}", response_model=ModelStatus, responses=problem_responses(401, 403, 404, 422))
def get_model(name: ModelName, services: ServicesDep, _: Invoker) -> ModelStatus:
    model = services.models.get_model(name)
    latest = services.models.list_versions(name, 1, None).items
    history = services.deployments.history(name, 20, None).items
    route = services.backend.registry.get_route(name)
    # What a user wants to see first: the deploy in flight, else the live one, else the newest attempt.
    in_flight = next((d for d in history if d.status is DeploymentStatus.IN_PROGRESS), None)
    live = next((d for d in history if route is not None and d.id == route.deployment_id), None)
    current = in_flight or live or (history[0] if history else None)
    return ModelStatus(model=model, latest_version=latest[0].version if latest else None, route=route,
                       deployment=current)


@router.delete("/models/{name}", status_code=204, responses=problem_responses(401, 403, 404, 409, 422))
def delete_model(name: ModelName, services: ServicesDep, _: Admin,
                 force: Annotated[bool, Query(description="Delete even while deployed")] = False) -> Response:
    services.models.delete_model(name, force=force)
    services.resolver.invalidate(name)
    return Response(status_code=204)


@router.get("/models/{name}/versions", response_model=VersionPage,
            responses=problem_responses(401, 403, 404, 422))
def list_versions(name: ModelName, services: ServicesDep, _: Invoker, limit: Limit = 100,
                  cursor: Cursor = None) -> VersionPage:
    page = services.models.list_versions(name, limit, cursor)
    return VersionPage(items=page.items, next_cursor=page.next_cursor)


@router.post("/models/{name}/versions", status_code=201, response_model=PendingVersionInfo,
             responses=problem_responses(401, 403, 404, 415, 422))
def create_version(name: ModelName, services: ServicesDep, token: Deployer,
                   body: CreateVersion | None = None) -> PendingVersionInfo:
    body = body or CreateVersion()
    plan = UploadPlan(size=body.size, sha256=body.sha256, part_size=body.part_size,
                      part_sha256=tuple(body.part_sha256))
    pending = services.models.begin_version(name, created_by=token.name, description=body.description,
                                            plan=plan, limits=body.limits)
    return PendingVersionInfo(version=pending.version, upload=pending.upload)


@router.get("/models/{name}/versions/{version}", response_model=ModelVersion,
            responses=problem_responses(401, 403, 404, 422))
def get_version(name: ModelName, version: VersionNumber, services: ServicesDep, _: Invoker) -> ModelVersion:
    return services.models.get_version(name, version)


@router.post("/models/{name}/versions/{version}/commit", response_model=ModelVersion,
             responses=problem_responses(401, 403, 404, 409, 415, 422))
def commit_version(name: ModelName, version: VersionNumber, body: CommitVersion, services: ServicesDep,
                   _: Deployer) -> ModelVersion:
    return services.models.commit_version(name, version, sha256=body.sha256, size=body.size)


@router.delete("/models/{name}/versions/{version}", status_code=204,
               responses=problem_responses(401, 403, 404, 409, 422))
def delete_version(name: ModelName, version: VersionNumber, services: ServicesDep, _: Admin) -> Response:
    services.models.delete_version(name, version)
    services.resolver.invalidate(name)
    return Response(status_code=204)


class _StreamReader(io.RawIOBase):
    """A blocking file-like view of the request body, read from a worker thread, so the store
    streams uploads to disk without holding them in memory."""

    def __init__(self, stream: AsyncIterator[bytes]) -> None:
        self._chunks = stream
        self._buffer = b""
        self._done = False

    async def _next_chunk(self) -> bytes:
        return await self._chunks.__anext__()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while not self._buffer and not self._done:
            try:
                self._buffer = anyio.from_thread.run(self._next_chunk)
            except StopAsyncIteration:
                self._done = True
        if size < 0 or size >= len(self._buffer):
            out, self._buffer = self._buffer, b""
        else:
            out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out


def _uploader(request: Request, services: ServicesDep) -> Token:
    """The caller of an upload, checked before the path is validated (dependencies run first), so an
    anonymous caller gets 401 whatever the id. The path names no model: the scope is checked again
    against the model the upload was reserved for."""
    token = services.auth.authenticate(request.headers.get("authorization"))
    if token.revoked or not any(scope.grants(Scope.DEPLOY) for scope in token.scopes):
        raise Forbidden("this token lacks the 'deploy' scope")
    return token


@router.put("/uploads/{upload_id}", response_model=StagedUploadInfo, tags=["uploads"],
            responses=problem_responses(401, 403, 404, 413, 415, 422),
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
@exempt  # streams its body (never buffered for a fingerprint); re-sending to an upload id replaces it
async def upload(token: Annotated[Token, Depends(_uploader)],
                 upload_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")], request: Request,
                 services: ServicesDep) -> StagedUploadInfo:
    model = await run_in_threadpool(services.backend.artifacts.upload_model, upload_id)
    TokenService.require(token, Scope.DEPLOY, model)
    reader = _StreamReader(request.stream().__aiter__())
    staged = await run_in_threadpool(services.backend.artifacts.receive_upload, upload_id,
                                     cast(BinaryIO, reader),
                                     services.settings.limits.max_model_bytes)
    return StagedUploadInfo(upload_id=staged.upload_id, size=staged.size, sha256=staged.sha256)
