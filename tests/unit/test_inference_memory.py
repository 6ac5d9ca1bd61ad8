"""Inference memory is bounded and given back: the bomb corpus through the real engine, in a process of
its own with a 256 MiB arena (``tests/memory_probe.py``), and the cap's defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from maas.inference.memory import (
    LAMBDA_RESERVE_MB,
    MIN_INFERENCE_MEMORY_BYTES,
    allocation_request,
    default_inference_memory_bytes,
)

MIB = 1024 * 1024
CAP_MIB = 256
#: resident memory a bounded case may leave behind (Python objects, numpy's and onnxruntime's caches)
SLACK = 48 * MIB
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def probe() -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "tests.memory_probe", str(CAP_MIB)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def grew(case: dict[str, Any]) -> int:
    return int(case["rss_after"]) - int(case["rss_before"])


@pytest.mark.parametrize("name", ["constant_of_shape", "expand", "tile", "range"])
def test_an_allocation_bomb_is_refused_at_the_cap_and_the_model_serves_on(probe: dict[str, Any], name: str) -> None:
    bomb = probe["bombs"][name]
    assert bomb["harmless"]["status"] == 200
    hostile = bomb["hostile"]
    assert (hostile["status"], hostile["type"]) == (422, "memory-limit-exceeded"), hostile
    assert "inference_memory_bytes" in hostile["detail"] and str(CAP_MIB * MIB) in hostile["detail"]
    assert grew(hostile) < SLACK  # refused before the memory was touched
    assert bomb["again"]["status"] == 200 and bomb["again"]["y"] == bomb["harmless"]["y"]
    assert probe["errors"][name.replace("_", "-")] == 0  # the caller's input, not the version's fault


def test_an_input_driven_loop_is_stopped_at_its_deadline_while_other_runs_are_answered(probe: dict[str, Any]) -> None:
    loop = probe["bombs"]["loop"]
    assert (loop["hostile"]["status"], loop["hostile"]["type"]) == (504, "inference-timeout")
    assert "max_inference_seconds" in loop["hostile"]["detail"]
    assert loop["again"]["status"] == 200
    meanwhile = probe["loop_meanwhile"]
    assert meanwhile["status"] == 504
    waits = probe["other_waits"]
    # another model, called every 10 ms from another thread during the 2 s loop, never waited for it
    assert waits["count"] >= 5 and waits["max"] < 1.0, waits


def test_an_outer_product_bomb_is_refused_by_output_size_and_its_memory_given_back(probe: dict[str, Any]) -> None:
    bomb = probe["bombs"]["outer_product"]
    assert (bomb["hostile"]["status"], bomb["hostile"]["type"]) == (422, "output-too-large")
    assert grew(bomb["hostile"]) < SLACK
    assert bomb["again"]["status"] == 200


def test_a_large_run_under_the_cap_is_answered_and_its_memory_returned(probe: dict[str, Any]) -> None:
    case = probe["under_cap"]
    assert case["status"] == 200 and case["y"] == (CAP_MIB // 2) * MIB // 4
    assert grew(case) < SLACK  # it touched 128 MiB


def test_copies_of_one_model_each_run_large_once_hold_nothing_afterwards(probe: dict[str, Any]) -> None:
    copies = probe["copies"]
    assert [case["status"] for case in copies] == [200] * 5
    assert copies[-1]["rss_after"] - copies[0]["rss_before"] < SLACK  # five runs of 128 MiB each


def test_the_whole_cap_stays_usable_after_repeated_large_runs(probe: dict[str, Any]) -> None:
    """onnxruntime's memory patterns once kept a block counted against the cap after each shape's
    second run: three runs of 40% of the cap left a run of 80% refused for good."""
    assert [case["status"] for case in probe["repeated"]] == [200] * 4, probe["repeated"]


def test_memory_held_by_other_runs_is_a_503_not_the_versions_fault(probe: dict[str, Any]) -> None:
    busy = probe["busy"]
    assert (busy["status"], busy["type"]) == (503, "inference-memory-busy"), busy
    assert "retry" in busy["detail"] and "inference_memory_bytes" in busy["detail"]
    assert probe["errors"]["big-run"] == 0
    assert probe["after_busy"]["status"] == 200  # once the other output is released, the same input fits


def test_the_session_cache_counts_what_a_session_holds_not_its_artifact_bytes(probe: dict[str, Any]) -> None:
    assert probe["folded"]["status"] == 200
    assert probe["folded_bytes"] < 1024
    # its session holds a 64 MiB folded constant: that is its cost in the cache
    assert probe["folded_cost"] > (CAP_MIB // 4) * MIB * 0.9, probe["folded_cost"]
    assert probe["cache"]["bytes"] <= probe["cache"]["max_bytes"]


def test_allocation_failures_are_recognised_with_their_size() -> None:
    assert allocation_request(RuntimeError(
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running "
        "ConstantOfShape node. Status Message: bfc_arena.cc:360 AllocateRawInternal Available memory of "
        "1347483392 is smaller than requested bytes of 4000000000")) == 4_000_000_000
    assert allocation_request(RuntimeError("Failed to allocate memory for requested buffer of size 1024")) == 1024
    assert allocation_request(RuntimeError("Failed to allocate memory")) == 0
    assert allocation_request(RuntimeError("indices element out of data bounds, idx=9")) is None


def test_the_cap_defaults_to_half_the_lambdas_memory_less_its_reserve(monkeypatch: pytest.MonkeyPatch) -> None:
    """The other half is the session cache's (weights are not allocated from the arena)."""
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "3008")
    assert default_inference_memory_bytes() == (3008 - LAMBDA_RESERVE_MB) * MIB // 2
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
    assert default_inference_memory_bytes() == MIN_INFERENCE_MEMORY_BYTES
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
    assert default_inference_memory_bytes() >= MIN_INFERENCE_MEMORY_BYTES
