"""Helpers for Lambda handler tests: load ``functions/<role>/handler.py`` by file path, build API
Gateway events from the recorded fixtures in ``tests/events``, and a stand-in Lambda context.

``functions/`` is deliberately not a package and never on ``sys.path`` (DESIGN.md section 2): on
Lambda each handler is the top-level module ``handler``. Tests load it under a unique module name,
so two loads are two independent "containers" (module state, clients, caches)."""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EVENTS = Path(__file__).resolve().parent / "events"


def load_handler(role: str, module_name: str | None = None) -> ModuleType:
    """Import ``functions/<role>/handler.py`` afresh as ``module_name`` (default ``maas_fn_<role>``):
    module-level init runs again, like a new Lambda container. Set the environment first."""
    path = REPO / "functions" / role / "handler.py"
    name = module_name or f"maas_fn_{role}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


@dataclass
class LambdaContext:
    """The attributes of Lambda's context object that handlers and Powertools read."""

    function_name: str = "maas-inference"
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 2048
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:maas-inference"
    log_group_name: str = "/aws/lambda/maas-inference"
    log_stream_name: str = "2026/11/22/[$LATEST]0123456789abcdef0123456789abcdef"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def _fill(value: Any, replacements: dict[str, str]) -> Any:
    if isinstance(value, str):
        for placeholder, text in replacements.items():
            value = value.replace(placeholder, text)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, replacements) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, replacements) for v in value]
    return value


def _set_header(event: dict[str, Any], name: str, value: str | None) -> None:
    """Set (or with None remove) a header in ``headers`` and ``multiValueHeaders``, any case."""
    for key in ("headers", "multiValueHeaders"):
        headers = event.get(key)
        if not isinstance(headers, dict):
            continue
        for existing in [k for k in headers if k.lower() == name.lower()]:
            del headers[existing]
        if value is not None:
            spelled = name.lower() if event.get("version") == "2.0" else name
            headers[spelled] = [value] if key == "multiValueHeaders" else value


def api_event(fixture: str, *, model: str = "iris", token: str | None = None, body: bytes | str = b"",
              path: str | None = None, method: str | None = None, header_length: int | None = None,
              headers: dict[str, str | None] | None = None) -> dict[str, Any]:
    """A recorded event (``tests/events/<fixture>.json``) with its placeholders filled in.

    ``path`` replaces the route (without the stage; the fixture's stage prefix is kept where API
    Gateway puts one); a fixture whose ``isBase64Encoded`` is true gets ``body`` base64-encoded.
    ``token`` fills ``Bearer {token}``; headers given as None are removed."""
    event: dict[str, Any] = copy.deepcopy(json.loads((EVENTS / f"{fixture}.json").read_text()))
    raw = body.encode() if isinstance(body, str) else body
    encoded = base64.b64encode(raw).decode("ascii") if event.get("isBase64Encoded") else raw.decode("utf-8")
    event = _fill(event, {"{model}": model, "{token}": token or "", "{content_length}": str(len(raw)),
                          "{header_length}": str(header_length or 0)})
    event["body"] = encoded if raw or event.get("isBase64Encoded") else None
    if header_length is None:
        _set_header(event, "Inference-Header-Content-Length", None)
    context = event["requestContext"]
    stage = context.get("stage")
    staged = "" if stage in (None, "$default") else f"/{stage}"
    if path is not None:
        if event.get("version") == "2.0":
            event["rawPath"] = context["http"]["path"] = staged + path
        else:
            event["path"] = path
            event["pathParameters"] = {"proxy": path.lstrip("/")}
            context["path"] = staged + path
    if method is not None:
        if event.get("version") == "2.0":
            context["http"]["method"] = method
            event["routeKey"] = context["routeKey"] = "$default"
        else:
            event["httpMethod"] = context["httpMethod"] = method
    for name, value in (headers or {}).items():
        _set_header(event, name, value)
    return event
