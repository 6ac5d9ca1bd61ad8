"""Management API: every route's happy path and its errors, through the real app and local backend."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient

from tests.conftest import push, reserve
from tests.models import scale_model

PROBLEM = "application/problem+json"


def assert_problem(response, status: int, field: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert body["status"] == status
    if field is not None:
        assert body.get("field") == field, body
    return body


def test_create_list_show_delete_model(client: TestClient) -> None:
    created = client.post("/models", json={"name": "fraud", "description": "card fraud", "tags": {"team": "risk"}})
    assert created.status_code == 201
    assert created.json()["name"] == "fraud"
    assert created.json()["tags"] == {"team": "risk"}
    assert [m["name"] for m in client.get("/models").json()["items"]] == ["fraud"]
    shown = client.get("/models/fraud").json()
    assert shown["model"]["description"] == "card fraud"
    assert shown["latest_version"] is None and shown["route"] is None and shown["deployment"] is None
    assert client.delete("/models/fraud").status_code == 204
    assert_problem(client.get("/models/fraud"), 404)


def test_model_errors(client: TestClient) -> None:
    assert client.post("/models", json={"name": "dup"}).status_code == 201
    assert_problem(client.post("/models", json={"name": "dup"}), 409)
    assert_problem(client.post("/models", json={"name": "Bad_Name"}), 422, "name")
    assert_problem(client.post("/models", json={}), 422, "name")
    assert_problem(client.post("/models", json={"name": "ok", "surprise": 1}), 422, "surprise")
    assert_problem(client.post("/models", json={"name": "ok", "tags": {"bad key!": "v"}}), 422)
    assert_problem(client.get("/models/missing"), 404)
    assert_problem(client.get("/models/UPPER"), 422, "name")
    assert_problem(client.delete("/models/missing"), 404)
    assert_problem(client.get("/models", params={"limit": 0}), 422, "limit")
    assert_problem(client.get("/models", params={"cursor": "!!!"}), 422, "cursor")
    assert_problem(client.post("/models", content=b"not json", headers={"Content-Type": "application/json"}), 422)


def test_models_are_paginated(client: TestClient) -> None:
    names = [f"m{i:02d}" for i in range(7)]
    for name in names:
        assert client.post("/models", json={"name": name}).status_code == 201
    seen, cursor = [], None
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = client.get("/models", params=params).json()
        seen += [m["name"] for m in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == names


def test_push_creates_ready_version_with_signature(client: TestClient, example_bytes: bytes) -> None:
    version = push(client, "iris", example_bytes)
    assert version["status"] == "READY"
    assert version["version"] == 1
    assert version["sha256"] == hashlib.sha256(example_bytes).hexdigest()
    assert version["size"] == len(example_bytes)
    signature = version["signature"]
    assert signature["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    assert [o["name"] for o in signature["outputs"]] == ["probabilities", "label"]
    assert client.get("/models/iris/versions/1").json()["status"] == "READY"
    listed = client.get("/models/iris/versions").json()["items"]
    assert [v["version"] for v in listed] == [1]
    assert push(client, "iris", example_bytes, create=False)["version"] == 2
    assert [v["version"] for v in client.get("/models/iris/versions").json()["items"]] == [2, 1]
    assert client.get("/models/iris").json()["latest_version"] == 2


def test_commit_is_idempotent_and_checks_checksum(client: TestClient, example_bytes: bytes) -> None:
    client.post("/models", json={"name": "iris"})
    url, number = reserve(client, "iris", example_bytes)
    assert client.get(f"/models/iris/versions/{number}").json()["status"] == "PENDING"
    commit = {"sha256": hashlib.sha256(example_bytes).hexdigest(), "size": len(example_bytes)}
    assert_problem(client.post(f"/models/iris/versions/{number}/commit", json=commit), 409)  # nothing uploaded
    assert client.put(url, content=example_bytes, headers={"Content-Type": "application/octet-stream"}
                      ).status_code == 200
    assert_problem(client.post(f"/models/iris/versions/{number}/commit",
                               json={**commit, "size": commit["size"] + 1}), 422, "size")
    assert_problem(client.post(f"/models/iris/versions/{number}/commit",
                               json={**commit, "sha256": "0" * 64}), 422, "sha256")
    assert client.get(f"/models/iris/versions/{number}").json()["status"] == "PENDING"
    first = client.post(f"/models/iris/versions/{number}/commit", json=commit)
    again = client.post(f"/models/iris/versions/{number}/commit", json=commit)
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    assert_problem(client.post(f"/models/iris/versions/{number}/commit", json={"sha256": "xyz", "size": 1}),
                   422, "sha256")


def test_rejected_model_marks_version_failed(client: TestClient) -> None:
    bad = b"\x80\x04\x95" + b"pickle payload" * 10
    client.post("/models", json={"name": "evil"})
    url, number = reserve(client, "evil", bad)
    client.put(url, content=bad, headers={"Content-Type": "application/octet-stream"})
    committed = client.post(f"/models/evil/versions/{number}/commit",
                            json={"sha256": hashlib.sha256(bad).hexdigest(), "size": len(bad)})
    body = assert_problem(committed, 422)
    assert "pickle" in body["detail"].lower()
    version = client.get("/models/evil/versions/1").json()
    assert version["status"] == "FAILED" and "pickle" in version["status_reason"].lower()
    assert version["sha256"] is None
    assert_problem(client.post("/models/evil/deployments", json={"version": 1}), 409)


def test_version_errors(client: TestClient, example_bytes: bytes) -> None:
    assert_problem(client.post("/models/nope/versions", json={}), 404)
    push(client, "iris", example_bytes)
    assert_problem(client.get("/models/iris/versions/9"), 404)
    assert_problem(client.get("/models/iris/versions/0"), 422, "version")
    assert_problem(client.get("/models/iris/versions/abc"), 422, "version")
    assert_problem(client.post("/models/iris/versions/9/commit", json={"sha256": "0" * 64, "size": 1}), 404)
    assert_problem(client.delete("/models/iris/versions/9"), 404)


def test_uploads_reject_wrong_ids_types_and_sizes(client: TestClient, settings) -> None:  # type: ignore[no-untyped-def]
    octet = {"Content-Type": "application/octet-stream"}
    assert_problem(client.put("/uploads/" + "a" * 32, content=b"x", headers=octet), 404)
    assert_problem(client.put("/uploads/not-an-upload-id", content=b"x", headers=octet), 422, "upload_id")
    assert client.put("/uploads/..%2f..%2fetc", content=b"x", headers=octet).status_code in (404, 422)
    client.post("/models", json={"name": "m"})
    url, _ = reserve(client, "m")
    assert_problem(client.put(url, content=b"x", headers={"Content-Type": "text/plain"}), 415)


def test_delete_version_guarded_by_alias_and_deployment(client: TestClient) -> None:
    push(client, "m", scale_model(1.0))
    push(client, "m", scale_model(2.0), create=False)
    push(client, "m", scale_model(3.0), create=False)
    assert client.put("/models/m/aliases/champion", json={"version": 1}).status_code == 200
    assert client.post("/models/m/deployments", json={"version": 2}).status_code == 201
    assert_problem(client.delete("/models/m/versions/1"), 409)
    assert_problem(client.delete("/models/m/versions/2"), 409)
    assert client.delete("/models/m/versions/3").status_code == 204
    assert_problem(client.get("/models/m/versions/3"), 404)
    # numbers are never reused
    assert push(client, "m", scale_model(4.0), create=False)["version"] == 4


def test_delete_deployed_model_needs_force(client: TestClient) -> None:
    push(client, "m", scale_model(1.0))
    client.post("/models/m/deployments", json={"version": 1})
    assert_problem(client.delete("/models/m"), 409, "force")
    assert client.delete("/models/m", params={"force": "true"}).status_code == 204
    assert client.get("/models").json()["items"] == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_mutations_refuse_non_json(client: TestClient, content_type: str) -> None:
    response = client.post("/models", content=b'{"name": "x"}', headers={"Content-Type": content_type})
    assert_problem(response, 415)
    assert client.get("/models").json()["items"] == []


def test_foreign_origin_is_refused(client: TestClient) -> None:
    response = client.post("/models", json={"name": "x"}, headers={"Origin": "https://evil.example"})
    assert_problem(response, 403)
    same = client.post("/models", json={"name": "x"}, headers={"Origin": "http://127.0.0.1"})
    assert same.status_code == 201
    assert "access-control-allow-origin" not in same.headers


def test_oversize_body_is_413(client: TestClient, settings) -> None:  # type: ignore[no-untyped-def]
    big = b"{" + b" " * (settings.limits.max_request_bytes + 1) + b"}"
    assert_problem(client.post("/models", content=big, headers={"Content-Type": "application/json"}), 413)


def test_unknown_route_and_method_are_problems(client: TestClient) -> None:
    assert_problem(client.get("/nope"), 404)
    assert_problem(client.patch("/models", json={}), 405)


def test_openapi_and_docs_are_served(client: TestClient) -> None:
    docs = client.get("/docs", headers={"Authorization": ""})
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = client.get("/openapi.json").json()
    assert spec["info"]["title"] == "maas"
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert "/v2/models/{name}/infer" in spec["paths"]


def test_streamed_body_without_length_is_capped(client: TestClient, settings) -> None:  # type: ignore[no-untyped-def]
    chunk = b" " * 65536
    chunks = (settings.limits.max_request_bytes // len(chunk)) + 2

    def body():  # type: ignore[no-untyped-def]
        yield b'{"name": "streamed"'
        for _ in range(chunks):
            yield chunk
        yield b"}"

    response = client.post("/models", content=body(), headers={"Content-Type": "application/json"})
    assert_problem(response, 413)
    assert client.get("/models").json()["items"] == []
    assert_problem(client.post("/models", content=b"{}", headers={"Content-Type": "application/json",
                                                                   "Content-Length": "x"}), 400)
