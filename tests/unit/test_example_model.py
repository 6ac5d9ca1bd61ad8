"""The bundled example model is exactly what the script in the repo regenerates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from maas.examples import EXAMPLE_REQUEST, example_model_path

ROOT = Path(__file__).resolve().parents[2]


def test_script_regenerates_the_bundled_model_byte_for_byte(tmp_path: Path) -> None:
    output = tmp_path / "iris.onnx"
    subprocess.run([sys.executable, str(ROOT / "scripts/make_example_model.py"), str(output)], check=True,
                   capture_output=True)
    assert output.read_bytes() == example_model_path().read_bytes()


def test_example_request_classifies_the_two_flowers() -> None:
    session = ort.InferenceSession(str(example_model_path()))
    features = np.array(EXAMPLE_REQUEST["inputs"][0]["data"], dtype=np.float32)
    probabilities, label = session.run(None, {"features": features})
    assert label.tolist() == [0, 2]  # setosa, virginica
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
