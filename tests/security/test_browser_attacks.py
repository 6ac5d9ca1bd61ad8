"""Attack class 2: a web page attacking the local server through the user's browser.

* "Simple" cross-site requests (``text/plain``, forms) skip the CORS preflight (MLflow CVE-2023-43472):
  every mutation must be JSON (or raw bytes for uploads and binary inference).
* DNS rebinding (MLflow CVE-2025-14279): a page on ``evil.example`` re-resolved to 127.0.0.1 reaches
  the server under its own Host name, reads included: only loopback Host names are answered.
* A foreign ``Origin`` on a mutation is refused, and nothing grants CORS to anyone.
* A Host, Origin or Content-Type header sent twice is refused: the guard and the app must never read
  different values of the headers the guard decides on.
* ``maas serve`` listens on 127.0.0.1 unless told otherwise.

Each refused request carries the credentials and a body that would have worked (the guard, not auth,
must stop it) and the registry plus every file in the sandbox are unchanged afterwards."""

from __future__ import annotations

import inspect
import socket
from collections.abc import Iterator

import httpx
import pytest
import typer.main
from fastapi.testclient import TestClient

from maas.api import create_app
from maas.cli import main as cli_main
from maas.cli import serve as cli_serve
from maas.settings import Limits, Settings
from tests.security.conftest import (
    PROBLEM,
    Stack,
    bearer,
    make_sandbox,
    openapi_operations,
    registry_state,
    request_parts,
    targets,
    tree_state,
)

OPERATIONS = openapi_operations()
MUTATIONS = [(method, path) for method, path in OPERATIONS if method in ("POST", "PUT", "PATCH", "DELETE")]
#: What a page may send without a preflight (the CORS "simple" content types), and other non-JSON.
SIMPLE_TYPES = ["text/plain", "text/plain; charset=utf-8", "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x", "TEXT/PLAIN", "application/xml", "application/json-seq"]
FOREIGN_HOSTS = ["evil.example", "evil.example:8080", "127.0.0.1.evil.example", "localhost.evil.example:80",
                 "127.0.0.2", "0.0.0.0", "[::2]:8080", "", "127.0.0.1 evil.example", "localhost.",
                 # Not a host[:port] at all, with a loopback name in front (the guard once took the part
                 # before the last ':' or after '[...]' as the name).
                 "127.0.0.1:8080@evil.example", "[::1]evil.example", "localhost:evil.example",
                 "127.0.0.1:99999999", "[::1]:80:evil", "127.0.0.1/evil.example", "localhost\\evil.example"]
FOREIGN_ORIGINS = ["http://evil.example", "https://evil.example", "null", "http://127.0.0.1.evil.example",
                   "http://127.0.0.1:9999", "http://localhost", "file://", "http://evil.example/127.0.0.1"]
LOOPBACK_HOSTS = ["127.0.0.1", "127.0.0.1:8080", "localhost", "localhost:8080", "[::1]", "[::1]:8080",
                  "LOCALHOST:8080", " 127.0.0.1:65535 ", "127.0.0.1:"]


@pytest.fixture(scope="module")
def served(local_stack: Stack) -> Stack:
    """The seeded local stack with the app ``maas serve`` builds on a loopback address (only loopback
    Host names answered, see ``maas.cli.serve.build_server``)."""
    app = create_app(local_stack.backend, local_stack.settings, allowed_hosts=cli_serve.LOOPBACK_ALLOWED_HOSTS)
    return Stack("served", local_stack.backend, local_stack.settings, app, local_stack.tokens,
                 local_stack.sandbox, local_stack.ids)


@pytest.fixture(scope="module")
def browser(served: Stack) -> Iterator[TestClient]:
    """The victim's browser: it holds the admin token (the worst case) and targets 127.0.0.1."""
    with served.client(served.admin) as client:
        yield client


def state(stack: Stack) -> tuple[object, object]:
    return registry_state(stack.backend), tree_state(stack.sandbox)


def assert_refused(response: httpx.Response, statuses: tuple[int, ...], why: object) -> None:
    assert response.status_code in statuses, (why, response.status_code, response.text)
    assert response.headers["content-type"].startswith(PROBLEM), why
    problem = response.json()
    assert {"type", "title", "status", "detail"} <= set(problem) and problem["status"] == response.status_code
    assert "access-control-allow-origin" not in response.headers


def test_there_are_mutations_to_attack() -> None:
    assert len(MUTATIONS) >= 14 and ("PUT", "/uploads/{upload_id}") in MUTATIONS


@pytest.mark.parametrize(("method", "path"), MUTATIONS)
def test_mutations_refuse_non_json_bodies(served: Stack, browser: TestClient, method: str, path: str) -> None:
    before = state(served)
    url, body, _ = request_parts(method, path, targets(served))
    for content_type in SIMPLE_TYPES:
        answer = browser.request(method, url, content=body or b"{}", headers={"Content-Type": content_type})
        assert_refused(answer, (415,), content_type)
        assert "Content-Type" in answer.json()["detail"]
    # No Content-Type at all is not JSON either (a ``fetch`` with a Blob body sends none). Inference is
    # the exception by design: it changes nothing and Triton's clients omit the header.
    if method != "DELETE" and not path.endswith("/infer"):
        assert_refused(browser.request(method, url, content=body or b"{}"), (415,), "no content type")
    assert state(served) == before


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_foreign_host_names_get_nothing(served: Stack, browser: TestClient, method: str, path: str) -> None:
    """Reads included: after rebinding, the page could read the answers (same origin to the browser)."""
    before = state(served)
    url, body, content_type = request_parts(method, path, targets(served))
    headers = {} if content_type is None else {"Content-Type": content_type}
    for host in FOREIGN_HOSTS:
        answer = browser.request(method, url, content=body or None, headers=headers | {"Host": host})
        assert_refused(answer, (403,), host)
        assert "Host" in answer.json()["detail"]
    assert state(served) == before


@pytest.mark.parametrize(("method", "path"), MUTATIONS)
def test_foreign_origins_cannot_mutate(served: Stack, browser: TestClient, method: str, path: str) -> None:
    before = state(served)
    url, body, content_type = request_parts(method, path, targets(served))
    headers = {} if content_type is None else {"Content-Type": content_type}
    for origin in FOREIGN_ORIGINS:
        answer = browser.request(method, url, content=body or None, headers=headers | {"Origin": origin})
        assert_refused(answer, (403,), origin)
    assert state(served) == before


@pytest.mark.parametrize(("method", "path"), MUTATIONS)
def test_repeated_guarded_headers_are_refused(served: Stack, browser: TestClient, method: str, path: str) -> None:
    """A second Host, Origin or Content-Type could let the guard and the app read different values
    (a dict keeps the last, Starlette the first): one of each, or 400."""
    before = state(served)
    url, body, content_type = request_parts(method, path, targets(served))
    json_type = content_type or "application/json"
    for headers in ([("Host", "evil.example"), ("Host", "127.0.0.1")],
                    [("Host", "127.0.0.1"), ("Host", "evil.example")],
                    [("Origin", "http://evil.example"), ("Origin", "http://127.0.0.1")],
                    [("Content-Type", "text/plain"), ("Content-Type", json_type)],
                    [("Content-Type", json_type), ("Content-Type", "text/plain")]):
        answer = browser.request(method, url, content=body or b"{}", headers=headers)
        assert_refused(answer, (400,), headers)
        assert "must appear once" in answer.json()["detail"]
    assert state(served) == before


def test_loopback_names_and_same_origin_requests_work(served: Stack, browser: TestClient) -> None:
    """The rules refuse attackers, not the CLI, the SDK or the docs page served by the server itself."""
    for host in LOOPBACK_HOSTS:
        answer = browser.get("/models", headers={"Host": host})
        assert answer.status_code == 200, (host, answer.text)
    same_origin = browser.post("/models", json={"name": "from-docs"},
                               headers={"Origin": "http://127.0.0.1", "Host": "127.0.0.1"})
    assert same_origin.status_code == 201, same_origin.text
    assert browser.delete("/models/from-docs").status_code == 204
    with_charset = browser.post("/models", content=b'{"name": "charset"}',
                                headers={"Content-Type": "application/json; charset=utf-8"})
    assert with_charset.status_code == 201, with_charset.text
    assert browser.delete("/models/charset").status_code == 204


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_no_cors_is_granted(served: Stack, browser: TestClient, method: str, path: str) -> None:
    """Without CORS headers a foreign page cannot read any answer, nor get a preflight approved."""
    url, _, _ = request_parts(method, path, targets(served))
    preflight = browser.options(url, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": method,
                                              "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code >= 400, preflight.text
    assert not [h for h in preflight.headers if h.lower().startswith("access-control-")]
    if method == "GET":
        read = browser.get(url, headers={"Origin": "http://evil.example"})
        assert not [h for h in read.headers if h.lower().startswith("access-control-")]


def test_the_served_app_is_the_guarded_one(tmp_path: object) -> None:
    """``build_server`` (what ``maas serve`` runs) restricts Host names on a loopback address and
    only there: behind another interface it cannot know its public names."""
    _, settings = make_sandbox(tmp_path)  # type: ignore[arg-type]
    settings = Settings(home=settings.home, limits=Limits(validation_timeout_s=60))
    backend, app, secret, _ = cli_serve.build_server(settings)
    try:
        with TestClient(app, base_url="http://127.0.0.1") as client:
            headers = bearer(secret)
            assert client.get("/models", headers=headers).status_code == 200
            assert_refused(client.get("/models", headers=headers | {"Host": "evil.example"}), (403,), "host")
            assert_refused(client.post("/models", content=b'{"name": "x"}',
                                       headers=headers | {"Content-Type": "text/plain"}), (415,), "text/plain")
    finally:
        cli_serve.close_backend(backend)


def test_serve_binds_loopback_by_default() -> None:
    command = typer.main.get_command(cli_main.app)
    serve = command.commands["serve"]  # type: ignore[attr-defined]
    host_option = next(p for p in serve.params if p.name == "host")
    assert host_option.default == "127.0.0.1"
    assert inspect.signature(cli_serve.serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(cli_serve.build_server).parameters["host"].default == "127.0.0.1"
    # The socket the server would listen on: bound to loopback, unreachable from other interfaces.
    sock = cli_serve.bind_socket(host_option.default, 0)
    try:
        sock.listen(1)
        address, port = sock.getsockname()[:2]
        assert address == "127.0.0.1"
        external = _external_address()
        if external is not None:
            with pytest.raises(OSError), socket.create_connection((external, port), timeout=1):
                pass
    finally:
        sock.close()


def _external_address() -> str | None:
    """This machine's address on its default route, if it has one (nothing is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routing decides the source address, no packet
        address: str = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address
