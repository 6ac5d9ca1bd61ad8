"""What a version's requests are checked against, worked out once per version and cached with its
session: the inputs' datatypes, ranks and fixed dimensions, shared symbolic dimensions, the output
names, and the run bounds (the server's, or the version's own where tighter)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from maas.domain import RunLimits, Signature, TensorSpec
from maas.errors import InvalidInput
from maas.inference.codec import DecodedRequest, datatype_to_dtype
from maas.settings import Limits

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["Checks", "InputCheck", "build_checks", "field_of", "session_signature", "shape_text", "to_strings"]


#: onnxruntime's type strings -> OIP datatypes (used only when a version carries no signature).
_ORT_TO_OIP = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


@dataclass(slots=True, frozen=True)
class InputCheck:
    name: str
    datatype: str
    dtype: np.dtype[Any]
    rank: int
    fixed: tuple[tuple[int, int], ...]  # (axis, size) of every non-dynamic dimension
    shape: tuple[int, ...]
    strings: bool  # BYTES: onnxruntime wants ``str`` elements


@dataclass(slots=True, frozen=True)
class Checks:
    inputs: tuple[InputCheck, ...]
    input_names: frozenset[str]
    outputs: list[str]
    output_names: frozenset[str]
    #: symbolic dimensions used in more than one place: (name, ((input, axis), ...)); they must agree
    shared_dims: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()
    #: this version's run bounds: the server's, or the version's own where tighter (``RunLimits``)
    deadline_s: float = 30.0
    max_output_bytes: int = 64 * 1024 * 1024
    #: how errors name the bound: "max_inference_seconds" or "this version's max_inference_seconds"
    bound_owner: str = ""


def _shared_dims(session: ort.InferenceSession) -> tuple[tuple[str, tuple[tuple[str, int], ...]], ...]:
    """Named dynamic dimensions (``batch``, ``N``) that several inputs or axes share: onnxruntime
    would fail on a mismatch, which is the client's error, so it is checked before running."""
    uses: dict[str, list[tuple[str, int]]] = {}
    for arg in session.get_inputs():
        for axis, dim in enumerate(arg.shape or ()):
            if isinstance(dim, str) and dim:
                uses.setdefault(dim, []).append((arg.name, axis))
    return tuple((dim, tuple(places)) for dim, places in uses.items() if len(places) > 1)


def _spec_check(spec: TensorSpec) -> InputCheck:
    return InputCheck(
        name=spec.name,
        datatype=spec.datatype,
        dtype=datatype_to_dtype(spec.datatype),
        rank=len(spec.shape),
        fixed=tuple((axis, dim) for axis, dim in enumerate(spec.shape) if dim >= 0),
        shape=tuple(spec.shape),
        strings=spec.datatype == "BYTES",
    )


def session_signature(session: ort.InferenceSession) -> Signature:
    def spec(arg: Any) -> TensorSpec:
        shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in (arg.shape or ()))
        return TensorSpec(name=arg.name, datatype=_ORT_TO_OIP.get(arg.type, arg.type), shape=shape)

    return Signature(
        inputs=tuple(spec(a) for a in session.get_inputs()),
        outputs=tuple(spec(a) for a in session.get_outputs()),
    )


def build_checks(signature: Signature, session: ort.InferenceSession, limits: Limits,
                  own: RunLimits | None) -> Checks:
    outputs = [spec.name for spec in signature.outputs]
    deadline, output_cap = limits.max_inference_seconds, limits.max_output_bytes
    if own is not None:
        deadline = min(deadline, own.max_inference_seconds or deadline)
        output_cap = min(output_cap, own.max_output_bytes or output_cap)
    return Checks(
        deadline_s=deadline,
        max_output_bytes=output_cap,
        bound_owner="this version's " if own is not None else "",
        inputs=tuple(_spec_check(spec) for spec in signature.inputs),
        input_names=frozenset(spec.name for spec in signature.inputs),
        outputs=outputs,
        output_names=frozenset(outputs),
        shared_dims=_shared_dims(session),
    )


def shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def field_of(request: DecodedRequest, name: str, suffix: str) -> str:
    index = list(request.inputs).index(name)
    return f"inputs[{index}]{suffix}"


def to_strings(array: np.ndarray, name: str, field: str) -> np.ndarray:
    try:
        items = [item.decode("utf-8") if type(item) is bytes else item for item in array.reshape(-1).tolist()]
    except UnicodeDecodeError:
        raise InvalidInput(
            f"input {name!r}: this model's string input needs UTF-8 text", field=field
        ) from None
    if any(type(item) is not str for item in items):
        raise InvalidInput(f"input {name!r}: BYTES elements must be bytes or text", field=field)
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(array.shape)
