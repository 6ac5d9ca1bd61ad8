"""`maas models optimize` and `maas models push --optimize` against a real `maas serve` (CLI in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.models import mlp_model, quantizable_model, scale_model

pytestmark = pytest.mark.e2e


def test_models_optimize(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model_file = tmp_path / "mlp.onnx"
    model_file.write_bytes(quantizable_model())
    run("models", "push", "cli-opt", str(model_file))
    printed = run("models", "optimize", "cli-opt", "1", "--tolerance", "0.05")
    assert "version 1 optimized into version 2" in printed and "s7 weights" in printed
    assert "as fast (99%:" in printed
    assert "size" in printed and "KiB" in printed and "p50 latency" in printed and " ms" in printed
    assert "max abs diff" in printed and "tolerance 0.05" in printed
    assert "maas deploy cli-opt 2" in printed
    again = json.loads(run("--json", "models", "optimize", "cli-opt", "1"))
    assert again["version"]["version"] == 2 and again["version"]["parent_version"] == 1
    assert again["report"]["reused"] is True
    assert "already optimized as version 2" in run("models", "optimize", "cli-opt", "1")
    rejected = run("models", "optimize", "cli-opt", "1", "--tolerance", "0", code=1)
    assert "Model rejected" in rejected and "over the tolerance of 0" in rejected  # the existing v2 is measured
    run("models", "optimize", "cli-opt", "1", "--tolerance", "5", code=2)  # out of range: usage error
    run("models", "optimize", "cli-opt", "1", "--goal", "speed", code=2)  # not a goal: usage error
    assert "version 1 already optimized as version 2" in run("models", "optimize", "cli-opt", "1", "--goal", "size")


def test_optimize_refuses_a_derivative_that_is_not_smaller(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model_file = tmp_path / "tiny.onnx"
    model_file.write_bytes(mlp_model(dims=(4, 8, 3)))  # iris-sized: int8 adds more graph than it saves
    run("models", "push", "cli-tiny", str(model_file))
    refused = run("models", "optimize", "cli-tiny", "1", code=1)
    assert "Model rejected" in refused and "not smaller than its parent" in refused
    listed = json.loads(run("--json", "versions", "cli-tiny"))
    items = listed["items"] if isinstance(listed, dict) else listed
    assert [item["version"] for item in items] == [1]  # nothing was registered


def test_push_with_optimize(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model_file = tmp_path / "mlp.onnx"
    model_file.write_bytes(quantizable_model(seed=1))
    printed = run("models", "push", "cli-pushopt", str(model_file), "--optimize")
    assert "cli-pushopt version 1: READY" in printed
    assert "version 1 optimized into version 2" in printed and "maas deploy cli-pushopt 2" in printed
    both = json.loads(run("--json", "models", "push", "cli-pushopt", str(model_file), "--optimize",
                          "--tolerance", "0.1", "--goal", "size"))
    assert both["pushed"]["version"] == 3
    assert both["optimized"]["version"]["version"] == 4 and both["optimized"]["version"]["parent_version"] == 3
    assert both["optimized"]["report"]["derived_bytes"] < both["optimized"]["report"]["parent_bytes"]
    assert both["optimized"]["report"]["goal"] == "size"
    # Nothing to quantize: the push stands, the command says why optimizing failed and exits 1.
    plain = tmp_path / "scale.onnx"
    plain.write_bytes(scale_model(2.0))
    failed = run("models", "push", "cli-pushopt", str(plain), "--optimize", code=1)
    assert "version 5 was pushed, but optimizing it failed" in failed and "nothing to quantize" in failed
