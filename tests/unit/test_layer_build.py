"""scripts/build_layers.py: trim rules, ELF checks, size accounting and the 250 MB guard on synthetic trees
(fast, offline), plus one real build of the inference layer for x86_64 (skipped when pip has no index)."""

from __future__ import annotations

import importlib.util
import json
import platform
import struct
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_layers.py"


def _load_script() -> ModuleType:
    """Import scripts/build_layers.py by path: scripts/ is not a package (registered in sys.modules
    first, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location("build_layers", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bl = _load_script()


def make_elf(
    path: Path,
    *,
    soname: str | None = None,
    needed: Iterable[str] = (),
    machine: int = 62,
    is64: bool = True,
    little: bool = True,
    misaligned: bool = False,
) -> Path:
    """Write a minimal ELF shared object: one PT_LOAD over the whole file and a PT_DYNAMIC with
    DT_NEEDED / DT_SONAME / DT_STRTAB entries, enough for ``read_elf``."""
    needed = list(needed)
    end = "<" if little else ">"
    ehsize, phentsize, phnum = (64, 56, 2) if is64 else (52, 32, 2)
    strtab = b"\0"
    offsets: dict[str, int] = {}
    for name in [*([soname] if soname else []), *needed]:
        offsets[name] = len(strtab)
        strtab += name.encode() + b"\0"
    strtab_offset = ehsize + phnum * phentsize
    dynamic_offset = (strtab_offset + len(strtab) + 7) // 8 * 8
    entries = [(1, offsets[name]) for name in needed]
    entries += [(14, offsets[soname])] if soname else []
    shift = 0x98 if misaligned else 0  # misaligned: the PT_LOAD maps vaddr 0 to file offset 0x98
    entries += [(5, strtab_offset - shift), (0, 0)]
    dynamic = b"".join(struct.pack(end + ("qQ" if is64 else "iI"), tag, value) for tag, value in entries)
    total = dynamic_offset + len(dynamic)
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1 if little else 2, 1]) + b"\0" * 9
    header = struct.pack(
        end + ("HHIQQQIHHHHHH" if is64 else "HHIIIIIHHHHHH"),
        3, machine, 1, 0, ehsize, 0, 0, ehsize, phentsize, phnum, 64 if is64 else 40, 0, 0,
    )  # fmt: skip

    def phdr(p_type: int, offset: int, vaddr: int, size: int, align: int) -> bytes:
        if is64:
            return struct.pack(end + "IIQQQQQQ", p_type, 5, offset, vaddr, vaddr, size, size, align)
        return struct.pack(end + "IIIIIIII", p_type, offset, vaddr, vaddr, size, size, 5, align)

    load = phdr(1, shift, 0, total, 0x1000)
    data = ident + header + load + phdr(2, dynamic_offset, dynamic_offset, len(dynamic), 8) + strtab
    data = data.ljust(dynamic_offset, b"\0") + dynamic
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write(root: Path, relative: str, size: int = 100) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


PYBIND = "onnxruntime/capi/onnxruntime_pybind11_state.cpython-312-x86_64-linux-gnu.so"
LIBORT = "onnxruntime/capi/libonnxruntime.so.1.32.0"


def synthetic_layer(root: Path, *, pybind_needs_libort: bool = False) -> None:
    """A tree shaped like an installed inference + api layer."""
    for relative in (
        "bin/f2py",
        "numpy/__init__.py",
        "numpy/__init__.pyi",
        "numpy/_core/tests/test_umath.py",
        "numpy/f2py/__init__.py",
        "numpy/typing/__init__.py",
        "numpy/_pyinstaller/hook-numpy.py",
        "numpy/testing/__init__.py",
        "onnxruntime/__init__.py",
        "onnxruntime/transformers/optimizer.py",
        "onnxruntime/tools/symbolic_shape_infer.py",
        "onnxruntime/quantization/quantize.py",
        "onnxruntime/datasets/mul_1.onnx",
        "onnxruntime/backend/backend.py",
        "onnx/__init__.py",
        "onnx/backend/base.py",
        "onnx/backend/test/data/node/model.onnx",
        "wrapt-stubs/__init__.pyi",
        "pydantic/__pycache__/main.cpython-311.pyc",
        "numpy-2.4.6.dist-info/RECORD",
        "numpy-2.4.6.dist-info/METADATA",
    ):
        write(root, relative)
    needed = ["libc.so.6", *(["libonnxruntime.so.1"] if pybind_needs_libort else [])]
    make_elf(root / PYBIND, needed=needed)
    make_elf(root / LIBORT, soname="libonnxruntime.so.1", needed=["libc.so.6"])
    make_elf(root / "onnxruntime/capi/libonnxruntime_providers_shared.so", soname="libonnxruntime_providers_shared.so")


def files(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in bl.iter_files(root)}


# ---------------------------------------------------------------------------------------------- trim rules


def test_trim_rules_remove_what_lambda_never_imports_and_account_for_every_byte(tmp_path: Path) -> None:
    synthetic_layer(tmp_path)
    before = bl.tree_size(tmp_path)
    libort_bytes = (tmp_path / LIBORT).stat().st_size

    report = bl.apply_trim_rules(tmp_path)

    assert files(tmp_path) == {
        "numpy/__init__.py",
        "numpy/typing/__init__.py",  # onnx.numpy_helper imports numpy.typing
        "numpy/testing/__init__.py",  # only directories named exactly "tests" go
        "onnxruntime/__init__.py",
        PYBIND,
        "onnxruntime/capi/libonnxruntime_providers_shared.so",
        "onnx/__init__.py",
        "onnx/backend/base.py",
        "numpy-2.4.6.dist-info/RECORD",
        "numpy-2.4.6.dist-info/METADATA",
    }
    assert sum(item.bytes for item in report) == before - bl.tree_size(tmp_path)
    by_rule = {item.rule: item for item in report}
    assert by_rule["onnxruntime/capi/libonnxruntime.so.*"].paths == [LIBORT]
    assert by_rule["onnxruntime/capi/libonnxruntime.so.*"].bytes == libort_bytes
    assert by_rule["**/tests"].paths == ["numpy/_core/tests"]
    assert by_rule["**/*.pyi"].bytes == 200
    assert all(not item.kept for item in report)


def test_a_linked_libonnxruntime_is_kept(tmp_path: Path) -> None:
    synthetic_layer(tmp_path, pybind_needs_libort=True)
    report = {item.rule: item for item in bl.apply_trim_rules(tmp_path)}
    rule = report["onnxruntime/capi/libonnxruntime.so.*"]
    assert (tmp_path / LIBORT).exists()
    assert rule.paths == [] and rule.bytes == 0
    assert rule.kept == [f"{LIBORT} (referenced by {PYBIND})"]


def test_a_library_loaded_by_name_from_python_is_kept(tmp_path: Path) -> None:
    synthetic_layer(tmp_path)
    (tmp_path / "onnxruntime/capi/_ld_preload.py").write_text('ctypes.CDLL("libonnxruntime.so.1")\n')
    bl.apply_trim_rules(tmp_path)
    assert (tmp_path / LIBORT).exists()


def test_custom_rules_honour_kind(tmp_path: Path) -> None:
    write(tmp_path, "pkg/data/file.bin")
    write(tmp_path, "pkg/data.bin/x")
    rules = [bl.TrimRule("pkg/data*", "test", "file")]
    [trimmed] = bl.apply_trim_rules(tmp_path, rules)
    assert trimmed.paths == []  # both matches are directories
    [trimmed] = bl.apply_trim_rules(tmp_path, [bl.TrimRule("pkg/data*", "test", "dir")])
    assert trimmed.paths == ["pkg/data", "pkg/data.bin"] and trimmed.bytes == 200
    assert files(tmp_path) == set()


# ---------------------------------------------------------------------------------------------------- ELF


@pytest.mark.parametrize(("is64", "little"), [(True, True), (False, False)])
def test_read_elf_reports_machine_soname_and_needed(tmp_path: Path, is64: bool, little: bool) -> None:
    path = make_elf(
        tmp_path / "libx.so", soname="libx.so.1", needed=["liba.so", "libb.so.2"], machine=183, is64=is64, little=little
    )
    info = bl.read_elf(path)
    assert info == bl.ElfInfo("aarch64", "libx.so.1", ("liba.so", "libb.so.2"), True)


def test_read_elf_flags_misaligned_segments_and_ignores_other_files(tmp_path: Path) -> None:
    misaligned = bl.read_elf(make_elf(tmp_path / "bad.so", soname="bad.so", needed=["libc.so.6"], misaligned=True))
    assert misaligned == bl.ElfInfo("x86_64", "bad.so", ("libc.so.6",), segments_aligned=False)
    assert bl.read_elf(write(tmp_path, "x.py")) is None
    assert bl.read_elf(write(tmp_path, "empty", 0)) is None


@pytest.mark.parametrize("misaligned", [False, True])
def test_strip_keeps_only_loadable_results(tmp_path: Path, misaligned: bool) -> None:
    """binutils strip turned numpy's patchelf-edited OpenBLAS into a file the loader rejects: such a
    result must be dropped and the original kept."""
    root = tmp_path / "python"
    library = make_elf(root / "pkg.libs/libblas.so", soname="libblas.so")
    with library.open("ab") as f:
        f.write(b"\0" * 4096)  # "debug info" for strip to remove
    original = library.read_bytes()
    result = make_elf(tmp_path / "stripped.so", soname="libblas.so", misaligned=misaligned)
    fake_strip = tmp_path / "strip"
    fake_strip.write_text(f'#!/bin/sh\ncp "{result}" "$3"\n')  # called as: strip --strip-unneeded -o OUT IN
    fake_strip.chmod(0o755)

    saved, rejected = bl.strip_shared_objects(root, str(fake_strip))

    if misaligned:
        assert (saved, rejected) == (0, ["pkg.libs/libblas.so"])
        assert library.read_bytes() == original
    else:
        assert (saved, rejected) == (4096, [])
        assert library.read_bytes() == result.read_bytes()
    assert files(root) == {"pkg.libs/libblas.so"}


# --------------------------------------------------------------------------------------- sizes and the zip


def test_sizes_and_deterministic_zip(tmp_path: Path) -> None:
    layer_dir = tmp_path / "inference-x86_64"
    write(layer_dir, "python/a/one.py", 1000)
    write(layer_dir, "python/a/b/two.so", 2345).chmod(0o755)
    write(layer_dir, "python/three.txt", 0)
    assert bl.tree_size(layer_dir) == 3345

    first = bl.zip_layer(layer_dir, tmp_path / "one.zip")
    second = bl.zip_layer(layer_dir, tmp_path / "two.zip")

    assert first == (tmp_path / "one.zip").stat().st_size
    assert (tmp_path / "one.zip").read_bytes() == (tmp_path / "two.zip").read_bytes()
    with zipfile.ZipFile(tmp_path / "one.zip") as archive:
        infos = {info.filename: info for info in archive.infolist()}
    assert sorted(infos) == ["python/a/b/two.so", "python/a/one.py", "python/three.txt"]
    assert sum(info.file_size for info in infos.values()) == 3345  # what Lambda counts as unzipped
    assert (infos["python/a/b/two.so"].external_attr >> 16) & 0o777 == 0o755
    assert (infos["python/a/one.py"].external_attr >> 16) & 0o777 == 0o644
    assert second == first


def test_runtime_layer_size_ignores_bytecode(tmp_path: Path) -> None:
    write(tmp_path, "maas/__init__.py", 10)
    write(tmp_path, "maas/__pycache__/__init__.cpython-311.pyc", 500)
    write(tmp_path, "maas/examples/iris.onnx", 90)
    assert bl.runtime_layer_size(tmp_path / "maas") == 100
    assert bl.runtime_layer_size() > 0  # the real layers/runtime/maas


def _result(layer: str, unzipped: int) -> Any:
    return bl.LayerResult(
        layer=layer, arch="x86_64", directory="", zip=None, unzipped_bytes=unzipped, zipped_bytes=None,
        packages={}, trimmed=[], trimmed_bytes=0, stripped_bytes=0, strip_tool=None, strip_rejected=[],
        compiled_with=None, compile_errors=[], smoke_tested=False, seconds={"total": 0.0},
    )  # fmt: skip


def test_limit_counts_the_runtime_layer_too() -> None:
    results = [_result("api", 900), _result("inference", 700)]
    assert bl.check_limits(results, runtime_bytes=100, limit_bytes=1000) == []  # 1000 is allowed
    [error] = bl.check_limits(results, runtime_bytes=101, limit_bytes=1000)
    assert error.startswith("api-x86_64: ") and "exceeds Lambda's" in error
    assert bl.LAMBDA_UNZIPPED_LIMIT == 262_144_000  # the byte count in Lambda's own error message


def test_main_writes_the_report_and_fails_over_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_build(layer: str, arch: str, out: Path, **_: Any) -> Any:
        write(out / f"{layer}-{arch}", "python/big.bin", 3 * 1024 * 1024)
        return _result(layer, bl.tree_size(out / f"{layer}-{arch}"))

    monkeypatch.setattr(bl, "build_layer", fake_build)
    monkeypatch.setattr(bl, "find_python312", lambda explicit=None: None)
    args = ["--layer", "inference", "--arch", "x86_64", "--out", str(tmp_path)]

    assert bl.main([*args, "--limit-mb", "3"]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False and "inference-x86_64" in report["errors"][0]
    assert report["compiled"] is False

    assert bl.main([*args, "--limit-mb", "4", "--report", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True


# ------------------------------------------------------------------------------ pins, closure and markers


@pytest.mark.parametrize(
    ("marker", "expected"),
    [
        ('python_version < "3.13"', True),
        ("python_version >= '3.13'", False),
        ('python_version < "3.11"', False),
        ('python_version >= "3.8" and python_version < "3.12.1"', True),
        ('extra == "standard"', False),
        ("(platform_system == 'Windows') and extra == 'timezone'", False),
        ('sys_platform == "win32" or platform_machine == "aarch64"', True),
        ('platform_python_implementation != "PyPy"', True),
        ('"linux" in sys_platform', True),
        ('python_full_version ~= "3.12.0"', True),
    ],
)
def test_evaluate_marker_for_lambda_python312_arm64(marker: str, expected: bool) -> None:
    assert bl.evaluate_marker(marker, bl.marker_environment("aarch64")) is expected


@pytest.mark.parametrize("marker", ["python_version <", 'unknown_var == "1"', '(python_version == "3.12"'])
def test_evaluate_marker_rejects_what_it_cannot_read(marker: str) -> None:
    with pytest.raises(ValueError):
        bl.evaluate_marker(marker, bl.marker_environment("x86_64"))


def _dist(site: Path, name: str, version: str, *requires: str) -> None:
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {requirement}" for requirement in requires]
    write(site, f"{name.replace('-', '_')}-{version}.dist-info/METADATA").write_text("\n".join(lines) + "\n\n")


def test_missing_dependencies_applies_markers_and_the_runtime_provided_set(tmp_path: Path) -> None:
    _dist(tmp_path, "aws-xray-sdk", "2.15.0", "wrapt", "botocore >=1.11.3")
    _dist(tmp_path, "anyio", "4.16.0", "idna>=2.8", 'exceptiongroup>=1.0.2; python_version < "3.11"')
    _dist(tmp_path, "fastapi", "1.0", "starlette>=1", 'httpx; extra == "all"')
    _dist(tmp_path, "Typing_Extensions", "4.16.0")
    _dist(tmp_path, "starlette", "1.0", "typing_extensions>=4.10; python_version < '3.13'")
    assert bl.missing_dependencies(tmp_path, "x86_64") == [
        "anyio requires idna>=2.8",
        "aws-xray-sdk requires wrapt",
    ]
    assert set(bl.installed_distributions(tmp_path)) == {
        "aws-xray-sdk", "anyio", "fastapi", "typing-extensions", "starlette",
    }  # fmt: skip


def test_read_pins_requires_exact_pins(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nNumPy==2.4.6  # why\n\npydantic_core == 2.50.4\n")
    assert bl.read_pins(requirements) == {"numpy": "2.4.6", "pydantic-core": "2.50.4"}
    requirements.write_text("numpy>=2\n")
    with pytest.raises(bl.BuildError, match="not an exact"):
        bl.read_pins(requirements)


@pytest.mark.parametrize("layer", bl.LAYERS)
def test_layer_requirements_are_exact_pins_without_maas_or_the_runtime_sdk(layer: str) -> None:
    pins = bl.read_pins(bl.DEPS_DIR / layer / "requirements.txt")
    assert {"numpy", "onnxruntime", "pydantic", "orjson", "aws-lambda-powertools", "aws-xray-sdk"} <= set(pins)
    assert not {"maas", "boto3", "botocore"} & set(pins)
    assert ("onnx" in pins) is (layer == "api")


def test_pip_command_targets_lambda_python312_on_both_manylinux_tags(tmp_path: Path) -> None:
    command = bl.pip_install_command(tmp_path / "req.txt", tmp_path / "python", "aarch64")
    joined = " ".join(command)
    assert "--platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64" in joined
    assert "--python-version 3.12 --implementation cp" in joined
    for flag in ("--no-deps", "--only-binary=:all:", "--no-compile", "--target"):
        assert flag in command


def test_network_errors_are_told_apart_from_bad_pins() -> None:
    offline = "WARNING: Retrying ... NewConnectionError('Failed to establish a new connection: [Errno -3] ...')"
    assert bl.looks_like_network_error(offline)
    bad_pin = "ERROR: Could not find a version that satisfies the requirement numpy==9.9 (from versions: 2.4.6)"
    assert not bl.looks_like_network_error(bad_pin)


# ------------------------------------------------------------------------------------------- a real build


@pytest.mark.timeout(900)
def test_real_inference_layer_build_for_x86_64(tmp_path: Path) -> None:
    """Installs the pinned inference closure from the configured index (~47 MB of wheels; ~10 s here
    with a warm or cold pip cache), trims, zips, and, where a CPython 3.12 exists on an x86_64 host,
    smoke-imports the layer and runs the iris model."""
    python312 = bl.find_python312()
    try:
        result = bl.build_layer(
            "inference", "x86_64", tmp_path, python312=python312, pip_args=("--retries", "1", "--timeout", "20")
        )
    except bl.PipFailed as failure:
        if failure.network or not bl.pip_index_reachable():
            pytest.skip(f"pip cannot reach a package index: {failure.output[-300:]}")
        raise

    site = Path(result.directory) / "python"
    [pybind] = site.glob("onnxruntime/capi/onnxruntime_pybind11_state.cpython-312-x86_64-linux-gnu.so")
    assert not list(site.glob("onnxruntime/capi/libonnxruntime.so*"))
    info = bl.read_elf(pybind)
    assert info is not None and info.machine == "x86_64"
    assert not any(name.startswith("libonnxruntime.so") for name in info.needed)
    assert not (site / "onnxruntime/transformers").exists() and not list(site.glob("numpy/**/tests"))
    assert result.packages["onnxruntime"] == "1.32.0" and "botocore" not in result.packages
    assert result.unzipped_bytes == bl.tree_size(Path(result.directory))
    assert result.unzipped_bytes + bl.runtime_layer_size() < bl.LAMBDA_UNZIPPED_LIMIT
    assert result.zipped_bytes is not None and result.zipped_bytes < result.unzipped_bytes
    with zipfile.ZipFile(result.zip) as archive:
        assert f"python/{pybind.relative_to(site).as_posix()}" in archive.namelist()
    if python312 and platform.system() == "Linux" and platform.machine() == "x86_64":
        assert result.smoke_tested and not result.compile_errors
        assert list(site.glob("numpy/__pycache__/*.cpython-312.pyc"))


def test_the_api_layer_keeps_the_quantizer_the_inference_layer_drops(tmp_path: Path) -> None:
    """The optimize step (int8 quantization) runs with the api layer; the inference layer never quantizes."""
    for layer, kept in (("inference", False), ("api", True)):
        root = tmp_path / layer
        synthetic_layer(root)
        bl.apply_trim_rules(root, [rule for rule in bl.TRIM_RULES if rule.applies_to(layer)])
        assert (root / "onnxruntime/quantization/quantize.py").exists() is kept, layer
        # the quantizer imports onnxruntime.transformers.onnx_utils
        assert (root / "onnxruntime/transformers/optimizer.py").exists() is kept, layer
        assert not (root / "onnxruntime/tools").exists()
