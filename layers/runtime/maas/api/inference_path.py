"""The OIP v2 infer routes as a raw ASGI path in front of FastAPI.

For a small model the web framework, not the model, sets the latency: FastAPI's router matches every
route with its own scope copies, solves a dependency graph and builds a ``Request`` per call, ~200 µs
that dwarf a 6 µs ``session.run``. ``POST /v2/models/{name}[/versions/{v}]/infer`` is therefore answered
here, before FastAPI sees it: one regex, the token cache, the route cache, ``decode_request`` straight to
numpy, the engine, ``encode_response``, two ASGI messages. Everything else, and every infer request whose
path parameters break the API's rules (FastAPI's 422 answers them), goes on to the FastAPI app; the
FastAPI routes of ``maas.api.routes.inference`` stay for OpenAPI and call the same :func:`run_inference`.

It sits inside ``RequestGuard`` (Host, Origin, content type and body caps apply unchanged) and answers
errors through ``maas.api.problems`` (a rare path: the Starlette response costs nothing on success)."""

from __future__ import annotations

import functools
import re
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from maas.api.problems import internal_error_response, maas_error_response
from maas.domain import Scope as TokenScope
from maas.domain.names import MODEL_NAME, VERSION_REF
from maas.errors import BadRequest, MaasError
from maas.inference.codec import decode_request, encode_response
from maas.inference.engine import RunOverran
from maas.protocol.oip import BINARY_HEADER, VERSION_HEADER
from maas.services.tokens import TokenService

if TYPE_CHECKING:
    from maas.api.deps import Services


#: Requests up to this many input elements, for a model already loaded, run on the event loop: a
#: thread hop would cost more than the model. Bigger ones and first loads (reading, hashing and
#: building a session) run in the threadpool, so they never stall the other connections.
INLINE_MAX_ELEMENTS = 16_384
#: ...but never for longer than this: a small input can still set off a long run (a Loop whose trip
#: count is an input held the event loop for 20 s, health waited 18 s). Past it the run is stopped (the
#: watchdog's resolution adds up to 50 ms), run again in the threadpool, and that session runs in the
#: threadpool from then on: the event loop pays for each such model once.
INLINE_DEADLINE_S = 0.02
#: Request bodies up to this size are decoded on the event loop; bigger ones in the threadpool.
INLINE_MAX_BODY_BYTES = 256 * 1024
INFER_ROUTE = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
_JSON = b"application/json"
_OCTET_STREAM = b"application/octet-stream"
_BINARY_HEADER = BINARY_HEADER.lower().encode("latin-1")
_VERSION_HEADER = VERSION_HEADER.lower().encode("latin-1")


@dataclass(slots=True)
class InferenceAnswer:
    """What an infer request produced: the encoded body, its binary-extension JSON length (``None``
    for plain JSON) and the version that answered."""

    payload: bytes
    json_length: int | None
    version: int

    @property
    def media_type(self) -> str:
        return "application/json" if self.json_length is None else "application/octet-stream"

    def headers(self) -> dict[str, str]:
        headers = {VERSION_HEADER: str(self.version)}
        if self.json_length is not None:
            headers[BINARY_HEADER] = str(self.json_length)
        return headers


def header_length(raw: str | None) -> int | None:
    """The binary extension's ``Inference-Header-Content-Length``, checked."""
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit():
        raise BadRequest(f"{BINARY_HEADER} must be a non-negative integer", field=BINARY_HEADER)
    return int(raw)


async def run_inference(services: Services, name: str, ref: str | None, authorization: str | None,
                        binary_header: str | None, body: bytes) -> InferenceAnswer:
    """Authorize, route, decode, run and encode one infer request (raises ``MaasError``)."""
    token = services.auth.authenticate(authorization)
    TokenService.require(token, TokenScope.INVOKE, name)
    chosen, routed = services.resolver.pick_for(token, name, ref)
    length = header_length(binary_header)
    if len(body) <= INLINE_MAX_BODY_BYTES:
        decoded = decode_request(body, length, services.settings.limits)
    else:  # a multi-megabyte decode (1.5M strings took 3 s) must not stall every other connection
        decoded = await run_in_threadpool(decode_request, body, length, services.settings.limits)
    engine = services.engine
    small = sum(array.size for array in decoded.inputs.values()) <= INLINE_MAX_ELEMENTS
    run = functools.partial(engine.infer, chosen, decoded, routed=routed)
    if small and engine.runs_inline(chosen):
        try:
            outputs = run(inline_deadline_s=INLINE_DEADLINE_S)
        except RunOverran:  # slower than a small model may be on the event loop: a worker thread, from now on
            outputs = await run_in_threadpool(run)
    else:
        outputs = await run_in_threadpool(run)
    encode = functools.partial(encode_response, name, str(chosen.version), decoded.id, outputs,
                               decoded.response_binary())
    if sum(array.size for _, array in outputs) <= INLINE_MAX_ELEMENTS:
        payload, json_length = encode()
    else:  # and neither may encoding a large answer
        payload, json_length = await run_in_threadpool(encode)
    return InferenceAnswer(payload, json_length, chosen.version)


class InferencePath:
    """ASGI middleware answering the infer routes itself (see the module docstring)."""

    def __init__(self, app: ASGIApp, services: Services):
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        match = INFER_ROUTE.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        name, ref = match.group(1), match.group(2)
        if len(name) > 63 or not MODEL_NAME.fullmatch(name) or (ref is not None and not VERSION_REF.fullmatch(ref)):
            await self.app(scope, receive, send)  # FastAPI's validation answers with its 422
            return
        authorization: str | None = None
        binary_header: str | None = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                authorization = value.decode("latin-1")
            elif key == _BINARY_HEADER:
                binary_header = value.decode("latin-1")
        try:
            body = await _read_body(receive)
            answer = await run_inference(self.services, name, ref, authorization, binary_header, body)
        except MaasError as error:
            await maas_error_response(error)(scope, receive, send)
            return
        except Exception:
            await internal_error_response()(scope, receive, send)
            return
        payload = answer.payload
        headers = [(b"content-type", _JSON if answer.json_length is None else _OCTET_STREAM),
                   (_VERSION_HEADER, str(answer.version).encode("latin-1")),
                   (b"content-length", str(len(payload)).encode("latin-1"))]
        if answer.json_length is not None:
            headers.append((_BINARY_HEADER, str(answer.json_length).encode("latin-1")))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


async def _read_body(receive: Receive) -> bytes:
    """The whole request body (``RequestGuard`` caps it while it streams in)."""
    message: MutableMapping[str, Any] = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    while message.get("more_body", False):
        message = await receive()
        chunks.append(message.get("body", b""))
    return b"".join(chunks)
