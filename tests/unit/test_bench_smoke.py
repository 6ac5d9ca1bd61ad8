"""A tiny run of the bench (bench/) so it cannot rot: shapes and correctness only, never speed.

Uses the ``tiny`` onnx.helper model (no scikit-learn needed), fractions of a second per point.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import http_bench, report
from bench.models import generate

FIELDS = {"system", "model", "scenario", "metric", "value", "unit", "outputs_match"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate(["tiny"], tmp_path_factory.mktemp("bench-models"))


def check_rows(rows: list[dict[str, object]], system: str) -> None:
    assert rows
    for row in rows:
        assert set(row) >= FIELDS, row
        assert row["system"] == system and row["model"] == "tiny"
        assert row["outputs_match"] is True, row
        assert isinstance(row["value"], float) and row["value"] > 0, row


def test_in_process_parts(tiny: dict[str, Path]) -> None:
    check_rows(http_bench.bench_raw("tiny", tiny["tiny"], duration=0.1, warmup=0.02), "raw-ort")
    check_rows(http_bench.bench_engine("tiny", tiny["tiny"], duration=0.1, warmup=0.02), "maas-engine")


def test_bare_asgi_over_http_and_report(tiny: dict[str, Path], tmp_path: Path) -> None:
    results = http_bench.run(tiny, rounds=1, systems=("raw", "bare"), duration=0.5, log=lambda _: None)
    http_rows = [r for r in results if r["system"] == "bare-asgi"]
    check_rows([r for r in http_rows if r["metric"] != "errors"], "bare-asgi")
    assert {r["scenario"] for r in http_rows} == {"c1", "c8", "c32"}
    assert not [r for r in http_rows if r["metric"] == "errors"]
    json_path, md_path = report.write(results, tmp_path)
    assert json_path.exists() and "| tiny | c32 | rps | bare-asgi |" in md_path.read_text()


def test_maas_serve_json_and_binary_over_http(tiny: dict[str, Path]) -> None:
    """``maas serve`` pushed and deployed through the SDK, loaded with JSON and with the binary tensor
    extension: every point answers raw onnxruntime's outputs, without errors."""
    results = http_bench.run(tiny, rounds=1, systems=("maas",), duration=0.3, log=lambda _: None)
    check_rows([r for r in results if r["metric"] != "errors"], "maas-serve")
    assert {r["scenario"] for r in results} == {"c1", "c8", "c32", "c1 binary", "c8 binary", "c32 binary"}
    assert not [r for r in results if r["metric"] == "errors"]
