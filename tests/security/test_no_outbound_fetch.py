"""Attack class 3: server-side request forgery through registration (TorchServe CVE-2023-43654: the
management API downloaded whatever URL a registration named).

maas never fetches anything a client names: models arrive as bytes through the upload route (or a
presigned S3 URL maas itself issued). A plain TCP listener on 127.0.0.1 records every connection while
every create / register / commit / alias / deploy / rollback / optimize / token / infer request
carries its URL in every string field, in fields the API does not know (``source_url``, ``model_uri``
...), in the query string and in headers, and while a model whose metadata, doc strings and external
data name the URL is registered. The listener must see zero connections; unknown fields are refused
with 422 naming them (never silently ignored, so no client believes a URL was used)."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from onnx import ModelProto, StringStringEntryProto, TensorProto

from tests.models import scale_model
from tests.security.conftest import (
    GHOSTS,
    MODEL,
    PROBLEM,
    Stack,
    fill,
    openapi_operations,
    registry_state,
)

OPERATIONS = openapi_operations()
#: Field names registries elsewhere fetch from (MLflow, TorchServe, BentoML, KServe storage URIs).
URL_FIELDS = ["url", "source_url", "model_url", "model_uri", "artifact_uri", "storage_uri", "uri", "href",
              "location", "callback_url", "webhook", "download_url", "source"]


class Listener:
    """A TCP server thread on 127.0.0.1 that only counts who connects (and what they sent first)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.connections: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="ssrf-listener", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(0.2)
                try:
                    first = conn.recv(256)
                except OSError:
                    first = b""
                self.connections.append(first)

    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.port}/model.onnx", f"http://localhost:{self.port}/x?y=1",
                f"https://127.0.0.1:{self.port}/", f"//127.0.0.1:{self.port}/m", f"127.0.0.1:{self.port}",
                f"s3://127.0.0.1:{self.port}/bucket/key", f"file://127.0.0.1:{self.port}/etc/passwd"]

    def assert_untouched(self) -> None:
        time.sleep(0.05)  # a fetch started in the background would have connected by now
        assert self.connections == [], f"the server connected to the listener: {self.connections}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


@pytest.fixture(scope="module")
def admin(stack: Stack) -> Iterator[TestClient]:
    with stack.client(stack.admin) as client:
        yield client


@pytest.fixture(autouse=True)
def _never_connected(listener: Listener) -> Iterator[None]:
    yield
    listener.assert_untouched()


def assert_unknown_field(answer: Any, field: str) -> None:
    assert answer.status_code == 422, (field, answer.text)
    assert answer.headers["content-type"].startswith(PROBLEM)
    assert answer.json()["field"] == field, answer.json()


def model_naming(url: str) -> bytes:
    """A valid model whose doc string, producer, domain and metadata all name the URL."""
    model = ModelProto()
    model.ParseFromString(scale_model(5.0))
    model.doc_string = f"weights at {url}"
    model.producer_name = url
    model.domain = url[:200]
    model.graph.doc_string = url
    model.metadata_props.extend([StringStringEntryProto(key=key, value=url) for key in URL_FIELDS])
    data: bytes = model.SerializeToString()
    return data


def model_with_remote_weights(url: str) -> bytes:
    """The classic: a tensor whose external data ``location`` is a URL."""
    model = ModelProto()
    model.ParseFromString(scale_model(6.0))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.extend([StringStringEntryProto(key="location", value=url),
                                 StringStringEntryProto(key="offset", value="0"),
                                 StringStringEntryProto(key="length", value="4")])
    data: bytes = model.SerializeToString()
    return data


def register(admin: TestClient, name: str, data: bytes, **extra: Any) -> Any:
    """Reserve, upload and commit through the API; returns the commit answer."""
    plan = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} | extra
    reserved = admin.post(f"/models/{name}/versions", json=plan)
    assert reserved.status_code == 201, reserved.text
    upload_id = reserved.json()["upload"]["upload_id"]
    uploaded = admin.put(f"/uploads/{upload_id}", content=data, headers={"Content-Type": "application/octet-stream"})
    assert uploaded.status_code == 200, uploaded.text
    version = reserved.json()["version"]["version"]
    return admin.post(f"/models/{name}/versions/{version}/commit",
                      json={"sha256": plan["sha256"], "size": len(data)})


def test_the_listener_records_connections(listener: Listener) -> None:
    """The proof is only as good as the listener: it must see a real connection (then forget it)."""
    with socket.create_connection(("127.0.0.1", listener.port), timeout=1) as probe:
        probe.sendall(b"GET / HTTP/1.1\r\n\r\n")
    deadline = time.monotonic() + 2
    while not listener.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert listener.connections and listener.connections[0].startswith(b"GET /")
    listener.connections.clear()


def test_create_model_keeps_urls_as_text(stack: Stack, admin: TestClient, listener: Listener) -> None:
    urls = listener.urls()
    name = f"ssrf-{stack.kind}"
    created = admin.post("/models", json={"name": name, "description": " ".join(urls),
                                          "tags": {f"k{i}": url for i, url in enumerate(urls)} | {"source": urls[0]}})
    assert created.status_code == 201, created.text
    stored = admin.get(f"/models/{name}").json()["model"]
    assert stored["description"] == " ".join(urls) and stored["tags"]["source"] == urls[0]
    for field in URL_FIELDS:
        before = registry_state(stack.backend)
        answer = admin.post("/models", json={"name": f"{name}-x", field: urls[0]})
        assert_unknown_field(answer, field)
        assert registry_state(stack.backend) == before
    for url in urls[:3]:  # a URL is not a name either
        assert admin.post("/models", json={"name": url}).status_code == 422


def test_registration_never_fetches(stack: Stack, admin: TestClient, listener: Listener) -> None:
    url = listener.urls()[0]
    name = f"reg-{stack.kind}"
    assert admin.post("/models", json={"name": name}).status_code == 201
    for field in URL_FIELDS:
        assert_unknown_field(admin.post(f"/models/{name}/versions", json={field: url}), field)
        assert_unknown_field(admin.post(f"/models/{name}/versions/1/commit",
                                        json={"sha256": "0" * 64, "size": 1, field: url}), field)
    # A model that names the URL everywhere a model can hold text registers without a fetch.
    committed = register(admin, name, model_naming(url), description=url)
    assert committed.status_code == 200, committed.text
    assert committed.json()["status"] == "READY" and committed.json()["description"] == url
    # Weights "at" the URL: refused before any path or URL is resolved.
    refused = register(admin, name, model_with_remote_weights(url))
    assert 400 <= refused.status_code < 500, refused.text
    assert "external data" in refused.json()["detail"]


def test_alias_deploy_rollback_optimize_tokens_never_fetch(stack: Stack, admin: TestClient,
                                                            listener: Listener) -> None:
    before = registry_state(stack.backend)
    for url in listener.urls():
        attempts: list[tuple[str, str, Any]] = [
            ("PUT", f"/models/{MODEL}/aliases/fetched", {"version": url}),
            ("POST", f"/models/{MODEL}/deployments", {"version": url}),
            ("POST", f"/models/{MODEL}/deployments", {"version": 1, "target": url}),
            ("POST", f"/models/{MODEL}/deployments", {"version": 1, "strategy": url}),
            ("POST", f"/models/{MODEL}/rollback", {"to_version": url}),
            ("POST", f"/models/{MODEL}/versions/1/optimize", {"tolerance": url}),
            ("POST", "/tokens", {"name": "t", "scopes": ["invoke"], "model": url}),
            ("POST", "/tokens", {"name": url, "scopes": ["invoke"]}),
            ("POST", "/tokens", {"name": "t", "scopes": [url]}),
            ("POST", f"/v2/models/{MODEL}/infer",
             {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [url]}]}),
            ("POST", f"/v2/models/{MODEL}/infer",
             {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4],
                          "parameters": {"url": url}}], "parameters": {"source_url": url}}),
        ]
        for field in URL_FIELDS:
            attempts += [("PUT", f"/models/{MODEL}/aliases/fetched", {"version": 1, field: url}),
                         ("POST", f"/models/{MODEL}/deployments", {"version": 1, field: url}),
                         ("POST", f"/models/{MODEL}/rollback", {field: url}),
                         ("POST", f"/models/{MODEL}/versions/1/optimize", {field: url}),
                         ("POST", "/tokens", {"name": "t", "scopes": ["invoke"], field: url})]
        for method, path, body in attempts:
            answer = admin.request(method, path, json=body)
            if path.endswith("/infer") and answer.status_code == 200:
                continue  # OIP parameters are free-form and ignored: still no fetch (checked below)
            assert 400 <= answer.status_code < 500, (method, path, body, answer.text)
            assert answer.headers["content-type"].startswith(PROBLEM)
    assert registry_state(stack.backend) == before


def test_urls_in_queries_and_headers_are_inert(stack: Stack, admin: TestClient, listener: Listener) -> None:
    """Every operation, with URLs where proxies and webhooks put them: nothing follows them."""
    url = listener.urls()[0]
    before = registry_state(stack.backend)
    headers = {"Referer": url, "Link": f"<{url}>; rel=source", "X-Forwarded-Host": f"127.0.0.1:{listener.port}",
               "Forwarded": f"host=127.0.0.1:{listener.port}", "X-Model-Url": url, "Location": url,
               "Content-Location": url}
    query = {field: url for field in URL_FIELDS} | {"cursor": url}
    for method, path in OPERATIONS:
        target = fill(path, GHOSTS)
        body: dict[str, Any] | None = {} if method in ("POST", "PUT") else None
        answer = admin.request(method, target, params=query, json=body, headers=headers)
        assert answer.status_code < 500, (method, path, answer.text)
    assert registry_state(stack.backend) == before
