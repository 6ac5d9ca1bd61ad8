"""Management API Lambda: the same FastAPI app as ``maas serve``, over the AWS backend, behind Mangum.

Composition root only: everything is built once per container at import (clients, app), because
Mangum's ``lifespan="auto"`` would run start-up on every invocation. Mangum stays behind this one
module (its repository is archived): replacing it touches nothing else."""

from __future__ import annotations

import json
import time
from typing import Any

from mangum import Mangum

from maas.api import create_app
from maas.backends.aws import AwsBackend
from maas.backends.aws.telemetry import EmfMetrics, correlation_id, get_logger, get_tracer
from maas.errors import PayloadTooLarge
from maas.settings import Settings

SERVICE = "maas-api"
logger = get_logger(SERVICE)
tracer = get_tracer(SERVICE)

settings = Settings.from_env()
backend = AwsBackend.from_env(settings)
emf = EmfMetrics()
app = create_app(backend, settings, metrics_sink=emf)
_adapters: dict[str, Mangum] = {}
_cold = True
#: Lambda returns at most 6 MB (the whole proxy answer, JSON-serialized): keep room for the envelope
MAX_RESPONSE_BYTES = 6 * 1024 * 1024 - 64 * 1024


def base_path(event: dict[str, Any]) -> str:
    """The stage prefix to strip: HTTP APIs (v2) put a named stage in ``rawPath`` (``/prod/models``);
    REST APIs (v1) usually do not, but a custom-domain mapping can. ``$default`` has none."""
    context = event.get("requestContext") or {}
    stage = context.get("stage")
    path = event.get("rawPath") or event.get("path") or "/"
    if not isinstance(stage, str) or not stage or stage == "$default":
        return "/"
    prefix = f"/{stage}"
    return prefix if path == prefix or path.startswith(prefix + "/") else "/"


def adapter(prefix: str) -> Mangum:
    found = _adapters.get(prefix)
    if found is None:
        found = _adapters[prefix] = Mangum(app, lifespan="off", api_gateway_base_path=prefix)
    return found


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    global _cold
    started = time.perf_counter()
    logger.set_correlation_id(correlation_id(event))
    try:
        response: dict[str, Any] = adapter(base_path(event))(event, context)
    finally:
        emf.request(None, None, total_s=time.perf_counter() - started, cold_start=_cold)
        _cold = False
        emf.flush()  # one EMF document per model-version this invocation touched
    if len(response.get("body") or "") > MAX_RESPONSE_BYTES:
        response = too_large(len(response["body"]))
    request_id = correlation_id(event)
    if request_id:
        response.setdefault("headers", {})["x-request-id"] = request_id
    return response


def too_large(size: int) -> dict[str, Any]:
    """Past Lambda's limit the invocation fails and API Gateway answers a bare 502; say why instead."""
    problem = PayloadTooLarge(f"the response would be {size} bytes, more than a Lambda function can return "
                              f"({MAX_RESPONSE_BYTES}); ask for fewer items (?limit=) or a smaller batch")
    return {"statusCode": problem.status, "isBase64Encoded": False,
            "headers": {"content-type": "application/problem+json"}, "body": json.dumps(problem.to_problem())}
