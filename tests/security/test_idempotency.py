"""Idempotency keys (issue 5, item 8): a retried or duplicated mutating call runs once.

Exploit class: a client (or a proxy, or the SDK itself) re-sends a mutation whose answer was lost;
without keys each copy runs, and "an idempotent retry never creates a second version" (DESIGN.md
section 3) breaks. Every test runs the real app over both backends (local files + SQLite, and AWS
under moto); faults are injected at the ports (a validator outage, a DynamoDB error), as
tests/security/test_faults.py does."""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError
from fastapi.testclient import TestClient

from maas.api import create_app
from maas.api.idempotency import REPLAYED_HEADER
from maas.backends.local import LocalBackend
from maas.client import Client
from maas.errors import Unavailable
from maas.ports import IdempotencyRecord, StoredResponse
from maas.services.idempotency import KEY_HEADER, Claimed, IdempotencyService, fingerprint, store_key
from maas.services.tokens import TokenService
from maas.settings import Settings
from tests.conftest import HOST
from tests.models import InProcessValidator

CONCURRENCY = 50
#: What a version reservation announces (S3 needs size and sha256 up front).
PLAN: dict[str, Any] = {"size": 11, "sha256": hashlib.sha256(b"placeholder").hexdigest()}


class FlakyValidator:
    """The real (in-process) validation, failing the next ``fail`` calls with an outage (503), as a
    validator whose sandbox could not start would."""

    def __init__(self, settings: Settings):
        self._real = InProcessValidator(settings)
        self.fail = 0
        self.calls = 0

    def validate(self, path: Path) -> Any:
        self.calls += 1
        if self.fail:
            self.fail -= 1
            raise Unavailable("the validator is unavailable; retry shortly", retry_after=1)
        return self._real.validate(path)


class FailingDynamo:
    """A boto3 DynamoDB client whose next ``fail`` calls of ``operation`` raise InternalError
    (before reaching the table), as an outage in the middle of a request would."""

    def __init__(self, real: Any, operation: str):
        self._real = real
        self._operation = operation
        self.fail = 0

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._real, name)
        if name != self._operation:
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.fail:
                self.fail -= 1
                raise ClientError({"Error": {"Code": "InternalError", "Message": "injected"},
                                   "ResponseMetadata": {"HTTPStatusCode": 500}}, name)
            return target(*args, **kwargs)

        return call


class Clock:
    """Time the idempotency service reads (keys live 24 h: tests move time instead of waiting)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def validator(settings: Settings) -> FlakyValidator:
    return FlakyValidator(settings)


@pytest.fixture
def app(backend: Any, settings: Settings, validator: FlakyValidator) -> Any:
    """The real app over the backend, validating in-process (no sandbox child: faster, and faultable)."""
    backend.validator = validator
    return create_app(backend, settings)


def new_token(backend: Any, name: str, scopes: list[str]) -> str:
    _, secret = TokenService(backend.registry).create(name, scopes, created_by="test")
    return secret


def key() -> dict[str, str]:
    return {KEY_HEADER: str(uuid.uuid4())}


def versions(client: TestClient, name: str) -> list[dict[str, Any]]:
    answer = client.get(f"/models/{name}/versions")
    assert answer.status_code == 200, answer.text
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


def plan(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def upload(client: TestClient, target: dict[str, Any], data: bytes) -> None:
    sent = client.put(f"/uploads/{target['upload']['upload_id']}", content=data,
                      headers={"Content-Type": "application/octet-stream"})
    assert sent.status_code == 200, sent.text


# --- the exploit: duplicates -------------------------------------------------------------------------
def test_concurrent_identical_registers_create_one_version(client: TestClient, example_bytes: bytes) -> None:
    assert client.post("/models", json={"name": "fraud"}).status_code == 201
    headers, body = key(), plan(example_bytes)
    start = threading.Barrier(CONCURRENCY)

    def register(_: int) -> httpx.Response:
        start.wait()
        answer: httpx.Response = client.post("/models/fraud/versions", json=body, headers=headers)
        return answer

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        answers = list(pool.map(register, range(CONCURRENCY)))

    assert {answer.status_code for answer in answers} == {201}
    assert len({answer.content for answer in answers}) == 1  # identical, upload target included
    assert sum(answer.headers.get(REPLAYED_HEADER) != "true" for answer in answers) == 1  # ran once
    assert [v["version"] for v in versions(client, "fraud")] == [1]


def test_replay_returns_the_stored_answer_without_running_again(client: TestClient, example_bytes: bytes,
                                                                validator: FlakyValidator) -> None:
    headers = key()
    first = client.post("/models", json={"name": "fraud"}, headers=headers)
    again = client.post("/models", json={"name": "fraud"}, headers=headers)  # would be 409 if it ran
    assert first.status_code == again.status_code == 201
    assert again.content == first.content and again.headers[REPLAYED_HEADER] == "true"
    assert again.headers["content-type"] == first.headers["content-type"]

    reserve_key = key()
    reserved = client.post("/models/fraud/versions", json=plan(example_bytes), headers=reserve_key)
    # Same JSON, other key order and spacing: the same request.
    reordered = client.post("/models/fraud/versions", headers={**reserve_key, "Content-Type": "application/json"},
                            content=f' {{"sha256": "{hashlib.sha256(example_bytes).hexdigest()}", '
                                    f'"size": {len(example_bytes)}}}')
    assert reordered.status_code == 201 and reordered.content == reserved.content
    upload(client, reserved.json(), example_bytes)

    commit_key = key()
    commit = {"sha256": hashlib.sha256(example_bytes).hexdigest(), "size": len(example_bytes)}
    committed = client.post("/models/fraud/versions/1/commit", json=commit, headers=commit_key)
    assert committed.status_code == 200 and committed.json()["status"] == "READY"
    replayed = client.post("/models/fraud/versions/1/commit", json=commit, headers=commit_key)
    assert replayed.content == committed.content and validator.calls == 1  # validated once

    alias_key = key()
    for _ in range(2):
        assert client.put("/models/fraud/aliases/champion", json={"version": 1},
                          headers=alias_key).status_code == 200
    deploy_key = key()
    deployed = [client.post("/models/fraud/deployments", json={"version": 1}, headers=deploy_key)
                for _ in range(2)]
    assert deployed[0].status_code == deployed[1].status_code == 201
    assert deployed[0].content == deployed[1].content
    assert len(client.get("/models/fraud/deployments").json()["items"]) == 1
    assert [v["version"] for v in versions(client, "fraud")] == [1]

    delete_key = key()
    gone = [client.delete("/models/fraud/aliases/champion", headers=delete_key) for _ in range(2)]
    assert [answer.status_code for answer in gone] == [204, 204]  # the repeat is not a 404
    assert gone[1].headers[REPLAYED_HEADER] == "true"


def test_client_errors_are_kept_like_any_answer(client: TestClient) -> None:
    headers = key()
    missing = client.post("/models/later/versions", json=PLAN, headers=headers)
    assert missing.status_code == 404
    assert client.post("/models", json={"name": "later"}).status_code == 201
    again = client.post("/models/later/versions", json=PLAN, headers=headers)
    assert again.status_code == 404 and again.content == missing.content  # as Stripe does: the answer stands
    assert versions(client, "later") == []


def test_the_store_never_holds_a_created_token_secret_nor_the_key(client: TestClient, backend: Any) -> None:
    """Tokens are stored hashed: the idempotency store must not become a copy of their secrets. A replay
    names the token that was created (one token) with its secret blanked: shown once, never kept."""
    headers = {KEY_HEADER: "token-key-0123456789"}
    created = client.post("/tokens", json={"name": "ci", "scopes": ["deploy"]}, headers=headers)
    assert created.status_code == 201
    replayed = client.post("/tokens", json={"name": "ci", "scopes": ["deploy"]}, headers=headers)
    assert replayed.status_code == 201 and replayed.headers[REPLAYED_HEADER] == "true"
    assert replayed.json() == {**created.json(), "token": None}
    assert [t["name"] for t in client.get("/tokens").json()["items"]].count("ci") == 1
    secret = created.json()["token"].encode()
    if isinstance(backend, LocalBackend):
        stored = b"".join(path.read_bytes() for path in backend.home.glob("registry.db*"))
    else:
        stored = json.dumps(backend.dynamodb.scan(TableName=backend.table)["Items"], default=repr).encode()
    assert b"IDEMPOTENCY#" in stored or isinstance(backend, LocalBackend)
    assert secret not in stored and headers[KEY_HEADER].encode() not in stored


# --- misuse of keys ------------------------------------------------------------------------------------
def test_same_key_with_another_request_is_refused(client: TestClient) -> None:
    headers = key()
    assert client.post("/models", json={"name": "one"}, headers=headers).status_code == 201
    for method, path, body in (("POST", "/models", {"name": "two"}),  # another body
                               ("POST", "/models/one/versions", {}),  # another path
                               ("DELETE", "/models/one", None)):  # another method
        refused = client.request(method, path, json=body, headers=headers)
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        problem = refused.json()
        assert problem["type"].endswith("/idempotency-key-reused") and problem["status"] == 422
        assert problem["field"] == KEY_HEADER and KEY_HEADER in problem["detail"] and problem["title"]
    assert [m["name"] for m in client.get("/models").json()["items"]] == ["one"]
    assert client.get("/models/one").status_code == 200


def test_malformed_keys_are_rejected_naming_the_header(client: TestClient) -> None:
    for bad in ("", " ", "a" * 256, "has space", "slash/y", "hash#y", 'quote"', "tab\t", "dot..ok?"):
        refused = client.post("/models", json={"name": "m"}, headers={KEY_HEADER: bad})
        assert refused.status_code == 422, (bad, refused.text)
        assert refused.json()["field"] == KEY_HEADER and KEY_HEADER in refused.json()["detail"]
    assert client.get("/models").json()["items"] == []
    assert client.post("/models", json={"name": "m"}, headers={KEY_HEADER: "a" * 255}).status_code == 201


def test_keys_are_scoped_per_token(client: TestClient, backend: Any) -> None:
    assert client.post("/models", json={"name": "shared"}).status_code == 201
    other = {"Authorization": f"Bearer {new_token(backend, 'ci', ['deploy'])}"}
    headers = key()
    mine = client.post("/models/shared/versions", json=PLAN, headers=headers)
    theirs = client.post("/models/shared/versions", json=PLAN, headers={**headers, **other})
    assert mine.status_code == theirs.status_code == 201  # the same request by another token runs
    assert mine.json()["version"]["version"] == 1 and theirs.json()["version"]["version"] == 2
    # Another token's use of the key with another request is not a reuse: each token has its own keys.
    elsewhere = key()
    assert client.post("/models/shared/versions", json=PLAN, headers=elsewhere).status_code == 201
    assert client.post("/models", json={"name": "elsewhere"}, headers={**elsewhere, **other}).status_code == 201
    assert client.post("/models/shared/versions", json=PLAN, headers=headers).content == mine.content
    assert [v["version"] for v in versions(client, "shared")] == [3, 2, 1]


def test_unauthenticated_requests_record_nothing(client: TestClient) -> None:
    headers = key()
    anonymous = client.post("/models", json={"name": "m"}, headers={**headers, "Authorization": ""})
    assert anonymous.status_code == 401
    assert client.post("/models", json={"name": "m"}, headers=headers).status_code == 201


# --- failures never poison a key ---------------------------------------------------------------------------
def test_a_failed_execution_releases_the_key(client: TestClient, example_bytes: bytes,
                                             validator: FlakyValidator) -> None:
    assert client.post("/models", json={"name": "fraud"}).status_code == 201
    reserved = client.post("/models/fraud/versions", json=plan(example_bytes))
    upload(client, reserved.json(), example_bytes)
    headers, commit = key(), {"sha256": hashlib.sha256(example_bytes).hexdigest(), "size": len(example_bytes)}
    validator.fail = 1
    failed = client.post("/models/fraud/versions/1/commit", json=commit, headers=headers)
    assert failed.status_code == 503 and failed.headers["Retry-After"]
    retried = client.post("/models/fraud/versions/1/commit", json=commit, headers=headers)
    assert retried.status_code == 200 and retried.json()["status"] == "READY"  # ran again, not replayed
    assert REPLAYED_HEADER not in retried.headers and validator.calls == 2
    assert client.post("/models/fraud/versions/1/commit", json=commit, headers=headers).content == retried.content


def test_a_registry_outage_mid_register_releases_the_key(aws_backend: Any, settings: Settings) -> None:
    faulty = FailingDynamo(aws_backend.dynamodb, "transact_write_items")  # allocate_version's write
    from maas.backends.aws import AwsBackend

    backend = AwsBackend(settings, bucket=aws_backend.bucket, table=aws_backend.table, s3=aws_backend.s3,
                         dynamodb=faulty, validator=InProcessValidator(settings))
    secret = new_token(backend, "admin", ["admin"])
    with TestClient(create_app(backend, settings), base_url=f"http://{HOST}") as client:
        client.headers["Authorization"] = f"Bearer {secret}"
        assert client.post("/models", json={"name": "fraud"}).status_code == 201
        headers = key()
        faulty.fail = 1
        failed = client.post("/models/fraud/versions", json=PLAN, headers=headers)
        assert failed.status_code == 503
        retried = client.post("/models/fraud/versions", json=PLAN, headers=headers)
        assert retried.status_code == 201 and REPLAYED_HEADER not in retried.headers
        assert client.post("/models/fraud/versions", json=PLAN, headers=headers).content == retried.content
        assert [v["version"] for v in versions(client, "fraud")] == [1]


def test_exactly_one_of_many_concurrent_claims_wins_in_the_store(backend: Any) -> None:
    """The store's claim is the atomic step everything rests on (threads here; Lambda containers or
    processes sharing a home in production)."""
    store, now = backend.idempotency, 1_000_000.0
    records = [IdempotencyRecord(principal="p", key="k", fingerprint="f", claim=f"claim-{i}",
                                 expires_at=now + 3600, lease_until=now + 60) for i in range(CONCURRENCY)]
    start = threading.Barrier(CONCURRENCY)

    def claim(record: IdempotencyRecord) -> IdempotencyRecord | None:
        start.wait()
        held: IdempotencyRecord | None = store.claim(record, now)
        return held

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(claim, records))
    winners = [record.claim for record, held in zip(records, results, strict=True) if held is None]
    assert len(winners) == 1
    assert {held.claim for held in results if held is not None} == set(winners)
    loser = next(record.claim for record in records if record.claim != winners[0])
    answer = StoredResponse(status=201, headers=(("content-type", "application/json"),), body=b"{}")
    store.release("p", "k", loser)  # not the holder: nothing happens
    assert not store.complete("p", "k", loser, answer, now + 3600)
    assert store.complete("p", "k", winners[0], answer, now + 3600)
    assert not store.complete("p", "k", winners[0], answer, now + 3600)  # once
    store.release("p", "k", winners[0])  # a completed key is kept
    kept = store.get("p", "k", now)
    assert kept is not None and kept.response == answer and kept.completed
    assert store.get("other-principal", "k", now) is None


# --- waiting, leases and expiry --------------------------------------------------------------------------
def test_a_key_in_progress_makes_duplicates_wait_then_409_and_a_crashed_holder_expires(
        app: Any, client: TestClient, backend: Any) -> None:
    """A request holding the key (claimed through the service exactly as the API claims it, and never
    finished: a slow or crashed server) makes a duplicate wait, then answer 409 with Retry-After;
    a holder that gives the key back lets the waiting duplicate run; one that crashed stops blocking
    once its lease has run out."""
    clock = Clock()
    service = IdempotencyService(backend.idempotency, wait_s=0.3, lease_s=60, clock=clock)
    app.state.idempotency = service
    token_id = backend.registry.list_tokens()[0].id
    body = {"name": "slow"}
    same_request = fingerprint("POST", "/models", [], token_id, json.dumps(body).encode())
    holder = service.begin(token_id, "held", same_request)
    assert isinstance(holder, Claimed)

    waited = client.post("/models", json=body, headers={KEY_HEADER: "held"})
    assert waited.status_code == 409, waited.text
    assert waited.json()["type"].endswith("/idempotency-key-in-progress") and waited.json()["field"] == KEY_HEADER
    assert 1 <= int(waited.headers["Retry-After"]) <= 5
    assert client.get("/models").json()["items"] == []  # nothing ran

    service.wait_s = 10.0
    threading.Timer(0.2, service.abandon, (token_id, "held", holder.claim)).start()
    ran = client.post("/models", json=body, headers={KEY_HEADER: "held"})  # waits, then runs itself
    assert ran.status_code == 201 and REPLAYED_HEADER not in ran.headers

    crashed = service.begin(token_id, "crashed", same_request)
    assert isinstance(crashed, Claimed)
    assert client.delete("/models/slow").status_code == 204
    clock.now += 61  # the holder's lease ran out: the key is free again
    taken = client.post("/models", json=body, headers={KEY_HEADER: "crashed"})
    assert taken.status_code == 201 and REPLAYED_HEADER not in taken.headers
    late = StoredResponse(status=500, headers=(), body=b"")
    assert not backend.idempotency.complete(token_id, store_key("crashed"), crashed.claim, late, clock.now + 10)
    assert client.post("/models", json=body, headers={KEY_HEADER: "crashed"}).content == taken.content


def test_keys_expire(app: Any, client: TestClient, backend: Any) -> None:
    clock = Clock()
    app.state.idempotency = IdempotencyService(backend.idempotency, ttl_s=3600, clock=clock)
    assert client.post("/models", json={"name": "m"}).status_code == 201
    headers = key()
    first = client.post("/models/m/versions", json=PLAN, headers=headers)
    clock.now += 3599
    assert client.post("/models/m/versions", json=PLAN, headers=headers).content == first.content
    clock.now += 2  # past the key's life: the same key is a new request
    later = client.post("/models/m/versions", json=PLAN, headers=headers)
    assert later.status_code == 201 and later.json()["version"]["version"] == 2
    token_id = backend.registry.list_tokens()[0].id
    assert backend.idempotency.get(token_id, store_key(headers[KEY_HEADER]), clock.now) is not None
    assert backend.idempotency.get(token_id, store_key(headers[KEY_HEADER]), clock.now + 3601) is None


# --- the SDK ------------------------------------------------------------------------------------------
class LosingTransport(httpx.BaseTransport):
    """The network between the SDK and the real app: delivers every request, but loses the answer
    of the first ``lose`` mutating ones (a timeout after the server did the work)."""

    def __init__(self, app_client: TestClient, lose: int):
        self._app = app_client
        self.lose = lose
        self.keys: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        answer = self._app.send(self._app.build_request(request.method, request.url.path,
                                                        params=request.url.params, headers=request.headers,
                                                        content=request.content))
        if request.method != "GET":
            self.keys.append(request.headers.get(KEY_HEADER))
            if self.lose:
                self.lose -= 1
                raise httpx.ReadTimeout("answer lost", request=request)
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)


def test_sdk_retries_reuse_the_key(app: Any, admin_token: str) -> None:
    with TestClient(app, base_url=f"http://{HOST}") as app_client:
        network = LosingTransport(app_client, lose=0)
        with Client(token=admin_token, retry_delay=0.0,
                    http_client=httpx.Client(base_url=f"http://{HOST}", transport=network)) as sdk:
            sdk.create_model("fraud")
            network.lose = 2  # two answers lost in a row: the third attempt gets the first answer
            pending = sdk.create_version("fraud", size=PLAN["size"], sha256=PLAN["sha256"])
            assert pending["version"]["version"] == 1
            assert len(network.keys) == 4 and network.keys[1] == network.keys[2] == network.keys[3]
            assert len(set(network.keys)) == 2  # each call its own key (create_model's, create_version's)
            assert [v["version"] for v in sdk.list_versions("fraud")] == [1]
            network.lose = 1
            # A new call: a new key, a new version.
            sdk.create_version("fraud", size=PLAN["size"], sha256=PLAN["sha256"])
            assert [v["version"] for v in sdk.list_versions("fraud")] == [2, 1]


def test_sdk_without_retries_surfaces_the_lost_answer(app: Any, admin_token: str) -> None:
    from maas.client import MaasClientError

    with TestClient(app, base_url=f"http://{HOST}") as app_client:
        network = LosingTransport(app_client, lose=1)
        with Client(token=admin_token, retries=0,
                    http_client=httpx.Client(base_url=f"http://{HOST}", transport=network)) as sdk, \
                pytest.raises(MaasClientError, match="Timeout"):
            sdk.create_model("fraud")


# --- documented ----------------------------------------------------------------------------------------
def test_openapi_documents_the_header_on_mutating_operations(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, method in (("/models", "post"), ("/models/{name}", "delete"), ("/models/{name}/versions", "post"),
                         ("/models/{name}/versions/{version}/commit", "post"),
                         ("/models/{name}/versions/{version}", "delete"),
                         ("/models/{name}/aliases/{alias}", "put"), ("/models/{name}/aliases/{alias}", "delete"),
                         ("/models/{name}/deployments", "post"), ("/models/{name}/rollback", "post")):
        params = {p["name"]: p for p in spec["paths"][path][method].get("parameters", [])}
        assert params[KEY_HEADER]["in"] == "header" and not params[KEY_HEADER].get("required"), (path, method)
    for path, method in (("/models", "get"), ("/uploads/{upload_id}", "put")):
        names = {p["name"] for p in spec["paths"][path][method].get("parameters", [])}
        assert KEY_HEADER not in names, (path, method)


def test_local_keys_survive_a_restart(settings: Settings, example_bytes: bytes) -> None:
    """An acknowledged answer is durable: a retry after the server restarted still replays it."""
    answers = []
    for _ in range(2):
        with LocalBackend(settings, validator=InProcessValidator(settings)) as local:
            secret, _ = local.ensure_admin_token(None)
            with TestClient(create_app(local, settings), base_url=f"http://{HOST}") as client:
                client.headers["Authorization"] = f"Bearer {secret}"
                answers.append(client.post("/models", json={"name": "m"}, headers={KEY_HEADER: "restart-1"}))
    assert [a.status_code for a in answers] == [201, 201] and answers[0].content == answers[1].content
