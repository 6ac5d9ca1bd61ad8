"""Open Inference Protocol v2 codec: request bytes -> numpy arrays, numpy arrays -> response bytes.

Transport-free (no FastAPI, no HTTP types): adapters hand in the body and the value of the
``Inference-Header-Content-Length`` header, and get back the body and the header length to send.

Requests are parsed with orjson and converted straight to numpy (``numpy.asarray`` for JSON data,
``numpy.frombuffer`` for the binary tensor extension); nothing is validated element by element in
Python. Every structural problem is checked before an array is built and raised as
:class:`~maas.errors.InvalidInput` naming the offending field (``inputs[0].shape``).

JSON conversion rules (per declared datatype):

* ``FP16/FP32/FP64``: numbers, converted in one C pass by ``numpy.asarray(data, dtype=...)``; ``null``
  is refused (it is not a number) and so is a value beyond the datatype's range (it would run as an
  infinity). Responses write NaN and infinities as ``null``, JSON having no such literals.
  Numpy's leniency is kept: booleans read as 0/1 and numeric strings as their value.
* integer types: JSON integers within the datatype's range; fractional numbers and all-boolean data are
  rejected (a boolean among integers reads as 0/1, as numpy coerces it).
* ``BOOL``: JSON ``true``/``false`` only.
* ``BYTES``: JSON strings, stored as UTF-8 ``bytes`` (numpy object arrays, as in
  :data:`maas.protocol.oip.DATATYPE_TO_NUMPY`).

Responses: JSON ``data`` is flattened in row-major order. ``BYTES`` outputs are written as JSON
strings: ``str`` elements as they are, ``bytes`` elements decoded as UTF-8 with invalid sequences
replaced by U+FFFD (ask for the output in binary to get exact bytes). Binary outputs carry
``parameters.binary_data_size`` and their raw little-endian bytes follow the JSON header in output order
(``BYTES``: each element as a 4-byte little-endian length then its bytes, as Triton does).
"""

from __future__ import annotations

import struct
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from maas.errors import BadRequest, InvalidInput, PayloadTooLarge
from maas.protocol.oip import DATATYPE_TO_NUMPY
from maas.settings import Limits

__all__ = [
    "DecodedRequest",
    "datatype_to_dtype",
    "decode_request",
    "dtype_to_datatype",
    "encode_response",
]

#: numpy's own limit on the number of dimensions.
MAX_RANK = 64

_LITTLE = sys.byteorder == "little"
_U32 = struct.Struct("<I")

#: OIP datatype -> native numpy dtype.
_DTYPES: dict[str, np.dtype[Any]] = {name: np.dtype(np_name) for name, np_name in DATATYPE_TO_NUMPY.items()}
#: OIP datatype -> little-endian numpy dtype (the wire format of the binary extension).
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    name: (dt if name == "BYTES" else dt.newbyteorder("<")) for name, dt in _DTYPES.items()
}
_ITEMSIZE: dict[str, int] = {name: dt.itemsize for name, dt in _DTYPES.items() if name != "BYTES"}
#: native numpy dtype -> OIP datatype, for the dtypes onnxruntime returns.
_DATATYPES: dict[np.dtype[Any], str] = {dt: name for name, dt in _DTYPES.items()}
_FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})
_INT_TYPES = frozenset({"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"})
_INT_RANGE: dict[str, tuple[int, int]] = {
    name: (int(np.iinfo(_DTYPES[name]).min), int(np.iinfo(_DTYPES[name]).max)) for name in _INT_TYPES
}
_NUMPY_OPT = orjson.OPT_SERIALIZE_NUMPY


def datatype_to_dtype(datatype: str) -> np.dtype[Any]:
    """The native numpy dtype of an OIP datatype (``BYTES`` -> object). ValueError if unknown."""
    try:
        return _DTYPES[datatype]
    except KeyError:
        raise ValueError(f"unknown OIP datatype {datatype!r}") from None


def dtype_to_datatype(dtype: np.dtype[Any] | type) -> str:
    """The OIP datatype of a numpy dtype (object, ``str`` and ``bytes`` dtypes -> ``BYTES``).

    ValueError for dtypes OIP cannot carry (complex, datetime...)."""
    dt = np.dtype(dtype)
    name = _DATATYPES.get(dt)
    if name is not None:
        return name
    if dt.kind in "OUS":
        return "BYTES"
    if dt.byteorder not in "=|":
        name = _DATATYPES.get(dt.newbyteorder("="))
        if name is not None:
            return name
    raise ValueError(f"numpy dtype {dt} has no OIP datatype")


# A JSON number beyond FP32/FP16's range casts to inf with numpy's RuntimeWarning; ``_from_json`` turns
# that inf into a 422, so the warning (issued from this module) says nothing more. A filter, not
# ``np.errstate``, because the context manager would cost every request ~2 µs.
warnings.filterwarnings("ignore", message="overflow encountered in cast", category=RuntimeWarning,
                        module=__name__)


@dataclass(slots=True)
class DecodedRequest:
    """An inference request turned into numpy arrays, ready for the engine's signature checks."""

    id: str | None
    #: input name -> array (in request order), already reshaped to the declared shape
    inputs: dict[str, np.ndarray]
    #: input name -> declared OIP datatype
    datatypes: dict[str, str]
    #: names of the outputs asked for, in order; None = every output of the model
    requested_outputs: list[str] | None = None
    #: requested outputs to return in binary (each output's ``binary_data``, else the request default)
    binary_outputs: set[str] = field(default_factory=set)
    #: request-level ``parameters.binary_data_output``: applies when no outputs are named
    binary_default: bool = False
    #: request-level ``parameters`` as sent
    parameters: dict[str, Any] = field(default_factory=dict)

    def response_binary(self) -> set[str] | bool:
        """What to pass as ``encode_response(binary=...)`` for this request."""
        if self.requested_outputs is None:
            return self.binary_default
        return self.binary_outputs


# --------------------------------------------------------------------------------------------- decode


def decode_request(body: bytes, header_length: int | None, limits: Limits) -> DecodedRequest:
    """Decode an OIP v2 inference request body.

    ``header_length`` is the ``Inference-Header-Content-Length`` header (binary tensor extension):
    the first ``header_length`` bytes are the JSON header, the rest are the binary inputs' bytes in
    input order. Raises BadRequest (not JSON, not an object, bad header length), PayloadTooLarge and
    InvalidInput (naming the field).
    """
    size = len(body)
    if size > limits.max_request_bytes:
        raise PayloadTooLarge(
            f"request body is {size} bytes, the limit is {limits.max_request_bytes}",
        )
    binary: memoryview | None = None
    if header_length is None:
        header: bytes | memoryview = body
    else:
        if (
            isinstance(header_length, bool)
            or not isinstance(header_length, int)
            or not (0 < header_length <= size)
        ):
            raise BadRequest(
                f"Inference-Header-Content-Length must be between 1 and the body size ({size})",
                field="Inference-Header-Content-Length",
            )
        view = memoryview(body)
        header = view[:header_length]
        binary = view[header_length:]
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON", field="body") from None
    if type(doc) is not dict:
        raise BadRequest("request body must be a JSON object", field="body")

    request_id = doc.get("id")
    if request_id is not None and type(request_id) is not str:
        raise InvalidInput("id must be a string", field="id")
    parameters = doc.get("parameters")
    if parameters is None:
        parameters = {}
    elif type(parameters) is not dict:
        raise InvalidInput("parameters must be an object", field="parameters")
    binary_default = parameters.get("binary_data_output", False)
    if type(binary_default) is not bool:
        raise InvalidInput("binary_data_output must be true or false", field="parameters.binary_data_output")

    raw_inputs = doc.get("inputs")
    if type(raw_inputs) is not list:
        raise InvalidInput("inputs must be an array of tensors", field="inputs")
    max_elements = limits.max_tensor_elements
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for i, spec in enumerate(raw_inputs):
        if type(spec) is not dict:
            raise InvalidInput("each input must be an object", field=f"inputs[{i}]")
        name = spec.get("name")
        if type(name) is not str or not name:
            raise InvalidInput("input name must be a non-empty string", field=f"inputs[{i}].name")
        if name in inputs:
            raise InvalidInput(f"input {name!r} is given more than once", field=f"inputs[{i}].name")
        datatype = spec.get("datatype")
        if type(datatype) is not str or datatype not in _DTYPES:
            raise InvalidInput(
                f"input {name!r}: unknown datatype {datatype!r}; expected one of {', '.join(_DTYPES)}",
                field=f"inputs[{i}].datatype",
            )
        shape = spec.get("shape")
        count = _element_count(shape, name, i, max_elements)
        params = spec.get("parameters")
        binary_size = None
        if params is not None:
            if type(params) is not dict:
                raise InvalidInput(
                    f"input {name!r}: parameters must be an object", field=f"inputs[{i}].parameters"
                )
            if "shared_memory_region" in params:
                raise InvalidInput(
                    f"input {name!r}: shared memory is not supported",
                    field=f"inputs[{i}].parameters.shared_memory_region",
                )
            binary_size = params.get("binary_data_size")
        data = spec.get("data")
        if binary_size is not None:
            if binary is None:
                raise InvalidInput(
                    f"input {name!r} has binary_data_size but the request has no "
                    "Inference-Header-Content-Length header",
                    field=f"inputs[{i}].parameters.binary_data_size",
                )
            if data is not None:
                raise InvalidInput(
                    f"input {name!r} has both data and binary_data_size", field=f"inputs[{i}].data"
                )
            if type(binary_size) is not int or binary_size < 0:
                raise InvalidInput(
                    f"input {name!r}: binary_data_size must be a non-negative integer",
                    field=f"inputs[{i}].parameters.binary_data_size",
                )
            if offset + binary_size > len(binary):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size is {binary_size} but only "
                    f"{len(binary) - offset} bytes of binary data remain (truncated body?)",
                    field=f"inputs[{i}].parameters.binary_data_size",
                )
            array = _from_binary(binary, offset, binary_size, datatype, count, name, i)
            offset += binary_size
        elif data is None:
            raise InvalidInput(
                f"input {name!r} has neither data nor parameters.binary_data_size",
                field=f"inputs[{i}].data",
            )
        else:
            array = _from_json(data, datatype, count, name, i)
        inputs[name] = array.reshape(shape)
        datatypes[name] = datatype
    if binary is not None and offset != len(binary):
        raise InvalidInput(
            f"the body has {len(binary) - offset} bytes of binary data after the last binary input "
            "(binary_data_size values must add up to the body size minus Inference-Header-Content-Length)",
            field="inputs",
        )

    requested, binary_outputs = _decode_outputs(doc.get("outputs"), binary_default)
    return DecodedRequest(
        id=request_id,
        inputs=inputs,
        datatypes=datatypes,
        requested_outputs=requested,
        binary_outputs=binary_outputs,
        binary_default=binary_default,
        parameters=parameters,
    )


def _element_count(shape: Any, name: str, i: int, max_elements: int) -> int:
    if type(shape) is not list or len(shape) > MAX_RANK:
        raise InvalidInput(
            f"input {name!r}: shape must be an array of at most {MAX_RANK} non-negative integers",
            field=f"inputs[{i}].shape",
        )
    count = 1
    for dim in shape:
        # Each dimension is capped too: [0, 2**62] has no elements but cannot be reshaped to.
        if type(dim) is not int or dim < 0 or dim > max_elements:
            raise InvalidInput(
                f"input {name!r}: shape must contain non-negative integers, got {shape}",
                field=f"inputs[{i}].shape",
            )
        count *= dim
    if count > max_elements:
        raise InvalidInput(
            f"input {name!r}: shape {shape} has {count} elements, the limit is {max_elements}",
            field=f"inputs[{i}].shape",
        )
    return count


def _from_binary(
    binary: memoryview, offset: int, size: int, datatype: str, count: int, name: str, i: int
) -> np.ndarray:
    if datatype == "BYTES":
        return _bytes_from_binary(binary[offset : offset + size], count, name, i)
    expected = count * _ITEMSIZE[datatype]
    if size != expected:
        raise InvalidInput(
            f"input {name!r}: binary_data_size is {size} bytes, {count} {datatype} elements need {expected}",
            field=f"inputs[{i}].parameters.binary_data_size",
        )
    array: np.ndarray = np.frombuffer(binary, dtype=_WIRE_DTYPES[datatype], count=count, offset=offset)
    if datatype == "BOOL":
        # Any non-zero byte is true; normalise so numpy/onnxruntime only ever see 0 and 1.
        normalised: np.ndarray = array.view(np.uint8) != 0
        return normalised
    if not _LITTLE and array.dtype.itemsize > 1:  # pragma: no cover - big-endian hosts
        return array.astype(array.dtype.newbyteorder("="))
    if not array.flags.aligned:
        array = array.copy()
    return array


def _bytes_from_binary(chunk: memoryview, count: int, name: str, i: int) -> np.ndarray:
    pos = 0
    end = len(chunk)
    field_name = f"inputs[{i}].parameters.binary_data_size"
    if 4 * count > end:  # every element carries a 4-byte length: check before allocating
        raise InvalidInput(
            f"input {name!r}: {end} bytes cannot hold {count} BYTES elements", field=field_name
        )
    out = np.empty(count, dtype=object)
    for k in range(count):
        if pos + 4 > end:
            raise InvalidInput(
                f"input {name!r}: binary BYTES data ends after {k} of {count} elements", field=field_name
            )
        (length,) = _U32.unpack_from(chunk, pos)
        pos += 4
        if pos + length > end:
            raise InvalidInput(
                f"input {name!r}: BYTES element {k} is {length} bytes long but only {end - pos} remain",
                field=field_name,
            )
        out[k] = bytes(chunk[pos : pos + length])
        pos += length
    if pos != end:
        raise InvalidInput(
            f"input {name!r}: binary BYTES data has {end - pos} bytes after its {count} elements",
            field=field_name,
        )
    return out


def _from_json(data: Any, datatype: str, count: int, name: str, i: int) -> np.ndarray:
    where = f"inputs[{i}].data"
    if type(data) is not list:
        raise InvalidInput(f"input {name!r}: data must be an array", field=where)
    nested = bool(data) and type(data[0]) is list
    if not nested and len(data) != count:
        raise InvalidInput(f"input {name!r}: data has {len(data)} elements, shape needs {count}", field=where)
    try:
        if count == 0:
            array = np.asarray(data, dtype=object)
            if array.size == 0:
                return np.empty(0, dtype=_DTYPES[datatype])
        elif datatype in _FLOAT_TYPES:
            # Straight to the target dtype (one C pass); JSON null would read as NaN.
            array = np.asarray(data, dtype=_DTYPES[datatype])
            if not np.isfinite(array).all():
                if np.isnan(array).any():
                    # null is not a number: a model must never run on a value the caller did not send
                    raise InvalidInput(f"input {name!r}: null is not a {datatype} number", field=where)
                # JSON has no infinity: an infinite value is a number too large for the datatype
                # (1e39 as FP32), which would run as inf and come back as null.
                raise InvalidInput(f"input {name!r}: a value is out of the range of {datatype}", field=where)
        elif datatype in _INT_TYPES:
            array = _json_int(data, datatype, name, where)
        elif datatype == "BOOL":
            array = np.asarray(data)
            if array.dtype.kind != "b":
                raise InvalidInput(f"input {name!r}: BOOL data must be true or false", field=where)
        else:
            array = _json_bytes(data, name, where)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(
            f"input {name!r}: data is not a regular (non-ragged) array of {datatype} values", field=where
        ) from None
    if array.size != count:
        raise InvalidInput(
            f"input {name!r}: data has {array.size} elements, shape needs {count}", field=where
        )
    return array


def _json_int(data: list[Any], datatype: str, name: str, where: str) -> np.ndarray:
    # Infer first so fractional numbers and all-boolean data are rejected rather than truncated
    # (a boolean mixed among integers follows numpy's coercion to 0/1: checking each element would
    # cost the hot path more than the leniency costs the client).
    array = np.asarray(data)
    kind = array.dtype.kind
    if kind not in "iu" and datatype == "UINT64":
        # Values above INT64's max next to small ones infer as float64 (or objects), losing
        # precision; this is rare, so redo the conversion from the Python ints, checked one by one.
        objects = np.array(data, dtype=object)
        if all(type(item) is int and 0 <= item < 2**64 for item in objects.ravel()):
            return objects.astype(np.uint64)
    if kind not in "iu":
        raise InvalidInput(
            f"input {name!r}: {datatype} data must be integers within the datatype's range", field=where
        )
    target = _DTYPES[datatype]
    if array.dtype != target:
        low, high = _INT_RANGE[datatype]
        if int(array.min()) < low or int(array.max()) > high:
            raise InvalidInput(
                f"input {name!r}: {datatype} data must be between {low} and {high}", field=where
            )
        array = array.astype(target)
    return array


def _json_bytes(data: list[Any], name: str, where: str) -> np.ndarray:
    flat: Iterable[Any] = np.array(data, dtype=object).ravel() if type(data[0]) is list else data
    try:
        encoded = [item.encode("utf-8") for item in flat]
    except (AttributeError, UnicodeEncodeError):
        raise InvalidInput(f"input {name!r}: BYTES data must be strings", field=where) from None
    out = np.empty(len(encoded), dtype=object)
    out[:] = encoded
    return out


def _decode_outputs(raw: Any, binary_default: bool) -> tuple[list[str] | None, set[str]]:
    if raw is None or raw == []:  # no outputs named: every output of the model
        return None, set()
    if type(raw) is not list:
        raise InvalidInput("outputs must be an array", field="outputs")
    names: list[str] = []
    binary: set[str] = set()
    for i, out in enumerate(raw):
        if type(out) is not dict:
            raise InvalidInput("each requested output must be an object", field=f"outputs[{i}]")
        name = out.get("name")
        if type(name) is not str or not name:
            raise InvalidInput("output name must be a non-empty string", field=f"outputs[{i}].name")
        if name in names:
            raise InvalidInput(f"output {name!r} is requested more than once", field=f"outputs[{i}].name")
        is_binary = binary_default
        params = out.get("parameters")
        if params is not None:
            if type(params) is not dict:
                raise InvalidInput(
                    f"output {name!r}: parameters must be an object", field=f"outputs[{i}].parameters"
                )
            for unsupported in ("classification", "shared_memory_region"):
                if params.get(unsupported) not in (None, 0):
                    raise InvalidInput(
                        f"output {name!r}: {unsupported} is not supported",
                        field=f"outputs[{i}].parameters.{unsupported}",
                    )
            flag = params.get("binary_data")
            if flag is not None:
                if type(flag) is not bool:
                    raise InvalidInput(
                        f"output {name!r}: binary_data must be true or false",
                        field=f"outputs[{i}].parameters.binary_data",
                    )
                is_binary = flag
        names.append(name)
        if is_binary:
            binary.add(name)
    return names, binary


# --------------------------------------------------------------------------------------------- encode


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Sequence[tuple[str, np.ndarray]],
    binary: set[str] | bool,
) -> tuple[bytes, int | None]:
    """Encode an OIP v2 inference response.

    ``binary``: True for every output in binary, or the names of the outputs to send in binary.
    Returns ``(body, header_length)``; ``header_length`` is None when nothing is binary (the body is
    plain JSON), else the value for the ``Inference-Header-Content-Length`` header.
    """
    entries: list[dict[str, Any]] = []
    chunks: list[Any] = []
    for name, value in outputs:
        array = np.asarray(value)
        datatype = _DATATYPES.get(array.dtype)
        if datatype is None:
            datatype = dtype_to_datatype(array.dtype)
            if datatype != "BYTES":
                array = array.astype(_DTYPES[datatype])
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": array.shape}
        if binary is True or (binary is not False and name in binary):
            raw = _bytes_to_binary(array) if datatype == "BYTES" else _numeric_to_binary(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype == "BYTES":
            entry["data"] = [_to_text(item) for item in array.reshape(-1).tolist()]
        else:
            entry["data"] = np.ascontiguousarray(array).reshape(-1)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = entries
    header = orjson.dumps(doc, option=_NUMPY_OPT)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _numeric_to_binary(array: np.ndarray) -> memoryview | bytes:
    if array.size == 0:
        return b""
    if not _LITTLE and array.dtype.itemsize > 1:  # pragma: no cover - big-endian hosts
        array = array.astype(array.dtype.newbyteorder("<"))
    # A flat byte view of the C-ordered data; b"".join copies it once into the body.
    return np.ascontiguousarray(array).data.cast("B")


def _bytes_to_binary(array: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in array.reshape(-1).tolist():
        raw = item.encode("utf-8") if type(item) is str else bytes(item)
        parts.append(_U32.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _to_text(item: Any) -> str:
    if type(item) is str:
        return item
    if isinstance(item, bytes | bytearray):
        return bytes(item).decode("utf-8", errors="replace")
    return str(item)
