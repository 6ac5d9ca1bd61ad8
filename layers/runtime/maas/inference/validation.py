"""Decide whether an uploaded artifact is a safe, runnable ONNX model, and read its signature.

Uploads are hostile until proven otherwise. The checks run cheapest and safest first, and nothing that
could execute code or touch the filesystem sees the bytes until the earlier checks passed:

1. size cap, from ``stat`` before reading, so a huge upload never reaches memory;
2. content sniffing, so pickles (which run code when loaded), archives (PyTorch ``.pt`` is a zip),
   HDF5 and text files are refused by what they are, with a reason that tells the user what to do;
3. protobuf parse with no external-data loading (parsing is pure: no I/O, no code execution);
4. refusal of any tensor stored as external data, anywhere in the model, *before* the checker or
   onnxruntime could resolve its location (CVE-2022-25882, CVE-2024-27318: ``../`` and absolute
   locations read arbitrary files);
5. node count (subgraphs included; the walk that counts is itself capped, see ``MESSAGES_PER_NODE``)
   and operator domains (custom domains need custom-op libraries, i.e. native code we do not load);
6. ``onnx.checker`` with full shape inference, then signature extraction;
7. one smoke inference on zeros with onnxruntime, single-threaded on CPU, so a model that cannot run
   is rejected at registration instead of on its first request.

``inspect_model_file`` runs all of this in-process (``check_static`` runs 1-6 only: no onnxruntime).
It bounds *what* is parsed but not the CPU or memory a crafted graph can make onnxruntime use, nor a
native crash; ``maas.inference.sandbox.SubprocessValidator`` is what services use: it runs the same
checks in a child process under rlimits (address space, CPU time, file size, open files, new tasks, no core dumps) and a
wall-clock timeout.

Every rejection is ``ModelRejected`` with a one-line reason that never contains filesystem paths or
tracebacks: the reason is shown to the uploader and stored on the FAILED version.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from onnx import TensorProto

from maas.domain import Signature, TensorSpec
from maas.errors import ModelRejected
from maas.inference.signature import quote_name, signature_from_model
from maas.settings import MIN_VALIDATION_MEMORY_BYTES as MIN_VALIDATION_MEMORY
from maas.settings import Limits

#: Operator domains onnxruntime implements natively. Anything else needs a custom-op library (native
#: code) or is unknown, so a model using it could not run on a stock runtime anyway.
ALLOWED_DOMAINS: frozenset[str] = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

#: The lowest RLIMIT_AS the validation child runs under, whatever ``Limits`` says. Importing numpy,
#: onnx and onnxruntime and creating one session maps several hundred MiB of address space (mostly
#: shared libraries and reserved thread stacks) before any model data; below this floor every model,
#: even a trivial one, would be rejected as "out of memory".
MIN_VALIDATION_MEMORY_BYTES = MIN_VALIDATION_MEMORY

#: Messages (nodes, attributes, tensors, value infos...) the structural walk visits per allowed node.
#: Real models have a handful per node; the cap bounds the walk's time and memory on crafted ones.
MESSAGES_PER_NODE = 16

_MAX_REASON_CHARS = 300
_SNIFF_BYTES = 512
_ONNX_FIRST_BYTE = 0x08  # field 1 (ModelProto.ir_version), wire type 0 (varint): (1 << 3) | 0

_PICKLE_GLOBAL = re.compile(rb"c[\w.]+\n[\w.]+\n")


# --------------------------------------------------------------------------------------------------
# reasons


_PATHLIKE = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.\-+@~]+){2,}(?::\d+)?")
_SOURCE_LOCATION = re.compile(r"\b[\w\-]+\.(?:cc|cpp|cxx|c|h|hpp|py):\d+\b")
_CPP_FUNCTION = re.compile(r"\b(?:\w+::)+~?\w+\([^()]*\)(?:\s*const)?")
_ORT_PREFIX = re.compile(r"\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")


def clean_reason(text: str) -> str:
    """One short line from a library's error message, with anything path-like removed.

    onnxruntime and onnx messages embed source locations (``/onnxruntime_src/.../x.h:91``), C++
    function signatures, and sometimes span lines; reasons are shown to users and stored, so they keep
    only the human-readable part.
    """
    for pattern in (_ORT_PREFIX, _PATHLIKE, _SOURCE_LOCATION, _CPP_FUNCTION):
        text = pattern.sub(" ", text)
    text = " ".join(text.split())
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return text or "no detail"


def _is_out_of_memory(exc: BaseException) -> bool:
    message = str(exc).lower()
    return isinstance(exc, MemoryError) or "bad_alloc" in message or "failed to allocate" in message


# --------------------------------------------------------------------------------------------------
# 1-2: size and content sniffing


def _sniff_non_onnx(head: bytes, data: bytes) -> str | None:
    """Name what ``data`` looks like when it is clearly not ONNX, else None.

    Heuristics only have to be right about the common mistakes (a pickled sklearn model, a PyTorch
    checkpoint, a Keras file, a config file): everything else that does not start like a ModelProto is
    refused by the ONNX magic check that follows.
    """
    first = head[:1]
    pickle_stop = data[-8:].rstrip(b"\r\n").endswith(b".")
    if first == b"\x80" or _PICKLE_GLOBAL.match(head) or (first in (b"(", b"]", b"}") and pickle_stop):
        # Protocol 2+ start with PROTO (0x80); protocol 0/1 with GLOBAL ("cmodule\nname\n"), MARK,
        # EMPTY_LIST or EMPTY_DICT, and end with STOP (".").
        return "a Python pickle (unpickling runs arbitrary code, so maas never loads pickles)"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
        return "a zip archive (PyTorch .pt/.pth, Keras .keras and NumPy .npz files are zip archives)"
    if head[257:262] == b"ustar":
        return "a tar archive"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "an HDF5 file (Keras .h5)"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array"
    if head[4:8] == bytes(4) and head[8:10] == b'{"':  # little-endian u64 header length, then JSON
        return "a safetensors file (weights only, no graph)"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        text = head.lstrip()
        if text[:1] in (b"{", b"["):
            kind = "JSON"
        elif text.startswith(b"---") or b": " in text or b":\n" in text:
            kind = "YAML"
        else:
            kind = "plain text"
        return f"a text file ({kind})"
    return None


def read_bounded(path: Path, limits: Limits) -> bytes:
    """The file's bytes, refusing by size before reading and again while reading (the file may grow)."""
    size = path.stat().st_size
    limit = limits.max_model_bytes
    if size > limit:
        raise ModelRejected(f"model is {size} bytes, over the limit of {limit} bytes")
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ModelRejected(f"model is over the limit of {limit} bytes")
    return data


def _check_content(data: bytes) -> None:
    if not data:
        raise ModelRejected("file is empty")
    # Sniff only what cannot be ONNX: naming the format is a courtesy, and a heuristic must never
    # refuse a real model (whose first byte is 0x08, which none of the formats sniffed start with).
    what = _sniff_non_onnx(data[:_SNIFF_BYTES], data) if data[0] != _ONNX_FIRST_BYTE else None
    if what is not None:
        raise ModelRejected(f"not an ONNX model: this looks like {what}; export the model to ONNX")
    if data[0] != _ONNX_FIRST_BYTE:
        raise ModelRejected(
            "not an ONNX model: a serialized ONNX ModelProto starts with its ir_version field (byte 0x08)"
        )


# --------------------------------------------------------------------------------------------------
# 3: parse


def _parse(data: bytes) -> onnx.ModelProto:
    """Parse the bytes as a ModelProto. ``ParseFromString`` does no I/O: external data stays a
    reference (a location string) that nothing resolves, which is what the next check relies on."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError:
        raise ModelRejected("not a valid ONNX protobuf (truncated or corrupt)") from None
    except (RecursionError, ValueError, RuntimeError):
        raise ModelRejected("not a valid ONNX protobuf (truncated, corrupt or nested too deeply)") from None
    return model


# --------------------------------------------------------------------------------------------------
# 4-5: structural walk


def _walk(model: onnx.ModelProto) -> Iterator[tuple[Message, str]]:
    """Every message in ``model`` with its field path (``graph.node[3].attribute[0].g``).

    A generic walk over the protobuf descriptors, not a list of known places: tensors and nodes hide in
    initializers, sparse initializers, node attributes (``t``, ``tensors``, ``sparse_tensor``), subgraphs
    of If/Loop/Scan (``g``, ``graphs``) at any depth, model-local functions and training info; walking
    every field finds them all, including fields added by future ONNX versions. Tensors are yielded but
    not descended into (their only sub-messages are segment and external-data entries, and their payload
    can be large). Iterative, so a deeply nested model cannot exhaust the Python stack.
    """
    stack: list[tuple[Message, str]] = [(model, "model")]
    while stack:
        message, where = stack.pop()
        yield message, where
        if isinstance(message, TensorProto):
            continue
        children: list[tuple[Message, str]] = []
        for field, value in message.ListFields():
            if field.type != FieldDescriptor.TYPE_MESSAGE:
                continue
            if _is_repeated(field):
                children.extend(
                    (item, f"{where}.{field.name}[{_label(item, i)}]") for i, item in enumerate(value)
                )
            else:
                children.append((value, f"{where}.{field.name}"))
        stack.extend(reversed(children))


def _label(item: Message, index: int) -> str:
    """How a repeated item appears in a walk path: attributes by name (``attribute['then_branch']``
    says which subgraph of an If/Loop/Scan), everything else by index."""
    if isinstance(item, onnx.AttributeProto):
        return quote_name(item.name)
    return str(index)


def _is_repeated(field: FieldDescriptor) -> bool:
    is_repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.28 deprecates ``label``
    if isinstance(is_repeated, bool):
        return is_repeated
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)


def _message_budget(limits: Limits) -> int:
    return limits.max_nodes * MESSAGES_PER_NODE


def _check_counts(model: onnx.ModelProto, limits: Limits) -> None:
    """Refuse by counts that cost nothing, before the walk: the parsed protobuf knows the length of
    each repeated field without creating a Python object per item, and a crafted graph of millions of
    empty entries (2 bytes each on disk) would otherwise take the walk minutes and gigabytes."""
    graph = model.graph
    if len(graph.node) > limits.max_nodes:
        raise ModelRejected(
            f"model has at least {len(graph.node)} nodes, over the limit of {limits.max_nodes}"
        )
    entries = sum(len(value) for field, value in graph.ListFields()
                  if field.type == FieldDescriptor.TYPE_MESSAGE and _is_repeated(field))
    if entries > _message_budget(limits):
        raise ModelRejected(
            f"model graph has {entries} entries (nodes, tensors, value infos), over the limit of"
            f" {_message_budget(limits)}"
        )


def _check_structure(model: onnx.ModelProto, limits: Limits) -> None:
    """Refuse external data, too many nodes, and unknown operator domains, in that order (after the
    cheap counts of ``_check_counts``; the walk itself stops at ``MESSAGES_PER_NODE`` messages per
    allowed node, which bounds its time whatever the model nests)."""
    _check_counts(model, limits)
    local_functions = {(f.domain, f.name) for f in model.functions}
    nodes = 0
    bad_domain: tuple[str, str] | None = None
    budget = _message_budget(limits)
    for visited, (message, where) in enumerate(_walk(model)):
        if visited > budget:
            raise ModelRejected(
                f"model has more than {budget} protobuf messages (nodes, attributes, tensors), over the"
                f" limit for {limits.max_nodes} nodes"
            )
        if isinstance(message, TensorProto):
            if message.data_location == TensorProto.EXTERNAL or len(message.external_data) > 0:
                raise ModelRejected(
                    f"tensor {quote_name(message.name)} at {where} refers to external data; maas accepts"
                    " self-contained models only (save the model without save_as_external_data)"
                )
        elif isinstance(message, onnx.NodeProto):
            nodes += 1
            domain = message.domain
            if (
                bad_domain is None
                and domain not in ALLOWED_DOMAINS
                and (domain, message.op_type) not in local_functions
            ):
                bad_domain = (domain, message.op_type)
    if nodes > limits.max_nodes:
        raise ModelRejected(
            f"model has {nodes} nodes (subgraphs included), over the limit of {limits.max_nodes}"
        )
    if bad_domain is not None:
        domain, op_type = bad_domain
        raise ModelRejected(
            f"operator {quote_name(op_type)} is in the custom domain {quote_name(domain)}; maas runs only"
            f" standard operators (domains: {', '.join(repr(d) for d in sorted(ALLOWED_DOMAINS))})"
        )


# --------------------------------------------------------------------------------------------------
# 6: checker


def _check_onnx(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except MemoryError:
        raise
    except Exception as exc:  # ValidationError, InferenceError, and whatever else a crafted model triggers
        raise ModelRejected(clean_reason(f"ONNX checker: {exc}")) from None  # capped as a whole


# --------------------------------------------------------------------------------------------------
# 7: smoke inference

_NUMPY_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


def smoke_shapes(signature: Signature, limits: Limits) -> dict[str, tuple[int, ...]]:
    """The shape of each smoke input (dynamic dims set to 1), without allocating anything.

    Refuses inputs whose fixed dims need more elements than a request may carry: such a model could
    never be called, and building its smoke input would itself be a memory attack. Part of the static
    checks, so a huge declared dim is refused before onnxruntime (or numpy) sees it.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in signature.inputs:
        shape = tuple(1 if d < 0 else d for d in spec.shape)
        elements = math.prod(shape)
        if elements > limits.max_tensor_elements:
            raise ModelRejected(
                f"input {quote_name(spec.name)} has fixed shape {list(spec.shape)} ({elements} elements),"
                f" over the limit of {limits.max_tensor_elements} elements per tensor"
            )
        shapes[spec.name] = shape
    return shapes


def smoke_inputs(signature: Signature, limits: Limits) -> dict[str, np.ndarray[Any, Any]]:
    """Zero-filled inputs matching ``signature``, dynamic dims set to 1 (see ``smoke_shapes``)."""
    shapes = smoke_shapes(signature, limits)
    return {spec.name: _zeros(spec, shapes[spec.name]) for spec in signature.inputs}


def _zeros(spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    if spec.datatype == "BYTES":
        return np.full(shape, "", dtype=np.object_)
    return np.zeros(shape, dtype=_NUMPY_DTYPES[spec.datatype])


def _smoke_inference(data: bytes, signature: Signature, limits: Limits) -> None:
    """Load ``data`` into onnxruntime (from bytes: no model path, so nothing relative to resolve) and
    run it once. One thread each way: validation must not starve the server it runs beside."""
    feeds = smoke_inputs(signature, limits)
    import onnxruntime as ort  # deferred: ~0.2 s import that only this step needs

    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: warnings about the graph are not actionable here
        options.add_session_config_entry("session.load_model_format", "ONNX")
        session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
    except Exception as exc:
        if _is_out_of_memory(exc):
            raise ModelRejected("smoke inference ran out of memory") from None
        raise ModelRejected(clean_reason(f"smoke inference failed: {exc}")) from None


# --------------------------------------------------------------------------------------------------
# the pipeline


def check_static(data: bytes, limits: Limits) -> Signature:
    """Checks 1-6 and the smoke-input size cap: everything but running the model.

    Pure Python and protobuf over bytes already in memory: no onnxruntime, no I/O, no allocation
    beyond the parsed model. It is the first half of ``inspect_model_bytes`` (so of what the child
    process runs), exposed on its own because it is cheap (well under a millisecond for small models):
    tests push tens of thousands of hostile inputs through it in-process.

    Returns the signature, or raises ModelRejected (MemoryError passes through, see below).
    """
    if len(data) > limits.max_model_bytes:
        raise ModelRejected(f"model is {len(data)} bytes, over the limit of {limits.max_model_bytes} bytes")
    _check_content(data)
    model = _parse(data)
    try:
        _check_structure(model, limits)
        _check_onnx(model)
        signature = signature_from_model(model)
    except (ModelRejected, MemoryError):
        raise
    except Exception as exc:
        raise ModelRejected(clean_reason(f"model could not be inspected: {exc!r}")) from None
    if not signature.inputs:
        raise ModelRejected("model has no inputs; maas serves models that take at least one input")
    if not signature.outputs:
        raise ModelRejected("model has no outputs")
    smoke_shapes(signature, limits)
    return signature


def inspect_model_bytes(data: bytes, limits: Limits) -> Signature:
    """All content checks on an artifact's bytes; see the module docstring for the order and why.

    Returns the signature, or raises ModelRejected. Exceptions that are not ModelRejected are turned
    into one (a crafted model can make any library raise anything) except MemoryError, which callers
    in a memory-limited child report as such.
    """
    signature = check_static(data, limits)  # the parsed model is not kept: onnxruntime parses its own copy
    _smoke_inference(data, signature, limits)
    return signature


def inspect_model_file(path: Path, limits: Limits) -> Signature:
    """Validate the ONNX model at ``path`` in this process and return its signature.

    Raises ModelRejected (with a reason for the user) for anything that is not a safe, runnable,
    self-contained ONNX model within ``limits``. ``OSError`` (the file is missing or unreadable) is
    propagated: that is a storage problem, not a verdict on the model. Use ``SubprocessValidator`` for
    untrusted uploads; this function does not bound CPU time or memory.
    """
    return inspect_model_bytes(read_bounded(path, limits), limits)
