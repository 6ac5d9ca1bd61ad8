"""A version's own run limits (``RunLimits``): recorded with the version on both backends, applied to
its requests, never looser than the server's."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from maas.backends.local.registry import SCHEMA_VERSION, SqliteRegistry
from maas.domain import Model
from tests.bombs import corpus
from tests.conftest import push

BOMBS = {bomb.name: bomb for bomb in corpus(outer_length=100)}


def infer(client: TestClient, name: str, inputs: list[dict[str, Any]]) -> Any:
    return client.post(f"/v2/models/{name}/infer", json={"inputs": inputs})


def test_a_versions_deadline_stops_its_runs_sooner_than_the_servers(client: TestClient) -> None:
    loop = BOMBS["loop"]
    version = push(client, "loop", loop.model, limits={"max_inference_seconds": 0.3})
    assert version["status"] == "READY" and version["limits"] == {"max_inference_seconds": 0.3,
                                                                  "max_output_bytes": None}
    assert client.get("/models/loop/versions/1").json()["limits"]["max_inference_seconds"] == 0.3
    assert client.post("/models/loop/deployments", json={"version": 1}).status_code == 201
    assert infer(client, "loop", loop.harmless).status_code == 200
    stopped = infer(client, "loop", loop.hostile)
    assert stopped.status_code == 504, stopped.text
    assert "0.3 s (this version's max_inference_seconds)" in stopped.json()["detail"]


def test_a_versions_output_cap_refuses_answers_the_server_would_send(client: TestClient) -> None:
    outer = BOMBS["outer_product"]  # 100 inputs: 40,000 bytes of output
    push(client, "outer", outer.model, limits={"max_output_bytes": 1024})
    assert client.post("/models/outer/deployments", json={"version": 1}).status_code == 201
    assert infer(client, "outer", outer.harmless).status_code == 200  # 16 bytes
    refused = infer(client, "outer", outer.hostile)
    assert refused.status_code == 422, refused.text
    assert "1024-byte limit (this version's max_output_bytes)" in refused.json()["detail"]


@pytest.mark.parametrize(("limits", "field"), [
    ({"max_inference_seconds": 31}, "limits.max_inference_seconds"),
    ({"max_output_bytes": 65 * 1024 * 1024}, "limits.max_output_bytes"),
])
def test_limits_looser_than_the_servers_are_refused_and_nothing_is_reserved(
        client: TestClient, limits: dict[str, Any], field: str) -> None:
    assert client.post("/models", json={"name": "loose"}).status_code == 201
    refused = client.post("/models/loose/versions", json={"size": 10, "sha256": "0" * 64, "limits": limits})
    assert refused.status_code == 422 and refused.json()["field"] == field, refused.text
    assert "only be tighter than the server's" in refused.json()["detail"]
    assert client.get("/models/loose/versions").json()["items"] == []


@pytest.mark.parametrize("limits", [{"max_memory_bytes": 1}, {"max_inference_seconds": 0}, {"max_output_bytes": -1}])
def test_unknown_or_impossible_limits_are_a_422(client: TestClient, limits: dict[str, Any]) -> None:
    assert client.post("/models", json={"name": "odd"}).status_code == 201
    refused = client.post("/models/odd/versions", json={"size": 10, "sha256": "0" * 64, "limits": limits})
    assert refused.status_code == 422, refused.text
    assert client.get("/models/odd/versions").json()["items"] == []


def test_a_registry_written_before_run_limits_opens_with_its_versions_intact(tmp_path: Path) -> None:
    """Schema 1 had no ``limits`` column: opening it adds the column and keeps every record."""
    path = tmp_path / "registry.db"
    fresh = SqliteRegistry(path)
    fresh.create_model(Model(name="old"))
    fresh.allocate_version("old", created_by="me", upload_id="u1", description="before")
    fresh.close()
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE versions DROP COLUMN limits")  # as schema 1 wrote it
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    reopened = SqliteRegistry(path)
    try:
        version = reopened.get_version("old", 1)
        assert version.description == "before" and version.limits is None
    finally:
        reopened.close()
    check = sqlite3.connect(path)
    try:
        assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert "limits" in {row[1] for row in check.execute("PRAGMA table_info(versions)")}
    finally:
        check.close()
