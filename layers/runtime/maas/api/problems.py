"""Every error leaves as application/problem+json naming the bad field; nothing internal leaks."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from maas.errors import MaasError, Throttled, Unavailable

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("maas.api")

STATUS_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Invalid input",
    429: "Too many requests",
    500: "Internal error",
    503: "Service unavailable",
}


def problem_response(status: int, title: str, detail: str, *, slug: str | None = None,
                     extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                     ) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://maas.dev/problems/{slug or title.lower().replace(' ', '-')}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if extra:
        body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def maas_error_response(error: MaasError) -> JSONResponse:
    headers = None
    if isinstance(error, Throttled | Unavailable):
        headers = {"Retry-After": str(error.retry_after)}
    if error.status >= 500:
        log.error("request failed: %s: %s", type(error).__name__, error.detail)
    return JSONResponse(error.to_problem(), status_code=error.status, media_type=PROBLEM_JSON,
                        headers=headers)


def internal_error_response() -> JSONResponse:
    """The answer to a bug, logged with its traceback; the client gets nothing internal."""
    log.exception("unhandled error")
    return problem_response(500, "Internal error", "the server failed to process the request; it has been logged",
                            slug="internal")


def _field_of(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "path", "query", "header", "cookie"):
        parts = parts[1:]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() and out else (f".{part}" if out else part)
    return out or "body"


def _message(msg: object) -> str:
    """pydantic's message without the "Value error, " its custom validators' messages carry."""
    return str(msg).removeprefix("Value error, ")


def install(app: FastAPI) -> None:
    @app.exception_handler(MaasError)
    async def _maas(_: Request, error: MaasError) -> JSONResponse:
        return maas_error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        field = _field_of(tuple(first.get("loc", ())))
        message = _message(first.get("msg", "invalid value"))
        return problem_response(
            422, "Invalid input", f"{field}: {message}", slug="invalid-input",
            extra={"field": field, "errors": [
                {"field": _field_of(tuple(e.get("loc", ()))), "message": _message(e.get("msg", ""))}
                for e in errors[:20]
            ]},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        title = STATUS_TITLES.get(error.status_code, "Error")
        detail = error.detail if isinstance(error.detail, str) else title
        if error.status_code == 404 and detail == "Not Found":
            detail = "no such route"
        return problem_response(error.status_code, title, detail,
                                headers=dict(error.headers) if error.headers else None)

    @app.exception_handler(Exception)
    async def _crash(_: Request, error: Exception) -> JSONResponse:
        return internal_error_response()
