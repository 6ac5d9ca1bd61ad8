"""Attack class 1: unauthenticated or under-privileged access (TorchServe's management API open to
anyone, CVE-2023-43654's first half).

Every operation of the app's OpenAPI document is called without credentials, with bad credentials
(unknown, revoked, wrong scheme, empty) and with each scope below the one it needs, plus an admin
token restricted to another model: all 401/403 problem+json, except the health probes, and the
registry is unchanged afterwards although the refused requests carried bodies that would have
changed it. The operations are enumerated from the document, and the required scopes are an explicit
table that must cover it exactly, so a new route fails here until someone decides who may call it.
The two Lambda front doors (the API function behind Mangum and the lean inference function) refuse
missing and bad tokens the same way."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

import httpx
import orjson
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from tests.functions import LambdaContext, api_event, load_handler
from tests.security.conftest import (
    GHOSTS,
    HARMFUL_BODIES,
    INFER_BODY,
    MODEL,
    NEW_MODEL,
    PUBLIC_OPERATIONS,
    SCOPES,
    Stack,
    bearer,
    fill,
    openapi_operations,
    registry_state,
    send,
    targets,
)

OPERATIONS = openapi_operations()
PROBLEM = "application/problem+json"
#: Who may call what. Reads and inference need ``invoke``; changes ``deploy``; deleting models or
#: versions and everything about tokens ``admin``. A route missing here fails the first test.
REQUIRED: dict[tuple[str, str], str] = {
    ("GET", "/models"): "invoke",
    ("POST", "/models"): "deploy",
    ("GET", "/models/{name}"): "invoke",
    ("DELETE", "/models/{name}"): "admin",
    ("GET", "/models/{name}/versions"): "invoke",
    ("POST", "/models/{name}/versions"): "deploy",
    ("GET", "/models/{name}/versions/{version}"): "invoke",
    ("DELETE", "/models/{name}/versions/{version}"): "admin",
    ("POST", "/models/{name}/versions/{version}/commit"): "deploy",
    ("POST", "/models/{name}/versions/{version}/optimize"): "deploy",
    ("PUT", "/uploads/{upload_id}"): "deploy",
    ("GET", "/models/{name}/aliases"): "invoke",
    ("GET", "/models/{name}/aliases/{alias}"): "invoke",
    ("PUT", "/models/{name}/aliases/{alias}"): "deploy",
    ("DELETE", "/models/{name}/aliases/{alias}"): "deploy",
    ("GET", "/models/{name}/deployments"): "invoke",
    ("POST", "/models/{name}/deployments"): "deploy",
    ("GET", "/deployments/{deployment_id}"): "invoke",
    ("POST", "/models/{name}/rollback"): "deploy",
    ("GET", "/tokens"): "admin",
    ("POST", "/tokens"): "admin",
    ("DELETE", "/tokens/{token_id}"): "admin",
    ("GET", "/metrics"): "invoke",
    ("GET", "/v2"): "invoke",
    ("GET", "/v2/models/{name}"): "invoke",
    ("GET", "/v2/models/{name}/ready"): "invoke",
    ("GET", "/v2/models/{name}/versions/{version}"): "invoke",
    ("GET", "/v2/models/{name}/versions/{version}/ready"): "invoke",
    ("POST", "/v2/models/{name}/infer"): "invoke",
    ("POST", "/v2/models/{name}/versions/{version}/infer"): "invoke",
}
#: Framework routes outside the document: the docs themselves, public by design (they hold no data).
UNDOCUMENTED_PUBLIC = {"/docs", "/docs/oauth2-redirect", "/openapi.json"}
BAD_CREDENTIALS = {
    "unknown": "Bearer maas_" + "x" * 43,
    "wrong-scheme": "Basic dXNlcjpwYXNz",
    "empty": "Bearer ",
    "no-scheme": "maas_" + "x" * 43,
}


def assert_refused(response: httpx.Response, status: int, why: object) -> None:
    assert response.status_code == status, (why, response.status_code, response.text)
    assert response.headers["content-type"].startswith(PROBLEM), why
    problem = response.json()
    assert problem["status"] == status and problem["title"] and problem["detail"], problem


@pytest.fixture(scope="module")
def anonymous(stack: Stack) -> Iterator[TestClient]:
    """A client without credentials of its own: each request says who it is."""
    with stack.client() as anonymous:
        yield anonymous


@pytest.fixture(scope="module")
def admin(stack: Stack) -> Iterator[TestClient]:
    with stack.client(stack.admin) as authenticated:
        yield authenticated


def test_the_scope_table_covers_every_documented_operation() -> None:
    assert len(OPERATIONS) >= 30
    assert set(OPERATIONS) - PUBLIC_OPERATIONS == set(REQUIRED), (
        "a route was added or removed: declare the scope it needs in REQUIRED (or PUBLIC_OPERATIONS)")


def all_routes(routes: list[Any]) -> Iterator[Any]:
    """The app's routes, descending into included routers (FastAPI >= 0.16x keeps them nested)."""
    for route in routes:
        nested = getattr(route, "original_router", None) or getattr(route, "app", None)
        if nested is not None and hasattr(nested, "routes") and not hasattr(route, "path"):
            yield from all_routes(nested.routes)
        else:
            yield route


def test_no_route_hides_from_the_document(stack: Stack) -> None:
    """Enumerating the document covers the app only if nothing routable is left out of it."""
    documented = set(OPERATIONS)
    seen = 0
    for route in all_routes(stack.app.routes):
        path = getattr(route, "path", None)
        if isinstance(route, APIRoute):
            seen += 1
            assert route.include_in_schema, path
            assert {(method, path) for method in route.methods or set()} <= documented, path
        else:
            assert path in UNDOCUMENTED_PUBLIC, (type(route), path)
    assert seen == len(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_every_operation_needs_a_valid_token(stack: Stack, anonymous: TestClient, admin: TestClient,
                                             method: str, path: str) -> None:
    before = registry_state(stack.backend)
    values = targets(stack)
    nobody = send(anonymous, method, path, values, {})
    if (method, path) in PUBLIC_OPERATIONS:
        assert nobody.status_code == 200, nobody.text
        return
    assert_refused(nobody, 401, "anonymous")
    for why, credentials in BAD_CREDENTIALS.items():
        assert_refused(send(anonymous, method, path, values, {"Authorization": credentials}), 401, why)
    assert_refused(send(anonymous, method, path, values, bearer(stack.tokens["revoked"])), 401, "revoked")
    assert registry_state(stack.backend) == before


#: Identifiers every route refuses (422) once the caller is known.
MALFORMED = {"name": "BAD_", "version": "0", "alias": "BAD_", "upload_id": "BAD", "deployment_id": "zz",
             "token_id": "zz"}


@pytest.mark.parametrize(("method", "path"), [(method, path) for method, path in sorted(REQUIRED) if "{" in path])
def test_anonymous_callers_learn_nothing_from_validation(local_stack: Stack, method: str, path: str) -> None:
    """Authentication comes first: without a token, even a malformed identifier is a 401, so an
    anonymous caller cannot probe which inputs a route would accept."""
    with local_stack.client() as nobody:
        assert_refused(send(nobody, method, path, MALFORMED, {}), 401, "anonymous, malformed")


@pytest.mark.parametrize(("method", "path"), sorted(REQUIRED))
def test_insufficient_scopes_are_forbidden(stack: Stack, anonymous: TestClient, admin: TestClient, method: str,
                                           path: str) -> None:
    needed = REQUIRED[(method, path)]
    before = registry_state(stack.backend)
    values = targets(stack)
    for scope in SCOPES[: SCOPES.index(needed)]:
        assert_refused(send(anonymous, method, path, values, bearer(stack.tokens[scope])), 403, scope)
    # An admin token restricted to another model acts on that model only, never on this one nor on
    # global resources (lists, tokens, metrics, deployments by id, uploads reserved for this model).
    assert_refused(send(anonymous, method, path, values, bearer(stack.tokens["other-model"])), 403, "other model")
    assert registry_state(stack.backend) == before
    if stack.kind != "local":
        return  # scopes are checked above the backend: the table's precision is proven once
    # The scope it needs is enough to get past auth (aimed at things that do not exist, or with empty
    # bodies, so that this changes nothing either): the table is not stricter than the app.
    for scope in SCOPES[SCOPES.index(needed):]:
        granted = send(anonymous, method, path, GHOSTS, bearer(stack.tokens[scope]), harmful=False)
        assert granted.status_code not in (401, 403), (scope, granted.text)
    assert registry_state(stack.backend) == before


def test_model_restricted_token_works_on_its_model_only(stack: Stack, anonymous: TestClient) -> None:
    from maas.services.tokens import TokenService

    _, secret = TokenService(stack.backend.registry).create("only-m", ["invoke"], model=MODEL)
    headers = bearer(secret)
    answer = anonymous.post(f"/v2/models/{MODEL}/infer", json=INFER_BODY, headers=headers)
    assert answer.status_code == 200, answer.text
    assert anonymous.get(f"/models/{MODEL}", headers=headers).status_code == 200
    assert_refused(anonymous.get("/models", headers=headers), 403, "global list")
    assert_refused(anonymous.post(f"/models/{MODEL}/rollback", json={}, headers=headers), 403, "deploy scope")


def test_tokens_lifecycle(admin: TestClient, anonymous: TestClient) -> None:
    """A created token works at once, never shows its secret or hash again, and stops at revocation."""
    created = admin.post("/tokens", json={"name": "ci", "scopes": ["deploy"]})
    assert created.status_code == 201, created.text
    secret, token_id = created.json()["token"], created.json()["id"]
    assert secret.startswith("maas_")
    listed = admin.get("/tokens").json()["items"]
    assert token_id in [t["id"] for t in listed]
    assert all("token" not in t and "token_hash" not in t for t in listed)
    ci = bearer(secret)
    assert anonymous.get(f"/models/{MODEL}/versions", headers=ci).status_code == 200
    assert admin.delete(f"/tokens/{token_id}").status_code == 204
    assert_refused(anonymous.get(f"/models/{MODEL}/versions", headers=ci), 401, "revoked")
    assert next(t for t in admin.get("/tokens").json()["items"] if t["id"] == token_id)["revoked"] is True
    assert admin.delete("/tokens/" + "0" * 16).status_code == 404
    for body in ({"name": "x", "scopes": ["root"]}, {"name": "x", "scopes": []},
                 {"name": "x", "scopes": ["invoke"], "model": "../x"}):
        assert admin.post("/tokens", json=body).status_code == 422, body


# --- the Lambda front doors ---------------------------------------------------------------------------


@pytest.fixture
def lambda_env(aws_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """The handlers build their backend from the environment: point it at the seeded stack's moto."""
    from tests.conftest import TEST_BUCKET, TEST_TABLE

    for name, value in {"MAAS_BUCKET": TEST_BUCKET, "MAAS_TABLE": TEST_TABLE, "MAAS_HOME": str(aws_stack.home),
                        "MAAS_ARTIFACT_CACHE_DIR": str(aws_stack.sandbox / "lambda-cache")}.items():
        monkeypatch.setenv(name, value)
    return aws_stack


def lambda_call(module: ModuleType, method: str, path: str, authorization: str | None,
                fixture: str = "v2_http_json_infer_prod") -> tuple[int, dict[str, str], bytes]:
    body = orjson.dumps(HARMFUL_BODIES.get((method, path), {})) if method in ("POST", "PUT") else b""
    content_type = "application/json" if body else None
    if path.startswith("/uploads/"):
        body, content_type = NEW_MODEL, "application/octet-stream"
    event = api_event(fixture, body=body, path=fill(path, GHOSTS | {"name": MODEL, "version": "1"}),
                      method=method, headers={"Authorization": authorization, "Content-Type": content_type})
    answer = module.handler(event, LambdaContext())
    headers = {k.lower(): v for k, v in answer["headers"].items()}
    return answer["statusCode"], headers, (answer.get("body") or "").encode()


def test_the_api_lambda_refuses_missing_and_bad_tokens(lambda_env: Stack) -> None:
    api = load_handler("api", "maas_fn_api_security")
    before = registry_state(lambda_env.backend)
    for method, path in OPERATIONS:
        for fixture in ("v1_rest_missing_auth_prod", "v2_http_json_infer_default"):
            for authorization in (None, BAD_CREDENTIALS["unknown"], f"Bearer {lambda_env.tokens['revoked']}"):
                status, headers, body = lambda_call(api, method, path, authorization, fixture)
                if (method, path) in PUBLIC_OPERATIONS:
                    assert status == 200, (method, path, body)
                    continue
                assert status == 401, (method, path, fixture, authorization, body)
                assert headers["content-type"] == PROBLEM
    assert registry_state(lambda_env.backend) == before


def test_the_inference_lambda_refuses_missing_and_bad_tokens(lambda_env: Stack) -> None:
    fn = load_handler("inference", "maas_fn_inference_security")
    served = [(method, path) for method, path in OPERATIONS if path.startswith("/v2")]
    assert len(served) == 9
    for method, path in served:
        for fixture in ("v1_rest_missing_auth_prod", "v2_http_json_infer_prod"):
            for authorization in (None, *BAD_CREDENTIALS.values(), f"Bearer {lambda_env.tokens['revoked']}"):
                status, headers, body = lambda_call(fn, method, path, authorization, fixture)
                if (method, path) in PUBLIC_OPERATIONS:
                    assert status == 200, (method, path, body)
                    continue
                assert status == 401, (method, path, fixture, authorization, body)
                assert headers["content-type"] == PROBLEM
        if (method, path) not in PUBLIC_OPERATIONS:
            status, _, body = lambda_call(fn, method, path, f"Bearer {lambda_env.tokens['other-model']}")
            assert status == 403, (method, path, body)


def test_the_inference_lambda_authenticates_before_it_validates_the_path(lambda_env: Stack) -> None:
    """As the app does: an anonymous caller gets 401 for a malformed model name or version, never the
    422 that would tell it which names the function accepts; with a token the rules answer 422."""
    fn = load_handler("inference", "maas_fn_inference_path_rules")
    for path in ("/v2/models/BAD_/infer", "/v2/models/m/versions/0/infer"):
        event = api_event("v2_http_json_infer_prod", body=b"{}", path=path, method="POST",
                          headers={"Authorization": None, "Content-Type": "application/json"})
        assert fn.handler(event, LambdaContext())["statusCode"] == 401, path
        event = api_event("v2_http_json_infer_prod", body=b"{}", path=path, method="POST",
                          headers={"Authorization": f"Bearer {lambda_env.tokens['invoke']}",
                                   "Content-Type": "application/json"})
        assert fn.handler(event, LambdaContext())["statusCode"] == 422, path
