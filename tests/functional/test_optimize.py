"""``POST /models/{name}/versions/{version}/optimize``: int8 derivatives with lineage, on both backends."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from maas.domain import VersionStatus
from maas.services.invariants import check_invariants
from maas.services.pagination import all_versions
from maas.services.serving import artifact_reader
from maas.services.tokens import TokenService
from tests.conftest import push
from tests.models import mlp_model, quantizable_model, scale_model, wide_matmul_model

PROBLEM = "application/problem+json"


def _versions(backend: Any, name: str) -> list[Any]:
    return sorted(all_versions(backend.registry, name), key=lambda version: version.version)


def _outputs(data: bytes, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return [np.asarray(value) for value in session.run(None, {"x": x})]


def test_optimize_registers_a_smaller_derived_version_within_tolerance(client: TestClient, backend: Any) -> None:
    parent = push(client, "mlp", quantizable_model(), limits={"max_inference_seconds": 5})
    assert parent["status"] == "READY"
    answer = client.post("/models/mlp/versions/1/optimize", json={"tolerance": 0.05})
    assert answer.status_code == 201, answer.text
    derived, report = answer.json()["version"], answer.json()["report"]
    assert derived["version"] == 2 and derived["status"] == "READY"
    assert derived["parent_version"] == 1
    assert derived["description"].startswith(f"int8 dynamic quantization of v1 ({report['scheme']} weights, ")
    assert derived["signature"] == parent["signature"]
    assert derived["limits"] == parent["limits"] == {"max_inference_seconds": 5.0, "max_output_bytes": None}
    assert derived["created_by"] == "admin"
    # int8 weights: a quarter of the float32 bytes, plus the graph
    assert derived["size"] < parent["size"]
    assert report["derived_bytes"] == derived["size"] < report["parent_bytes"] == parent["size"]
    assert report["reused"] is False and report["method"] == "int8-dynamic"
    assert report["scheme"] == "s7" and report["goal"] == "latency"  # the fastest scheme, accurate enough here
    assert [(c["check"], c["passed"]) for c in report["checks"]] == [
        ("portability", True), ("size", True), ("accuracy", True), ("latency", True)]
    assert report["speedup_interval"][0] > 1  # what goal latency demands
    assert report["parent_version"] == 1 and report["version"] == 2
    assert report["parent_p50_ms"] > 0 and report["derived_p50_ms"] > 0  # measured, not compared
    assert report["tolerance"] == 0.05
    assert 0 < report["max_rel_diff"] <= 0.05
    assert report["compared"] == ["y", "label"]
    assert client.get("/models/mlp/versions/2").json()["parent_version"] == 1

    # Fresh inputs (another seed than the check used): the stored derivative answers like its parent.
    stored = backend.registry.get_version("mlp", 2)
    read = artifact_reader(backend.artifacts)
    parent_bytes, derived_bytes = read(backend.registry.get_version("mlp", 1)), read(stored)
    x = np.random.default_rng(1234).standard_normal((32, 256)).astype(np.float32)
    (p_y, p_label), (d_y, d_label) = _outputs(parent_bytes, x), _outputs(derived_bytes, x)
    assert float(np.max(np.abs(p_y - d_y))) / max(1.0, float(np.max(np.abs(p_y)))) <= 0.05
    assert np.mean(p_label == d_label) >= 0.9

    # And it is served like any version.
    inferred = client.post("/v2/models/mlp/versions/2/infer", json={"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 256], "data": x[0].tolist()}]})
    assert inferred.status_code == 200, inferred.text
    assert check_invariants(backend.registry, backend.artifacts) == []


def test_optimize_is_idempotent(client: TestClient, backend: Any) -> None:
    push(client, "idem", quantizable_model(seed=4))
    first = client.post("/models/idem/versions/1/optimize", json={})
    assert first.status_code == 201, first.text
    again = client.post("/models/idem/versions/1/optimize")  # no body: default tolerance
    assert again.status_code == 200, again.text
    assert again.json()["version"]["version"] == first.json()["version"]["version"] == 2
    assert again.json()["report"]["reused"] is True
    # A reused derivative is measured again, not taken on trust.
    assert again.json()["report"]["scheme"] == first.json()["report"]["scheme"]
    assert again.json()["report"]["timing_pairs"] >= 8
    # An alias naming the parent finds the same derivative.
    assert client.put("/models/idem/aliases/champion", json={"version": 1}).status_code == 200
    assert client.post("/models/idem/versions/champion/optimize").json()["version"]["version"] == 2
    assert [v.version for v in _versions(backend, "idem")] == [1, 2]
    # The derivative itself is not quantized again.
    twice = client.post("/models/idem/versions/2/optimize")
    assert twice.status_code == 422 and twice.json()["field"] == "version", twice.text
    # A stricter tolerance than the derivative was measured at is refused, not silently reused.
    strict = client.post("/models/idem/versions/1/optimize", json={"tolerance": 1e-9})
    assert strict.status_code == 422, strict.text
    assert strict.json()["check"] == "accuracy" and strict.json()["output"] == "y"
    assert [v.version for v in _versions(backend, "idem")] == [1, 2]


def test_a_tolerance_of_zero_is_rejected_and_leaves_no_version(client: TestClient, backend: Any) -> None:
    push(client, "strict", quantizable_model(seed=5))
    rejected = client.post("/models/strict/versions/1/optimize", json={"tolerance": 0})
    assert rejected.status_code == 422, rejected.text
    assert rejected.headers["content-type"].startswith(PROBLEM)
    body = rejected.json()
    assert body["title"] == "Model rejected"
    assert "'y'" in body["detail"] and "tolerance of 0" in body["detail"], body
    assert body["output"] == "y" and body["check"] == "accuracy"
    assert body["report"]["tolerance"] == 0 and len(body["report"]["checks"]) == 9  # every scheme tried
    assert [v.version for v in _versions(backend, "strict")] == [1]
    assert backend.registry.list_versions_by_status(VersionStatus.PENDING.value) == []
    assert backend.registry.list_versions_by_status(VersionStatus.FAILED.value) == []
    assert check_invariants(backend.registry, backend.artifacts) == []
    # The same version optimizes fine at a sane tolerance afterwards.
    assert client.post("/models/strict/versions/1/optimize").status_code == 201


def test_invalid_requests(client: TestClient, backend: Any) -> None:
    push(client, "bad", mlp_model(dims=(8, 16, 3), seed=7))
    for tolerance in (-0.1, 2, "lots"):
        answer = client.post("/models/bad/versions/1/optimize", json={"tolerance": tolerance})
        assert answer.status_code == 422 and answer.json()["field"] == "tolerance", answer.text
    surprise = client.post("/models/bad/versions/1/optimize", json={"tolerance": 0.1, "bits": 4})
    assert surprise.status_code == 422 and surprise.json()["field"] == "bits"
    goal = client.post("/models/bad/versions/1/optimize", json={"goal": "speed"})
    assert goal.status_code == 422 and goal.json()["field"] == "goal", goal.text
    assert client.post("/models/bad/versions/9/optimize").status_code == 404
    assert client.post("/models/missing/versions/1/optimize").status_code == 404
    assert client.post("/models/bad/versions/nope/optimize").status_code == 404  # unknown alias
    assert [v.version for v in _versions(backend, "bad")] == [1]


def test_a_model_with_nothing_to_quantize_gets_a_clear_422(client: TestClient, backend: Any) -> None:
    push(client, "scale", scale_model(2.0))  # a single Mul: no MatMul or Gemm weights
    answer = client.post("/models/scale/versions/1/optimize")
    assert answer.status_code == 422, answer.text
    assert "nothing to quantize" in answer.json()["detail"]
    assert answer.json()["field"] == "version"
    assert [v.version for v in _versions(backend, "scale")] == [1]


def test_optimize_needs_the_deploy_scope(client: TestClient, app: Any, backend: Any) -> None:
    push(client, "auth", quantizable_model(seed=11))
    tokens = TokenService(backend.registry)
    _, invoke = tokens.create("app", ["invoke"], created_by="test")
    _, other_model = tokens.create("other", ["deploy"], model="elsewhere", created_by="test")
    with TestClient(app, base_url="http://127.0.0.1") as anonymous:
        assert anonymous.post("/models/auth/versions/1/optimize").status_code == 401
        for secret in (invoke, other_model):
            answer = anonymous.post("/models/auth/versions/1/optimize",
                                    headers={"Authorization": f"Bearer {secret}"})
            assert answer.status_code == 403, answer.text
        _, deployer = tokens.create("ci", ["deploy"], model="auth", created_by="test")
        answer = anonymous.post("/models/auth/versions/1/optimize", headers={"Authorization": f"Bearer {deployer}"})
        assert answer.status_code == 201, answer.text
        assert answer.json()["version"]["created_by"] == "ci"
    assert [v.version for v in _versions(backend, "auth")] == [1, 2]


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_failure_after_the_version_is_reserved_aborts_it(client: TestClient, backend: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    push(client, "crash", quantizable_model(seed=13))

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(backend.artifacts, "promote", refuse)
    with pytest.raises(OSError):
        client.post("/models/crash/versions/1/optimize")
    versions = _versions(backend, "crash")
    assert [(v.version, v.status) for v in versions] == [(1, VersionStatus.READY), (2, VersionStatus.FAILED)]
    assert versions[1].parent_version == 1
    assert backend.registry.list_versions_by_status(VersionStatus.PENDING.value) == []
    assert list(backend.artifacts.list_uploads()) == []
    assert check_invariants(backend.registry, backend.artifacts) == []
    monkeypatch.undo()
    # A FAILED attempt is not a derivative: the retry registers one.
    retried = client.post("/models/crash/versions/1/optimize")
    assert retried.status_code == 201 and retried.json()["version"]["version"] == 3


@pytest.mark.parametrize(("model", "check", "said"), [
    (mlp_model(dims=(8, 16, 3), seed=11), "size", "is not smaller than its parent"),
    (wide_matmul_model(), "latency", "is not faster than its parent"),
], ids=["larger", "slower"])
def test_a_derivative_larger_or_slower_than_its_parent_is_refused(client: TestClient, backend: Any, model: bytes,
                                                                  check: str, said: str) -> None:
    push(client, "worse", model)
    answer = client.post("/models/worse/versions/1/optimize")
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM)
    body = answer.json()
    assert body["title"] == "Model rejected" and body["check"] == check and said in body["detail"], body
    assert body["report"]["parent_bytes"] == _versions(backend, "worse")[0].size
    # Nothing is registered, nothing is left behind.
    assert [v.version for v in _versions(backend, "worse")] == [1]
    assert backend.registry.list_versions_by_status(VersionStatus.PENDING.value) == []
    assert check_invariants(backend.registry, backend.artifacts) == []


def test_goal_size_keeps_a_smaller_derivative_that_is_not_slower(client: TestClient) -> None:
    push(client, "small", quantizable_model(seed=8))
    answer = client.post("/models/small/versions/1/optimize", json={"goal": "size"})
    assert answer.status_code == 201, answer.text
    report = answer.json()["report"]
    assert report["goal"] == "size" and report["speedup_interval"][1] >= 1
    slower = client.post("/models/small/versions/1/optimize", json={"goal": "size"})
    assert slower.status_code == 200 and slower.json()["report"]["reused"] is True


def test_a_derivative_from_before_the_portable_schemes_is_not_reused(client: TestClient, app: Any,
                                                                    backend: Any) -> None:
    """Versions quantized with full-range int8 weights (no scheme in their description) may answer
    differently on CPUs without VNNI: optimizing their parent makes a portable derivative instead."""
    import hashlib
    import io

    from maas.domain import UploadPlan
    from maas.inference.quantization import FULL_RANGE_INT8, quantize_weights

    push(client, "legacy", quantizable_model(seed=8))
    old = quantize_weights(artifact_reader(backend.artifacts)(backend.registry.get_version("legacy", 1)),
                           FULL_RANGE_INT8)
    # Registered as an earlier maas did: lineage and a description without a scheme.
    models = app.state.services.models
    sha256 = hashlib.sha256(old).hexdigest()
    pending = models.begin_version("legacy", created_by="old-maas", parent_version=1,
                                   description="int8 dynamic quantization of v1 (max relative diff 0.01, "
                                               "tolerance 0.05)", plan=UploadPlan(size=len(old), sha256=sha256))
    backend.artifacts.receive_upload(pending.upload.upload_id, io.BytesIO(old), len(old))
    assert models.commit_version("legacy", 2, sha256=sha256, size=len(old)).status is VersionStatus.READY
    answer = client.post("/models/legacy/versions/1/optimize")
    assert answer.status_code == 201, answer.text
    assert answer.json()["version"]["version"] == 3 and answer.json()["report"]["reused"] is False
    assert answer.json()["version"]["description"].startswith("int8 dynamic quantization of v1 (s7 weights")
