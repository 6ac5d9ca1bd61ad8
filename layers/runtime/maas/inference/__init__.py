"""Running and checking ONNX models: signature extraction, validation, and the inference engine."""
