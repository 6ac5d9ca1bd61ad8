"""Open Inference Protocol v2 (KServe / Triton) shapes.

These pydantic models document the protocol in OpenAPI and serve the client; the server's hot path
does not validate requests through them (see ``maas.inference.codec``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: OIP datatype name -> numpy dtype string. BYTES tensors are numpy object arrays of ``bytes``.
DATATYPE_TO_NUMPY: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BYTES": "object",
}

BINARY_HEADER = "Inference-Header-Content-Length"
VERSION_HEADER = "X-Maas-Model-Version"
EXTENSIONS = ("binary_tensor_data",)


class _Schema(BaseModel):
    """The OIP shapes, for OpenAPI and metadata answers. The infer hot path never validates through
    them, so their validators are built on first use, not at import (the inference Lambda imports
    this module for its constants: a cold start should not build schemas it never uses)."""

    model_config = ConfigDict(defer_build=True)


class TensorMetadata(_Schema):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(_Schema):
    name: str
    versions: list[str] = Field(default_factory=list)
    platform: str = "onnxruntime_onnx"
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(_Schema):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(default=None, description="Row-major tensor data, flat or nested.")


class RequestOutput(_Schema):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(_Schema):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_Schema):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(_Schema):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]
