"""The example model bundled for the demo and the tests (regenerate with scripts/make_example_model.py)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

EXAMPLE_MODEL_NAME = "iris"
EXAMPLE_FILE = "iris.onnx"

#: A valid OIP v2 request body for the example model: two flowers, four features each.
EXAMPLE_REQUEST: dict[str, Any] = {
    "inputs": [
        {
            "name": "features",
            "shape": [2, 4],
            "datatype": "FP32",
            "data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]],
        }
    ]
}


def example_model_path() -> Path:
    return Path(str(resources.files(__name__).joinpath(EXAMPLE_FILE)))
