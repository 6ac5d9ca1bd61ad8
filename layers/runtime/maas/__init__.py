"""maas: turn an ONNX model into a versioned, validated, monitored inference service."""

__version__ = "0.1.0"
