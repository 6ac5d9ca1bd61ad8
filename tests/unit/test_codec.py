"""The OIP v2 codec: JSON and binary round trips (checked with Triton's own client) and error fields."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from maas.errors import BadRequest, InvalidInput, PayloadTooLarge
from maas.inference.codec import (
    DecodedRequest,
    datatype_to_dtype,
    decode_request,
    dtype_to_datatype,
    encode_response,
)
from maas.protocol.oip import DATATYPE_TO_NUMPY
from maas.settings import Limits

LIMITS = Limits()
NUMERIC = [name for name in DATATYPE_TO_NUMPY if name != "BYTES"]


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    count = int(np.prod(shape))
    if datatype == "BYTES":
        return np.array([f"é{k}".encode() for k in range(count)], dtype=object).reshape(shape)
    if datatype == "BOOL":
        flags: np.ndarray = np.arange(count) % 2 == 0
        return flags.reshape(shape)
    dtype = datatype_to_dtype(datatype)
    if dtype.kind == "f":
        values = np.array([0.5, -1.25, 3.0, 1e-3, 2.0**10, -0.0])
        return np.resize(values, count).astype(dtype).reshape(shape)
    info = np.iinfo(dtype)
    values = np.array([info.min, info.max, 0, 1, 7, info.max - 1], dtype=dtype)
    return np.resize(values, count).reshape(shape)


def to_json_data(array: np.ndarray, datatype: str) -> list[Any]:
    if datatype == "BYTES":
        return [item.decode() for item in array.reshape(-1)]
    return array.reshape(-1).tolist()


def body(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc)


def one_input(**fields: Any) -> bytes:
    tensor = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}
    tensor.update(fields)
    return body({"inputs": [tensor]})


def triton_request(
    arrays: dict[str, np.ndarray], binary: bool = True, outputs: list[Any] | None = None, request_id: str = ""
) -> tuple[bytes, int | None]:
    inputs = []
    for name, array in arrays.items():
        infer_input = triton.InferInput(name, list(array.shape), dtype_to_datatype(array.dtype))
        infer_input.set_data_from_numpy(array, binary_data=binary)
        inputs.append(infer_input)
    request_body, json_size = triton.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id=request_id
    )
    return request_body, json_size


def parse(body_bytes: bytes, header_length: int | None) -> Any:
    return triton.InferenceServerClient.parse_response_body(body_bytes, header_length=header_length)


# ----------------------------------------------------------------------------------------- datatypes


@pytest.mark.parametrize("datatype", list(DATATYPE_TO_NUMPY))
def test_datatype_helpers_round_trip(datatype: str) -> None:
    assert dtype_to_datatype(datatype_to_dtype(datatype)) == datatype


def test_datatype_helpers_reject_unknown() -> None:
    with pytest.raises(ValueError):
        datatype_to_dtype("BF17")
    with pytest.raises(ValueError):
        dtype_to_datatype(np.complex64)
    assert dtype_to_datatype(np.dtype("<U3")) == "BYTES"
    assert dtype_to_datatype(np.dtype(">f4")) == "FP32"


# ----------------------------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("datatype", list(DATATYPE_TO_NUMPY))
def test_json_round_trip_every_datatype(datatype: str) -> None:
    array = sample(datatype)
    request = body(
        {
            "id": "r1",
            "inputs": [
                {"name": "x", "datatype": datatype, "shape": [2, 3], "data": to_json_data(array, datatype)}
            ],
        }
    )
    decoded = decode_request(request, None, LIMITS)
    assert decoded.id == "r1"
    assert decoded.datatypes == {"x": datatype}
    got = decoded.inputs["x"]
    assert got.dtype == datatype_to_dtype(datatype)
    assert got.shape == (2, 3)
    np.testing.assert_array_equal(got, array)

    response, header_length = encode_response("m", "3", "r1", [("y", got)], binary=False)
    assert header_length is None
    doc = orjson.loads(response)
    assert doc["model_name"] == "m" and doc["model_version"] == "3" and doc["id"] == "r1"
    assert doc["outputs"][0]["datatype"] == datatype
    assert doc["outputs"][0]["shape"] == [2, 3]
    result = parse(response, None).as_numpy("y")
    if datatype == "BYTES":  # Triton's client reads JSON BYTES back as str objects
        result = np.array([item.encode() for item in result.reshape(-1)], dtype=object).reshape(2, 3)
    assert result.dtype == got.dtype
    np.testing.assert_array_equal(result, array)


@pytest.mark.parametrize("datatype", ["FP32", "INT64", "BOOL", "BYTES"])
def test_nested_and_flat_data_decode_the_same(datatype: str) -> None:
    array = sample(datatype)
    flat = to_json_data(array, datatype)
    nested = [flat[:3], flat[3:]]
    decoded = [
        decode_request(
            body({"inputs": [{"name": "x", "datatype": datatype, "shape": [2, 3], "data": data}]}),
            None,
            LIMITS,
        ).inputs["x"]
        for data in (flat, nested)
    ]
    np.testing.assert_array_equal(decoded[0], decoded[1])
    assert decoded[0].shape == decoded[1].shape == (2, 3)


def test_json_scalar_and_empty_tensors() -> None:
    decoded = decode_request(
        body(
            {
                "inputs": [
                    {"name": "s", "datatype": "FP64", "shape": [], "data": [2.5]},
                    {"name": "e", "datatype": "INT32", "shape": [0, 4], "data": []},
                ]
            }
        ),
        None,
        LIMITS,
    )
    assert decoded.inputs["s"].shape == () and decoded.inputs["s"] == 2.5
    assert decoded.inputs["e"].shape == (0, 4) and decoded.inputs["e"].dtype == np.int32
    response, _ = encode_response("m", "1", None, list(decoded.inputs.items()), binary=False)
    doc = orjson.loads(response)
    assert "id" not in doc
    assert doc["outputs"] == [
        {"name": "s", "datatype": "FP64", "shape": [], "data": [2.5]},
        {"name": "e", "datatype": "INT32", "shape": [0, 4], "data": []},
    ]


def test_json_request_from_triton_client() -> None:
    arrays = {"a": sample("FP32"), "b": sample("INT8"), "c": sample("BYTES")}
    request, json_size = triton_request(arrays, binary=False, request_id="abc")
    assert json_size is None
    decoded = decode_request(request, None, LIMITS)
    assert decoded.id == "abc"
    for name, array in arrays.items():
        np.testing.assert_array_equal(decoded.inputs[name], array)


def test_fp16_json_output_round_trips() -> None:
    array = np.array([0.1, 65504, -2.5e-5, 1 / 3], dtype=np.float16)
    response, _ = encode_response("m", "1", None, [("y", array)], binary=False)
    np.testing.assert_array_equal(parse(response, None).as_numpy("y"), array)


def test_nan_and_infinity_are_written_as_null() -> None:
    array = np.array([np.nan, np.inf, 1.0], dtype=np.float32)
    response, _ = encode_response("m", "1", None, [("y", array)], binary=False)
    assert orjson.loads(response)["outputs"][0]["data"] == [None, None, 1.0]


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_null_is_not_a_number_for_a_float_input(datatype: str) -> None:
    """``"data": [null, 0, 0, 0]`` once ran the model on NaN (and answered 200 with null outputs)."""
    request = body({"inputs": [{"name": "x", "datatype": datatype, "shape": [1, 4], "data": [None, 0, 0, 0]}]})
    with pytest.raises(InvalidInput, match=f"null is not a {datatype} number") as caught:
        decode_request(request, None, LIMITS)
    assert caught.value.field == "inputs[0].data"
    nested = body({"inputs": [{"name": "x", "datatype": datatype, "shape": [2, 2], "data": [[1, 2], [3, None]]}]})
    with pytest.raises(InvalidInput, match="null"):
        decode_request(nested, None, LIMITS)


def test_bytes_outputs_from_onnxruntime_str_and_invalid_utf8() -> None:
    array = np.array(["héllo", b"\xff\xfe", b"ok"], dtype=object)
    response, _ = encode_response("m", "1", None, [("y", array)], binary=False)
    assert orjson.loads(response)["outputs"][0]["data"] == ["héllo", "\ufffd\ufffd", "ok"]
    response, header_length = encode_response("m", "1", None, [("y", array)], binary=True)
    result = parse(response, header_length).as_numpy("y")
    assert result.tolist() == ["héllo".encode(), b"\xff\xfe", b"ok"]


def test_non_contiguous_outputs_are_row_major() -> None:
    array = np.arange(6, dtype=np.int32).reshape(2, 3).T
    for binary in (False, True):
        response, header_length = encode_response("m", "1", None, [("y", array)], binary=binary)
        np.testing.assert_array_equal(parse(response, header_length).as_numpy("y"), array)


# --------------------------------------------------------------------------------------------- binary


@pytest.mark.parametrize("datatype", list(DATATYPE_TO_NUMPY))
def test_binary_round_trip_with_triton_client(datatype: str) -> None:
    arrays = {"first": sample(datatype), "second": sample("FP32", (1, 4))}
    request, json_size = triton_request(arrays, binary=True, request_id="bin")
    assert json_size is not None
    decoded = decode_request(request, json_size, LIMITS)
    assert decoded.id == "bin"
    assert decoded.requested_outputs is None and decoded.binary_default is True
    for name, array in arrays.items():
        assert decoded.inputs[name].shape == array.shape
        np.testing.assert_array_equal(decoded.inputs[name], array)

    outputs = list(decoded.inputs.items())
    response, header_length = encode_response("m", "2", decoded.id, outputs, decoded.response_binary())
    assert header_length is not None
    result = parse(response, header_length)
    assert result.get_response()["id"] == "bin"
    for name, array in arrays.items():
        got = result.as_numpy(name)
        assert got.dtype == array.dtype
        np.testing.assert_array_equal(got, array)


def test_binary_and_json_inputs_mixed() -> None:
    binary_input = triton.InferInput("b", [3], "INT64").set_data_from_numpy(np.array([1, 2, 3]), True)
    json_input = triton.InferInput("j", [2], "FP64").set_data_from_numpy(np.array([0.5, 1.5]), False)
    request, json_size = triton.InferenceServerClient.generate_request_body([json_input, binary_input])
    decoded = decode_request(request, json_size, LIMITS)
    assert decoded.inputs["b"].tolist() == [1, 2, 3]
    assert decoded.inputs["j"].tolist() == [0.5, 1.5]


def test_requested_outputs_choose_binary_per_output() -> None:
    outputs = [triton.InferRequestedOutput("p", binary_data=True), triton.InferRequestedOutput("q", False)]
    request, json_size = triton_request({"x": sample("FP32")}, outputs=outputs)
    decoded = decode_request(request, json_size, LIMITS)
    assert decoded.requested_outputs == ["p", "q"]
    assert decoded.binary_outputs == {"p"}
    assert decoded.response_binary() == {"p"}
    p, q = sample("FP32"), sample("INT16")
    response, header_length = encode_response("m", "1", None, [("p", p), ("q", q)], decoded.response_binary())
    doc = orjson.loads(response[:header_length])
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": p.nbytes}
    assert doc["outputs"][1]["data"] == q.reshape(-1).tolist()
    result = parse(response, header_length)
    np.testing.assert_array_equal(result.as_numpy("p"), p)
    np.testing.assert_array_equal(result.as_numpy("q"), q)


def test_output_binary_flag_overrides_the_request_default() -> None:
    request = body(
        {
            "parameters": {"binary_data_output": True},
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}],
            "outputs": [{"name": "a"}, {"name": "b", "parameters": {"binary_data": False}}],
        }
    )
    decoded = decode_request(request, None, LIMITS)
    assert decoded.binary_outputs == {"a"}
    assert decoded.parameters == {"binary_data_output": True}


def test_binary_bool_normalises_non_zero_bytes() -> None:
    header = body(
        {"inputs": [{"name": "x", "datatype": "BOOL", "shape": [3], "parameters": {"binary_data_size": 3}}]}
    )
    decoded = decode_request(header + b"\x00\x02\x01", len(header), LIMITS)
    assert decoded.inputs["x"].tolist() == [False, True, True]
    assert decoded.inputs["x"].view(np.uint8).tolist() == [0, 1, 1]


def test_unaligned_binary_input_is_usable() -> None:
    header = body(
        {
            "inputs": [
                {"name": "a", "datatype": "UINT8", "shape": [1], "parameters": {"binary_data_size": 1}},
                {"name": "b", "datatype": "FP64", "shape": [2], "parameters": {"binary_data_size": 16}},
            ]
        }
    )
    payload = b"\x07" + np.array([1.5, -2.0]).tobytes()
    decoded = decode_request(header + payload, len(header), LIMITS)
    assert decoded.inputs["b"].flags.aligned
    assert decoded.inputs["b"].tolist() == [1.5, -2.0]


# --------------------------------------------------------------------------------------------- errors


def error_of(request: bytes, header_length: int | None = None, limits: Limits = LIMITS) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        decode_request(request, header_length, limits)
    return info.value


@pytest.mark.parametrize(
    ("request_body", "field"),
    [
        (one_input(data=[1.0, 2.0, 3.0]), "inputs[0].data"),
        (one_input(data=[[1.0, 2.0, 3.0]]), "inputs[0].data"),
        (one_input(data=[[1.0], [2.0, 3.0]]), "inputs[0].data"),
        (one_input(data=["a", "b"]), "inputs[0].data"),
        (one_input(data=[1.0, {"x": 1}]), "inputs[0].data"),
        (one_input(data="12"), "inputs[0].data"),
        (one_input(data=None), "inputs[0].data"),
        (one_input(shape=[-1]), "inputs[0].shape"),
        (one_input(shape=[2.0]), "inputs[0].shape"),
        (one_input(shape=[True, True]), "inputs[0].shape"),
        (one_input(shape="2"), "inputs[0].shape"),
        (one_input(shape=[1] * 65), "inputs[0].shape"),
        (one_input(datatype="FP8"), "inputs[0].datatype"),
        (one_input(datatype=None), "inputs[0].datatype"),
        (one_input(name=""), "inputs[0].name"),
        (one_input(name=3), "inputs[0].name"),
        (one_input(datatype="INT64", data=[1, 2.5]), "inputs[0].data"),
        (one_input(datatype="INT64", data=[True, False]), "inputs[0].data"),
        (one_input(datatype="INT8", data=[1, 300]), "inputs[0].data"),
        (one_input(datatype="UINT32", data=[1, -1]), "inputs[0].data"),
        (
            b'{"inputs": [{"name": "x", "datatype": "INT64", "shape": [2], '
            b'"data": [1, 1180591620717411303424]}]}',
            "inputs[0].data",
        ),
        (one_input(datatype="UINT64", data=[2**64 - 1, -1]), "inputs[0].data"),
        (one_input(datatype="BOOL", data=[1, 0]), "inputs[0].data"),
        (one_input(datatype="BYTES", data=["a", 1]), "inputs[0].data"),
        (one_input(parameters={"binary_data_size": 8}), "inputs[0].parameters.binary_data_size"),
        (one_input(parameters={"shared_memory_region": "r"}), "inputs[0].parameters.shared_memory_region"),
        (one_input(parameters=[]), "inputs[0].parameters"),
        (body({"inputs": {}}), "inputs"),
        (body({"inputs": [1]}), "inputs[0]"),
        (body({"id": 5, "inputs": []}), "id"),
        (body({"parameters": [], "inputs": []}), "parameters"),
        (body({"parameters": {"binary_data_output": 1}, "inputs": []}), "parameters.binary_data_output"),
        (body({"inputs": [], "outputs": {}}), "outputs"),
        (body({"inputs": [], "outputs": [{"name": "a"}, {"name": "a"}]}), "outputs[1].name"),
        (body({"inputs": [], "outputs": [{"nom": "a"}]}), "outputs[0].name"),
        (
            body({"inputs": [], "outputs": [{"name": "a", "parameters": {"binary_data": "yes"}}]}),
            "outputs[0].parameters.binary_data",
        ),
        (
            body({"inputs": [], "outputs": [{"name": "a", "parameters": {"classification": 2}}]}),
            "outputs[0].parameters.classification",
        ),
    ],
)
def test_json_errors_name_the_field(request_body: bytes, field: str) -> None:
    assert error_of(request_body).field == field


def test_missing_data_names_the_field() -> None:
    request = body({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}]})
    assert error_of(request).field == "inputs[0].data"


def test_duplicate_input_names() -> None:
    tensor = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}
    error = error_of(body({"inputs": [tensor, dict(tensor)]}))
    assert error.field == "inputs[1].name"
    assert "'x'" in error.detail


def test_oversize_tensor_is_rejected_before_any_array_is_built() -> None:
    limits = Limits(max_tensor_elements=100)
    error = error_of(one_input(shape=[10, 11], data=[]), limits=limits)
    assert error.field == "inputs[0].shape"
    assert "110" in error.detail and "100" in error.detail
    # A huge declared shape fails on the cap, not on memory.
    error = error_of(one_input(shape=[2**40, 2**40], data=[]))
    assert error.field == "inputs[0].shape"


def test_body_over_the_request_cap() -> None:
    with pytest.raises(PayloadTooLarge):
        decode_request(one_input(), None, Limits(max_request_bytes=10))


@pytest.mark.parametrize("raw", [b"", b"not json", b"{", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_body_not_a_json_object(raw: bytes) -> None:
    with pytest.raises(BadRequest) as info:
        decode_request(raw, None, LIMITS)
    assert info.value.field == "body"


@pytest.mark.parametrize("header_length", [0, -1, 10_000])
def test_header_length_out_of_range(header_length: int) -> None:
    with pytest.raises(BadRequest) as info:
        decode_request(one_input(), header_length, LIMITS)
    assert info.value.field == "Inference-Header-Content-Length"


def binary_request(arrays: dict[str, np.ndarray]) -> tuple[bytes, int]:
    request, json_size = triton_request(arrays)
    assert json_size is not None
    return request, json_size


def test_truncated_binary_body() -> None:
    request, json_size = binary_request({"x": sample("FP32"), "y": sample("INT32")})
    error = error_of(request[:-4], json_size)
    assert error.field == "inputs[1].parameters.binary_data_size"
    assert "truncated" in error.detail


def test_trailing_bytes_after_binary_inputs() -> None:
    request, json_size = binary_request({"x": sample("FP32")})
    error = error_of(request + b"\0\0\0\0", json_size)
    assert error.field == "inputs"


def test_trailing_bytes_without_binary_inputs() -> None:
    request = one_input()
    assert error_of(request + b"junk", len(request)).field == "inputs"


def test_binary_size_mismatch_with_shape() -> None:
    header = body(
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [2, 2], "parameters": {"binary_data_size": 12}}
            ]
        }
    )
    error = error_of(header + b"\0" * 12, len(header))
    assert error.field == "inputs[0].parameters.binary_data_size"
    assert "16" in error.detail


def test_binary_and_data_together() -> None:
    header = one_input(parameters={"binary_data_size": 8})
    error = error_of(header + b"\0" * 8, len(header))
    assert error.field == "inputs[0].data"


@pytest.mark.parametrize("size", [-1, 1.5, "8"])
def test_binary_size_must_be_a_non_negative_integer(size: Any) -> None:
    header = body(
        {
            "inputs": [
                {"name": "x", "datatype": "UINT8", "shape": [8], "parameters": {"binary_data_size": size}}
            ]
        }
    )
    assert error_of(header + b"\0" * 8, len(header)).field == "inputs[0].parameters.binary_data_size"


def bytes_request(payload: bytes, count: int) -> tuple[bytes, int]:
    header = body(
        {
            "inputs": [
                {
                    "name": "s",
                    "datatype": "BYTES",
                    "shape": [count],
                    "parameters": {"binary_data_size": len(payload)},
                }
            ]
        }
    )
    return header + payload, len(header)


def test_binary_bytes_elements_are_length_prefixed() -> None:
    payload = struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)
    decoded = decode_request(*bytes_request(payload, 2), LIMITS)
    assert decoded.inputs["s"].tolist() == [b"ab", b""]


@pytest.mark.parametrize(
    ("payload", "count"),
    [
        (struct.pack("<I", 5) + b"ab", 1),  # element longer than the chunk
        (struct.pack("<I", 2) + b"ab", 2),  # fewer elements than the shape
        (struct.pack("<I", 2) + b"abc", 1),  # bytes left over
        (b"\x01\x00", 1),  # not even a length prefix
    ],
)
def test_binary_bytes_errors(payload: bytes, count: int) -> None:
    assert error_of(*bytes_request(payload, count)).field == "inputs[0].parameters.binary_data_size"


def test_decoded_request_defaults() -> None:
    request = DecodedRequest(id=None, inputs={}, datatypes={})
    assert request.requested_outputs is None
    assert request.binary_outputs == set()
    assert request.response_binary() is False


def test_huge_dimension_of_an_empty_tensor_is_invalid_input() -> None:
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 2**62, 4], "data": []}]})
    with pytest.raises(InvalidInput) as raised:
        decode_request(body, None, LIMITS)
    assert raised.value.field == "inputs[0].shape"


def test_bytes_count_is_checked_before_allocating() -> None:
    header = orjson.dumps({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [4_194_304],
                                       "parameters": {"binary_data_size": 0}}]})
    with pytest.raises(InvalidInput) as raised:
        decode_request(header, len(header), LIMITS)
    assert "cannot hold" in raised.value.detail


@pytest.mark.parametrize(("datatype", "value"), [("FP32", 1e39), ("FP16", 70000.0), ("FP32", -3.5e38)])
def test_numbers_beyond_the_float_range_are_refused_not_run_as_infinity(datatype: str, value: float) -> None:
    """JSON cannot say "infinity": a value that only becomes one in the datatype was out of range, and
    would run as inf and come back as null."""
    request = body({"inputs": [{"name": "x", "datatype": datatype, "shape": [2], "data": [1.0, value]}]})
    with pytest.raises(InvalidInput, match=f"out of the range of {datatype}") as caught:
        decode_request(request, None, LIMITS)
    assert caught.value.field == "inputs[0].data"
    assert decode_request(body({"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [1e39]}]}),
                          None, LIMITS).inputs["x"][0] == 1e39
