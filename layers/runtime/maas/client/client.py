"""Python SDK for the maas HTTP API (see docs/api.md).

Every method maps to one route (``push`` to the three-step upload) and returns the parsed JSON body as
plain dicts and lists. HTTP errors raise :class:`MaasClientError`, built from the problem+json body.

    from maas.client import Client

    with Client() as maas:                       # MAAS_URL / MAAS_TOKEN / <MAAS_HOME>/admin-token
        version = maas.push("iris", "iris.onnx")
        maas.deploy("iris", version["version"])
        print(maas.predict("iris", {"features": [[5.1, 3.5, 1.4, 0.2]]}))
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import numpy as np
import orjson

from maas.protocol.oip import DATATYPE_TO_NUMPY

DEFAULT_URL = "http://127.0.0.1:8080"
ADMIN_TOKEN_FILE = "admin-token"
UPLOAD_CHUNK_BYTES = 1024 * 1024
#: Files larger than this go up in parts of this size (S3 multipart; 5 MiB to 5 GiB, at most 10,000).
MULTIPART_PART_BYTES = 64 * 1024 * 1024

#: numpy dtype name -> OIP datatype name (the inverse of ``DATATYPE_TO_NUMPY``).
NUMPY_TO_DATATYPE: dict[str, str] = {numpy: oip for oip, numpy in DATATYPE_TO_NUMPY.items()}

ProgressCallback = Callable[[int, int], None]

#: How long ``deploy`` waits by default for a deployment the server runs in the background (202).
DEPLOY_WAIT_S = 600.0
DEPLOY_POLL_S = 1.0
DEPLOY_POLL_MAX_S = 5.0
IN_PROGRESS = "IN_PROGRESS"
FAILED_STATUSES = ("FAILED", "ROLLED_BACK")

#: Sent with every mutating management call (a fresh UUID per call, the same one on each retry of
#: it): the server runs the call once however many times it arrives (docs: README "Idempotency").
IDEMPOTENCY_HEADER = "Idempotency-Key"
MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Answers worth retrying a call with the same key: throttled, gateway/backend unavailable.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: Failures with no answer (status 0) worth a retry: the call may or may not have run, which the
#: idempotency key makes harmless. "Cannot connect" is left out: nothing is listening.
RETRY_TRANSPORT_TITLES = frozenset({"Timeout", "Connection error"})
RETRIES = 3
RETRY_DELAY_S = 0.5
RETRY_DELAY_MAX_S = 10.0


class MaasClientError(Exception):
    """An error answered by the maas server (or no answer at all: ``status`` 0).

    ``str()`` is one line such as ``409 Conflict: version 3 is referenced by alias 'champion'``.
    """

    def __init__(self, status: int, title: str, detail: str = "", field: str | None = None, *,
                 retry_after: float | None = None):
        self.status = status
        self.title = title
        self.detail = detail
        self.field = field
        #: the server's ``Retry-After`` (seconds), when it said when to retry
        self.retry_after = retry_after
        super().__init__(str(self))

    def __str__(self) -> str:
        head = f"{self.status} {self.title}" if self.status else self.title
        text = f"{head}: {self.detail}" if self.detail else head
        if self.field and self.field not in self.detail:
            text += f" (field: {self.field})"
        return text

    def __repr__(self) -> str:
        return (
            f"MaasClientError(status={self.status!r}, title={self.title!r}, detail={self.detail!r}, "
            f"field={self.field!r})"
        )

    @classmethod
    def from_response(cls, response: httpx.Response) -> MaasClientError:
        status = response.status_code
        title = response.reason_phrase or "HTTP error"
        detail = ""
        field: str | None = None
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            title = str(body.get("title") or title)
            raw_detail = body.get("detail")
            if isinstance(raw_detail, str):
                detail = raw_detail
            elif raw_detail is not None:  # e.g. FastAPI's default validation error list
                detail = orjson.dumps(raw_detail).decode()
            raw_field = body.get("field")
            field = str(raw_field) if raw_field is not None else None
        else:
            detail = " ".join(response.text.split())[:300]
        retry_after: float | None = None
        with contextlib.suppress(ValueError):
            retry_after = float(response.headers.get("Retry-After", ""))
        return cls(status, title, detail, field, retry_after=retry_after)


class DeploymentFailed(MaasClientError):
    """A deployment that ended FAILED or ROLLED_BACK while ``Client.deploy`` waited for it. The
    deployment (with its events) is ``.deployment``; the message ends with its last event."""

    def __init__(self, deployment: Mapping[str, Any]):
        self.deployment = dict(deployment)
        events = self.deployment.get("events") or []
        last = events[-1] if events and isinstance(events[-1], Mapping) else {}
        reason = ": ".join(str(part) for part in (last.get("kind"), last.get("detail")) if part)
        detail = (f"deployment {self.deployment.get('id')} of version {self.deployment.get('version')} ended "
                  f"{self.deployment.get('status')}" + (f" ({reason})" if reason else ""))
        super().__init__(0, "Deployment failed", detail)

    def __reduce__(self) -> Any:
        return (type(self), (self.deployment,))


def default_home() -> Path:
    return Path(os.environ.get("MAAS_HOME") or Path.home() / ".maas").expanduser()


def resolve_url(url: str | None = None) -> str:
    return (url or os.environ.get("MAAS_URL") or DEFAULT_URL).rstrip("/")


def resolve_token(token: str | None = None, home: str | Path | None = None) -> str | None:
    """The explicit token, else ``MAAS_TOKEN``, else ``MAAS_ADMIN_TOKEN`` (what a scripted local
    server was started with), else the local server's ``<home>/admin-token`` file."""
    if token:
        return token
    env = os.environ.get("MAAS_TOKEN") or os.environ.get("MAAS_ADMIN_TOKEN")
    if env:
        return env
    path = (Path(home).expanduser() if home is not None else default_home()) / ADMIN_TOKEN_FILE
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return secret or None


def build_infer_request(
    inputs: Mapping[str, Any] | Sequence[Any], datatypes: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Turn ``predict`` input into an OIP v2 request body.

    Accepted forms: a full request ``{"inputs": [{name, shape, datatype, data}, ...], ...}`` (returned
    unchanged), a list of OIP input dicts, or a shorthand mapping ``input name -> numpy array | nested
    list``. In the shorthand, numpy arrays keep their dtype; plain lists and scalars take the datatype in
    ``datatypes`` (the model's signature) when known, otherwise numpy's inference. Data is sent flat
    (row-major) with the array's shape.
    """
    if isinstance(inputs, Mapping):
        if _is_full_request(inputs):
            return dict(inputs)
        tensors = [
            _tensor(str(name), value, (datatypes or {}).get(str(name))) for name, value in inputs.items()
        ]
        if not tensors:
            raise ValueError("inputs must name at least one tensor")
        return {"inputs": tensors}
    if isinstance(inputs, Sequence) and not isinstance(inputs, str | bytes):
        if not all(isinstance(item, Mapping) for item in inputs):
            raise ValueError("a list of inputs must hold OIP input objects {name, shape, datatype, data}")
        return {"inputs": [dict(item) for item in inputs]}
    raise ValueError("inputs must be an OIP request, a list of OIP inputs, or a mapping name -> array")


def _is_full_request(body: Mapping[str, Any]) -> bool:
    items = body.get("inputs")
    return isinstance(items, list) and all(isinstance(item, Mapping) for item in items)


def _tensor(name: str, value: Any, datatype: str | None) -> dict[str, Any]:
    if isinstance(value, np.ndarray):
        array = value
    else:
        numpy_type = DATATYPE_TO_NUMPY.get(datatype.upper()) if datatype else None
        if numpy_type == "object" or (numpy_type is None and _holds_text(value)):
            array = np.asarray(value, dtype=object)
        elif numpy_type is not None:
            array = _cast(name, value, str(datatype).upper(), np.dtype(numpy_type))
        else:
            array = np.asarray(value)
    oip_type = _oip_datatype(name, array)
    flat = array.reshape(-1)
    data: list[Any]
    if oip_type == "BYTES":
        data = [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in flat]
    else:
        data = flat.tolist()
    return {"name": name, "shape": [int(dim) for dim in array.shape], "datatype": oip_type, "data": data}


def _cast(name: str, value: Any, datatype: str, target: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """``value`` as the model's datatype, refusing what the cast would change instead of sending it:
    a number beyond the datatype's range (numpy would make it inf, or wrap it), a fraction for an
    integer type, a missing value (None) for a number."""
    try:
        source = np.asarray(value)
    except ValueError as error:
        raise ValueError(f"input {name!r}: not a regular (non-ragged) array: {error}") from None
    if source.dtype.kind == "O" and any(item is None for item in source.reshape(-1)):
        raise ValueError(f"input {name!r}: None is not a {datatype} value")
    if source.dtype.kind in "iuf" and target.kind in "iuf" and source.size:
        values = source.astype(np.float64) if source.dtype.kind == "f" else source
        if source.dtype.kind == "f" and not np.isfinite(values).all():
            raise ValueError(f"input {name!r}: {datatype} values must be finite numbers")
        if target.kind in "iu":
            if source.dtype.kind == "f" and not (values == np.floor(values)).all():
                raise ValueError(f"input {name!r}: {datatype} values must be whole numbers")
            bounds = np.iinfo(target)
            low, high = values.min(), values.max()
            if low < bounds.min or high > bounds.max:
                raise ValueError(f"input {name!r}: a value is out of the range of {datatype} "
                                 f"({bounds.min} to {bounds.max})")
        elif np.abs(values).max() > np.finfo(target).max:
            raise ValueError(f"input {name!r}: a value is out of the range of {datatype} "
                             f"(at most {float(np.finfo(target).max):.4g} in magnitude)")
    try:
        return np.asarray(value, dtype=target)
    except (ValueError, TypeError, OverflowError) as error:
        raise ValueError(f"input {name!r}: cannot be sent as {datatype}: {error}") from None


def _holds_text(value: Any) -> bool:
    while isinstance(value, list | tuple) and value:
        value = value[0]
    return isinstance(value, str | bytes)


def _oip_datatype(name: str, array: np.ndarray[Any, Any]) -> str:
    kind = array.dtype
    if kind.kind in "USO":
        return "BYTES"
    try:
        return NUMPY_TO_DATATYPE[kind.name]
    except KeyError:
        raise ValueError(f"input {name!r}: numpy dtype {kind.name} has no OIP v2 datatype") from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(UPLOAD_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(path: str | Path, part_size: int = MULTIPART_PART_BYTES) -> tuple[str, int, list[str]]:
    """(sha256, size, part sha256s) of a file in one read; the part list is empty when the file fits
    in one part (a single upload)."""
    total = hashlib.sha256()
    part = hashlib.sha256()
    parts: list[str] = []
    size = in_part = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(UPLOAD_CHUNK_BYTES):
            total.update(chunk)
            size += len(chunk)
            view = memoryview(chunk)
            while view:
                take = min(len(view), part_size - in_part)
                part.update(view[:take])
                in_part += take
                view = view[take:]
                if in_part == part_size:
                    parts.append(part.hexdigest())
                    part, in_part = hashlib.sha256(), 0
    if in_part:
        parts.append(part.hexdigest())
    return total.hexdigest(), size, parts if size > part_size else []


def _segment(value: str | int) -> str:
    return quote(str(value), safe="")


class Client:
    """A synchronous client for one maas server.

    ``url`` defaults to ``MAAS_URL`` or ``http://127.0.0.1:8080``; ``token`` to ``MAAS_TOKEN`` or the file
    ``<home>/admin-token`` that a local ``maas serve`` writes (home = ``MAAS_HOME`` or ``~/.maas``).
    ``transport`` replaces httpx's network transport; ``http_client`` injects a ready ``httpx.Client``
    (e.g. a FastAPI ``TestClient``), whose ``base_url`` is used when ``url`` is not given.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
        home: str | Path | None = None,
        retries: int = RETRIES,
        retry_delay: float = RETRY_DELAY_S,
    ):
        """``retries``: how many times a mutating call is sent again after a timeout, a dropped
        connection, 429 or 502/503/504 (with the same ``Idempotency-Key``: it still runs once);
        ``retry_delay``: the first wait, doubled each time, unless the server sent ``Retry-After``."""
        if http_client is not None and url is None:
            self.url = str(http_client.base_url).rstrip("/")
        else:
            self.url = resolve_url(url)
        self.token = resolve_token(token, home)
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.retry_delay = max(0.0, float(retry_delay))
        self._transport = transport
        self._owns_http = http_client is None
        try:
            self._http = http_client or httpx.Client(base_url=self.url, timeout=timeout, transport=transport)
        except (httpx.InvalidURL, ValueError) as exc:
            raise MaasClientError(0, "Invalid URL", f"{self.url}: {exc}") from None
        self._foreign: httpx.Client | None = None

    # -- plumbing ---------------------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()
        if self._foreign is not None:
            self._foreign.close()
            self._foreign = None

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})"

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _send(self, http: httpx.Client, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = http.request(method, url, **kwargs)
        except httpx.ConnectError:
            if http is self._http:
                raise MaasClientError(
                    0, "Cannot connect", f"no maas server at {self.url}; start one with `maas serve`"
                ) from None
            raise MaasClientError(
                0, "Cannot connect", f"upload host {urlsplit(url).hostname} unreachable"
            ) from None
        except httpx.TimeoutException:
            raise MaasClientError(
                0, "Timeout", f"no answer from {self.url} within {self.timeout:g}s"
            ) from None
        except httpx.TransportError as exc:
            raise MaasClientError(0, "Connection error", f"{type(exc).__name__}: {exc}") from None
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise MaasClientError(0, "Invalid URL", f"{url}: {exc}") from None
        if response.is_error:
            raise MaasClientError.from_response(response)
        return response

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """One API call. Mutating management calls carry an ``Idempotency-Key`` (``idempotency_key``
        or a fresh UUID) and are retried with that same key on transient failures, so a retry after
        a lost answer returns the first answer instead of, say, registering a second version."""
        headers = {"Accept": "application/json", **self._auth_headers()}
        kwargs: dict[str, Any] = {"headers": headers}
        if json is not None:
            headers["Content-Type"] = "application/json"
            kwargs["content"] = orjson.dumps(json, option=orjson.OPT_SERIALIZE_NUMPY)
        if params:
            kwargs["params"] = {key: value for key, value in params.items() if value is not None}
        idempotent = method.upper() in MUTATING_METHODS and not path.startswith("/v2")  # not inference
        if idempotent:
            headers[IDEMPOTENCY_HEADER] = idempotency_key or str(uuid.uuid4())
        attempt = 0
        while True:
            try:
                response = self._send(self._http, method, path, **kwargs)
                break
            except MaasClientError as error:
                if not idempotent or attempt >= self.retries or not self._retryable(error):
                    raise
                time.sleep(self._retry_wait(error, attempt))
                attempt += 1
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text

    @staticmethod
    def _retryable(error: MaasClientError) -> bool:
        if error.status == 0:
            return error.title in RETRY_TRANSPORT_TITLES
        # 409 on the key itself: the first copy of this call is still running on the server.
        return error.status in RETRY_STATUSES or (error.status == 409 and error.field == IDEMPOTENCY_HEADER)

    def _retry_wait(self, error: MaasClientError, attempt: int) -> float:
        if error.retry_after is not None:
            return float(min(max(error.retry_after, 0.0), RETRY_DELAY_MAX_S))
        base = float(min(self.retry_delay * 2.0**attempt, RETRY_DELAY_MAX_S))
        return base / 2 + random.uniform(0, base / 2)  # jitter: clients that failed together spread out

    def _paged(self, path: str, limit: int | None = None) -> list[Any]:
        """Every item of a paginated list, following ``next_cursor``."""
        items: list[Any] = []
        cursor: str | None = None
        while True:
            page = self._request("GET", path, params={"limit": limit, "cursor": cursor})
            items.extend(page.get("items", []))
            cursor = page.get("next_cursor")
            if not cursor:
                return items

    @staticmethod
    def _model_path(name: str) -> str:
        return f"/models/{_segment(name)}"

    # -- models -----------------------------------------------------------------------------------

    def list_models(self, *, limit: int | None = None) -> list[dict[str, Any]]:
        """GET /models, all pages (``limit`` is the page size)."""
        return self._paged("/models", limit)

    def create_model(
        self, name: str, description: str = "", tags: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "description": description}
        if tags:
            body["tags"] = dict(tags)
        result: dict[str, Any] = self._request("POST", "/models", json=body)
        return result

    def get_model(self, name: str) -> dict[str, Any]:
        """GET /models/{name}: ``{model, latest_version, route, deployment}``."""
        result: dict[str, Any] = self._request("GET", self._model_path(name))
        return result

    def status(self, name: str) -> dict[str, Any]:
        """The model, its latest version, live route and current deployment (same as ``get_model``)."""
        return self.get_model(name)

    def delete_model(self, name: str, force: bool = False) -> None:
        self._request("DELETE", self._model_path(name), params={"force": "true" if force else "false"})

    # -- versions ---------------------------------------------------------------------------------

    def list_versions(self, name: str, *, limit: int | None = None) -> list[dict[str, Any]]:
        """Every version of a model, newest first."""
        return self._paged(f"{self._model_path(name)}/versions", limit)

    def get_version(self, name: str, version: int | str) -> dict[str, Any]:
        result: dict[str, Any] = self._request(
            "GET", f"{self._model_path(name)}/versions/{_segment(version)}"
        )
        return result

    def delete_version(self, name: str, version: int | str) -> None:
        self._request("DELETE", f"{self._model_path(name)}/versions/{_segment(version)}")

    def create_version(
        self,
        name: str,
        description: str = "",
        *,
        size: int | None = None,
        sha256: str | None = None,
        part_size: int | None = None,
        part_sha256: Sequence[str] = (),
        limits: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """POST /models/{name}/versions: ``{version (PENDING), upload: {upload_id, url, method, ...}}``.

        ``size`` and ``sha256`` announce the bytes (required on AWS, where S3 checks them as they
        arrive); ``part_size`` and ``part_sha256`` ask for a multipart upload (``upload.parts``);
        ``limits`` the version's own run limits (``max_inference_seconds``, ``max_output_bytes``: at most
        the server's, which refuses looser ones with 422)."""
        body: dict[str, Any] = {"description": description}
        if limits:
            body["limits"] = dict(limits)
        if size is not None:
            body["size"] = int(size)
        if sha256 is not None:
            body["sha256"] = sha256
        if part_sha256:
            body["part_size"] = int(part_size) if part_size is not None else MULTIPART_PART_BYTES
            body["part_sha256"] = list(part_sha256)
        result: dict[str, Any] = self._request("POST", f"{self._model_path(name)}/versions", json=body)
        return result

    def commit_version(self, name: str, version: int, sha256: str, size: int) -> dict[str, Any]:
        result: dict[str, Any] = self._request(
            "POST",
            f"{self._model_path(name)}/versions/{_segment(version)}/commit",
            json={"sha256": sha256, "size": size},
        )
        return result

    def push(
        self,
        name: str,
        path: str | Path,
        *,
        description: str = "",
        create: bool = True,
        progress: ProgressCallback | None = None,
        part_size: int | None = None,
        limits: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Register ``path`` as a new version of ``name`` and return the committed (READY) version.

        Hashes the file first (sha256 and size, and the sha256 of every ``part_size`` slice when it is
        larger than one part: default :data:`MULTIPART_PART_BYTES`), announces them when creating the
        version so storage can check the bytes as they arrive, uploads to the target the server hands
        out (one PUT, or one PUT per part; ``progress(sent, total)`` per chunk across all parts), then
        commits so the server verifies and validates the artifact. Creates the model first when
        ``create`` is true and it does not exist. ``limits``: see :meth:`create_version`.
        """
        file = Path(path)
        part_bytes = MULTIPART_PART_BYTES if part_size is None else int(part_size)
        if part_bytes <= 0:
            raise ValueError("part_size must be a positive number of bytes")
        sha256, size, part_sha256 = file_digests(file, part_bytes)
        if create:
            try:
                self.create_model(name)
            except MaasClientError as exc:
                if exc.status != 409:
                    raise
        created = self.create_version(name, description, size=size, sha256=sha256,
                                      part_size=part_bytes if part_sha256 else None, part_sha256=part_sha256,
                                      limits=limits)
        version = int(created["version"]["version"])
        upload = created["upload"]
        sent = 0
        if progress is not None:
            progress(0, size)

        def chunks(offset: int, length: int) -> Iterator[bytes]:
            nonlocal sent
            with file.open("rb") as handle:
                handle.seek(offset)
                left = length
                while left > 0:
                    chunk = handle.read(min(UPLOAD_CHUNK_BYTES, left))
                    if not chunk:
                        raise MaasClientError(0, "File changed", f"{file} became shorter while it was uploaded")
                    left -= len(chunk)
                    sent += len(chunk)
                    if progress is not None:
                        progress(sent, size)
                    yield chunk

        parts = upload.get("parts") or []
        if upload.get("url") is None and parts:
            # Multipart (S3): part N holds bytes [(N - 1) * part_size, N * part_size) of the file.
            target_part_size = int(upload.get("part_size") or part_bytes)
            for part in parts:
                offset = (int(part["number"]) - 1) * target_part_size
                length = max(0, min(target_part_size, size - offset))
                self._upload({"url": part["url"], "method": upload.get("method"), "headers": part.get("headers")},
                             chunks(offset, length), length)
        else:
            self._upload(upload, chunks(0, size), size)
        return self.commit_version(name, version, sha256, size)

    def _upload(self, target: Mapping[str, Any], body: Iterator[bytes], size: int) -> None:
        """Send one body to an upload URL with the headers the server asked for (presigned S3 URLs
        sign some of them, e.g. ``x-amz-checksum-sha256``)."""
        url = str(target["url"])
        method = str(target.get("method") or "PUT").upper()
        headers = {str(key): str(value) for key, value in (target.get("headers") or {}).items()}
        if not any(key.lower() == "content-type" for key in headers):
            headers["Content-Type"] = "application/octet-stream"
        # An explicit length keeps httpx from sending chunked encoding, which S3 presigned PUTs refuse.
        headers = {key: value for key, value in headers.items() if key.lower() != "content-length"}
        headers["Content-Length"] = str(size)
        parts = urlsplit(url)
        if not parts.scheme:
            # Relative to the maas server: authenticate like every other call.
            self._send(self._http, method, url, content=body, headers={**headers, **self._auth_headers()})
        elif _origin(url) == _origin(self.url):
            self._send(self._http, method, url, content=body, headers={**headers, **self._auth_headers()})
        else:
            # A presigned URL (S3): used as-is, and the maas token never leaves for another host.
            if self._foreign is None:
                self._foreign = httpx.Client(timeout=max(self.timeout, 300.0), transport=self._transport)
            self._send(self._foreign, method, url, content=body, headers=headers)

    # -- aliases ----------------------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int) -> dict[str, Any]:
        result: dict[str, Any] = self._request(
            "PUT", f"{self._model_path(name)}/aliases/{_segment(alias)}", json={"version": int(version)}
        )
        return result

    def get_alias(self, name: str, alias: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"{self._model_path(name)}/aliases/{_segment(alias)}")
        return result

    def list_aliases(self, name: str) -> list[dict[str, Any]]:
        page = self._request("GET", f"{self._model_path(name)}/aliases")
        items: list[dict[str, Any]] = page.get("items", [])
        return items

    def delete_alias(self, name: str, alias: str) -> None:
        self._request("DELETE", f"{self._model_path(name)}/aliases/{_segment(alias)}")

    def optimize(self, name: str, version: int | str, *, tolerance: float | None = None,
                 goal: str | None = None) -> dict[str, Any]:
        """Quantize a READY version to int8 and register it as a new version (parent lineage), if it is
        smaller, its outputs stay within ``tolerance`` (server default 0.05) of the parent's on sample
        inputs, and it is faster (``goal="latency"``, the default) or not slower (``goal="size"``).

        Returns ``{"version": <derived version>, "report": {...}}``: scheme, sizes, paired latencies,
        diffs and checks; ``report["reused"]`` is true when the version had been optimized before. A
        failed check raises ``MaasClientError`` (422) whose problem names the ``check``."""
        body: dict[str, Any] = {} if tolerance is None else {"tolerance": float(tolerance)}
        if goal is not None:
            body["goal"] = goal
        result: dict[str, Any] = self._request(
            "POST", f"{self._model_path(name)}/versions/{_segment(version)}/optimize", json=body
        )
        return result

    # -- deployments ------------------------------------------------------------------------------

    def deploy(
        self,
        name: str,
        version: int | str,
        strategy: str = "all_at_once",
        *,
        wait: bool = True,
        timeout: float = DEPLOY_WAIT_S,
        poll_interval: float = DEPLOY_POLL_S,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Deploy ``version`` (a number or an alias). ``options`` go into the request body; ``None``
        values are left out: ``target`` (``lambda`` | ``sagemaker``), ``canary_percent``,
        ``linear_step_percent``, ``bake_seconds``, ``linear_interval_seconds``, ``optimize`` (bool),
        ``thresholds`` (``{"max_error_rate": 0.01, "max_p99_latency_ms": 250, "max_p99_latency_ratio":
        2}``). Example: ``client.deploy("fraud", 3, "canary", canary_percent=10, bake_seconds=300)``.

        A deploy that bakes (canary, linear, a bake) or runs elsewhere (Step Functions) is answered
        202 with the deployment IN_PROGRESS: with ``wait`` (the default) this polls it (see
        :meth:`wait_for_deployment`) and raises :class:`DeploymentFailed` if it ends FAILED or
        ROLLED_BACK, as a server that deploys synchronously answers the failure as an error. Without
        ``wait`` it returns the deployment as the server answered it."""
        body: dict[str, Any] = {"version": _version_value(version), "strategy": strategy}
        body.update({key: value for key, value in options.items() if value is not None})
        result: dict[str, Any] = self._request("POST", f"{self._model_path(name)}/deployments", json=body)
        if not wait or not isinstance(result, dict) or result.get("status") != IN_PROGRESS or not result.get("id"):
            return result
        final = self.wait_for_deployment(str(result["id"]), timeout=timeout, poll_interval=poll_interval,
                                         on_update=on_update)
        if final.get("status") in FAILED_STATUSES:
            raise DeploymentFailed(final)
        return final

    def wait_for_deployment(
        self,
        deployment_id: str,
        *,
        timeout: float = DEPLOY_WAIT_S,
        poll_interval: float = DEPLOY_POLL_S,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll ``GET /deployments/{id}`` until the deployment leaves IN_PROGRESS and return it, whatever
        its final status. ``on_update`` sees every answer. Raises :class:`MaasClientError` (status 0,
        ``Timeout``) if it is still in progress after ``timeout`` seconds (the deployment carries on)."""
        deadline = time.monotonic() + max(timeout, 0.0)
        delay = min(max(poll_interval, 0.0), DEPLOY_POLL_MAX_S)
        while True:
            deployment = self.get_deployment(deployment_id)
            if on_update is not None:
                on_update(deployment)
            if deployment.get("status") != IN_PROGRESS:
                return deployment
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MaasClientError(
                    0, "Timeout", f"deployment {deployment_id} is still IN_PROGRESS after {timeout:g}s; "
                    "it carries on: follow it with `maas status` or GET /deployments/{id}"
                )
            time.sleep(min(delay, remaining))
            delay = min(max(delay * 1.5, poll_interval), DEPLOY_POLL_MAX_S)

    def list_deployments(self, name: str, *, limit: int | None = None) -> list[dict[str, Any]]:
        """Every deployment of a model, newest first (only the newest ``limit`` when given)."""
        path = f"{self._model_path(name)}/deployments"
        if limit is not None:
            page: dict[str, Any] = self._request("GET", path, params={"limit": limit})
            return list(page.get("items", []))
        return self._paged(path)

    def get_deployment(self, deployment_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/deployments/{_segment(deployment_id)}")
        return result

    def rollback(self, name: str, to_version: int | None = None) -> dict[str, Any]:
        """Roll back to the previous (or the given) version; returns the deployment now live."""
        body: dict[str, Any] = {} if to_version is None else {"to_version": int(to_version)}
        result: dict[str, Any] = self._request("POST", f"{self._model_path(name)}/rollback", json=body)
        return result

    # -- inference (OIP v2) -----------------------------------------------------------------------

    @staticmethod
    def _v2_path(name: str, version: int | str | None) -> str:
        path = f"/v2/models/{_segment(name)}"
        return path if version is None else f"{path}/versions/{_segment(version)}"

    def model_metadata(self, name: str, version: int | str | None = None) -> dict[str, Any]:
        """GET /v2/models/{name}[/versions/{v}]: ``{name, versions, platform, inputs, outputs}``."""
        result: dict[str, Any] = self._request("GET", self._v2_path(name, version))
        return result

    def model_ready(self, name: str, version: int | str | None = None) -> bool:
        try:
            answer = self._request("GET", f"{self._v2_path(name, version)}/ready")
        except MaasClientError as exc:
            if exc.status in (400, 404, 409, 503):
                return False
            raise
        return bool(answer.get("ready", False)) if isinstance(answer, dict) else False

    def predict(
        self,
        name: str,
        inputs: Mapping[str, Any] | Sequence[Any],
        version: int | str | None = None,
    ) -> dict[str, Any]:
        """POST /v2/models/{name}[/versions/{v}]/infer and return the OIP response.

        ``inputs`` is a full OIP request, a list of OIP inputs, or a mapping ``name -> array``; for the
        mapping, plain lists take the datatypes of the model's signature (one metadata call)."""
        datatypes: dict[str, str] | None = None
        if (
            isinstance(inputs, Mapping)
            and not _is_full_request(inputs)
            and any(not isinstance(value, np.ndarray) for value in inputs.values())
        ):
            metadata = self.model_metadata(name, version)
            datatypes = {
                str(spec["name"]): str(spec["datatype"])
                for spec in metadata.get("inputs", [])
                if isinstance(spec, Mapping) and "name" in spec and "datatype" in spec
            }
        body = build_infer_request(inputs, datatypes)
        result: dict[str, Any] = self._request("POST", f"{self._v2_path(name, version)}/infer", json=body)
        return result

    def health(self) -> dict[str, bool]:
        """``{"live": bool, "ready": bool}`` from /v2/health/live and /v2/health/ready."""
        live = self._request("GET", "/v2/health/live")
        try:
            ready = self._request("GET", "/v2/health/ready")
        except MaasClientError as exc:
            if exc.status == 0:
                raise
            ready = {"ready": False}
        return {
            "live": bool(isinstance(live, dict) and live.get("live", False)),
            "ready": bool(isinstance(ready, dict) and ready.get("ready", False)),
        }

    def server_metadata(self) -> dict[str, Any]:
        """GET /v2: ``{name, version, extensions}``."""
        result: dict[str, Any] = self._request("GET", "/v2")
        return result

    # -- tokens -----------------------------------------------------------------------------------

    def create_token(
        self, name: str, scopes: str | Sequence[str], model: str | None = None
    ) -> dict[str, Any]:
        """Create an API token; the answer's ``token`` is the secret, shown this once."""
        scope_list = [scopes] if isinstance(scopes, str) else [str(scope) for scope in scopes]
        body: dict[str, Any] = {"name": name, "scopes": scope_list}
        if model is not None:
            body["model"] = model
        result: dict[str, Any] = self._request("POST", "/tokens", json=body)
        return result

    def list_tokens(self) -> list[dict[str, Any]]:
        page = self._request("GET", "/tokens")
        items: list[dict[str, Any]] = page.get("items", [])
        return items

    def revoke_token(self, token_id: str) -> None:
        self._request("DELETE", f"/tokens/{_segment(token_id)}")


def _version_value(version: int | str) -> int | str:
    """Version numbers travel as integers, aliases as strings."""
    if isinstance(version, str) and version.isascii() and version.isdigit():
        return int(version)
    return version


def _origin(url: str) -> str:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}"
