"""Read a model's serving signature (graph inputs and outputs) from its ONNX graph.

The signature is what the inference API checks requests against before onnxruntime runs, so it
must describe exactly what a client may send: OIP v2 datatype names and shapes with -1 for dims
the graph leaves open. Anything the serving path cannot represent (sequence/map inputs, element
types with no OIP v2 name or no numpy dtype) is refused here, at registration, instead of failing
on the first request.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from maas.domain import Signature, TensorSpec
from maas.errors import ModelRejected

#: ONNX ``TensorProto`` element types maas can serve, mapped to their OIP v2 datatype names.
#: BFLOAT16, the FLOAT8/INT4 families and complex types are left out on purpose: numpy (which the
#: hot path decodes request tensors into) has no native dtype for them, so no client could send them.
ONNX_TO_OIP: dict[int, str] = {
    TensorProto.BOOL: "BOOL",
    TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32",
    TensorProto.UINT64: "UINT64",
    TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.FLOAT16: "FP16",
    TensorProto.FLOAT: "FP32",
    TensorProto.DOUBLE: "FP64",
    TensorProto.STRING: "BYTES",
}

_MAX_NAME_CHARS = 80
# What a registry record can hold on every backend (a DynamoDB item is at most 400 KB) and clients can
# reasonably send: real exporters stay far below (names of ~100 characters, a few dozen tensors).
MAX_TENSOR_NAME_CHARS = 1024
MAX_SIGNATURE_TENSORS = 1000
MAX_SIGNATURE_DIMS = 64


def quote_name(name: str) -> str:
    """Quote a name taken from an uploaded model for use in a rejection reason.

    Names are attacker-controlled: ``repr`` escapes newlines and control characters so a reason stays
    one line, and long names are cut so a reason stays readable.
    """
    if len(name) > _MAX_NAME_CHARS:
        name = name[:_MAX_NAME_CHARS] + "..."
    return repr(name)


def _elem_type_name(elem_type: int) -> str:
    try:
        return str(TensorProto.DataType.Name(elem_type))  # type: ignore[arg-type]
    except ValueError:
        return f"unknown type {elem_type}"


def _tensor_spec(value: onnx.ValueInfoProto, role: str) -> TensorSpec:
    """One graph input or output as a TensorSpec, or ModelRejected naming it and why not."""
    label = f"{role} {quote_name(value.name)}"
    if len(value.name) > MAX_TENSOR_NAME_CHARS:
        raise ModelRejected(f"{label} has a name of {len(value.name)} characters; at most "
                            f"{MAX_TENSOR_NAME_CHARS} are supported")
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        what = {
            "sequence_type": "a sequence",
            "map_type": "a map",
            "optional_type": "an optional",
            "sparse_tensor_type": "a sparse tensor",
            None: "missing its type",
        }.get(kind, kind)
        raise ModelRejected(f"{label} is {what}; maas serves dense tensor inputs and outputs only")
    tensor_type = value.type.tensor_type
    datatype = ONNX_TO_OIP.get(tensor_type.elem_type)
    if datatype is None:
        raise ModelRejected(
            f"{label} has element type {_elem_type_name(tensor_type.elem_type)}, which maas cannot serve"
            f" (supported: {', '.join(sorted(set(ONNX_TO_OIP.values())))})"
        )
    if not tensor_type.HasField("shape"):
        # Without a rank the server could not check requests before running the model.
        raise ModelRejected(f"{label} has no shape (unknown rank); re-export the model with shapes")
    # dim_value is 0 when the dim is symbolic (dim_param) or unknown; ONNX never means 0 by an unset
    # dim, and a literal 0-sized dim cannot carry data, so both become "dynamic" (-1).
    if len(tensor_type.shape.dim) > MAX_SIGNATURE_DIMS:
        raise ModelRejected(f"{label} has rank {len(tensor_type.shape.dim)}; at most {MAX_SIGNATURE_DIMS} "
                            "dimensions are supported")
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                  for d in tensor_type.shape.dim)
    return TensorSpec(name=value.name, datatype=datatype, shape=shape)


def signature_from_model(model: onnx.ModelProto) -> Signature:
    """The serving signature of ``model``'s main graph.

    Inputs that are also initializers are left out: older exporters (IR < 4) list weights as graph
    inputs, and they are constants with defaults, not something a client should send.
    Raises ModelRejected for inputs or outputs that maas cannot serve.
    """
    graph = model.graph
    if len(graph.input) + len(graph.output) > MAX_SIGNATURE_TENSORS + len(graph.initializer):
        raise ModelRejected(f"the model has {len(graph.input)} inputs and {len(graph.output)} outputs; at most "
                            f"{MAX_SIGNATURE_TENSORS} in all are supported")
    initializers = {t.name for t in graph.initializer}
    initializers.update(s.values.name for s in graph.sparse_initializer)
    inputs = tuple(_tensor_spec(v, "input") for v in graph.input if v.name not in initializers)
    outputs = tuple(_tensor_spec(v, "output") for v in graph.output)
    if len(inputs) + len(outputs) > MAX_SIGNATURE_TENSORS:
        raise ModelRejected(f"the model has {len(inputs)} inputs and {len(outputs)} outputs; at most "
                            f"{MAX_SIGNATURE_TENSORS} in all are supported")
    return Signature(inputs=inputs, outputs=outputs)
