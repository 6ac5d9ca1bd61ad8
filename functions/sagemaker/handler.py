"""SageMaker real-time endpoint container: one ONNX model behind SageMaker's hosting contract.

SageMaker starts the image with ``docker run <image> serve`` and talks to it over HTTP on port 8080:

* ``GET /ping``: 200 once the model is loaded, 503 while it loads or when it cannot be (SageMaker
  keeps the instance out of service until it answers 200);
* ``POST /invocations``: the body of ``InvokeEndpoint``, here an Open Inference Protocol v2 request:
  JSON, or Triton's binary tensor extension. SageMaker forwards ``Content-Type`` and ``Accept`` but
  not arbitrary headers, so the JSON header length travels in the content type, as in SageMaker's
  Triton containers: ``application/vnd.sagemaker-triton.binary+json;json-header-size=<N>``. The
  ``Inference-Header-Content-Length`` header is accepted too (direct calls, ``docker run`` locally).
  Binary answers say their header length the same two ways.

The model is the artifact SageMaker unpacks into ``/opt/ml/model`` (``SM_MODEL_DIR`` overrides it):
``model.onnx``, or the only ``*.onnx`` file there. Its sha256 is computed at start-up (and compared with
``MAAS_MODEL_SHA256`` when the deployment sets it); the engine checks the bytes it loads against it, as it
does for registry versions.

Serving is ``maas.inference``: the same codec (``decode_request`` / ``encode_response``) and engine
(signature checks, cleaned onnxruntime errors) as ``maas serve`` and the inference Lambda, with
``CUDAExecutionProvider`` first when onnxruntime offers it and CPU otherwise. Errors are problem+json
(``maas.errors``) without tracebacks or paths. The app is a plain ASGI callable (no FastAPI or
Starlette to import) run by uvicorn in one process; inference runs in worker threads so ``/ping``
answers while a batch runs.

Environment: ``SM_MODEL_DIR`` (default ``/opt/ml/model``), ``MAAS_MODEL_NAME`` / ``MAAS_MODEL_VERSION``
(what answers report, default ``model`` / ``1``), ``MAAS_MODEL_SHA256`` (the registry's sha256 of the
version: when set, a file that does not hash to it is refused), ``MAAS_ORT_PROVIDERS`` (comma-separated execution
providers, default CUDA then CPU, whichever are available), ``SAGEMAKER_BIND_TO_PORT`` (set by SageMaker
for multi-container endpoints; default 8080), ``MAAS_SAGEMAKER_HOST`` (default 0.0.0.0) and the
``MAAS_*`` limits of ``maas.settings`` (body cap ``MAAS_MAX_REQUEST_BYTES``, 6 MiB as InvokeEndpoint's).

Composition root (DESIGN.md L4): it wires the package; it owns only HTTP (ASGI) and the model file.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort
import orjson
import uvicorn

from maas.domain import ModelVersion, VersionStatus
from maas.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidInput,
    MaasError,
    NotFound,
    PayloadTooLarge,
    StorageCorrupted,
    Throttled,
    Unavailable,
    UnsupportedMediaType,
)
from maas.inference.codec import decode_request, encode_response
from maas.inference.engine import InferenceEngine
from maas.protocol.http_rules import same_origin
from maas.protocol.oip import BINARY_HEADER, VERSION_HEADER
from maas.settings import Limits, Settings

logger = logging.getLogger("maas.sagemaker")

ENV_MODEL_DIR = "SM_MODEL_DIR"
ENV_MODEL_NAME = "MAAS_MODEL_NAME"
ENV_MODEL_VERSION = "MAAS_MODEL_VERSION"
ENV_MODEL_SHA256 = "MAAS_MODEL_SHA256"
ENV_PROVIDERS = "MAAS_ORT_PROVIDERS"
ENV_PORT = "SAGEMAKER_BIND_TO_PORT"
ENV_HOST = "MAAS_SAGEMAKER_HOST"

DEFAULT_MODEL_DIR = "/opt/ml/model"
DEFAULT_MODEL_NAME = "model"
DEFAULT_MODEL_VERSION = 1
DEFAULT_PORT = 8080
# The only place in the project that binds every interface: SageMaker reaches the container from
# outside its network namespace, on the container's own address. Everything else (maas serve, the
# e2e tests) binds 127.0.0.1; tests of this module override it with --host / MAAS_SAGEMAKER_HOST.
DEFAULT_HOST = "0.0.0.0"
#: longer than the idle timeout of SageMaker's front end (60 s), so it is the one closing connections
KEEP_ALIVE_S = 75
MODEL_FILE = "model.onnx"
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
_SHA256 = re.compile(r"[0-9a-f]{64}")

JSON = "application/json"
PROBLEM_JSON = "application/problem+json"
OCTET_STREAM = "application/octet-stream"
#: SageMaker's Triton media type for the binary tensor extension; ``json-header-size`` carries the length
TRITON_BINARY = "application/vnd.sagemaker-triton.binary+json"
HEADER_SIZE_PARAM = "json-header-size"
ACCEPTED_TYPES = frozenset({JSON, OCTET_STREAM, TRITON_BINARY})
INTERNAL_DETAIL = "the server failed to process the request; it has been logged"

AsgiScope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# ------------------------------------------------------------------------------------------ HTTP bits


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = JSON
    headers: dict[str, str] = field(default_factory=dict)

    async def send(self, send: Send) -> None:
        headers = [(b"content-length", str(len(self.body)).encode("ascii"))]
        if self.content_type is not None:
            headers.append((b"content-type", self.content_type.encode("latin-1")))
        headers.extend((name.lower().encode("latin-1"), value.encode("latin-1"))
                       for name, value in self.headers.items())
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


class MethodNotAllowed(MaasError):
    status = 405
    title = "Method not allowed"
    slug = "method-not-allowed"

    def __init__(self, allow: str):
        super().__init__("Method Not Allowed")
        self.allow = allow


class ClientDisconnected(Exception):
    """The client went away before sending the whole body: there is no one to answer."""


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(status, orjson.dumps(body), JSON, headers or {})


def problem_response(error: MaasError) -> Response:
    headers: dict[str, str] = {}
    if isinstance(error, Throttled | Unavailable):
        headers["Retry-After"] = str(error.retry_after)
    elif isinstance(error, MethodNotAllowed):
        headers["Allow"] = error.allow
    return Response(error.status, orjson.dumps(error.to_problem()), PROBLEM_JSON, headers)


def internal_error_response() -> Response:
    """The answer to a bug: generic on purpose (the traceback goes to the log, never to the client)."""
    body = {"type": "https://maas.dev/problems/internal", "title": "Internal error", "status": 500,
            "detail": INTERNAL_DETAIL}
    return Response(500, orjson.dumps(body), PROBLEM_JSON)


def parse_content_type(value: str | None) -> tuple[str | None, dict[str, str]]:
    """``type/subtype; name=value; ...`` -> (lower-case media type or None, lower-case-named parameters)."""
    if value is None:
        return None, {}
    media, *rest = value.split(";")
    params: dict[str, str] = {}
    for part in rest:
        name, sep, raw = part.partition("=")
        if sep:
            params[name.strip().lower()] = raw.strip().strip('"')
    return media.strip().lower() or None, params


def _length(raw: str, where: str) -> int:
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit():
        raise BadRequest(f"{where} must be a non-negative integer", field=where)
    return int(raw)


def header_length(headers: dict[str, str]) -> int | None:
    """The binary extension's JSON header length: the ``json-header-size`` parameter of the content
    type (SageMaker's way) and/or the ``Inference-Header-Content-Length`` header; they must agree."""
    _, params = parse_content_type(headers.get("content-type"))
    from_type = params.get(HEADER_SIZE_PARAM)
    from_header = headers.get(BINARY_HEADER.lower())
    lengths = {
        _length(raw, where)
        for raw, where in ((from_type, HEADER_SIZE_PARAM), (from_header, BINARY_HEADER))
        if raw is not None
    }
    if len(lengths) > 1:
        raise BadRequest(f"the Content-Type's {HEADER_SIZE_PARAM} and {BINARY_HEADER} disagree", field=BINARY_HEADER)
    return lengths.pop() if lengths else None


# ------------------------------------------------------------------------------------------ the model


def find_model(model_dir: Path) -> Path:
    """``model.onnx`` in ``model_dir``, else its only ``*.onnx`` file. Errors name no path (they reach
    ``/ping`` answers); the caller logs the directory."""
    preferred = model_dir / MODEL_FILE
    if preferred.is_file():
        return preferred
    candidates = sorted(path for path in model_dir.glob("*.onnx") if path.is_file()) if model_dir.is_dir() else []
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise NotFound("no ONNX model (a *.onnx file) in the model directory")
    raise Conflict(f"{len(candidates)} *.onnx files in the model directory and none is named {MODEL_FILE}")


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def choose_providers(available: Sequence[str], requested: str | None = None) -> list[str]:
    """Execution providers in preference order: ``requested`` (comma-separated, each must be
    available), else CUDA then CPU, whichever this onnxruntime build offers."""
    if requested is not None and requested.strip():
        names = [name.strip() for name in requested.split(",") if name.strip()]
        missing = [name for name in names if name not in available]
        if missing:
            raise ValueError(f"{ENV_PROVIDERS}: {', '.join(missing)} not available (this onnxruntime offers "
                             f"{', '.join(available)})")
        return names
    chosen = [name for name in PREFERRED_PROVIDERS if name in available]
    return chosen or list(available)


# -------------------------------------------------------------------------------------------- the app


class SageMakerApp:
    """The ASGI app. ``load()`` loads the model (the lifespan start-up runs it in a thread); until it
    succeeds ``/ping`` and ``/invocations`` answer 503."""

    def __init__(self, model_dir: Path, limits: Limits, *, providers: Sequence[str],
                 model_name: str = DEFAULT_MODEL_NAME, model_version: int = DEFAULT_MODEL_VERSION,
                 expected_sha256: str | None = None):
        self.model_dir = model_dir
        self.expected_sha256 = expected_sha256
        self.limits = limits
        self.model_name = model_name
        self.model_version = model_version
        self.engine = InferenceEngine(self._read_model, limits, providers=providers)
        self.version: ModelVersion | None = None
        self.providers: list[str] = []
        self._path: Path | None = None
        self._not_ready = "the model is loading"
        self._loader: asyncio.Task[None] | None = None

    # -- the model

    def _read_model(self, version: ModelVersion) -> bytes:
        assert self._path is not None
        return self._path.read_bytes()

    @property
    def ready(self) -> bool:
        return self.version is not None

    def _unavailable(self) -> Unavailable:
        return Unavailable(self._not_ready, retry_after=5)

    def load(self) -> None:
        """Find, hash and load the model; on failure keep answering 503 with the reason (logged)."""
        try:
            path = find_model(self.model_dir)
            self._path = path
            sha256 = file_sha256(path)
            if self.expected_sha256 is not None and sha256 != self.expected_sha256:
                raise StorageCorrupted(f"the model file's sha256 is not the registered one ({ENV_MODEL_SHA256})")
            version = ModelVersion(model=self.model_name, version=self.model_version, status=VersionStatus.READY,
                                   sha256=sha256, size=path.stat().st_size)
            self.engine.warm(version)  # reads the file again and checks it against the sha256
            self.providers = list(self.engine.session(version).get_providers())
        except MaasError as error:
            logger.error("model not loaded from %s: %s", self.model_dir, error.detail)
            self._not_ready = f"the model could not be loaded: {error.detail}"
            return
        except Exception:
            logger.exception("model not loaded from %s", self.model_dir)
            self._not_ready = "the model could not be loaded; see the container log"
            return
        self.version = version
        if "CUDAExecutionProvider" not in self.providers:
            logger.warning("serving on %s, not CUDAExecutionProvider", ", ".join(self.providers))
        logger.info("model %r version %s loaded from %s (sha256 %s, %d bytes) on %s", self.model_name,
                    self.model_version, path.name, version.sha256, version.size, ", ".join(self.providers))

    # -- ASGI

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            try:
                response = await self._handle(scope, receive)
            except ClientDisconnected:
                return
            await response.send(send)
        # websockets: not served (uvicorn closes them)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self._loader is None and not self.ready:
                    # Loading in a thread lets the server bind at once and answer /ping with 503
                    # (rather than refuse connections) until the model is ready.
                    self._loader = asyncio.create_task(asyncio.to_thread(self.load))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(self, scope: AsgiScope, receive: Receive) -> Response:
        try:
            return await self._route(scope, receive)
        except MaasError as error:
            if error.status >= 500:
                logger.error("request failed: %s: %s", type(error).__name__, error.detail)
            return problem_response(error)
        except ClientDisconnected:
            raise
        except Exception:
            logger.exception("unhandled error")
            return internal_error_response()

    async def _route(self, scope: AsgiScope, receive: Receive) -> Response:
        path, method = scope["path"], scope["method"]
        if path == "/ping":
            if method != "GET":
                raise MethodNotAllowed("GET")
            return self.ping()
        if path == "/invocations":
            if method != "POST":
                raise MethodNotAllowed("POST")
            headers = _headers(scope["headers"])
            _check_request(headers, self.limits.max_request_bytes)
            body = await _read_body(receive, self.limits.max_request_bytes)
            return await asyncio.to_thread(self.invoke, body, headers)
        raise NotFound("no such route: SageMaker containers serve GET /ping and POST /invocations")

    def ping(self) -> Response:
        if self.version is None:
            return problem_response(self._unavailable())
        return json_response({"status": "ready", "model": self.model_name, "version": str(self.model_version),
                              "providers": self.providers})

    def invoke(self, body: bytes, headers: dict[str, str]) -> Response:
        """One inference, off the event loop (the engine is thread-safe)."""
        version = self.version
        if version is None:
            raise self._unavailable()
        decoded = decode_request(body, header_length(headers), self.limits)
        outputs = self.engine.infer(version, decoded)
        payload, json_length = encode_response(self.model_name, str(version.version), decoded.id, outputs,
                                               decoded.response_binary())
        answer_headers = {VERSION_HEADER: str(version.version)}
        if json_length is None:
            return Response(200, payload, JSON, answer_headers)
        answer_headers[BINARY_HEADER] = str(json_length)
        return Response(200, payload, f"{TRITON_BINARY};{HEADER_SIZE_PARAM}={json_length}", answer_headers)


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """ASGI headers (lower-case names) as a dict; for a repeated header the last value."""
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in raw}


def _check_request(headers: dict[str, str], max_bytes: int) -> None:
    """Refuse before reading the body: foreign origins (a browser's cross-site request to a local
    ``docker run``; SageMaker sends no Origin), content types a browser form could send, and bodies
    declared over the cap."""
    origin = headers.get("origin")
    if origin is not None and not same_origin(origin, headers.get("host", "")):
        raise Forbidden("cross-origin requests are not accepted")
    media, _ = parse_content_type(headers.get("content-type"))
    if media is not None and media not in ACCEPTED_TYPES:
        raise UnsupportedMediaType(f"Content-Type {media!r} is not accepted here; use "
                                   f"{' or '.join(sorted(ACCEPTED_TYPES))}")
    declared = headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"the body exceeds the {max_bytes}-byte limit")


async def _read_body(receive: Receive, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``max_bytes`` (never buffered whole)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"the body exceeds the {max_bytes}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


# ------------------------------------------------------------------------------------ the composition


def _model_version() -> int:
    raw = os.environ.get(ENV_MODEL_VERSION, "").strip()
    if not raw:
        return DEFAULT_MODEL_VERSION
    if not raw.isascii() or not raw.isdigit() or int(raw) < 1:
        raise InvalidInput(f"{ENV_MODEL_VERSION} must be a positive integer, got {raw!r}", field=ENV_MODEL_VERSION)
    return int(raw)


def _expected_sha256() -> str | None:
    raw = os.environ.get(ENV_MODEL_SHA256, "").strip().lower()
    if not raw:
        return None
    if not _SHA256.fullmatch(raw):
        raise InvalidInput(f"{ENV_MODEL_SHA256} must be 64 hexadecimal digits", field=ENV_MODEL_SHA256)
    return raw


def build() -> SageMakerApp:
    """The app as configured by the environment (nothing loaded yet: see ``SageMakerApp.load``)."""
    return SageMakerApp(
        Path(os.environ.get(ENV_MODEL_DIR) or DEFAULT_MODEL_DIR),
        Settings.from_env().limits,
        providers=choose_providers(ort.get_available_providers(), os.environ.get(ENV_PROVIDERS)),
        model_name=os.environ.get(ENV_MODEL_NAME, "").strip() or DEFAULT_MODEL_NAME,
        model_version=_model_version(),
        expected_sha256=_expected_sha256(),
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``serve`` (what SageMaker passes: ``docker run <image> serve``) and the bind overrides."""
    parser = argparse.ArgumentParser(prog="handler.py", description="maas SageMaker inference container")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve"],
                        help="SageMaker runs the image with 'serve' (the default)")
    parser.add_argument("--host", default=os.environ.get(ENV_HOST) or DEFAULT_HOST,
                        help=f"interface to bind (default {DEFAULT_HOST}, or ${ENV_HOST})")
    parser.add_argument("--port", type=int, default=int(os.environ.get(ENV_PORT) or DEFAULT_PORT),
                        help=f"port (default {DEFAULT_PORT}, or ${ENV_PORT} as SageMaker sets it)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = build()
    except (MaasError, ValueError) as error:
        detail = error.detail if isinstance(error, MaasError) else str(error)
        logger.error("configuration error: %s", detail)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, lifespan="on", access_log=False,
                timeout_keep_alive=KEEP_ALIVE_S, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
