"""Inference Lambda: Open Inference Protocol v2 behind API Gateway (REST v1 and HTTP API v2 events).

A lean twin of ``maas.api.routes.inference``: same routes, statuses, problem+json bodies and headers,
but no FastAPI, Starlette or Mangum (about 0.3 s of imports a cold start would pay on the latency
path) and no onnx (the validator never runs here). What it does import heavy (boto3, numpy,
onnxruntime) loads once, at init, with the clients, the engine and the caches:

* sessions in memory (the engine's LRU by bytes), artifacts on disk in ``/tmp`` (content addressed,
  sha256 verified), so a container rebuilds an evicted session without reading S3;
* registry reads (route, version) through ``ServingResolver`` with a 2 s TTL: a deploy or rollback
  reaches warm containers within seconds without a DynamoDB read per request;
* tokens through the 5 s ``TokenCache``.

A model whose route targets ``sagemaker`` (large or GPU models) is not run here: its infer requests go
to its SageMaker endpoint (``InvokeEndpoint``, the same OIP v2 body; the binary extension's header
length rides in the content type), and the answer comes back as the endpoint gave it, with the version
header naming the version that answered (the one the answer reports, else the route's stable one). The
SageMaker module and client load on the first such request only, so Lambda-served models pay nothing
for it.

Environment: ``MAAS_BUCKET`` / ``MAAS_TABLE`` (the backend), ``MAAS_ARTIFACT_CACHE_DIR`` (default
``/tmp/maas-artifacts``), ``MAAS_ARTIFACT_CACHE_BYTES`` (default 512 MiB), ``MAAS_ROUTE_TTL_S``
(default 2), the ``MAAS_*`` limits of ``maas.settings`` and Powertools' variables.

Composition root (DESIGN.md L4): it wires the package; the logic it owns is only HTTP over Lambda
events (parsing, routing, the request guard, answers)."""

from __future__ import annotations

import base64
import binascii
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeGuard

import botocore.session  # noqa: F401  # the SDK loads during init (billed at full CPU), never on a request
import onnxruntime  # noqa: F401  # the engine imports it lazily; this function runs models, so at init
import orjson

from maas import __version__
from maas.backends.aws import AwsBackend
from maas.backends.aws.telemetry import EmfMetrics, correlation_id, get_logger, get_tracer
from maas.domain import ModelVersion, Route, Scope, Token, VersionStatus
from maas.domain.names import MODEL_NAME, VERSION_REF
from maas.errors import (
    BadRequest,
    InvalidInput,
    MaasError,
    NotFound,
    NotReady,
    PayloadTooLarge,
    StorageCorrupted,
    Throttled,
    Unavailable,
)
from maas.inference.artifact_cache import DiskArtifactCache
from maas.inference.codec import decode_request, encode_response
from maas.inference.engine import InferenceEngine
from maas.ports import Backend
from maas.protocol.http_rules import mutation_problem
from maas.protocol.oip import BINARY_HEADER, EXTENSIONS, VERSION_HEADER
from maas.services.invariants import artifact_of
from maas.services.models import ModelService
from maas.services.serving import ServingResolver
from maas.services.tokens import TokenCache, TokenService
from maas.settings import ENV_ARTIFACT_CACHE_BYTES, ENV_ARTIFACT_CACHE_DIR, ENV_POOL_PATH, ENV_ROUTE_TTL, Settings

SERVICE = "maas-inference"
ENV_CACHE_DIR = ENV_ARTIFACT_CACHE_DIR
ENV_CACHE_BYTES = ENV_ARTIFACT_CACHE_BYTES
DEFAULT_CACHE_DIR = "/tmp/maas-artifacts"  # Lambda's only writable disk
DEFAULT_CACHE_BYTES = 512 * 1024 * 1024
DEFAULT_ROUTE_TTL_S = 2.0
TOKEN_TTL_S = 5.0
#: Lambda returns at most 6 MB (the whole proxy answer, JSON-serialized): keep room for the envelope
MAX_RESPONSE_BYTES = 6 * 1024 * 1024 - 64 * 1024

JSON = "application/json"
PROBLEM_JSON = "application/problem+json"
OCTET_STREAM = "application/octet-stream"
REQUEST_ID_HEADER = "X-Request-Id"
INTERNAL_DETAIL = "the server failed to process the request; it has been logged"
#: A pool other than the default one (the container-image function) is mounted under its own prefix on
#: the shared API (``/image/v2/...``); stripping it here keeps the routes identical in every pool.
POOL_PATH = os.environ.get(ENV_POOL_PATH, "").rstrip("/")

# The path rules of maas.api.deps (ModelName, VersionRef), checked the way FastAPI reports them.
NAME_PATTERN = f"^{MODEL_NAME.pattern}$"
NAME_MAX_LENGTH = 63
VERSION_PATTERN = f"^({VERSION_REF.pattern})$"
_NAME = re.compile(NAME_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)
_MODEL_ROUTE = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?")
METADATA_LIMIT = 1000  # the versions listed in model metadata, as the API does
SAGEMAKER_TARGET = "sagemaker"  # Route.target of models served by a SageMaker endpoint

logger = get_logger(SERVICE)
tracer = get_tracer(SERVICE)


# ----------------------------------------------------------------------------------- HTTP over events


@dataclass(slots=True)
class HttpRequest:
    """What the routes need from an API Gateway event, whatever its payload version."""

    method: str
    path: str
    #: lower-case names; for repeated headers the last value (what REST APIs put in ``headers``)
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str | None = JSON
    headers: dict[str, str] | None = None
    binary: bool = False

    def to_lambda(self, request_id: str | None) -> dict[str, Any]:
        """The Lambda proxy integration answer (the same shape for REST v1 and HTTP API v2)."""
        headers: dict[str, str] = {}
        if self.content_type is not None:
            headers["Content-Type"] = self.content_type
        if self.headers:
            headers.update(self.headers)
        if request_id:
            headers[REQUEST_ID_HEADER] = request_id
        if self.binary:
            return {"statusCode": self.status, "headers": headers, "isBase64Encoded": True,
                    "body": base64.b64encode(self.body).decode("ascii")}
        return {"statusCode": self.status, "headers": headers, "isBase64Encoded": False,
                "body": self.body.decode("utf-8")}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> HttpResponse:
    return HttpResponse(status, orjson.dumps(body), JSON, headers)


def problem_response(error: MaasError) -> HttpResponse:
    headers: dict[str, str] | None = None
    if isinstance(error, Throttled | Unavailable):
        headers = {"Retry-After": str(error.retry_after)}
    elif isinstance(error, MethodNotAllowed):
        headers = {"Allow": error.allow}
    return HttpResponse(error.status, orjson.dumps(error.to_problem()), PROBLEM_JSON, headers)


def internal_error_response() -> HttpResponse:
    """The answer to a bug: generic on purpose (the traceback goes to the log, never to the client)."""
    body = {"type": "https://maas.dev/problems/internal", "title": "Internal error", "status": 500,
            "detail": INTERNAL_DETAIL}
    return HttpResponse(500, orjson.dumps(body), PROBLEM_JSON)


def _stage_prefix(path: str, stage: Any) -> str:
    """``path`` without its ``/<stage>`` prefix. HTTP APIs put a named stage in ``rawPath``; REST
    APIs normally do not, but a custom-domain base path mapping can. A REST path that is already a
    route (a stage named ``v2``!) is left alone."""
    if not isinstance(stage, str) or not stage or stage == "$default":
        return path
    prefix = "/" + stage
    if path != prefix and not path.startswith(prefix + "/"):
        return path
    stripped = path[len(prefix):] or "/"
    if _is_route_path(path) and not _is_route_path(stripped):
        return path
    return stripped


def _is_route_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def _is_mapping(value: Any) -> TypeGuard[Mapping[str, Any]]:
    """``isinstance(value, Mapping)``, with the common case first: events are plain dicts, and an ABC
    check costs about a microsecond, several times per request."""
    return type(value) is dict or isinstance(value, Mapping)


def _headers(event: Mapping[str, Any]) -> dict[str, str]:
    """Lower-cased header names. ``headers`` already holds the last value of a repeated header (what
    both payload versions put there); ``multiValueHeaders`` is only read for names it lacks, so a REST
    event's two copies of every header are not both walked on each request."""
    single = event.get("headers")
    headers: dict[str, str] = {}
    if _is_mapping(single):
        headers = {name.lower(): value for name, value in single.items()
                   if type(name) is str and type(value) is str}
    multi = event.get("multiValueHeaders")
    if _is_mapping(multi) and (not _is_mapping(single) or multi.keys() - single.keys()):
        for name, values in multi.items():
            if isinstance(name, str) and isinstance(values, list) and values and isinstance(values[-1], str):
                headers.setdefault(name.lower(), values[-1])
    return headers


def parse_event(event: Mapping[str, Any], max_bytes: int) -> HttpRequest:
    """An API Gateway proxy event (REST v1 or HTTP API v2) as an :class:`HttpRequest`. The body cap
    is checked before decoding base64, so an oversize body is never materialized twice."""
    if not _is_mapping(event):
        raise BadRequest("the event is not an API Gateway proxy event")
    context = event.get("requestContext")
    context = context if _is_mapping(context) else {}
    if event.get("version") == "2.0" or "rawPath" in event:
        http = context.get("http")
        method = http.get("method") if _is_mapping(http) else None
        path = event.get("rawPath")
    else:
        method = event.get("httpMethod")
        path = event.get("path")
    if not isinstance(method, str) or not isinstance(path, str):
        raise BadRequest("the event is not an API Gateway proxy event")
    raw = event.get("body")
    body: bytes
    if raw is None:
        body = b""
    elif not isinstance(raw, str):
        raise BadRequest("the event body is not text")
    elif event.get("isBase64Encoded"):
        if len(raw) > (max_bytes + 2) // 3 * 4 + 4:  # base64 of more than max_bytes bytes
            raise PayloadTooLarge(f"the body exceeds the {max_bytes}-byte limit")
        try:
            body = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("the request body is not valid base64", field="body") from None
    else:
        try:
            body = raw.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("the request body is not valid UTF-8", field="body") from None
    path = _stage_prefix(path, context.get("stage"))
    if POOL_PATH and path.startswith(POOL_PATH + "/"):
        path = path[len(POOL_PATH):]
    return HttpRequest(method=method.upper(), path=path, headers=_headers(event), body=body)


def guard(request: HttpRequest, max_bytes: int) -> None:
    """``maas.api.guard.RequestGuard`` for events: cross-origin mutations and content types (the same
    ``maas.protocol.http_rules``), then the body cap, checked before routing and auth."""
    headers = request.headers
    refused = mutation_problem(request.method, request.path, origin=headers.get("origin"),
                               host=headers.get("host", ""), content_type=headers.get("content-type"),
                               has_body=bool(request.body))
    if refused is not None:
        raise refused
    if len(request.body) > max_bytes:
        raise PayloadTooLarge(f"the body exceeds the {max_bytes}-byte limit")


class MethodNotAllowed(MaasError):
    """A known path with another method (FastAPI's 405, with ``Allow``)."""

    status = 405
    title = "Method not allowed"
    slug = "method-not-allowed"

    def __init__(self, allow: str):
        super().__init__("Method Not Allowed")
        self.allow = allow


def check_path(name: str, version: str | None) -> None:
    """422 for path parameters breaking the API's rules, with FastAPI's validation problem shape."""
    errors: list[dict[str, str]] = []
    if len(name) > NAME_MAX_LENGTH:
        errors.append({"field": "name", "message": f"String should have at most {NAME_MAX_LENGTH} characters"})
    elif not _NAME.fullmatch(name):
        errors.append({"field": "name", "message": f"String should match pattern '{NAME_PATTERN}'"})
    if version is not None and not _VERSION.fullmatch(version):
        errors.append({"field": "version", "message": f"String should match pattern '{VERSION_PATTERN}'"})
    if errors:
        first = errors[0]
        raise InvalidInput(f"{first['field']}: {first['message']}", field=first["field"],
                           extra={"errors": errors})


# ---------------------------------------------------------------------------------------- the function


class EndpointInvoker(Protocol):
    """What the proxy needs of a SageMaker target (``maas.backends.aws.sagemaker.SageMakerInvoker``)."""

    def invoke(self, model: str, body: bytes, content_type: str) -> tuple[bytes, str]: ...


@dataclass(slots=True)
class _Call:
    """What one invocation learned, for its metrics."""

    model: str | None = None
    version: int | None = None
    engine_ran: bool = False


class InferenceFunction:
    """The inference service over a backend (AWS in production, any ``maas.ports.Backend`` in tests):
    call it with an API Gateway event, get the proxy integration answer."""

    def __init__(self, backend: Backend, settings: Settings, *, cache_dir: Path, cache_bytes: int,
                 route_ttl_s: float = DEFAULT_ROUTE_TTL_S, metrics: EmfMetrics | None = None,
                 clock: Callable[[], float] = time.perf_counter, endpoints: EndpointInvoker | None = None):
        """``endpoints``: where requests for SageMaker-served models go (default: ``InvokeEndpoint``
        through a client made on the first such request)."""
        self.backend = backend
        self.settings = settings
        self.metrics = metrics or EmfMetrics()
        self.models = ModelService(backend.registry, backend.artifacts, backend.validator, settings.limits)
        self.resolver = ServingResolver(backend.registry, self.models, ttl_s=route_ttl_s)
        self.auth = TokenCache(TokenService(backend.registry), ttl_s=TOKEN_TTL_S)
        self.artifact_cache = DiskArtifactCache(cache_dir, cache_bytes, self._fetch)
        self.engine = InferenceEngine(self.artifact_cache.read, settings.limits, self.metrics)
        self._max_bytes = settings.limits.max_request_bytes
        self._clock = clock
        self._cold = True
        self._endpoints = endpoints

    def _fetch(self, version: ModelVersion) -> bytes:
        assert version.sha256 is not None
        try:
            return self.backend.artifacts.read(artifact_of(version.sha256, version.size, version.storage_key,
                                                           version.storage_version_id))
        except NotFound:
            # A READY version whose bytes vanished is a storage fault, not a missing resource.
            raise StorageCorrupted(f"the artifact of {version.model!r} version {version.version} is missing "
                                   "from storage") from None

    # -- the entry point

    def __call__(self, event: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
        started = self._clock()
        request_id = correlation_id(event) or getattr(context, "aws_request_id", None)
        call = _Call()
        try:
            response = self._handle(event, call)
        except MaasError as error:
            response = problem_response(error)
            if error.status >= 500:
                logger.error("request failed: %s: %s", type(error).__name__, error.detail)
                if not call.engine_ran:
                    self.metrics.error(call.model, call.version)
        except Exception:
            logger.exception("unhandled error")
            response = internal_error_response()
            if not call.engine_ran:
                self.metrics.error(call.model, call.version)
        try:
            self.metrics.request(call.model, call.version, total_s=self._clock() - started, cold_start=self._cold)
            self.metrics.flush()
        except Exception:  # metrics must never turn an answer into a failure
            logger.exception("metrics flush failed")
        self._cold = False
        return response.to_lambda(request_id)

    def _handle(self, event: Mapping[str, Any], call: _Call) -> HttpResponse:
        request = parse_event(event, self._max_bytes)
        guard(request, self._max_bytes)
        path, method = request.path, request.method
        if path in ("/v2/health/live", "/v2/health/ready"):
            self._allow(method, "GET")
            return json_response({path.rsplit("/", 1)[1]: True})
        if path == "/v2":
            self._allow(method, "GET")
            self._authorize(request, None)
            return json_response({"name": "maas", "version": __version__, "extensions": list(EXTENSIONS)})
        match = _MODEL_ROUTE.fullmatch(path)
        if match is None:
            raise NotFound("no such route")
        name, ref, action = match.group(1), match.group(2), match.group(3)
        call.model = name
        if action == "/infer":
            self._allow(method, "POST")
            token = self._authorize(request, name)  # before the path rules: anonymous callers learn nothing
            check_path(name, ref)
            return self._infer(request, token, name, ref, call)
        self._allow(method, "GET")
        self._authorize(request, name)
        check_path(name, ref)
        if action == "/ready":
            return json_response(self._readiness(name, ref))
        chosen = self._default_version(name) if ref is None else self.resolver.pick(name, ref)
        return json_response(self._metadata(name, chosen))

    @staticmethod
    def _allow(method: str, allowed: str) -> None:
        if method != allowed:
            raise MethodNotAllowed(allowed)

    def _authorize(self, request: HttpRequest, model: str | None) -> Token:
        token = self.auth.authenticate(request.headers.get("authorization"))
        return TokenService.require(token, Scope.INVOKE, model)

    # -- routes

    @staticmethod
    def _header_length(request: HttpRequest) -> int | None:
        raw_length = request.headers.get(BINARY_HEADER.lower())
        if raw_length is None:
            return None
        if not raw_length.isascii() or not raw_length.isdigit():
            raise BadRequest(f"{BINARY_HEADER} must be a non-negative integer", field=BINARY_HEADER)
        return int(raw_length)

    def _sagemaker_route(self, name: str) -> Route | None:
        route = self.resolver.route(name)
        return route if route is not None and route.target == SAGEMAKER_TARGET else None

    def _infer(self, request: HttpRequest, token: Token, name: str, ref: str | None, call: _Call) -> HttpResponse:
        route = self._sagemaker_route(name)
        if route is not None:
            return self._proxy(request, name, ref, route, call)
        chosen, routed = self.resolver.pick_for(token, name, ref)
        call.version = chosen.version
        tracer.put_annotation("model", name)
        header_length = self._header_length(request)
        decoded = decode_request(request.body, header_length, self.settings.limits)
        call.engine_ran = True
        outputs = self.engine.infer(chosen, decoded, routed=routed)
        payload, json_length = encode_response(name, str(chosen.version), decoded.id, outputs,
                                               decoded.response_binary())
        return self._answer(payload, json_length, chosen.version)

    @staticmethod
    def _answer(payload: bytes, json_length: int | None, version: int) -> HttpResponse:
        size = len(payload) if json_length is None else -(-len(payload) // 3) * 4
        if size > MAX_RESPONSE_BYTES:
            # Past the limit Lambda fails the invocation and API Gateway answers a bare 502.
            raise PayloadTooLarge(
                f"the response would be {size} bytes, more than a Lambda function can return "
                f"({MAX_RESPONSE_BYTES}); send a smaller batch or ask for binary outputs")
        headers = {VERSION_HEADER: str(version)}
        if json_length is not None:
            headers[BINARY_HEADER] = str(json_length)
            return HttpResponse(200, payload, OCTET_STREAM, headers, binary=True)
        return HttpResponse(200, payload, JSON, headers)

    def _endpoint_invoker(self) -> EndpointInvoker:
        if self._endpoints is None:
            # Imported on the first SageMaker-served request: Lambda-served models never load it.
            from maas.backends.aws.sagemaker import sagemaker_invoker_from_env

            self._endpoints = sagemaker_invoker_from_env()
        return self._endpoints

    def _proxy(self, request: HttpRequest, name: str, ref: str | None, route: Route, call: _Call) -> HttpResponse:
        """An infer request for a model served by its SageMaker endpoint: the same OIP v2 body goes to
        ``InvokeEndpoint``. The endpoint runs one version (two while SageMaker shifts traffic), so a
        version named in the URL must be one the route serves."""
        from maas.backends.aws.sagemaker import answer_header_length, answered_version, request_content_type

        tracer.put_annotation("model", name)
        served = {route.stable_version} if route.canary_version is None else {route.stable_version,
                                                                               route.canary_version}
        if ref is not None:
            named = self.resolver.pick(name, ref).version
            if named not in served:
                raise NotReady(f"version {named} of {name!r} is not served: the model runs on a SageMaker "
                               f"endpoint serving version {route.stable_version}")
        call.version = route.stable_version
        content_type = request_content_type(self._header_length(request))
        invoker = self._endpoint_invoker()
        call.engine_ran = True  # the endpoint's answer (or failure) is counted as the model's invocation
        started = self._clock()
        try:
            payload, answer_type = invoker.invoke(name, request.body, content_type)
            json_length = answer_header_length(answer_type)
        except MaasError as error:
            self.metrics.invocation(name, route.stable_version, latency_s=self._clock() - started,
                                    error=error.status >= 500)
            raise
        except Exception:
            self.metrics.invocation(name, route.stable_version, latency_s=self._clock() - started, error=True)
            raise
        version = answered_version(payload, json_length) or route.stable_version
        call.version = version
        self.metrics.invocation(name, version, latency_s=self._clock() - started, error=False)
        return self._answer(payload, json_length, version)

    def _ready_versions(self, name: str) -> list[ModelVersion]:
        return [v for v in self.models.list_versions(name, METADATA_LIMIT, None).items
                if v.status is VersionStatus.READY]

    def _default_version(self, name: str) -> ModelVersion:
        """The routed stable version, or before any deploy the newest READY one (for metadata)."""
        route = self.resolver.route(name)
        if route is not None:
            return self.resolver.version(name, route.stable_version)
        for candidate in self._ready_versions(name):
            return candidate
        raise NotReady(f"model {name!r} has no READY version")

    def _metadata(self, name: str, version: ModelVersion) -> dict[str, Any]:
        signature = version.signature
        if signature is None:
            raise NotReady(f"model {name!r} version {version.version} has no signature")
        return {
            "name": name,
            "versions": [str(v.version) for v in self._ready_versions(name)],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in signature.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                        for t in signature.outputs],
        }

    def _readiness(self, name: str, ref: str | None) -> dict[str, Any]:
        try:
            chosen = self.resolver.pick(name, ref)
            if self._sagemaker_route(name) is None:  # a SageMaker endpoint's readiness is SageMaker's
                self.engine.warm(chosen)
        except NotReady as error:
            raise NotReady(error.detail, extra={"name": name, "ready": False}) from None
        return {"name": name, "ready": True}


# ------------------------------------------------------------------------------------ the composition


def _env_number(name: str, default: float, cast: Callable[[str], float]) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {raw!r}")
    return value


def build(backend: Backend | None = None, settings: Settings | None = None) -> InferenceFunction:
    """The function as configured by the environment (``AwsBackend.from_env`` unless given one)."""
    settings = settings or Settings.from_env()
    return InferenceFunction(
        backend if backend is not None else AwsBackend.from_env(settings),
        settings,
        cache_dir=Path(os.environ.get(ENV_CACHE_DIR) or DEFAULT_CACHE_DIR),
        cache_bytes=int(_env_number(ENV_CACHE_BYTES, DEFAULT_CACHE_BYTES, int)),
        route_ttl_s=_env_number(ENV_ROUTE_TTL, DEFAULT_ROUTE_TTL_S, float),
    )


def _init() -> InferenceFunction | None:
    try:
        return build()
    except Exception:
        # Failing the import would make Lambda retry init on every request with a bare 502; instead
        # each request retries the build and answers a problem+json 500 while it fails.
        logger.exception("initialisation failed; retrying on the next request")
        return None


function: InferenceFunction | None = _init()


@tracer.capture_lambda_handler(capture_response=False)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The Lambda entry point (``CMD ["handler.handler"]`` / ``handler.handler`` in a zip)."""
    global function
    logger.set_correlation_id(correlation_id(event))
    if function is None:
        function = _init()
        if function is None:
            return internal_error_response().to_lambda(correlation_id(event))
    return function(event, context)
