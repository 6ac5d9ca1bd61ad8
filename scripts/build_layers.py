#!/usr/bin/env python3
"""Build the Lambda dependency layers (``api``, ``inference``) for CPython 3.12 without Docker.

    python scripts/build_layers.py [--layer api|inference|all] [--arch x86_64|arm64|all]
                                   [--out DIR] [--report FILE.json] [--python PYTHON3.12] [--strip]

Why no Docker: CI and developer machines here have none, and every dependency ships manylinux wheels,
so ``pip install --target --platform ... --only-binary=:all:`` can lay out a Linux/CPython 3.12 layer for
either architecture from any host. Each layer ends up in ``<out>/<layer>-<arch>/python/`` (what Lambda
mounts as ``/opt/python``) and is zipped to ``<out>/<layer>-<arch>.zip``.

Steps, and why each exists:

1. pip installs the pinned closure from ``layers/deps/<layer>/requirements.txt`` with ``--no-deps``:
   resolving would pull botocore (the Lambda runtime provides it) and onnxruntime's unused extras.
   ``--no-compile`` because pip would write bytecode for *this* interpreter, useless on 3.12.
2. Closure check: every ``Requires-Dist`` of every installed package (markers evaluated for Linux,
   CPython 3.12, the target arch) must be installed or provided by the Lambda runtime. This is what makes
   ``--no-deps`` safe: an upgrade that adds a dependency fails the build, not a cold start.
3. Trim with ``TRIM_RULES`` (below): code the Lambda never imports. ``onnxruntime/capi/libonnxruntime.so.*``
   (33 MB) goes too: the Python extension embeds the runtime and does not list it in its ELF ``NEEDED``
   entries; the rule re-checks that on every build and keeps the file if anything references it.
4. ``--strip`` only: strip shared objects with binutils (api-x86_64: -24 MB, inference: -1.5 MB). Off by
   default: binutils 2.40 ``strip`` rewrote numpy's auditwheel-patched OpenBLAS into a file the loader
   rejects ("ELF load command address/offset not page-aligned"). Each stripped file is re-checked for that
   and the original kept if the check fails.
5. Byte-compile with a real CPython 3.12 when one is found (``--python``, ``$PYTHON312``, ``python3.12``):
   ``/opt`` is read-only on Lambda, so without it every cold start recompiles. ``unchecked-hash`` pycs,
   because zip timestamps have a 2 s resolution and would make timestamp-checked pycs look stale.
6. Smoke test (native arch + CPython 3.12 only): import the layer with the runtime layer
   (``layers/runtime``) in an isolated interpreter and run the bundled iris model.
7. Measure, zip deterministically (sorted entries, fixed timestamps: same inputs, same zip hash), print a
   table, write a JSON report, and exit 1 if a layer plus the runtime layer exceeds Lambda's 250 MB
   unzipped limit (which covers the function and all its layers together).

Only the standard library is used; pip runs as a subprocess of this interpreter.
"""

from __future__ import annotations

import argparse
import email.parser
import glob
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPS_DIR = REPO_ROOT / "layers" / "deps"
RUNTIME_PACKAGE = REPO_ROOT / "layers" / "runtime" / "maas"
DEFAULT_OUT = REPO_ROOT / "build" / "layers"

LAYERS = ("api", "inference")
# Lambda's architecture names -> the names manylinux platform tags and ELF headers use.
ARCHS: dict[str, str] = {"x86_64": "x86_64", "arm64": "aarch64"}
# onnxruntime >= 1.20 publishes only manylinux_2_28 wheels while some packages (pydantic-core) publish only
# manylinux2014 ones: pip needs both tags (Lambda's python3.12 runtime is Amazon Linux 2023, glibc 2.34).
MANYLINUX_TAGS = ("manylinux2014", "manylinux_2_28")
PYTHON_VERSION = "3.12"
MB = 1024 * 1024
# Lambda rejects a function whose code plus layers unzip to more than 262,144,000 bytes ("250 MB").
LAMBDA_UNZIPPED_LIMIT = 250 * MB
# Packages the python3.12 Lambda runtime already has (boto3 and its closure). Requirements on these are
# satisfied without shipping them (aws-xray-sdk requires botocore).
RUNTIME_PROVIDED = frozenset({"boto3", "botocore", "s3transfer", "jmespath", "python-dateutil", "six", "urllib3"})
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}


@dataclass(frozen=True)
class TrimRule:
    """Delete what ``pattern`` (a ``Path.glob`` pattern relative to the layer's ``python/``) matches.

    ``unless_referenced`` keeps a matched shared library that another file still references: by ELF
    ``NEEDED``/``SONAME``, or by name inside another ELF file or a ``.py`` file (a ``dlopen``/ctypes load)."""

    pattern: str
    why: str
    kind: Literal["any", "dir", "file"] = "any"
    unless_referenced: bool = False
    only_layers: tuple[str, ...] = ()  # empty: every layer

    def applies_to(self, layer: str) -> bool:
        return not self.only_layers or layer in self.only_layers


TRIM_RULES: tuple[TrimRule, ...] = (
    TrimRule("bin", "console scripts from pip --target; nothing on Lambda runs them", "dir"),
    TrimRule("**/__pycache__", "bytecode of the build interpreter; step 5 compiles for 3.12", "dir"),
    TrimRule("**/tests", "bundled test suites (numpy ships ~10 MB)", "dir"),
    TrimRule("**/*.pyi", "type stubs, for type checkers only", "file"),
    TrimRule("*-stubs", "PEP 561 stub-only packages (wrapt-stubs)", "dir"),
    TrimRule("numpy/f2py", "Fortran wrapper generator, build-time tool", "dir"),
    TrimRule("numpy/_pyinstaller", "PyInstaller hooks", "dir"),
    # Not numpy/typing: onnx.numpy_helper imports numpy.typing at import time (and it is only 13 KB).
    TrimRule("onnx/backend/test", "ONNX backend conformance models and data (17 MB)", "dir"),
    # onnxruntime.quantization imports onnxruntime.transformers.onnx_utils: the api layer keeps both.
    TrimRule("onnxruntime/transformers", "model optimisation tooling (offline)", "dir", only_layers=("inference",)),
    TrimRule("onnxruntime/tools", "conversion and profiling tools (offline)", "dir"),
    # The api layer keeps it: the optimize step (int8 dynamic quantization) runs with that layer.
    TrimRule("onnxruntime/quantization", "offline quantisation (needs onnx + ml_dtypes)", "dir",
             only_layers=("inference",)),
    TrimRule("onnxruntime/datasets", "sample models", "dir"),
    TrimRule("onnxruntime/backend", "ONNX backend-test adapter (imports onnx)", "dir"),
    TrimRule(
        "onnxruntime/capi/libonnxruntime.so.*",
        "C API library for C/C++ users; the pybind module embeds the runtime and does not link it",
        "file",
        unless_referenced=True,
    ),
)

# What the smoke test imports per layer, with the runtime layer on the path (as /opt/python on Lambda).
SMOKE_IMPORTS: dict[str, tuple[str, ...]] = {
    "inference": (
        "numpy",
        "onnxruntime",
        "orjson",
        "pydantic",
        "aws_lambda_powertools",
        "maas.inference.engine",
        "maas.inference.codec",
    ),
    "api": (
        "numpy",
        "onnxruntime",
        "onnx",
        "orjson",
        "pydantic",
        "fastapi",
        "mangum",
        "prometheus_client",
        "aws_lambda_powertools",
        "maas.api",
        "maas.inference.validation",
        "maas.inference.optimize",
        "onnxruntime.quantization",
    ),
}

# pip output that means "no network / no index", as opposed to a broken pin or a missing wheel.
NETWORK_ERROR_MARKERS = (
    "NewConnectionError",
    "ConnectTimeoutError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Name or service not known",
    "nodename nor servname",
    "Network is unreachable",
    "No route to host",
    "Connection refused",
    "Connection reset",
    "ProxyError",
    "Read timed out",
    "SSLError",
)


class BuildError(Exception):
    """A layer could not be built; the message says what to fix."""


class PipFailed(BuildError):
    """pip exited non-zero. ``network`` is True when its output looks like an unreachable index."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output
        self.network = looks_like_network_error(output)


@dataclass
class Trimmed:
    rule: str
    paths: list[str] = field(default_factory=list)
    bytes: int = 0
    kept: list[str] = field(default_factory=list)  # matched but still referenced (unless_referenced)


@dataclass
class LayerResult:
    layer: str
    arch: str
    directory: str
    zip: str | None
    unzipped_bytes: int
    zipped_bytes: int | None
    packages: dict[str, str]
    trimmed: list[Trimmed]
    trimmed_bytes: int
    stripped_bytes: int
    strip_tool: str | None
    strip_rejected: list[str]  # strip produced a smaller file that failed the ELF checks: kept unstripped
    compiled_with: str | None
    compile_errors: list[str]
    smoke_tested: bool
    seconds: dict[str, float]


# --------------------------------------------------------------------------------------------------- sizes


def iter_files(root: Path) -> Iterator[Path]:
    """Regular files under ``root`` (symlinks are not followed: wheels contain none)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                yield path


def tree_size(root: Path) -> int:
    """Unzipped size as Lambda counts it: the sum of the file sizes."""
    return sum(path.stat().st_size for path in iter_files(root))


def runtime_layer_size(package: Path = RUNTIME_PACKAGE) -> int:
    """Size of the runtime layer (the ``maas`` package) as it ships: sources, no bytecode caches."""
    return sum(
        path.stat().st_size for path in iter_files(package) if "__pycache__" not in path.parts and path.suffix != ".pyc"
    )


def zip_layer(layer_dir: Path, zip_path: Path) -> int:
    """Zip ``layer_dir`` (which holds ``python/``) deterministically; return the zip's size in bytes.

    Entries are sorted and stamped 1980-01-01 so identical inputs give a byte-identical zip (a stable CDK
    asset hash); the executable bit is kept."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_name(zip_path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in iter_files(layer_dir):
            info = zipfile.ZipInfo(path.relative_to(layer_dir).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
            info.external_attr = (0o100000 | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with path.open("rb") as source, archive.open(info, "w") as target:
                shutil.copyfileobj(source, target, 1024 * 1024)
    tmp.replace(zip_path)
    return zip_path.stat().st_size


def check_limits(
    results: Sequence[LayerResult], runtime_bytes: int, limit_bytes: int = LAMBDA_UNZIPPED_LIMIT
) -> list[str]:
    """One message per layer whose unzipped size plus the runtime layer's exceeds ``limit_bytes``."""
    errors = []
    for result in results:
        total = result.unzipped_bytes + runtime_bytes
        if total > limit_bytes:
            errors.append(
                f"{result.layer}-{result.arch}: {total / MB:.1f} MB unzipped (deps {result.unzipped_bytes / MB:.1f}"
                f" + runtime layer {runtime_bytes / MB:.1f}) exceeds Lambda's {limit_bytes / MB:.0f} MB limit"
                " for a function and its layers; trim more (TRIM_RULES) or move dependencies out of this layer"
            )
    return errors


# ----------------------------------------------------------------------------------------------------- ELF


@dataclass(frozen=True)
class ElfInfo:
    machine: str  # "x86_64", "aarch64", or "e_machine=<n>"
    soname: str | None
    needed: tuple[str, ...]
    # Every PT_LOAD has offset == vaddr (mod align), as the dynamic loader requires.
    segments_aligned: bool = True


def read_elf(path: Path) -> ElfInfo | None:
    """Machine, ``SONAME`` and ``NEEDED`` entries of an ELF file (``readelf -d`` without binutils).

    Returns None for non-ELF files. Follows PT_DYNAMIC and maps DT_STRTAB through the PT_LOAD segments,
    which stays right for libraries that auditwheel/patchelf rewrote."""
    with path.open("rb") as f:
        ident = f.read(16)
        if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
            return None
        is64 = ident[4] == 2
        end = "<" if ident[5] == 1 else ">"
        header_format = end + ("HHIQQQIHHHHHH" if is64 else "HHIIIIIHHHHHH")
        header = struct.unpack(header_format, f.read(struct.calcsize(header_format)))
        machine_id, phoff, phentsize, phnum = header[1], header[4], header[8], header[9]
        machine = ELF_MACHINES.get(machine_id, f"e_machine={machine_id}")
        loads: list[tuple[int, int, int]] = []  # (vaddr, filesz, offset)
        dynamic: tuple[int, int] | None = None  # (offset, filesz)
        aligned = True
        for index in range(phnum):
            f.seek(phoff + index * phentsize)
            if is64:
                p_type, _, p_offset, p_vaddr, _, p_filesz, _, p_align = struct.unpack(end + "IIQQQQQQ", f.read(56))
            else:
                p_type, p_offset, p_vaddr, _, p_filesz, _, _, p_align = struct.unpack(end + "IIIIIIII", f.read(32))
            if p_type == 1:  # PT_LOAD
                loads.append((p_vaddr, p_filesz, p_offset))
                aligned = aligned and (p_align <= 1 or p_offset % p_align == p_vaddr % p_align)
            elif p_type == 2:  # PT_DYNAMIC
                dynamic = (p_offset, p_filesz)
        if dynamic is None:
            return ElfInfo(machine, None, (), aligned)
        entry_format = end + ("qQ" if is64 else "iI")
        entry_size = struct.calcsize(entry_format)
        f.seek(dynamic[0])
        raw = f.read(dynamic[1])
        needed_offsets: list[int] = []
        soname_offset: int | None = None
        strtab_vaddr: int | None = None
        for start in range(0, len(raw) - entry_size + 1, entry_size):
            tag, value = struct.unpack_from(entry_format, raw, start)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                needed_offsets.append(value)
            elif tag == 5:  # DT_STRTAB
                strtab_vaddr = value
            elif tag == 14:  # DT_SONAME
                soname_offset = value
        if strtab_vaddr is None:
            return ElfInfo(machine, None, (), aligned)
        strtab = next(
            (offset + strtab_vaddr - vaddr for vaddr, size, offset in loads if vaddr <= strtab_vaddr < vaddr + size),
            strtab_vaddr,  # unmapped: shared objects usually have vaddr == offset for the first segment
        )

        def string_at(index: int) -> str:
            f.seek(strtab + index)
            data = f.read(4096)
            return data.split(b"\0", 1)[0].decode("utf-8", "replace")

        return ElfInfo(
            machine,
            string_at(soname_offset) if soname_offset is not None else None,
            tuple(string_at(offset) for offset in needed_offsets),
            aligned,
        )


def is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def references_to(library: Path, root: Path, exclude: Iterable[Path] = ()) -> list[str]:
    """Files under ``root`` (other than ``library`` and ``exclude``) that reference ``library``.

    A reference is an ELF ``NEEDED`` entry naming the library's file name or ``SONAME``, or either name as a
    byte string inside another ELF or ``.py`` file (how ``dlopen`` and ctypes loads look)."""
    info = read_elf(library)
    names = {library.name} | ({info.soname} if info and info.soname else set())
    needles = [name.encode() for name in names]
    skipped = {library.resolve(), *(path.resolve() for path in exclude)}
    found = []
    for path in iter_files(root):
        if path.resolve() in skipped:
            continue
        if path.suffix == ".py":
            data = path.read_bytes()
            if any(needle in data for needle in needles):
                found.append(path.relative_to(root).as_posix())
            continue
        other = read_elf(path)
        if other is None:
            continue
        if names & set(other.needed) or any(needle in path.read_bytes() for needle in needles):
            found.append(path.relative_to(root).as_posix())
    return found


# ---------------------------------------------------------------------------------------------------- trim


def _matches(root: Path, rule: TrimRule) -> list[Path]:
    matches = []
    for path in sorted(root.glob(rule.pattern)):
        if path.is_symlink() or not path.exists():
            continue
        if (rule.kind == "dir" and not path.is_dir()) or (rule.kind == "file" and not path.is_file()):
            continue
        matches.append(path)
    return matches


def _size(path: Path) -> int:
    return tree_size(path) if path.is_dir() else path.stat().st_size


def apply_trim_rules(root: Path, rules: Sequence[TrimRule] = TRIM_RULES) -> list[Trimmed]:
    """Apply ``rules`` in order to the installed tree ``root``; return what each removed (and kept)."""
    report = []
    for rule in rules:
        trimmed = Trimmed(rule.pattern)
        matches = _matches(root, rule)
        for path in matches:
            if not path.exists():  # inside a directory an earlier match of this rule removed
                continue
            relative = path.relative_to(root).as_posix()
            if rule.unless_referenced and path.is_file():
                users = references_to(path, root, exclude=matches)
                if users:
                    trimmed.kept.append(f"{relative} (referenced by {', '.join(users[:3])})")
                    continue
            trimmed.bytes += _size(path)
            trimmed.paths.append(relative)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        report.append(trimmed)
    return report


# --------------------------------------------------------------------------------------------------- strip


def find_strip(elf_arch: str) -> str | None:
    """A ``strip`` that understands ``elf_arch`` binaries: the host's own for the host arch, else
    ``<arch>-linux-gnu-strip`` (binutils-aarch64-linux-gnu and friends) when installed."""
    if platform.system() == "Linux" and platform.machine() == elf_arch and shutil.which("strip"):
        return shutil.which("strip")
    return shutil.which(f"{elf_arch}-linux-gnu-strip")


def strip_shared_objects(root: Path, strip: str) -> tuple[int, list[str]]:
    """``strip --strip-unneeded`` every ELF file (dynamic symbols stay, so extensions still load).

    Writes to a temporary file and keeps it only when strip succeeded, the result is smaller and its
    segments are still loadable (``ElfInfo.segments_aligned``: binutils can break patchelf-edited files).
    Returns the bytes saved and the files left unstripped because the stripped copy failed those checks."""
    saved = 0
    rejected: list[str] = []
    for path in list(iter_files(root)):
        before = read_elf(path)
        if before is None:
            continue
        stripped = path.with_name(path.name + ".stripped")
        completed = subprocess.run(
            [strip, "--strip-unneeded", "-o", str(stripped), str(path)], capture_output=True, check=False
        )
        after = read_elf(stripped) if completed.returncode == 0 and stripped.exists() else None
        if (
            after is not None
            and after.segments_aligned
            and (after.machine, after.soname, after.needed) == (before.machine, before.soname, before.needed)
            and stripped.stat().st_size < path.stat().st_size
        ):
            saved += path.stat().st_size - stripped.stat().st_size
            shutil.copymode(path, stripped)
            stripped.replace(path)
        else:
            if after is not None and stripped.stat().st_size < path.stat().st_size:
                rejected.append(path.relative_to(root).as_posix())
            stripped.unlink(missing_ok=True)
    return saved, rejected


# ------------------------------------------------------------------------------------------------ compile


def _python_version(executable: str) -> tuple[int, int] | None:
    try:
        completed = subprocess.run(
            [executable, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return None
    except subprocess.TimeoutExpired:
        return None
    parts = completed.stdout.split()
    if completed.returncode != 0 or len(parts) != 2:
        return None
    return int(parts[0]), int(parts[1])


def find_python312(explicit: str | None = None) -> str | None:
    """A working CPython 3.12: ``explicit``, ``$PYTHON312``, ``python3.12`` on PATH, or a pyenv install.

    Each candidate is run, because a pyenv shim named ``python3.12`` can exist without a 3.12 behind it."""
    candidates: list[str | None] = [explicit, os.environ.get("PYTHON312"), shutil.which("python3.12")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")), reverse=True)
    for candidate in candidates:
        if candidate and _python_version(candidate) == (3, 12):
            return candidate
    if explicit:
        raise BuildError(f"--python {explicit} is not a working CPython {PYTHON_VERSION}")
    return None


def compile_layer(site_dir: Path, python312: str) -> list[str]:
    """Byte-compile ``site_dir`` with CPython 3.12 as Lambda will see it (``/opt/python``).

    ``unchecked-hash`` pycs are never revalidated against the sources (a layer is immutable, and zip's 2 s
    timestamps would make timestamp-based pycs stale). Returns the files that failed to compile."""
    completed = subprocess.run(
        [
            python312,
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "--invalidation-mode",
            "unchecked-hash",
            "-s",
            str(site_dir),
            "-p",
            "/opt/python",
            str(site_dir),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode == 0:
        return []
    failed = re.findall(r"\*\*\* Error compiling '([^']+)'", completed.stdout)
    return failed or [(completed.stdout + completed.stderr).strip()[-500:]]


def smoke_test(site_dir: Path, layer: str, python312: str, runtime_dir: Path = RUNTIME_PACKAGE.parent) -> None:
    """Import the layer's modules from ``site_dir`` + the runtime layer in an isolated CPython 3.12 (no
    site-packages, like Lambda's ``/opt/python``) and run the bundled iris model through onnxruntime."""
    code = f"""
import importlib, sys
sys.path[:0] = [{str(site_dir)!r}, {str(runtime_dir)!r}]
for name in {SMOKE_IMPORTS[layer]!r}:
    module = importlib.import_module(name)
    where = getattr(module, "__file__", "") or ""
    assert where.startswith(({str(site_dir)!r}, {str(runtime_dir)!r})), (name, where)
import numpy as np, onnxruntime as ort
from maas.examples import example_model_path
session = ort.InferenceSession(str(example_model_path()), providers=["CPUExecutionProvider"])
label = session.run(["label"], {{"features": np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)}})[0]
assert int(label[0]) == 0, label
"""
    completed = subprocess.run([python312, "-I", "-S", "-c", code], capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise BuildError(f"{layer} layer smoke test failed under {python312}:\n{completed.stderr.strip()[-3000:]}")


# ---------------------------------------------------------------------------------------- dependency closure


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_MARKER_TOKEN = re.compile(
    r"""\s*(?:(?P<lparen>\()|(?P<rparen>\))|(?P<op>===|==|!=|<=|>=|~=|<|>|not\s+in\b|in\b)"""
    r"""|(?P<bool>and\b|or\b)|(?P<string>'[^']*'|"[^"]*")|(?P<name>[A-Za-z_][A-Za-z0-9_.]*))"""
)
_VERSION_VARIABLES = {"python_version", "python_full_version", "implementation_version"}


def marker_environment(elf_arch: str) -> dict[str, str]:
    """PEP 508 marker values for the Lambda python3.12 runtime on ``elf_arch``, installing no extras."""
    return {
        "python_version": PYTHON_VERSION,
        "python_full_version": f"{PYTHON_VERSION}.0",
        "implementation_name": "cpython",
        "implementation_version": f"{PYTHON_VERSION}.0",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "platform_machine": elf_arch,
        "platform_release": "",
        "platform_version": "",
        "extra": "",
    }


def _version_key(text: str) -> tuple[int, ...]:
    parts = [int(match) for match in re.findall(r"\d+", text.split("+")[0])[:4]]
    return tuple(parts + [0] * (4 - len(parts)))


def _compare(left: str, op: str, right: str, versions: bool) -> bool:
    op = " ".join(op.split())
    if op in ("in", "not in"):
        return (left in right) == (op == "in")
    if op == "===":
        return left == right
    if versions:
        a, b = _version_key(left), _version_key(right)
        if op == "~=":
            prefix = len(re.findall(r"\d+", right)) - 1
            return a >= b and a[: max(prefix, 1)] == b[: max(prefix, 1)]
        return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
    if op in ("==", "!="):
        return (left == right) == (op == "==")
    raise ValueError(f"cannot compare {left!r} {op} {right!r} as strings")


def evaluate_marker(marker: str, environment: dict[str, str]) -> bool:
    """Evaluate a PEP 508 environment marker (``python_version < "3.13" and extra == "x"``).

    A small recursive-descent evaluator because this script uses only the standard library; raises
    ValueError on anything it does not understand so the caller can treat the requirement as needed."""
    tokens: list[tuple[str, str]] = []
    position = 0
    text = marker.strip()
    while position < len(text):
        match = _MARKER_TOKEN.match(text, position)
        if not match or match.end() == position:
            raise ValueError(f"cannot parse marker {marker!r} at {text[position:]!r}")
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind)))
        position = match.end()
        while position < len(text) and text[position].isspace():
            position += 1
    index = 0

    def peek() -> tuple[str, str]:
        return tokens[index] if index < len(tokens) else ("end", "")

    def take(kind: str) -> str:
        nonlocal index
        token = peek()
        if token[0] != kind:
            raise ValueError(f"marker {marker!r}: expected {kind}, got {token[1]!r}")
        index += 1
        return token[1]

    def value() -> tuple[str, bool]:
        kind, token = peek()
        if kind == "string":
            take("string")
            return token[1:-1], False
        name = take("name")
        if name not in environment:
            raise ValueError(f"marker {marker!r}: unknown variable {name!r}")
        return environment[name], name in _VERSION_VARIABLES

    def atom() -> bool:
        if peek()[0] == "lparen":
            take("lparen")
            result = disjunction()
            take("rparen")
            return result
        left, left_is_version = value()
        op = take("op")
        right, right_is_version = value()
        return _compare(left, op, right, left_is_version or right_is_version)

    def conjunction() -> bool:
        nonlocal index
        result = atom()
        while peek() == ("bool", "and"):
            index += 1
            result = atom() and result
        return result

    def disjunction() -> bool:
        nonlocal index
        result = conjunction()
        while peek() == ("bool", "or"):
            index += 1
            result = conjunction() or result
        return result

    result = disjunction()
    if index != len(tokens):
        raise ValueError(f"marker {marker!r}: unexpected {peek()[1]!r}")
    return result


_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def installed_distributions(site_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """``{normalized name: (version, Requires-Dist lines)}`` from the ``*.dist-info`` dirs in ``site_dir``."""
    found = {}
    for dist_info in sorted(site_dir.glob("*.dist-info")):
        metadata_file = dist_info / "METADATA"
        if not metadata_file.is_file():
            continue
        metadata = email.parser.Parser().parsestr(metadata_file.read_text(encoding="utf-8", errors="replace"))
        found[normalize(metadata["Name"] or dist_info.name.split("-")[0])] = (
            metadata["Version"] or "?",
            metadata.get_all("Requires-Dist") or [],
        )
    return found


def missing_dependencies(site_dir: Path, elf_arch: str, provided: Iterable[str] = RUNTIME_PROVIDED) -> list[str]:
    """Requirements of installed packages that apply on the target yet are neither installed nor provided
    by the Lambda runtime, as ``"<package> requires <requirement>"``."""
    installed = installed_distributions(site_dir)
    available = set(installed) | {normalize(name) for name in provided}
    environment = marker_environment(elf_arch)
    missing = []
    for package, (_, requirements) in sorted(installed.items()):
        for requirement in requirements:
            spec, _, marker = requirement.partition(";")
            match = _REQUIREMENT.match(spec)
            if not match:
                continue
            if marker.strip():
                try:
                    applies = evaluate_marker(marker, environment)
                except ValueError:
                    applies = True  # cannot tell: assume it is needed and let a human look
                if not applies:
                    continue
            if normalize(match.group(1)) not in available:
                missing.append(f"{package} requires {requirement.strip()}")
    return missing


# ------------------------------------------------------------------------------------------------------ pip


def looks_like_network_error(output: str) -> bool:
    """Whether pip's output says the index could not be reached (rather than a bad pin or missing wheel)."""
    return any(marker in output for marker in NETWORK_ERROR_MARKERS)


def read_pins(requirements: Path) -> dict[str, str]:
    """``{name: version}`` from a requirements file, which must pin every entry with ``==`` (``--no-deps``
    installs exactly what is listed, so a range would silently drift)."""
    pins = {}
    for number, raw in enumerate(requirements.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)", line)
        if not match:
            raise BuildError(f"{requirements}:{number}: {line!r} is not an exact `name==version` pin")
        pins[normalize(match.group(1))] = match.group(2)
    return pins


def pip_install_command(requirements: Path, site_dir: Path, elf_arch: str, pip_args: Sequence[str] = ()) -> list[str]:
    platforms = [arg for tag in MANYLINUX_TAGS for arg in ("--platform", f"{tag}_{elf_arch}")]
    return [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "--no-input",
        "--target",
        str(site_dir),
        "--requirement",
        str(requirements),
        "--no-deps",
        "--only-binary=:all:",
        *platforms,
        "--python-version",
        PYTHON_VERSION,
        "--implementation",
        "cp",
        "--no-compile",
        *pip_args,
    ]


def pip_index_reachable(timeout_s: int = 60) -> bool:
    """Whether pip can fetch a small pinned wheel from its configured index (or cache) right now."""
    with tempfile.TemporaryDirectory() as tmp:
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--disable-pip-version-check",
                "--no-input",
                "--no-deps",
                "--only-binary=:all:",
                "--retries",
                "1",
                "--timeout",
                "15",
                "--dest",
                tmp,
                "typing-extensions==4.16.0",
            ],
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    return completed.returncode == 0


# ---------------------------------------------------------------------------------------------------- build


def build_layer(
    layer: str,
    arch: str,
    out: Path,
    *,
    python312: str | None = None,
    strip: bool = False,
    make_zip: bool = True,
    smoke: bool = True,
    rules: Sequence[TrimRule] = TRIM_RULES,
    pip_args: Sequence[str] = (),
    requirements: Path | None = None,
) -> LayerResult:
    """Build one layer into ``<out>/<layer>-<arch>/python/`` (see the module docstring for the steps)."""
    if arch not in ARCHS:
        raise BuildError(f"unknown arch {arch!r}: choose from {', '.join(ARCHS)}")
    elf_arch = ARCHS[arch]
    requirements = requirements or DEPS_DIR / layer / "requirements.txt"
    if not requirements.is_file():
        raise BuildError(f"no requirements file for layer {layer!r}: {requirements}")
    pins = read_pins(requirements)
    layer_dir = out / f"{layer}-{arch}"
    site_dir = layer_dir / "python"
    if layer_dir.exists():
        shutil.rmtree(layer_dir)
    site_dir.mkdir(parents=True)
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    completed = subprocess.run(
        pip_install_command(requirements, site_dir, elf_arch, pip_args), capture_output=True, text=True, check=False
    )
    seconds["pip"] = time.perf_counter() - started
    if completed.returncode != 0:
        output = (completed.stdout + completed.stderr).strip()
        raise PipFailed(f"pip could not install the {layer} layer for {arch}:\n{output[-4000:]}", output)

    installed = installed_distributions(site_dir)
    unpinned = sorted(set(installed) - set(pins))
    missing = missing_dependencies(site_dir, elf_arch)
    if unpinned or missing:
        raise BuildError(
            f"{requirements} is not a closed set of pins for {arch}:"
            + "".join(f"\n  installed but not pinned: {name}" for name in unpinned)
            + "".join(f"\n  missing: {item}" for item in missing)
            + f"\npin the missing packages (==) in {requirements}, or add them to RUNTIME_PROVIDED"
            " if the Lambda runtime ships them"
        )

    started = time.perf_counter()
    trimmed = apply_trim_rules(site_dir, [rule for rule in rules if rule.applies_to(layer)])
    seconds["trim"] = time.perf_counter() - started

    stripped_bytes = 0
    strip_rejected: list[str] = []
    strip_tool = find_strip(elf_arch) if strip else None
    if strip_tool:
        started = time.perf_counter()
        stripped_bytes, strip_rejected = strip_shared_objects(site_dir, strip_tool)
        seconds["strip"] = time.perf_counter() - started

    compile_errors: list[str] = []
    if python312:
        started = time.perf_counter()
        compile_errors = compile_layer(site_dir, python312)
        seconds["compile"] = time.perf_counter() - started

    smoke_tested = False
    native = platform.system() == "Linux" and platform.machine() == elf_arch
    if smoke and python312 and native:
        started = time.perf_counter()
        smoke_test(site_dir, layer, python312)
        smoke_tested = True
        seconds["smoke"] = time.perf_counter() - started

    unzipped = tree_size(layer_dir)
    zip_path: Path | None = None
    zipped: int | None = None
    if make_zip:
        started = time.perf_counter()
        zip_path = out / f"{layer}-{arch}.zip"
        zipped = zip_layer(layer_dir, zip_path)
        seconds["zip"] = time.perf_counter() - started
    seconds = {name: round(value, 2) for name, value in seconds.items()}
    seconds["total"] = round(sum(seconds.values()), 2)

    return LayerResult(
        layer=layer,
        arch=arch,
        directory=str(layer_dir),
        zip=str(zip_path) if zip_path else None,
        unzipped_bytes=unzipped,
        zipped_bytes=zipped,
        packages={name: version for name, (version, _) in sorted(installed.items())},
        trimmed=trimmed,
        trimmed_bytes=sum(item.bytes for item in trimmed),
        stripped_bytes=stripped_bytes,
        strip_tool=strip_tool,
        strip_rejected=strip_rejected,
        compiled_with=python312,
        compile_errors=compile_errors,
        smoke_tested=smoke_tested,
        seconds=seconds,
    )


def build_runtime_layer(out: Path, python312: str | None, package: Path = RUNTIME_PACKAGE) -> Path:
    """The runtime layer: the ``maas`` package itself under ``<out>/runtime/python/`` (no third-party code,
    nothing to resolve), byte-compiled for 3.12 like the dependency layers. Returns the layer directory."""
    layer_dir = out / "runtime"
    if layer_dir.exists():
        shutil.rmtree(layer_dir)
    site_dir = layer_dir / "python"
    shutil.copytree(package, site_dir / package.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if python312:
        failed = compile_layer(site_dir, python312)
        if failed:
            raise BuildError("the runtime layer did not byte-compile:\n  " + "\n  ".join(failed))
    return layer_dir


def format_table(results: Sequence[LayerResult], runtime_bytes: int) -> str:
    """The size table printed after a build (MB = 2**20 bytes, the unit of Lambda's 250 MB limit)."""
    header = f"{'layer':<10} {'arch':<7} {'unzipped':>9} {'zipped':>8} {'+runtime':>9} {'trimmed':>8} {'build':>7}"
    lines = [header, "-" * len(header)]
    for r in results:
        zipped = f"{r.zipped_bytes / MB:.1f}" if r.zipped_bytes is not None else "-"
        lines.append(
            f"{r.layer:<10} {r.arch:<7} {r.unzipped_bytes / MB:>9.1f} {zipped:>8} "
            f"{(r.unzipped_bytes + runtime_bytes) / MB:>9.1f} {(r.trimmed_bytes + r.stripped_bytes) / MB:>8.1f}"
            f" {r.seconds['total']:>6.1f}s"
        )
    lines.append(f"sizes in MB (2**20 bytes); runtime layer (layers/runtime/maas): {runtime_bytes / MB:.2f} MB")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--layer", choices=[*LAYERS, "runtime", "all"], default="all",
                        help="a dependency layer, 'runtime' (the maas package only) or 'all' dependency layers")
    parser.add_argument("--arch", choices=[*ARCHS, "all"], default="all", help="Lambda architecture name")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: build/layers)")
    parser.add_argument("--report", type=Path, help="JSON report path (default: <out>/report.json)")
    parser.add_argument("--python", help="CPython 3.12 to byte-compile with (default: found on PATH / pyenv)")
    parser.add_argument("--strip", action="store_true", help="strip shared objects (binutils; off by default)")
    parser.add_argument("--limit-mb", type=float, default=LAMBDA_UNZIPPED_LIMIT / MB, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    layers = LAYERS if args.layer == "all" else (args.layer,)
    archs = tuple(ARCHS) if args.arch == "all" else (args.arch,)
    out: Path = args.out.resolve()
    report_path: Path = args.report or out / "report.json"
    limit_bytes = int(args.limit_mb * MB)
    try:
        python312 = find_python312(args.python)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if python312 is None:
        print(f"note: no CPython {PYTHON_VERSION} found; layers are not byte-compiled (use --python)", file=sys.stderr)
    if args.layer == "runtime":
        try:
            layer_dir = build_runtime_layer(out, python312)
        except BuildError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"runtime layer: {layer_dir} ({tree_size(layer_dir) / MB:.2f} MB)")
        return 0

    results: list[LayerResult] = []
    for layer in layers:
        for arch in archs:
            print(f"building {layer}-{arch} ...", file=sys.stderr, flush=True)
            try:
                results.append(build_layer(layer, arch, out, python312=python312, strip=args.strip))
            except BuildError as error:
                hint = "\n(pip could not reach its package index)" if getattr(error, "network", False) else ""
                print(f"error: {error}{hint}", file=sys.stderr)
                return 2

    runtime_bytes = runtime_layer_size()
    errors = check_limits(results, runtime_bytes, limit_bytes)
    report = {
        "ok": not errors,
        "errors": errors,
        "limit_bytes": limit_bytes,
        "python_version": PYTHON_VERSION,
        "compiled": python312 is not None,
        "compiled_with": python312,
        "runtime_layer": {"path": str(RUNTIME_PACKAGE.relative_to(REPO_ROOT)), "unzipped_bytes": runtime_bytes},
        "layers": [asdict(result) for result in results],
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(results, runtime_bytes))
    print(f"byte-compiled for {PYTHON_VERSION}: {'yes, with ' + python312 if python312 else 'no'}")
    print(f"report: {report_path}")
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
