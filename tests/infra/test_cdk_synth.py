"""`npx cdk synth` with the pinned CDK CLI and real, Docker-free bundling: the layers are built by
scripts/build_layers.py through ILocalBundling, and the assets hold what the functions import, within
Lambda's 250 MB unzipped limit. Needs node_modules (`npm ci`, run by `make install-dev`) and pip's
index (the layers are pip-installed for Linux/CPython 3.12). The one slow infra test (~1 min)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.infra.conftest import REPO

MB = 1024 * 1024
LAMBDA_UNZIPPED_LIMIT = 250 * MB


def tree_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def cdk_synth(out: Path, *context: str) -> Path:
    """`npx cdk synth` as a user runs it (the pinned CLI, cdk.json, real Docker-free bundling)."""
    cdk = REPO / "node_modules" / ".bin" / "cdk"
    assert cdk.exists(), "the pinned CDK CLI is missing: run `npm ci` (make install-dev does)"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "CDK_DISABLE_VERSION_CHECK": "1", "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "1",
           "CDK_DISABLE_CLI_TELEMETRY": "true"}
    arguments = [argument for value in context for argument in ("-c", value)]
    completed = subprocess.run([str(cdk), "synth", "--quiet", "--output", str(out), *arguments], cwd=REPO,
                               env=env, capture_output=True, text=True, timeout=900, check=False)
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-6000:]
    return out


@pytest.fixture(scope="module")
def cloud_assembly(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cdk_synth(tmp_path_factory.mktemp("cdk.out"))


@pytest.fixture(scope="module")
def pools_assembly(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage opted into container pools from the command line, as the README shows."""
    return cdk_synth(tmp_path_factory.mktemp("cdk.out-pools"), 'maas:stages={"dev": {"container_pools": true}}')


def layer_dirs(assembly: Path) -> dict[str, Path]:
    template: dict[str, Any] = json.loads((assembly / "maas-dev.template.json").read_text())
    found = {}
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::Lambda::LayerVersion":
            description = resource["Properties"]["Description"]
            kind = "runtime" if description.startswith("maas package") else (
                "api" if "FastAPI" in description else "inference")
            found[kind] = assembly / resource["Metadata"]["aws:asset:path"]
    return found


def test_layers_are_bundled_for_python312_without_docker(cloud_assembly: Path) -> None:
    layers = layer_dirs(cloud_assembly)
    assert set(layers) == {"runtime", "api", "inference"}
    site = {kind: path / "python" for kind, path in layers.items()}
    # the runtime layer is the maas package, byte-compiled for Lambda's 3.12
    assert (site["runtime"] / "maas" / "__init__.py").is_file()
    assert list((site["runtime"] / "maas" / "__pycache__").glob("*.cpython-312.pyc"))
    assert not list(site["runtime"].rglob("*.cpython-311.pyc"))
    # the inference layer: what the lean handler imports, trimmed, no web framework, no boto3 (Lambda's own)
    for package in ("onnxruntime", "numpy", "pydantic", "orjson", "aws_lambda_powertools"):
        assert (site["inference"] / package).is_dir(), package
    for absent in ("fastapi", "onnx", "boto3", "botocore", "onnxruntime/transformers", "onnxruntime/quantization"):
        assert not (site["inference"] / absent).exists(), absent
    # the api layer adds the validator and the web stack
    for package in ("fastapi", "starlette", "mangum", "onnx", "onnxruntime", "onnxruntime/quantization"):
        assert (site["api"] / package).is_dir(), package  # the optimize step quantizes with this layer
    runtime = tree_bytes(layers["runtime"])
    for kind in ("api", "inference"):
        total = tree_bytes(layers[kind]) + runtime
        print(f"{kind} layer + runtime layer: {total / MB:.1f} MB unzipped")
        assert total < LAMBDA_UNZIPPED_LIMIT, f"{kind}: {total / MB:.1f} MB"


def test_function_assets_hold_only_their_handler(cloud_assembly: Path) -> None:
    template: dict[str, Any] = json.loads((cloud_assembly / "maas-dev.template.json").read_text())
    zips = [r for r in template["Resources"].values()
            if r["Type"] == "AWS::Lambda::Function" and str(r["Properties"].get("Runtime", "")).startswith("python")]
    assert len(zips) >= 6
    for resource in zips:
        asset = cloud_assembly / resource["Metadata"]["aws:asset:path"]
        files = sorted(path.relative_to(asset).as_posix() for path in asset.rglob("*") if path.is_file())
        assert files == ["handler.py"], files


def test_a_default_stage_has_no_container_asset(cloud_assembly: Path) -> None:
    """`cdk deploy` of a default stage never needs a Docker daemon: nothing to build or push."""
    manifest: dict[str, Any] = json.loads((cloud_assembly / "maas-dev.assets.json").read_text())
    assert manifest.get("dockerImages", {}) == {}


def test_container_assets_send_only_what_the_dockerfiles_copy(pools_assembly: Path) -> None:
    manifest: dict[str, Any] = json.loads((pools_assembly / "maas-dev.assets.json").read_text())
    images = {image["source"]["dockerFile"]: pools_assembly / image["source"]["directory"]
              for image in manifest["dockerImages"].values()}
    assert set(images) == {"functions/inference/Dockerfile", "functions/sagemaker/Dockerfile"}
    for dockerfile, context in images.items():
        assert (context / dockerfile).is_file()
        assert (context / "layers" / "runtime" / "maas" / "__init__.py").is_file()
        for excluded in (".venv", "tests", "cdk.out", "node_modules", ".git", "build"):
            assert not (context / excluded).exists(), (dockerfile, excluded)
        assert tree_bytes(context) < 20 * MB
