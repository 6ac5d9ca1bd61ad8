"""Auth on every operation, enumerated from the OpenAPI document so a new route cannot skip it."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from maas.api import create_app
from maas.services.tokens import TokenService
from tests.conftest import HOST, push
from tests.models import scale_model

PUBLIC = {("GET", "/v2/health/live"), ("GET", "/v2/health/ready")}
PLACEHOLDERS = {"name": "m", "version": "1", "alias": "champion", "upload_id": "a" * 32,
                "deployment_id": "0" * 32, "token_id": "0" * 16}
ADMIN_ONLY = re.compile(r"^(DELETE /models/\{name\}(/versions/\{version\})?|\w+ /tokens.*)$")


def operations() -> Iterator[tuple[str, str]]:
    import tempfile

    from maas.backends.local import LocalBackend
    from maas.settings import Settings
    with tempfile.TemporaryDirectory() as home:
        app = create_app(LocalBackend(Settings(home=home)))
        for path, methods in app.openapi()["paths"].items():
            for method in methods:
                yield method.upper(), path


OPERATIONS = sorted(operations())


def call(client: TestClient, method: str, path: str, token: str | None):  # type: ignore[no-untyped-def]
    url = path
    for key, value in PLACEHOLDERS.items():
        url = url.replace("{" + key + "}", value)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if path.startswith("/uploads/"):
        return client.request(method, url, content=b"x", headers=headers | {"Content-Type": "application/octet-stream"})
    if method in ("POST", "PUT"):
        return client.request(method, url, json={"version": 1, "name": "x", "scopes": ["invoke"]}, headers=headers)
    return client.request(method, url, headers=headers)


def needed_scope(method: str, path: str) -> str:
    if ADMIN_ONLY.match(f"{method} {path}"):
        return "admin"
    if method == "GET" or path.endswith("/infer"):
        return "invoke"
    return "deploy"


@pytest.fixture
def tokens(backend) -> dict[str, str]:  # type: ignore[no-untyped-def]
    service = TokenService(backend.registry)
    return {scope: service.create(f"t-{scope}", [scope])[1] for scope in ("invoke", "deploy", "admin")} | {
        "other-model": service.create("other", ["admin"], model="other")[1]}


@pytest.fixture
def bare(app) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(app, base_url=f"http://{HOST}") as client:
        yield client


def test_the_enumeration_sees_every_route() -> None:
    assert len(OPERATIONS) >= 25
    assert ("POST", "/v2/models/{name}/infer") in OPERATIONS
    assert ("PUT", "/uploads/{upload_id}") in OPERATIONS


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_every_operation_needs_a_token(bare: TestClient, method: str, path: str) -> None:
    anonymous = call(bare, method, path, None)
    if (method, path) in PUBLIC:
        assert anonymous.status_code == 200
        return
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.headers["content-type"].startswith("application/problem+json")
    assert call(bare, method, path, "maas_" + "x" * 43).status_code == 401


@pytest.mark.parametrize(("method", "path"), [op for op in OPERATIONS if op not in PUBLIC])
def test_insufficient_scopes_are_forbidden(bare: TestClient, tokens: dict[str, str], method: str,
                                           path: str) -> None:
    needed = needed_scope(method, path)
    order = ["invoke", "deploy", "admin"]
    for scope in order[: order.index(needed)]:
        response = call(bare, method, path, tokens[scope])
        assert response.status_code == 403, (scope, response.text)
    granted = call(bare, method, path, tokens[needed])
    assert granted.status_code not in (401, 403), granted.text
    if "{name}" in path:
        assert call(bare, method, path, tokens["other-model"]).status_code == 403


def test_model_restricted_token_works_on_its_model(client: TestClient, backend) -> None:  # type: ignore[no-untyped-def]
    push(client, "m", scale_model(2.0))
    client.post("/models/m/deployments", json={"version": 1})
    _, secret = TokenService(backend.registry).create("only-m", ["invoke"], model="m")
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    headers = {"Authorization": f"Bearer {secret}"}
    assert client.post("/v2/models/m/infer", json=body, headers=headers).status_code == 200
    assert client.get("/models", headers=headers).status_code == 403


def test_tokens_lifecycle(client: TestClient) -> None:
    created = client.post("/tokens", json={"name": "ci", "scopes": ["deploy"]})
    assert created.status_code == 201
    secret, token_id = created.json()["token"], created.json()["id"]
    assert secret.startswith("maas_")
    listed = client.get("/tokens").json()["items"]
    assert token_id in [t["id"] for t in listed]
    assert all("token" not in t and "token_hash" not in t for t in listed)
    ci = {"Authorization": f"Bearer {secret}"}
    assert client.post("/models", json={"name": "by-ci"}, headers=ci).status_code == 201
    assert client.delete(f"/tokens/{token_id}").status_code == 204
    assert client.post("/models", json={"name": "by-ci-2"}, headers=ci).status_code == 401
    assert next(t for t in client.get("/tokens").json()["items"] if t["id"] == token_id)["revoked"] is True
    assert client.delete("/tokens/" + "0" * 16).status_code == 404
    assert client.post("/tokens", json={"name": "x", "scopes": ["root"]}).status_code == 422
    assert client.post("/tokens", json={"name": "x", "scopes": []}).status_code == 422
    assert client.post("/tokens", json={"name": "x", "scopes": ["invoke"], "model": "../x"}).status_code == 422
    assert client.get("/tokens", headers={"Authorization": "Basic abc"}).status_code == 401
