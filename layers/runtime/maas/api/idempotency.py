"""The ``Idempotency-Key`` header on mutating routes: HTTP glue for ``maas.services.idempotency``.

A router opts in with ``APIRouter(route_class=IdempotentRoute)``: every ``POST``/``PUT``/``PATCH``/
``DELETE`` route it declares then documents the header in OpenAPI and, when a request carries it,

1. authenticates the caller (keys are scoped per token; without valid credentials the route runs
   as usual and answers 401 itself),
2. fingerprints the request (method, path, query, token, canonical body),
3. claims the key: the first request runs the route; a repeat gets the stored response back
   (status, body, headers, plus ``Idempotent-Replayed: true``) without running anything; a
   concurrent repeat waits (without holding a worker thread) until the first answers, up to the
   service's ``wait_s``, then gets 409 with ``Retry-After``; the key with another request gets 422,
4. stores the route's response, errors with status < 500 included, or releases the key when the
   route failed (5xx, crash, cancellation) so that a retry runs it again.

It wraps the route's handler rather than being a middleware because ``maas.api.app`` (which owns
the middleware stack) is not the place to know which routes mutate, and because the wrapped
handler still sees FastAPI's own validation and exception handling, whose answers it records.
Routes that stream their body (uploads) are exempt with :func:`exempt`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Header, Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from maas.api.deps import get_services
from maas.api.problems import problem_response
from maas.errors import MaasError
from maas.ports import IdempotencyStore, StoredResponse
from maas.services.idempotency import (
    KEY_HEADER,
    KEY_MAX_LENGTH,
    KEY_PATTERN,
    Busy,
    Claimed,
    IdempotencyService,
    Replay,
    check_key,
    fingerprint,
    poll_delay,
)

log = logging.getLogger("maas.api")

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
REPLAYED_HEADER = "Idempotent-Replayed"
#: Headers that describe one transmission rather than the answer: never stored nor replayed.
_NOT_STORED = frozenset({"content-length", "date", "server", "set-cookie", "transfer-encoding", "connection",
                         REPLAYED_HEADER.lower()})
_EXEMPT = "__maas_idempotency_exempt__"
_SECRETS = "__maas_idempotency_secret_fields__"

F = TypeVar("F", bound=Callable[..., Any])
Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def idempotency_key_header(
    key: Annotated[str | None, Header(
        alias=KEY_HEADER, max_length=KEY_MAX_LENGTH, pattern=KEY_PATTERN,
        description="Makes the call safe to retry: a repeat with the same key (same token, same request) "
                    "returns the first call's stored response (with `Idempotent-Replayed: true`) instead of "
                    "running again; the key with a different request gets 422. Keys live 24 h. "
                    "The maas SDK and CLI send a random one (UUID) on every mutating call.",
        examples=["3f1c9a52-7d1e-4a8e-9b2f-0c6d5e4f3a21"])] = None,
) -> str | None:
    """Declares the header (OpenAPI, validation); :class:`IdempotentRoute` does the work."""
    return key


def secret_fields(*fields: str) -> Callable[[F], F]:
    """Mark the fields of a route's answer that hold a secret shown once (a created token): the stored
    answer has them blanked, so a replay returns null there and the secret is never kept."""

    def mark(endpoint: F) -> F:
        setattr(endpoint, _SECRETS, fields)
        return endpoint

    return mark


def exempt(endpoint: F) -> F:
    """Leave a mutating route out (it streams its body, or is idempotent by nature)."""
    setattr(endpoint, _EXEMPT, True)
    return endpoint


def service_for(request: Request) -> IdempotencyService | None:
    """The app's idempotency service, built on first use over the backend's store (None: the
    backend keeps no keys, and the header is ignored). ``app.state.idempotency`` may be set to
    configure it (TTL, lease, wait)."""
    state = request.app.state
    service: IdempotencyService | None = getattr(state, "idempotency", None)
    if service is None:
        store: IdempotencyStore | None = getattr(get_services(request).backend, "idempotency", None)
        if store is None:
            return None
        service = IdempotencyService(store)
        state.idempotency = service
    return service


def _stored(response: Response) -> StoredResponse | None:
    body = getattr(response, "body", None)
    if not isinstance(body, bytes | bytearray | memoryview):  # a streamed body cannot be kept
        return None
    headers = tuple((name, value) for name, value in response.headers.items() if name.lower() not in _NOT_STORED)
    return StoredResponse(status=response.status_code, headers=headers, body=bytes(body))


def _replay(stored: StoredResponse) -> Response:
    response = Response(content=stored.body, status_code=stored.status)
    for name, value in stored.headers:
        response.headers.append(name, value)
    response.headers[REPLAYED_HEADER] = "true"
    return response


async def _rendered(request: Request, error: Exception) -> Response | None:
    """The response the app's exception handlers give ``error`` when it is a client error (the
    route's answer, kept like any other); None for anything else (a 5xx or a crash)."""
    if isinstance(error, MaasError) and error.status >= 500:
        return None
    handlers: dict[Any, Callable[..., Any]] = request.app.exception_handlers
    for cls in type(error).__mro__:
        if cls is Exception or cls is BaseException:
            break
        handler = handlers.get(cls)
        if handler is not None:
            answer = handler(request, error)
            response: Response = await answer if hasattr(answer, "__await__") else answer
            return response if response.status_code < 500 else None
    return None


async def _release(service: IdempotencyService, principal: str, key: str, claim: str) -> None:
    with anyio.CancelScope(shield=True):  # also when the request itself is being cancelled
        try:
            await run_in_threadpool(service.abandon, principal, key, claim)
        except Exception:  # the key then stays blocked until its lease runs out
            log.exception("could not release an idempotency key")


def _wrap(handler: Handler, secrets: tuple[str, ...]) -> Handler:
    async def idempotent(request: Request) -> Response:
        raw_key = request.headers.get(KEY_HEADER)
        if raw_key is None:
            return await handler(request)
        service = service_for(request)
        if service is None:
            return await handler(request)
        services = get_services(request)
        try:
            token = await run_in_threadpool(services.auth.authenticate, request.headers.get("authorization"))
        except MaasError:
            return await handler(request)  # answers 401 itself; nothing is recorded for nobody
        key = check_key(raw_key)
        body = await request.body()  # cached on the request: the route reads it again for free
        request_fingerprint = fingerprint(request.method, request.url.path, request.query_params.multi_items(),
                                          token.id, body)
        deadline = time.monotonic() + service.wait_s
        attempt = 0
        while True:
            outcome = await run_in_threadpool(service.begin, token.id, key, request_fingerprint)
            if isinstance(outcome, Replay):
                return _replay(outcome.response)
            if isinstance(outcome, Claimed):
                break
            assert isinstance(outcome, Busy)
            if time.monotonic() >= deadline:
                error = service.in_progress()
                retry_after = max(1, min(int(outcome.lease_until - service.clock()) + 1, 5))
                return problem_response(error.status, error.title, error.detail, slug=error.slug,
                                        extra={"field": KEY_HEADER}, headers={"Retry-After": str(retry_after)})
            await anyio.sleep(poll_delay(attempt))
            attempt += 1

        claim = outcome.claim
        try:
            response = await handler(request)
        except Exception as error:
            rendered = await _rendered(request, error)
            if rendered is None:
                await _release(service, token.id, key, claim)
                raise
            response = rendered
        except BaseException:
            await _release(service, token.id, key, claim)
            raise
        stored = _stored(response)
        if stored is None:
            await _release(service, token.id, key, claim)
            return response
        try:
            await run_in_threadpool(service.finish, token.id, key, claim, stored, secrets)
        except Exception:
            # The operation ran: answer it. A retry may run it again once the key's lease runs out.
            log.exception("could not store an idempotent response")
        return response

    return idempotent


class IdempotentRoute(APIRoute):
    """An ``APIRoute`` whose mutating operations honour ``Idempotency-Key`` (module docstring)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        methods = {method.upper() for method in kwargs.get("methods") or ()}
        self.idempotent = bool(methods & MUTATING) and not getattr(endpoint, _EXEMPT, False)
        if self.idempotent:
            kwargs["dependencies"] = [*(kwargs.get("dependencies") or ()), Depends(idempotency_key_header)]
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        return _wrap(handler, getattr(self.endpoint, _SECRETS, ())) if self.idempotent else handler


__all__ = ["MUTATING", "REPLAYED_HEADER", "IdempotentRoute", "exempt", "idempotency_key_header", "secret_fields",
           "service_for"]
