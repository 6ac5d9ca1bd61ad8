"""``create_app(backend)``: the one FastAPI application for every backend (local, AWS behind Mangum)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI, Response
from starlette.types import ASGIApp

from maas import __version__
from maas.api import problems
from maas.api.deps import Invoker, Services, ServicesDep, TokenCache
from maas.api.guard import RequestGuard
from maas.api.inference_path import InferencePath
from maas.api.metrics import FanOut, PrometheusMetrics
from maas.api.routes import deployments, inference, models, optimize, tokens
from maas.domain import Signature
from maas.inference.engine import InferenceEngine
from maas.inference.sandbox import Sandbox, sandbox_of
from maas.inference.smoke import SmokeTest
from maas.ports import Backend, Metrics
from maas.services.aliases import AliasService
from maas.services.deployments import DeploymentService
from maas.services.health import HealthRecorder
from maas.services.models import ModelService
from maas.services.optimize import OptimizeService
from maas.services.serving import ServingResolver, artifact_reader
from maas.services.tokens import TokenService
from maas.settings import Settings

DESCRIPTION = """Versioned, validated, monitored ONNX model serving.

Management routes need `Authorization: Bearer <token>`; errors are `application/problem+json`.
Inference follows the Open Inference Protocol v2 (KServe/Triton), with Triton's binary tensor extension.
"""


def _quantize(settings: Settings, sandbox: Sandbox | None, model: bytes, signature: Signature, tolerance: float,
              /, *, goal: str, derived: bytes | None = None) -> tuple[bytes, Any]:
    """``maas.inference.optimize.quantize`` in the backend's sandbox (a child process: it runs an
    untrusted model many times); in this process only where the backend has none (tests), imported on
    the first call: onnx and onnxruntime would lengthen the API function's cold start."""
    if sandbox is not None:
        return sandbox.quantize(model, signature, tolerance, goal=goal, derived=derived)
    from maas.inference.optimize import quantize

    return quantize(model, signature, tolerance, goal=goal, derived=derived, limits=settings.limits)


class MaasAPI(FastAPI):
    """FastAPI with ``front``: ASGI layers put in front of the whole stack, FastAPI's own middleware
    included. The request guard and the infer fast path run there, so an inference request pays for
    neither FastAPI's router nor its per-request middleware (~20 µs of telemetry and error wrappers)."""

    front: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return stack if self.front is None else self.front(stack)


def create_app(backend: Backend, settings: Settings | None = None, *,
               allowed_hosts: Iterable[str] | None = None, metrics_sink: Metrics | None = None) -> MaasAPI:
    """Build the API over a backend. ``allowed_hosts`` restricts the Host header (DNS rebinding
    defence for a server bound to loopback); ``None`` accepts any host (behind API Gateway).
    ``metrics_sink`` receives the engine's metrics besides ``/metrics`` (CloudWatch EMF on Lambda)."""
    settings = settings or getattr(backend, "settings", None) or Settings.from_env()
    metrics = PrometheusMetrics()

    # Every inference also feeds the per-version health the deploy workflow judges canaries with
    # (a backend may bring its own source: CloudWatch on AWS).
    recorder = HealthRecorder()
    sinks: tuple[Metrics, ...] = (metrics, recorder) if metrics_sink is None else (metrics, recorder, metrics_sink)
    engine = InferenceEngine(artifact_reader(backend.artifacts), settings.limits, FanOut(*sinks))
    sandbox = sandbox_of(backend.validator)
    model_service = ModelService(backend.registry, backend.artifacts, backend.validator, settings.limits)
    token_service = TokenService(backend.registry)
    services = Services(
        backend=backend,
        settings=settings,
        models=model_service,
        aliases=AliasService(backend.registry),
        # Deploys run where the backend says (Step Functions on AWS, whose tasks read CloudWatch), else
        # here: the smoke test runs the version through this engine, bakes are judged on this process's
        # traffic, and endpoint targets (``sagemaker``) come from the backend.
        deployments=DeploymentService(backend.registry, model_service, smoke_test=SmokeTest(engine, sandbox),
                                      executor=backend.deploy_executor, health=recorder,
                                      targets=backend.endpoint_targets),
        tokens=token_service,
        auth=TokenCache(token_service),
        resolver=ServingResolver(backend.registry, model_service),
        engine=engine,
        metrics=metrics,
        optimize=OptimizeService(model_service, backend.artifacts, functools.partial(_quantize, settings, sandbox)),
    )
    # Traffic shifts made by deploys running in this process reach the route cache at once.
    services.deployments.workflow.on_route_change = services.resolver.invalidate
    # Deploys with ``optimize`` quantize through the same service as the optimize route.
    services.deployments.workflow.optimizer = lambda version: services.optimize.optimize(version.model,
                                                                                         version.version)
    app = MaasAPI(title="maas", version=__version__, description=DESCRIPTION, docs_url="/docs",
                  redoc_url=None, openapi_url="/openapi.json")
    app.state.services = services
    problems.install(app)
    for module in (models, optimize, deployments, tokens, inference):
        app.include_router(module.router)

    @app.get("/metrics", tags=["metrics"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    def prometheus_metrics(services: ServicesDep, _: Invoker) -> Response:
        return Response(services.metrics.render(), media_type=PrometheusMetrics.content_type)

    limits = settings.limits
    app.front = lambda stack: RequestGuard(
        InferencePath(stack, services), max_request_bytes=limits.max_request_bytes,
        max_upload_bytes=limits.max_model_bytes, allowed_hosts=allowed_hosts,
        authenticate=services.auth.authenticate, body_idle_timeout_s=limits.body_idle_timeout_s,
        body_timeout_s=limits.body_timeout_s, max_buffered_request_bytes=limits.max_buffered_request_bytes)
    return app


__all__ = ["MaasAPI", "Services", "create_app"]
