"""Model validation: one test per kind of hostile or broken artifact, plus the happy paths.

Bad inputs are built here, in tmp_path, with the same libraries an attacker would use. Nothing of
maas is mocked: the checks run for real, in-process (``inspect_model_file``) and in a child process
(``SubprocessValidator``, a few cases only: each costs ~0.5 s of interpreter start and imports).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from maas.domain import Signature, TensorSpec
from maas.errors import ModelRejected
from maas.examples import example_model_path
from maas.inference.sandbox import SubprocessValidator
from maas.inference.signature import (
    MAX_SIGNATURE_DIMS,
    MAX_SIGNATURE_TENSORS,
    MAX_TENSOR_NAME_CHARS,
    ONNX_TO_OIP,
    signature_from_model,
)
from maas.inference.validation import inspect_model_file
from maas.settings import Limits

LIMITS = Limits()

EXAMPLE_SIGNATURE = Signature(
    inputs=(TensorSpec(name="features", datatype="FP32", shape=(-1, 4)),),
    outputs=(
        TensorSpec(name="probabilities", datatype="FP32", shape=(-1, 3)),
        TensorSpec(name="label", datatype="INT64", shape=(-1,)),
    ),
)


# ------------------------------------------------------------------------------------------------
# helpers


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def save(path: Path, model: onnx.ModelProto) -> Path:
    """Serialize without onnx.save, which would try to handle external data itself."""
    return write(path, model.SerializeToString())


def make_model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
               outputs: list[onnx.ValueInfoProto], initializers: list[onnx.TensorProto] | None = None,
               opsets: list[onnx.OperatorSetIdProto] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers or [])
    return helper.make_model(graph, opset_imports=opsets or [helper.make_opsetid("", 17)], ir_version=8)


def add_bias_model(bias: onnx.TensorProto) -> onnx.ModelProto:
    """y = x + bias, with ``bias`` an initializer (the caller decides how it is stored)."""
    return make_model(
        [helper.make_node("Add", ["x", bias.name], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        [bias],
    )


def external_tensor(name: str, location: str) -> onnx.TensorProto:
    tensor = helper.make_tensor(name, TensorProto.FLOAT, [2], [0.0, 0.0])
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "8")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def rejected(path: Path, limits: Limits = LIMITS) -> str:
    with pytest.raises(ModelRejected) as info:
        inspect_model_file(path, limits)
    reason = info.value.detail
    assert "\n" not in reason
    assert "Traceback" not in reason
    assert str(path.parent) not in reason
    return reason


def atime_tracks_reads(directory: Path) -> bool:
    """Whether this filesystem updates atime on read (relatime does when atime < mtime)."""
    probe = write(directory / "atime-probe", b"probe")
    os.utime(probe, (0, probe.stat().st_mtime))
    probe.read_bytes()
    return probe.stat().st_atime > 0


# ------------------------------------------------------------------------------------------------
# accepted models


def test_example_model_is_accepted_with_its_signature() -> None:
    assert inspect_model_file(example_model_path(), LIMITS) == EXAMPLE_SIGNATURE


def test_fixed_shapes_and_string_inputs(tmp_path: Path) -> None:
    model = make_model(
        [
            helper.make_node("Identity", ["x"], ["x_out"]),
            helper.make_node("Identity", ["text"], ["text_out"]),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("text", TensorProto.STRING, [2]),
        ],
        [
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("text_out", TensorProto.STRING, ["n"]),
        ],
    )
    assert inspect_model_file(save(tmp_path / "m.onnx", model), LIMITS) == Signature(
        inputs=(
            TensorSpec(name="x", datatype="FP32", shape=(2, 3)),
            TensorSpec(name="text", datatype="BYTES", shape=(2,)),
        ),
        outputs=(
            TensorSpec(name="x_out", datatype="FP32", shape=(2, 3)),
            TensorSpec(name="text_out", datatype="BYTES", shape=(-1,)),
        ),
    )


def test_initializers_listed_as_inputs_are_not_part_of_the_signature() -> None:
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [2], [1.0, 2.0])
    model = add_bias_model(bias)
    model.graph.input.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [2]))
    assert [spec.name for spec in signature_from_model(model).inputs] == ["x"]


def test_oip_names_cover_the_common_types() -> None:
    assert ONNX_TO_OIP[TensorProto.FLOAT] == "FP32"
    assert ONNX_TO_OIP[TensorProto.STRING] == "BYTES"
    assert ONNX_TO_OIP[TensorProto.FLOAT16] == "FP16"
    assert ONNX_TO_OIP[TensorProto.UINT8] == "UINT8"
    assert TensorProto.BFLOAT16 not in ONNX_TO_OIP


# ------------------------------------------------------------------------------------------------
# not ONNX at all


class _Payload:
    """Unpickling this creates ``marker``: the classic pickle code-execution payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_is_refused_without_being_loaded(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    path = write(tmp_path / "model.onnx", pickle.dumps(_Payload(marker), protocol=protocol))
    assert "pickle" in rejected(path)
    assert not marker.exists()


def test_zip_is_refused(tmp_path: Path) -> None:
    # PyTorch's torch.save writes exactly this: a zip holding data.pkl.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"weights": [1, 2, 3]}))
    assert "zip" in rejected(write(tmp_path / "model.pt", buffer.getvalue()))


def test_tar_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    example = example_model_path().read_bytes()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("model.onnx")
        info.size = len(example)
        archive.addfile(info, io.BytesIO(example))
    assert "tar" in rejected(write(tmp_path / "model.tar", buffer.getvalue()))


def test_gzip_is_refused(tmp_path: Path) -> None:
    data = gzip.compress(example_model_path().read_bytes())
    assert "gzip" in rejected(write(tmp_path / "model.onnx.gz", data))


def test_hdf5_is_refused(tmp_path: Path) -> None:
    assert "HDF5" in rejected(write(tmp_path / "model.h5", b"\x89HDF\r\n\x1a\n" + bytes(100)))


def test_empty_file_is_refused(tmp_path: Path) -> None:
    assert "empty" in rejected(write(tmp_path / "model.onnx", b""))


@pytest.mark.parametrize(
    ("text", "kind"),
    [(b"model:\n  name: iris\n  layers: 3\n", "YAML"), (b'{"format": "onnx"}', "JSON"), (b"hello", "text")],
)
def test_text_is_refused(tmp_path: Path, text: bytes, kind: str) -> None:
    reason = rejected(write(tmp_path / "model.onnx", text))
    assert "text" in reason
    assert kind in reason


def test_other_binary_is_refused_by_the_onnx_magic_byte(tmp_path: Path) -> None:
    assert "0x08" in rejected(write(tmp_path / "model.onnx", b"\x7fELF\x02\x01\x01" + bytes(64)))


def test_truncated_model_is_refused(tmp_path: Path) -> None:
    data = example_model_path().read_bytes()
    for cut in (len(data) // 2, len(data) - 3):
        reason = rejected(write(tmp_path / f"cut{cut}.onnx", data[:cut]))
        assert "protobuf" in reason or "checker" in reason


# ------------------------------------------------------------------------------------------------
# external data (CVE-2022-25882, CVE-2024-27318)


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "subdir/../../x"])
def test_external_data_paths_are_refused(tmp_path: Path, location: str) -> None:
    path = save(tmp_path / "models" / "model.onnx", add_bias_model(external_tensor("bias", location)))
    reason = rejected(path)
    assert "external data" in reason
    assert location not in reason
    assert not (tmp_path / "x").exists()


def test_external_data_pointing_at_a_file_outside_is_never_read(tmp_path: Path) -> None:
    secret = write(tmp_path / "secret.bin", b"\x00\x00\x80?\x00\x00\x00@")  # two valid floats
    os.utime(secret, (0, secret.stat().st_mtime))
    created = tmp_path / "created.bin"
    model_dir = tmp_path / "models" / "v1"
    for i, location in enumerate(["../../secret.bin", str(secret), "../../created.bin"]):
        path = save(model_dir / f"model{i}.onnx", add_bias_model(external_tensor("bias", location)))
        reason = rejected(path)
        assert "external data" in reason
        assert "bias" in reason
    assert not created.exists()
    if atime_tracks_reads(tmp_path / "probe"):
        assert secret.stat().st_atime == 0


def test_external_data_inside_an_if_subgraph_is_refused(tmp_path: Path) -> None:
    then_graph = helper.make_graph(
        [helper.make_node("Identity", ["hidden"], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [2])],
        initializer=[external_tensor("hidden", "../../etc/passwd")],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["else_out"], value=helper.make_tensor("c", TensorProto.FLOAT, [2],
                                                                                 [0.0, 0.0]))],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [2])],
    )
    model = make_model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    reason = rejected(save(tmp_path / "model.onnx", model))
    assert "external data" in reason
    assert "then_branch" in reason


def test_external_data_in_a_constant_attribute_is_refused(tmp_path: Path) -> None:
    model = make_model(
        [
            helper.make_node("Constant", [], ["c"], value=external_tensor("const", "weights.bin")),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    assert "external data" in rejected(save(tmp_path / "model.onnx", model))


# ------------------------------------------------------------------------------------------------
# limits and graph checks


def test_oversize_model_is_refused_before_reading(tmp_path: Path) -> None:
    reason = rejected(example_model_path(), Limits(max_model_bytes=100))
    assert "over the limit of 100 bytes" in reason


def test_too_many_nodes_are_refused() -> None:
    reason = rejected(example_model_path(), Limits(max_nodes=2))
    assert "4 nodes" in reason


def test_nodes_in_subgraphs_count(tmp_path: Path) -> None:
    body = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["b"])],
        "branch",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])],
    )
    model = make_model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body)],
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    path = save(tmp_path / "model.onnx", model)
    assert "5 nodes" in rejected(path, Limits(max_nodes=4))
    assert [s.name for s in inspect_model_file(path, Limits(max_nodes=5)).inputs] == ["cond", "x"]


def test_custom_domain_operator_is_refused(tmp_path: Path) -> None:
    model = make_model(
        [helper.make_node("Backdoor", ["x"], ["y"], domain="evil.custom")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        opsets=[helper.make_opsetid("", 17), helper.make_opsetid("evil.custom", 1)],
    )
    reason = rejected(save(tmp_path / "model.onnx", model))
    assert "'evil.custom'" in reason
    assert "Backdoor" in reason


def test_model_failing_the_checker_is_refused(tmp_path: Path) -> None:
    model = make_model(
        [helper.make_node("Add", ["x", "nowhere"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    assert rejected(save(tmp_path / "model.onnx", model)).startswith("ONNX checker:")


def test_sequence_input_is_refused(tmp_path: Path) -> None:
    seq = helper.make_tensor_sequence_value_info("items", TensorProto.FLOAT, [2])
    model = make_model(
        [helper.make_node("SequenceLength", ["items"], ["n"])],
        [seq],
        [helper.make_tensor_value_info("n", TensorProto.INT64, [])],
    )
    reason = rejected(save(tmp_path / "model.onnx", model))
    assert "'items'" in reason
    assert "sequence" in reason


def test_signatures_too_large_to_record_are_refused(tmp_path: Path) -> None:
    """Names and counts come from the uploader; the signature is stored with the version (a DynamoDB
    item holds at most 400 KB), so both backends refuse the same oversize signatures up front."""
    long_name = "x" * (MAX_TENSOR_NAME_CHARS + 1)
    model = make_model([helper.make_node("Identity", [long_name], ["y"])],
                       [helper.make_tensor_value_info(long_name, TensorProto.FLOAT, [1])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    reason = rejected(save(tmp_path / "long.onnx", model))
    assert "name of 1025 characters" in reason and long_name not in reason
    count = MAX_SIGNATURE_TENSORS // 2 + 1
    wide = make_model([helper.make_node("Identity", [f"i{k}"], [f"o{k}"]) for k in range(count)],
                      [helper.make_tensor_value_info(f"i{k}", TensorProto.FLOAT, [1]) for k in range(count)],
                      [helper.make_tensor_value_info(f"o{k}", TensorProto.FLOAT, [1]) for k in range(count)])
    assert "at most 1000 in all" in rejected(save(tmp_path / "wide.onnx", wide))
    deep = make_model([helper.make_node("Identity", ["x"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1] * (MAX_SIGNATURE_DIMS + 1))],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1] * (MAX_SIGNATURE_DIMS + 1))])
    assert f"rank {MAX_SIGNATURE_DIMS + 1}" in rejected(save(tmp_path / "deep.onnx", deep))
    ok = make_model([helper.make_node("Identity", ["x" * MAX_TENSOR_NAME_CHARS], ["y"])],
                    [helper.make_tensor_value_info("x" * MAX_TENSOR_NAME_CHARS, TensorProto.FLOAT, [1])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    assert inspect_model_file(save(tmp_path / "ok.onnx", ok), Limits()).inputs[0].name == "x" * 1024


def test_model_without_inputs_is_refused(tmp_path: Path) -> None:
    model = make_model(
        [helper.make_node("Constant", [], ["y"], value=helper.make_tensor("c", TensorProto.FLOAT, [1], [1]))],
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    assert "no inputs" in rejected(save(tmp_path / "model.onnx", model))


def test_input_too_large_to_smoke_test_is_refused(tmp_path: Path) -> None:
    model = make_model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [100_000, 100_000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [100_000, 100_000])],
    )
    assert "elements" in rejected(save(tmp_path / "model.onnx", model))


def test_model_that_cannot_run_is_refused_by_the_smoke_inference(tmp_path: Path) -> None:
    # Valid for the checker (shapes are symbolic) but Reshape to 5 elements fails on any real input.
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [5])
    model = make_model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])],
        [shape],
    )
    reason = rejected(save(tmp_path / "model.onnx", model))
    assert reason.startswith("smoke inference failed:")
    assert ".cc:" not in reason


# ------------------------------------------------------------------------------------------------
# in a child process


def memory_bomb() -> onnx.ModelProto:
    """Tiny file, 64 GiB at run time: ConstantOfShape([2**34]) broadcast onto the input."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [2**34])
    return make_model(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["big"]),
            helper.make_node("Add", ["big", "x"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2**34])],
        [shape],
    )


def test_subprocess_validator_accepts_the_example_and_rejects_bad_files(tmp_path: Path) -> None:
    validator = SubprocessValidator(LIMITS)
    assert validator.validate(example_model_path()) == EXAMPLE_SIGNATURE

    marker = tmp_path / "pwned"
    with pytest.raises(ModelRejected, match="pickle"):
        validator.validate(write(tmp_path / "model.pkl", pickle.dumps(_Payload(marker))))
    assert not marker.exists()

    path = save(tmp_path / "m" / "model.onnx", add_bias_model(external_tensor("bias", "../../etc/passwd")))
    with pytest.raises(ModelRejected, match="external data"):
        validator.validate(path)


def test_subprocess_validator_times_out() -> None:
    with pytest.raises(ModelRejected, match=r"timed out after 0\.01 s"):
        SubprocessValidator(Limits(validation_timeout_s=0.01)).validate(example_model_path())


def test_subprocess_validator_survives_a_memory_bomb(tmp_path: Path) -> None:
    path = save(tmp_path / "bomb.onnx", memory_bomb())
    with pytest.raises(ModelRejected, match="memory"):
        SubprocessValidator(Limits(validation_memory_bytes=1)).validate(path)


def test_missing_file_is_not_a_verdict(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        SubprocessValidator(LIMITS).validate(tmp_path / "absent.onnx")


# ------------------------------------------------------------------------------------------------
# fuzzing


_EXAMPLE_BYTES = example_model_path().read_bytes()


@st.composite
def mutated_example(draw: st.DrawFn) -> bytes:
    data = bytearray(_EXAMPLE_BYTES)
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["set", "insert", "delete"]))
        if action == "set":
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data.insert(position, draw(st.integers(0, 255)))
        elif len(data) > 1:
            del data[position]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated_example())
def test_mutated_models_are_accepted_or_rejected_never_crash(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path / "fuzz.onnx", data)
    try:
        signature = inspect_model_file(path, LIMITS)
    except ModelRejected as exc:
        assert exc.detail
        assert "\n" not in exc.detail
    else:
        assert isinstance(signature, Signature)
        assert np.all([spec.datatype in ONNX_TO_OIP.values() for spec in signature.inputs])


def test_validations_beyond_the_concurrency_bound_wait_then_get_a_503() -> None:
    """Each child may take ``validation_memory_bytes``: without a bound, concurrent commits added up
    (five peaked at 9.6 GB). The one over the bound waits, then is told to retry; nothing is decided
    about its model."""
    from maas.errors import Unavailable

    validator = SubprocessValidator(Limits(max_concurrent_validations=1, validation_queue_timeout_s=0.2))
    assert validator.sandbox._slots.acquire(timeout=1)  # a validation in flight holds the only slot
    try:
        with pytest.raises(Unavailable) as busy:
            validator.validate(example_model_path())
        assert busy.value.status == 503 and busy.value.retry_after > 0
        assert "model checks are running" in busy.value.detail
    finally:
        validator.sandbox._slots.release()
    assert [spec.name for spec in validator.validate(example_model_path()).inputs] == ["features"]
