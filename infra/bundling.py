"""Lambda layer bundling without Docker.

CDK's Python bundling runs pip inside a SAM build image, which needs a Docker engine; the machines that
synthesize this stack (CI, laptops without Docker) have none. Every dependency ships manylinux wheels, so
``scripts/build_layers.py`` lays the layers out for Linux/CPython 3.12 from any host (cross-platform pip,
closure check, trimming, 3.12 bytecode, a smoke test on the native architecture). This module only hands
its output to CDK through ``ILocalBundling``.

Bundling runs at construct time. Tests skip it with the context ``aws:cdk:bundling-stacks = []``; then
CDK never calls ``try_bundle`` and the asset is a placeholder.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsii
from aws_cdk import AssetHashType, BundlingOptions, DockerImage, ILocalBundling
from aws_cdk import aws_lambda as lambda_

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_layers.py"
RUNTIME_PACKAGE = REPO_ROOT / "layers" / "runtime" / "maas"
# What makes a layer's content: hashing these (not the output) keeps the asset hash stable across builds.
LAYER_SOURCES = {
    "runtime": (RUNTIME_PACKAGE,),
    "api": (REPO_ROOT / "layers" / "deps" / "api" / "requirements.txt",),
    "inference": (REPO_ROOT / "layers" / "deps" / "inference" / "requirements.txt",),
}


class BundlingFailed(RuntimeError):
    """The layer build script failed: synth stops with its output instead of falling back to Docker."""


@jsii.implements(ILocalBundling)
class LayerBuild:
    """Runs ``scripts/build_layers.py`` for one layer and architecture into CDK's output directory."""

    def __init__(self, layer: str, architecture: str, python: str = sys.executable):
        self.layer = layer
        self.architecture = architecture
        self.python = python

    def command(self, out: Path) -> list[str]:
        return [self.python, str(BUILD_SCRIPT), "--layer", self.layer, "--arch", self.architecture,
                "--out", str(out)]

    def try_bundle(self, output_dir: str, _options: Any = None, **_kwargs: Any) -> bool:
        with tempfile.TemporaryDirectory(prefix=f"maas-{self.layer}-") as scratch:
            out = Path(scratch)
            completed = subprocess.run(self.command(out), capture_output=True, text=True, check=False)
            if completed.returncode != 0:
                raise BundlingFailed(f"building the {self.layer} layer ({self.architecture}) failed:\n"
                                     + (completed.stdout + completed.stderr)[-4000:])
            built = out / ("runtime" if self.layer == "runtime" else f"{self.layer}-{self.architecture}")
            shutil.copytree(built / "python", Path(output_dir) / "python", dirs_exist_ok=True)
        return True


def layer_hash(layer: str, architecture: str) -> str:
    """What the layer is made of: its sources, the build script, the layer and architecture. An unchanged
    layer keeps its hash, so CDK neither rebuilds nor re-uploads it; any change to the pins or to the
    build rules gives a new one."""
    digest = hashlib.sha256(f"{layer}\0{architecture}\0".encode())
    for source in (*LAYER_SOURCES[layer], BUILD_SCRIPT):
        files = sorted(source.rglob("*")) if source.is_dir() else [source]
        for file in files:
            if file.is_file() and "__pycache__" not in file.parts and file.suffix != ".pyc":
                digest.update(file.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def layer_code(layer: str, architecture: str) -> lambda_.Code:
    """The asset of a layer, bundled locally by ``LayerBuild``."""
    source = LAYER_SOURCES[layer][0]
    return lambda_.Code.from_asset(
        str(source if source.is_dir() else source.parent),
        asset_hash_type=AssetHashType.CUSTOM,
        asset_hash=layer_hash(layer, architecture),
        exclude=["__pycache__", "*.pyc"],
        bundling=BundlingOptions(
            # Never pulled: local bundling always succeeds or raises. CDK requires an image regardless.
            image=DockerImage.from_registry("public.ecr.aws/sam/build-python3.12"),
            local=LayerBuild(layer, architecture),
        ),
    )
