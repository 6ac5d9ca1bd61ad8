"""Open Inference Protocol v2 data plane (KServe / Triton compatible, with the binary extension).

The infer route reads the raw body and decodes it straight to numpy (``maas.inference.codec``):
no pydantic model per request, no FastAPI dependency chain, auth from a short-lived token cache."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from maas import __version__
from maas.api.deps import Invoker, ModelName, Services, ServicesDep, VersionRef
from maas.api.schemas import problem_responses
from maas.domain import ModelVersion, Scope, VersionStatus
from maas.errors import BadRequest, NotReady
from maas.inference.codec import decode_request, encode_response
from maas.protocol.oip import (
    BINARY_HEADER,
    EXTENSIONS,
    VERSION_HEADER,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    TensorMetadata,
)
from maas.services.tokens import TokenService

router = APIRouter(tags=["inference"])
#: Requests up to this many input elements, for a model already loaded, run on the event loop: a
#: thread hop would cost more than the model. Bigger ones and first loads (reading, hashing and
#: building a session) run in the threadpool, so they never stall the other connections.
INLINE_MAX_ELEMENTS = 16_384

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
    services: Services = request.app.state.services
    token = services.auth.authenticate(request.headers.get("authorization"))
    TokenService.require(token, Scope.INVOKE, name)
    chosen = services.resolver.pick(name, ref)
    raw_length = request.headers.get(BINARY_HEADER)
    header_length: int | None = None
    if raw_length is not None:
        if not raw_length.isascii() or not raw_length.isdigit():
            raise BadRequest(f"{BINARY_HEADER} must be a non-negative integer", field=BINARY_HEADER)
        header_length = int(raw_length)
    body = await request.body()
    decoded = decode_request(body, header_length, services.settings.limits)
    if chosen.sha256 in services.engine.cache and \
            sum(array.size for array in decoded.inputs.values()) <= INLINE_MAX_ELEMENTS:
        outputs = services.engine.infer(chosen, decoded)
    else:
        outputs = await run_in_threadpool(services.engine.infer, chosen, decoded)
    payload, json_length = encode_response(name, str(chosen.version), decoded.id, outputs,
                                           decoded.response_binary())
    headers = {VERSION_HEADER: str(chosen.version)}
    if json_length is not None:
        headers[BINARY_HEADER] = str(json_length)
        return Response(payload, media_type="application/octet-stream", headers=headers)
    return Response(payload, media_type="application/json", headers=headers)


@router.post("/v2/models/{name}/infer", response_model=InferenceResponse, openapi_extra=INFER_OPENAPI,
             responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422))
async def infer(name: ModelName, request: Request) -> Response:
    return await _infer(request, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", response_model=InferenceResponse,
             openapi_extra=INFER_OPENAPI, responses=problem_responses(400, 401, 403, 404, 409, 413, 415, 422))
async def infer_version(name: ModelName, version: VersionRef, request: Request) -> Response:
    return await _infer(request, name, version)
