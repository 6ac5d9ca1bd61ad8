"""The sandbox runs every untrusted model run that is not a served request in a child: validation, the
deploy smoke test and int8 optimization. Each case here costs a child (~0.5-2 s), so there are few."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from maas.errors import InvalidInput, ModelRejected, Unavailable, Unhealthy
from maas.inference.checks import session_signature
from maas.inference.memory import resident_bytes
from maas.inference.sandbox import Sandbox, SubprocessValidator, sandbox_of
from maas.settings import Limits
from tests.bombs import smoke_bomb, smoke_loop
from tests.models import InProcessValidator, quantizable_model, scale_model

MIB = 1024 * 1024
LIMITS = Limits(validation_timeout_s=20, validation_memory_bytes=1536 * MIB)


def signature_of(data: bytes) -> object:
    import onnxruntime as ort

    return session_signature(ort.InferenceSession(data, providers=["CPUExecutionProvider"]))


def validated(data: bytes, limits: Limits = LIMITS) -> object:
    """What a commit decides about ``data`` (the sandbox's validate job)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(data)
        return Sandbox(limits).validate(path)


def test_a_model_that_explodes_only_on_the_smoke_inputs_is_unhealthy_and_the_server_keeps_its_memory() -> None:
    data = smoke_bomb()
    signature = validated(data)  # zeros: no allocation, so validation accepts it
    before = resident_bytes()
    with pytest.raises(Unhealthy) as verdict:
        Sandbox(LIMITS).smoke_test(data, signature, "the smoke test of model 'bomb' version 1")
    assert verdict.value.detail.startswith("the smoke test of model 'bomb' version 1")
    assert "memory" in verdict.value.detail or "allocate" in verdict.value.detail, verdict.value.detail
    assert resident_bytes() - before < 32 * MIB  # ~8 GB was asked for, in the child


def test_a_loop_that_spins_only_on_the_smoke_inputs_is_stopped_by_the_sandboxs_timeout() -> None:
    data = smoke_loop()
    signature = validated(data)
    with pytest.raises(Unhealthy) as verdict:
        Sandbox(LIMITS.model_copy(update={"validation_timeout_s": 3})).smoke_test(data, signature, "the smoke test")
    assert "timed out after 3 s" in verdict.value.detail


def test_a_healthy_model_passes_its_smoke_test_in_the_sandbox() -> None:
    data = scale_model(2.0)
    Sandbox(LIMITS).smoke_test(data, validated(data), "the smoke test")  # no exception


def test_int8_optimization_runs_in_the_sandbox_and_answers_like_in_process() -> None:
    data = quantizable_model()
    derived, report = Sandbox(LIMITS).quantize(data, signature_of(data), 0.05, goal="size")
    assert len(derived) < len(data) * 0.5 and derived[:1] == b"\x08"
    assert report["method"] == "int8-dynamic" and report["max_rel_diff"] <= 0.05, report
    # the derived model is a valid model of the same signature
    assert [spec.name for spec in validated(derived).inputs] == [spec.name for spec in signature_of(data).inputs]


def test_optimization_refusals_cross_the_sandbox_as_the_same_errors() -> None:
    data = scale_model(2.0)
    with pytest.raises(InvalidInput) as nothing:
        Sandbox(LIMITS).quantize(data, signature_of(data), 0.05, goal="latency")
    assert "nothing to quantize" in nothing.value.detail and nothing.value.field == "version"
    with pytest.raises(InvalidInput) as goal:
        Sandbox(LIMITS).quantize(data, signature_of(data), 0.05, goal="smallest")
    assert goal.value.field == "goal"
    model = quantizable_model()
    with pytest.raises(ModelRejected) as timed_out:
        Sandbox(LIMITS.model_copy(update={"optimize_timeout_s": 0.01})).quantize(model, signature_of(model), 0.05,
                                                                               goal="size")
    assert "optimization timed out" in timed_out.value.detail


def test_one_bound_on_children_covers_every_job() -> None:
    sandbox = Sandbox(Limits(max_concurrent_validations=1, validation_queue_timeout_s=0.1))
    assert sandbox._slots.acquire(timeout=1)  # a validation in flight
    try:
        with pytest.raises(Unavailable) as busy:
            sandbox.smoke_test(scale_model(2.0), signature_of(scale_model(2.0)), "the smoke test")
        assert busy.value.status == 503 and busy.value.retry_after > 0
    finally:
        sandbox._slots.release()


def test_backends_expose_their_validators_sandbox_and_in_process_validators_have_none() -> None:
    validator = SubprocessValidator(LIMITS)
    assert sandbox_of(validator) is validator.sandbox
    assert sandbox_of(InProcessValidator(LIMITS)) is None
