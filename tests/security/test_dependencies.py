"""Dependencies (issue 5, class 11): the minimum versions pyproject.toml pins for the libraries that
parse what attackers send (starlette, python-multipart, fastapi: requests; onnx, onnxruntime: models)
stay above the releases that fixed their CVEs, and what is installed (and what the Lambda layers ship)
satisfies them, so a downgrade fails here. ``make audit`` (pip-audit, run by ``make test``) covers
every other package against PyPI's advisory data."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]

#: package -> (the first release with every fix we require, the CVE that sets it). Lowering a pin in
#: pyproject.toml below these fails; raising it is always fine.
FIXED_IN = {
    "starlette": ("1.3.1", "CVE-2026-54283"),
    "python-multipart": ("0.0.30", "CVE-2026-53539"),
    "onnx": ("1.21.0", "CVE-2026-27489"),
    "onnxruntime": ("1.28.1", "memory-safety fixes for malformed models"),
    "fastapi": ("0.165", "requires the fixed starlette"),
}


def pinned() -> dict[str, SpecifierSet]:
    """The specifier pyproject.toml gives each package of FIXED_IN (wherever it is declared)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines.extend(extra)
    found: dict[str, SpecifierSet] = {}
    for line in lines:
        requirement = Requirement(line)
        name = requirement.name.lower()
        if name in FIXED_IN:
            assert name not in found, f"{name} is declared twice in pyproject.toml"
            found[name] = requirement.specifier
    return found


def minimum(specifier: SpecifierSet) -> Version:
    lows = [Version(s.version) for s in specifier if s.operator in (">=", "==", "~=")]
    assert lows, f"{specifier} has no lower bound"
    return max(lows)


@pytest.mark.parametrize("package", sorted(FIXED_IN))
def test_pinned_minimum_is_above_the_fixed_release(package: str) -> None:
    fixed, why = FIXED_IN[package]
    specifiers = pinned()
    assert package in specifiers, f"pyproject.toml must pin a minimum for {package} ({why})"
    assert minimum(specifiers[package]) >= Version(fixed), f"{package} must stay >= {fixed}: {why}"


@pytest.mark.parametrize("package", sorted(FIXED_IN))
def test_installed_version_satisfies_the_pin(package: str) -> None:
    installed = version(package)
    specifier = pinned()[package]
    assert specifier.contains(installed, prereleases=True), f"{package} {installed} is outside {specifier}"


def test_lambda_layers_ship_fixed_versions() -> None:
    """The layers are pinned separately (layers/deps/*/requirements.txt): they must satisfy the same pins."""
    specifiers = pinned()
    checked = 0
    for requirements in sorted((ROOT / "layers" / "deps").glob("*/requirements.txt")):
        for line in requirements.read_text().splitlines():
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;#]+).*", line.strip())
            if match and match[1].lower() in specifiers:
                specifier = specifiers[match[1].lower()]
                assert specifier.contains(match[2], prereleases=True), \
                    f"{requirements.relative_to(ROOT)}: {match[1]}=={match[2]} is outside {specifier}"
                checked += 1
    assert checked >= 3  # fastapi, starlette, onnx, onnxruntime (twice)
