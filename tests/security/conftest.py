"""Shared fixtures of the security suite (one module per attack class, see issue 5 and DESIGN.md 9).

The attacks need a server with something to attack: ``stack`` is the real app over a real backend
(local files + SQLite, or AWS under moto) seeded with a READY version, an alias, a deployment, a
pending upload and one token per scope. Building that costs about a second (moto, a push), so it is
module-scoped: the modules that use it only send requests that must be refused, and prove with
``registry_state`` that nothing changed. Tests that need to change state use the function-scoped
``client`` / ``backend`` fixtures of ``tests/conftest.py``.

The store root lives in a sandbox directory next to a decoy sibling (``outside``), so a path
traversal that escapes the root shows up as a change in ``tree_state(sandbox)``."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from maas.api import create_app
from maas.backends.local import LocalBackend
from maas.services.tokens import TokenService
from maas.settings import Limits, Settings
from tests.conftest import HOST, TEST_BUCKET, TEST_TABLE, _serialize_moto_dynamodb, push, reserve
from tests.models import InProcessValidator, scale_model

#: The seeded model every stack serves, and the model a restricted token is limited to instead.
MODEL = "m"
OTHER_MODEL = "other"
ALIAS = "champion"
PROBLEM = "application/problem+json"
SCOPES = ("invoke", "deploy", "admin")
#: Routes anyone may call (load balancers and Kubernetes probes carry no token).
PUBLIC_OPERATIONS = frozenset({("GET", "/v2/health/live"), ("GET", "/v2/health/ready")})
INFER_BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
NEW_MODEL = scale_model(3.0)
#: Bodies that would succeed (and change the registry) if the refused caller were let through.
HARMFUL_BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/models"): {"name": "intruder"},
    ("POST", "/models/{name}/versions"): {"size": len(NEW_MODEL), "sha256": hashlib.sha256(NEW_MODEL).hexdigest()},
    ("POST", "/models/{name}/versions/{version}/commit"): {"sha256": "0" * 64, "size": 1},
    ("PUT", "/models/{name}/aliases/{alias}"): {"version": 1},
    ("POST", "/models/{name}/deployments"): {"version": 1},
    ("POST", "/tokens"): {"name": "intruder", "scopes": ["admin"]},
    ("POST", "/v2/models/{name}/infer"): INFER_BODY,
    ("POST", "/v2/models/{name}/versions/{version}/infer"): INFER_BODY,
}
#: Targets that do not exist, for calls that must get past a check without changing anything.
GHOSTS = {"name": "ghost", "version": "999", "alias": "ghost", "upload_id": "f" * 32,
          "deployment_id": "f" * 32, "token_id": "f" * 16}
#: Fake credentials and a region, as ``tests/conftest.py``'s ``aws_credentials``: nothing reaches AWS.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


@dataclass
class Stack:
    """The real app over one backend, seeded, plus what the attacks aim at."""

    kind: str
    backend: Any
    settings: Settings
    app: FastAPI
    #: secrets by scope (``invoke``, ``deploy``, ``admin``) and ``other-model`` (admin on OTHER_MODEL only)
    tokens: dict[str, str]
    #: the sandbox: ``home`` (the store root) and ``outside`` (a decoy sibling tree)
    sandbox: Path
    #: real ids of the seeded objects, to aim the attacks at things that exist
    ids: dict[str, str] = field(default_factory=dict)

    @property
    def admin(self) -> str:
        return self.tokens["admin"]

    @property
    def home(self) -> Path:
        return Path(self.settings.home)

    @property
    def outside(self) -> Path:
        return self.sandbox / "outside"

    def client(self, token: str | None = None, **kwargs: Any) -> TestClient:
        """A client without lifespan (the app has no start-up work), optionally authenticated."""
        client = TestClient(self.app, base_url=f"http://{HOST}", **kwargs)
        if token is not None:
            client.headers["Authorization"] = f"Bearer {token}"
        return client


def make_sandbox(root: Path) -> tuple[Path, Settings]:
    """``root/home`` for the store and a decoy ``root/outside`` holding files a traversal could hit."""
    outside = root / "outside"
    (outside / "nested").mkdir(parents=True)
    (outside / "secret.txt").write_text("do not touch")
    (outside / "nested" / "registry.db").write_bytes(b"decoy")
    return root, Settings(home=root / "home", limits=Limits(validation_timeout_s=60))


def seed(stack: Stack) -> None:
    """A READY version 1 of MODEL (served, aliased) and a pending upload for version 2."""
    with stack.client(stack.admin) as client:
        push(client, MODEL, scale_model(2.0))
        assert client.put(f"/models/{MODEL}/aliases/{ALIAS}", json={"version": 1}).status_code == 200
        deployed = client.post(f"/models/{MODEL}/deployments", json={"version": 1})
        assert deployed.status_code == 201, deployed.text
        stack.ids["deployment_id"] = deployed.json()["id"]
        upload_path, pending = reserve(client, MODEL, b"pending bytes")
        stack.ids["upload_id"] = upload_path.rsplit("/", 1)[1]
        stack.ids["pending_version"] = str(pending)
        assert client.post("/models", json={"name": OTHER_MODEL}).status_code == 201
    service = TokenService(stack.backend.registry)
    for scope in SCOPES:
        stack.tokens[scope] = service.create(f"t-{scope}", [scope])[1]
    stack.tokens["other-model"] = service.create("t-other", ["admin"], model=OTHER_MODEL)[1]
    victim, _ = service.create("victim", ["invoke"])
    stack.ids["token_id"] = victim.id
    revoked, stack.tokens["revoked"] = service.create("t-revoked", ["admin"])
    stack.backend.registry.revoke_token(revoked.id)


def _local_stack(root: Path) -> Iterator[Stack]:
    sandbox, settings = make_sandbox(root)
    # The in-process validator runs the same checks without the sandbox child (a second saved per
    # stack); the malicious-model suite tests the sandbox itself.
    backend = LocalBackend(settings, validator=InProcessValidator(settings))
    try:
        stack = Stack("local", backend, settings, create_app(backend, settings), {}, sandbox)
        stack.tokens["admin"], _ = backend.ensure_admin_token(None)  # type: ignore[assignment]
        seed(stack)
        yield stack
    finally:
        backend.close()


def _aws_stack(root: Path) -> Iterator[Stack]:
    import boto3
    from moto import mock_aws

    from maas.backends.aws import AwsBackend
    from maas.backends.aws.table import create_table

    sandbox, settings = make_sandbox(root)
    with pytest.MonkeyPatch.context() as patch:
        for variable in ("AWS_PROFILE", "AWS_ENDPOINT_URL"):
            patch.delenv(variable, raising=False)
        for variable, value in AWS_ENV.items():
            patch.setenv(variable, value)
        _serialize_moto_dynamodb(patch)
        with mock_aws():
            s3 = boto3.client("s3")
            s3.create_bucket(Bucket=TEST_BUCKET)
            s3.put_bucket_versioning(Bucket=TEST_BUCKET, VersioningConfiguration={"Status": "Enabled"})
            create_table(boto3.client("dynamodb"), TEST_TABLE)
            backend = AwsBackend(settings, bucket=TEST_BUCKET, table=TEST_TABLE,
                                 validator=InProcessValidator(settings))
            stack = Stack("aws", backend, settings, create_app(backend, settings), {}, sandbox)
            stack.tokens["admin"] = TokenService(backend.registry).create("root", ["admin"])[1]
            seed(stack)
            yield stack


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The seeded app over the local backend (alone: attacks on what only ``maas serve`` exposes)."""
    yield from _local_stack(tmp_path_factory.mktemp("sandbox-local"))


@pytest.fixture(scope="module")
def aws_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The seeded app over the AWS backend; moto stays active for the whole module, so the Lambda
    handlers (which build their own clients from ``MAAS_BUCKET`` / ``MAAS_TABLE``) see the same data.
    Do not combine with the function-scoped ``moto`` fixture in one module: starting moto again
    resets every mocked service, the seed included."""
    yield from _aws_stack(tmp_path_factory.mktemp("sandbox-aws"))


@pytest.fixture(scope="module", params=["local", "aws"])
def stack(request: pytest.FixtureRequest) -> Stack:
    """The seeded app over each backend, once per module (see the module docstring)."""
    found: Stack = request.getfixturevalue(f"{request.param}_stack")
    return found


# --- helpers ----------------------------------------------------------------------------------------


def openapi_operations(app: FastAPI | None = None) -> list[tuple[str, str]]:
    """Every (METHOD, path template) of the app's OpenAPI document, sorted: what a client can call.
    Without ``app``, the document of an app over a throw-away local backend (for parametrize)."""
    if app is None:
        with tempfile.TemporaryDirectory() as home, LocalBackend(Settings(home=Path(home))) as backend:
            return openapi_operations(create_app(backend))
    return sorted((method.upper(), path) for path, methods in app.openapi()["paths"].items()
                  for method in methods)


def fill(path: str, values: dict[str, str]) -> str:
    """A path template with its ``{placeholders}`` replaced (every one must be given)."""
    for key, value in values.items():
        path = path.replace("{" + key + "}", value)
    assert "{" not in path, path
    return path


def registry_state(backend: Any) -> dict[str, Any]:
    """Everything the registry holds, read straight from it (cheaper than through the API under moto):
    two equal states mean no request in between created, changed or deleted anything."""
    registry = backend.registry
    state: dict[str, Any] = {"tokens": sorted((t.id, t.revoked, t.scopes, t.model) for t in registry.list_tokens())}
    for model in registry.list_models(1000, None).items:
        name = model.name
        state[name] = {
            "model": model.model_dump(),
            "route": None if (route := registry.get_route(name)) is None else route.model_dump(),
            "versions": [v.model_dump() for v in registry.list_versions(name, 1000, None).items],
            "aliases": [a.model_dump() for a in registry.list_aliases(name)],
            "deployments": [d.model_dump() for d in registry.list_deployments(name, 1000, None).items],
        }
    return state


def tree_state(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (or ``dir`` / ``link -> target``) of everything under ``root``:
    compare two to see whether anything appeared, vanished or changed."""
    state: dict[str, str] = {}
    for directory, dirs, files in os.walk(root, followlinks=False):
        here = Path(directory)
        for name in dirs:
            state[str((here / name).relative_to(root))] = "dir"
        for name in files:
            path = here / name
            key = str(path.relative_to(root))
            state[key] = f"link -> {os.readlink(path)}" if path.is_symlink() else \
                hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def targets(stack: Stack) -> dict[str, str]:
    """Placeholders aimed at the seeded objects (version 1 is READY, aliased and deployed)."""
    return {"name": MODEL, "version": "1", "alias": ALIAS, "upload_id": stack.ids["upload_id"],
            "deployment_id": stack.ids["deployment_id"], "token_id": stack.ids["token_id"]}


def request_parts(method: str, path: str, values: dict[str, str], *, harmful: bool = True,
                  ) -> tuple[str, bytes, str | None]:
    """URL, body and natural Content-Type of one request as a client would make it: JSON on
    mutations (``HARMFUL_BODIES`` unless ``harmful`` is false), model bytes on uploads."""
    url = fill(path, values)
    if path.startswith("/uploads/"):
        return url, NEW_MODEL, "application/octet-stream"
    if method in ("POST", "PUT"):
        body = HARMFUL_BODIES.get((method, path), {}) if harmful else {}
        return url, orjson.dumps(body), "application/json"
    if method == "DELETE" and path == "/models/{name}":
        url += "?force=true"
    return url, b"", None


def send(client: TestClient, method: str, path: str, values: dict[str, str], headers: dict[str, str],
         *, harmful: bool = True) -> httpx.Response:
    """One request as a client would make it (a JSON body on mutations, bytes on uploads)."""
    url, body, content_type = request_parts(method, path, values, harmful=harmful)
    if content_type is not None:
        headers = headers | {"Content-Type": content_type}
    response: httpx.Response = client.request(method, url, content=body or None, headers=headers)
    return response


def bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}
