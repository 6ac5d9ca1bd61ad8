"""Aliases, deploys, rollbacks and the route they produce, seen through inference results."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.conftest import break_artifact, push, reserve
from tests.functional.test_api_models import assert_problem
from tests.models import scale_model

ONES = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}


def answer(client: TestClient, name: str = "m") -> tuple[str, float]:
    response = client.post(f"/v2/models/{name}/infer", json=ONES)
    assert response.status_code == 200, response.text
    return response.headers["X-Maas-Model-Version"], response.json()["outputs"][0]["data"][0]


def three_versions(client: TestClient) -> None:
    for factor in (1.0, 2.0, 3.0):
        push(client, "m", scale_model(factor), create=factor == 1.0)


def test_aliases(client: TestClient) -> None:
    three_versions(client)
    assert client.put("/models/m/aliases/champion", json={"version": 2}).json()["version"] == 2
    assert client.get("/models/m/aliases/champion").json()["version"] == 2
    assert client.put("/models/m/aliases/champion", json={"version": 3}).json()["version"] == 3
    assert [a["alias"] for a in client.get("/models/m/aliases").json()["items"]] == ["champion"]
    assert client.delete("/models/m/aliases/champion").status_code == 204
    assert_problem(client.get("/models/m/aliases/champion"), 404)
    assert_problem(client.put("/models/m/aliases/champion", json={"version": 9}), 404)
    assert_problem(client.put("/models/m/aliases/Bad!", json={"version": 1}), 422, "alias")
    assert_problem(client.put("/models/m/aliases/latest", json={"version": 1}), 422, "alias")
    assert_problem(client.put("/models/m/aliases/ok", json={"version": "x"}), 422, "version")
    reserve(client, "m")  # v4 stays PENDING
    assert_problem(client.put("/models/m/aliases/ok", json={"version": 4}), 409)
    assert_problem(client.get("/models/nope/aliases"), 404)


def test_deploy_route_and_rollback(client: TestClient) -> None:
    three_versions(client)
    assert_problem(client.post("/v2/models/m/infer", json=ONES), 404)
    first = client.post("/models/m/deployments", json={"version": 1})
    assert first.status_code == 201
    assert first.json()["status"] == "SUCCEEDED" and first.json()["stable_version"] == 1
    assert answer(client) == ("1", 1.0)
    client.put("/models/m/aliases/champion", json={"version": 3})
    assert client.post("/models/m/deployments", json={"version": "champion"}).json()["stable_version"] == 3
    assert answer(client) == ("3", 3.0)
    status = client.get("/models/m").json()
    assert status["route"]["stable_version"] == 3
    assert [e["kind"] for e in status["deployment"]["events"]] == [
        "started", "validated", "smoke_test_passed", "promoted"]  # one event per workflow step
    rolled = client.post("/models/m/rollback")
    assert rolled.status_code == 200 and rolled.json()["stable_version"] == 1
    assert answer(client) == ("1", 1.0)
    history = client.get("/models/m/deployments").json()["items"]
    assert [(d["version"], d["status"]) for d in history] == [(3, "ROLLED_BACK"), (1, "SUCCEEDED")]
    assert history[0]["events"][-1]["kind"] == "rolled_back"
    assert client.get(f"/deployments/{history[0]['id']}").json()["status"] == "ROLLED_BACK"
    assert_problem(client.post("/models/m/rollback"), 409)  # nothing older than version 1
    to = client.post("/models/m/rollback", json={"to_version": 2})
    assert to.status_code == 200 and to.json()["stable_version"] == 2
    assert answer(client) == ("2", 2.0)
    # explicit versions and aliases bypass the route
    assert client.post("/v2/models/m/versions/3/infer", json=ONES).json()["outputs"][0]["data"][0] == 3.0
    assert client.post("/v2/models/m/versions/champion/infer", json=ONES).headers["X-Maas-Model-Version"] == "3"


def test_deploy_errors(client: TestClient) -> None:
    assert_problem(client.post("/models/nope/deployments", json={"version": 1}), 404)
    three_versions(client)
    assert_problem(client.post("/models/m/deployments", json={"version": 9}), 404)
    assert_problem(client.post("/models/m/deployments", json={"version": "nope"}), 404)
    assert_problem(client.post("/models/m/deployments", json={"version": 1, "strategy": "yolo"}), 422, "strategy")
    for bad in ({"canary_percent": 0}, {"canary_percent": 101}, {"linear_step_percent": -1}, {"bake_seconds": -1},
                {"linear_interval_seconds": 86_401}, {"optimize": "maybe"}):
        field = next(iter(bad))
        assert_problem(client.post("/models/m/deployments", json={"version": 1, "strategy": "canary", **bad}), 422,
                       field)
    # no SageMaker target on this server: refused, naming the field
    refused = client.post("/models/m/deployments", json={"version": 1, "target": "sagemaker"})
    assert_problem(refused, 422, "target")
    assert "no SageMaker target" in refused.json()["detail"] and "container pools" in refused.json()["detail"]
    assert_problem(client.post("/models/m/deployments", json={"version": 1, "target": "mars"}), 422, "target")
    assert_problem(client.post("/models/m/deployments", json={}), 422, "version")
    assert_problem(client.post("/models/m/rollback"), 409)
    assert_problem(client.post("/models/m/rollback", json={"to_version": 0}), 422, "to_version")
    assert_problem(client.get("/deployments/" + "0" * 32), 404)
    assert_problem(client.get("/deployments/../../etc"), 404)
    assert client.get("/models/m/deployments").json()["items"] == []


def test_failed_smoke_test_leaves_previous_route(client: TestClient, backend) -> None:  # type: ignore[no-untyped-def]
    three_versions(client)
    client.post("/models/m/deployments", json={"version": 1})
    # corrupt version 2's stored artifact: the deploy's smoke load re-hashes and must refuse it
    break_artifact(backend, client.get("/models/m/versions/2").json())
    failed = client.post("/models/m/deployments", json={"version": 2})
    assert failed.status_code == 500
    assert "sha256" not in failed.json()["detail"].lower() or "/" not in failed.json()["detail"]
    assert answer(client) == ("1", 1.0)
    history = client.get("/models/m/deployments").json()["items"]
    assert history[0]["status"] == "FAILED" and history[0]["events"][-1]["kind"] == "smoke_test_failed"
