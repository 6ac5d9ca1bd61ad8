"""Open Inference Protocol v2 data plane (KServe / Triton compatible, with the binary extension).

The infer routes are answered by ``maas.api.inference_path.InferencePath`` in front of FastAPI (raw ASGI,
no router, no dependency chain); they are declared here for OpenAPI and call the same function."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from maas import __version__
from maas.api.deps import Invoker, ModelName, Services, ServicesDep, VersionRef
from maas.api.inference_path import run_inference
from maas.api.schemas import problem_responses
from maas.domain import ModelVersion, VersionStatus
from maas.errors import NotReady
from maas.protocol.oip import (
    BINARY_HEADER,
    EXTENSIONS,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    TensorMetadata,
)

router = APIRouter(tags=["inference"])

INFER_OPENAPI: dict[str, Any] = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                "description": "JSON header + binary tensors; set "
                                                               f"{BINARY_HEADER}"}},
    }},
    "security": [{"HTTPBearer": []}],
}


@router.get("/v2/health/live", tags=["health"])
def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", tags=["health"])
def ready() -> dict[str, bool]:
    return {"ready": True}


@router.get("/v2", responses=problem_responses(401, 403))
def server_metadata(_: Invoker) -> dict[str, Any]:
    return {"name": "maas", "version": __version__, "extensions": list(EXTENSIONS)}


def _metadata(services: Services, name: str, version: ModelVersion) -> ModelMetadata:
    ready = [str(v.version) for v in services.models.list_versions(name, 1000, None).items
             if v.status is VersionStatus.READY]
    signature = version.signature
    assert signature is not None
    return ModelMetadata(
        name=name, versions=ready,
        inputs=[TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in signature.inputs],
        outputs=[TensorMetadata(name=t.name, datatype=t.datatype, shape=list(t.shape))
                 for t in signature.outputs],
    )


def _default_version(services: Services, name: str) -> ModelVersion:
    """The routed stable version, or before any deploy the newest READY one (for metadata)."""
    route = services.resolver.route(name)
    if route is not None:
        return services.resolver.version(name, route.stable_version)
    for candidate in services.models.list_versions(name, 1000, None).items:
        if candidate.status is VersionStatus.READY:
            return candidate
    raise NotReady(f"model {name!r} has no READY version")


@router.get("/v2/models/{name}", response_model=ModelMetadata, responses=problem_responses(401, 403, 404, 409))
def model_metadata(name: ModelName, services: ServicesDep, _: Invoker) -> ModelMetadata:
    return _metadata(services, name, _default_version(services, name))


@router.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata,
            responses=problem_responses(401, 403, 404, 409))
def version_metadata(name: ModelName, version: VersionRef, services: ServicesDep, _: Invoker) -> ModelMetadata:
    return _metadata(services, name, services.resolver.pick(name, version))


def _readiness(services: Services, name: str, ref: str | None) -> dict[str, Any]:
    try:
        chosen = services.resolver.pick(name, ref)
        services.engine.warm(chosen)
    except NotReady as error:
        raise NotReady(error.detail, extra={"name": name, "ready": False}) from None
    return {"name": name, "ready": True}


@router.get("/v2/models/{name}/ready", responses=problem_responses(401, 403, 404, 409))
def model_ready(name: ModelName, services: ServicesDep, _: Invoker) -> dict[str, Any]:
    return _readiness(services, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready", responses=problem_responses(401, 403, 404, 409))
def version_ready(name: ModelName, version: VersionRef, services: ServicesDep, _: Invoker) -> dict[str, Any]:
    return _readiness(services, name, version)


async def _infer(request: Request, name: str, ref: str | None) -> Response:
    """Reached when ``InferencePath`` is not in front, and for paths breaking the name rules (it leaves
    those to FastAPI): the ``Invoker`` dependency runs before the path is validated, so an anonymous
    caller gets 401, never a 422 that would tell which names the server accepts."""
    answer = await run_inference(request.app.state.services, name, ref, request.headers.get("authorization"),
                                 request.headers.get(BINARY_HEADER), await request.body())
    return Response(answer.payload, media_type=answer.media_type, headers=answer.headers())


@router.post("/v2/models/{name}/infer", response_model=InferenceResponse, openapi_extra=INFER_OPENAPI,
             responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422))
async def infer(_: Invoker, name: ModelName, request: Request) -> Response:
    return await _infer(request, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", response_model=InferenceResponse,
             openapi_extra=INFER_OPENAPI, responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422))
async def infer_version(_: Invoker, name: ModelName, version: VersionRef, request: Request) -> Response:
    return await _infer(request, name, version)
