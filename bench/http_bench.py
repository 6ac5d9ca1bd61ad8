"""Raw onnxruntime, maas's engine in-process, and the HTTP systems, side by side in one run (not a test).

Every point yields result dicts ``{"system", "model", "scenario", "metric", "value", "unit",
"outputs_match"}``; ``round`` is added so :mod:`bench.report` can take medians over rounds.

* ``raw-ort``: ``session.run`` in a loop in this process, one intra-op thread, pinned to the server core:
  the limit;
* ``maas-engine``: ``decode_request`` + ``InferenceEngine.infer`` + ``encode_response`` (OIP JSON) in this
  process, pinned the same way;
* ``bare-asgi``, ``thin-fastapi``, ``maas-serve``: over loopback (see :mod:`bench.servers`), load from
  :mod:`bench.load` in another process on the other core: p50/p99 at 1 connection, throughput at 8 and 32;
* ``kserve`` / ``mlserver`` (``--systems ...,kserve,mlserver``): the peers of :mod:`bench.peers` served the
  same way (pinned to the server core, same models, same load generator and points);
* ``maas-serve`` again with Triton's binary tensor extension (inputs and outputs as raw bytes after a JSON
  header: scenarios ``c1 binary`` ... ``c32 binary``), whose target is raw ``session.run`` throughput.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson

from bench.load import measure
from bench.models import MODELS
from bench.servers import SERVER_CORE, serving

SERVER_SYSTEMS = {"bare": "bare-asgi", "fastapi": "thin-fastapi", "maas": "maas-serve", "kserve": "kserve",
                  "mlserver": "mlserver"}
#: The default systems; the peers (``kserve``, ``mlserver``: their own virtual environments, built on first
#: use by ``bench.peers``) join with ``--systems``.
ALL_SYSTEMS = ("raw", "engine", "bare", "fastapi", "maas")
POINTS = ((1, "c1", ("p50_ms", "p99_ms")), (8, "c8", ("rps",)), (32, "c32", ("rps", "p99_ms")))
UNITS = {"p50_ms": "ms", "p99_ms": "ms", "rps": "req/s", "errors": "count"}


def row(system: str, model: str, scenario: str, metric: str, value: float, match: bool | None) -> dict[str, Any]:
    return {"system": system, "model": model, "scenario": scenario, "metric": metric, "value": float(value),
            "unit": UNITS[metric], "outputs_match": match}


def request_body(inputs: dict[str, np.ndarray]) -> bytes:
    return orjson.dumps({"inputs": [{"name": name, "shape": list(array.shape), "datatype": "FP32",
                                     "data": array.ravel().tolist()} for name, array in inputs.items()]})


def binary_request(inputs: dict[str, np.ndarray]) -> tuple[bytes, int]:
    """An OIP request with the binary extension (every input and output as raw bytes) and its JSON
    header's length (the ``Inference-Header-Content-Length`` header)."""
    header = orjson.dumps({
        "inputs": [{"name": name, "shape": list(array.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": array.nbytes}} for name, array in inputs.items()],
        "parameters": {"binary_data_output": True}})
    return header + b"".join(np.ascontiguousarray(a, dtype=np.float32).tobytes() for a in inputs.values()), len(header)


BINARY_DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


def binary_outputs_match(body: bytes, expected: dict[str, np.ndarray]) -> bool:
    """Does a binary-extension answer carry raw onnxruntime's outputs? The JSON header ends where a JSON
    decoder stops (latin-1 maps bytes to characters one to one, so the index is a byte offset)."""
    try:
        header, end = json.JSONDecoder().raw_decode(body.decode("latin-1"))
        got = {}
        for output in header["outputs"]:
            size = output["parameters"]["binary_data_size"]
            got[output["name"]] = np.frombuffer(body, BINARY_DTYPES[output["datatype"]], size // np.dtype(
                BINARY_DTYPES[output["datatype"]]).itemsize, end).reshape(output["shape"])
            end += size
    except (ValueError, KeyError, TypeError):
        return False
    if set(got) != set(expected) or end != len(body):
        return False
    return all(got[name].shape == want.shape and np.allclose(got[name], want, rtol=1e-5, atol=1e-6)
               for name, want in expected.items())


def reference_outputs(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = _session(path)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def outputs_match(body: bytes, expected: dict[str, np.ndarray]) -> bool:
    """Does an OIP JSON answer carry raw onnxruntime's outputs (float32 round trip, tight tolerance)?"""
    try:
        answer = orjson.loads(body)
        got = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return False
    if set(got) != set(expected):
        return False
    return all(got[name].shape == want.shape and np.allclose(got[name], want, rtol=1e-5, atol=1e-6)
               for name, want in expected.items())


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def pinned() -> Iterator[None]:
    """Run this process on the server core for an in-process loop (when the platform lets us)."""
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(SERVER_CORE)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def timed_loop(fn: Callable[[], object], duration: float, warmup: float) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, calls/s) of ``fn`` called back to back for ``duration`` seconds."""
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        fn()
    samples: list[float] = []
    started = time.perf_counter()
    end = started + duration
    now = started
    while now < end or len(samples) < 5:
        fn()
        after = time.perf_counter()
        samples.append(after - now)
        now = after
    samples.sort()
    elapsed = now - started
    return samples[len(samples) // 2] * 1e3, samples[min(len(samples) - 1, int(0.99 * len(samples)))] * 1e3, \
        len(samples) / elapsed


def bench_raw(model: str, path: Path, duration: float, warmup: float) -> list[dict[str, Any]]:
    inputs = MODELS[model].sample()
    expected = reference_outputs(path, inputs)
    with pinned():  # before the session exists: onnxruntime's threads inherit the affinity
        session = _session(path)
        got = session.run(None, inputs)
        match = all(np.array_equal(a, b) for a, b in zip(got, expected.values(), strict=True))
        p50, p99, rps = timed_loop(lambda: session.run(None, inputs), duration, warmup)
    return [row("raw-ort", model, "in-process", "p50_ms", p50, match),
            row("raw-ort", model, "in-process", "p99_ms", p99, match),
            row("raw-ort", model, "in-process", "rps", rps, match)]


def bench_engine(model: str, path: Path, duration: float, warmup: float) -> list[dict[str, Any]]:
    import onnx

    from maas.domain import ModelVersion, VersionStatus
    from maas.inference.codec import decode_request, encode_response
    from maas.inference.engine import InferenceEngine
    from maas.inference.signature import signature_from_model
    from maas.settings import Limits

    data = path.read_bytes()
    version = ModelVersion(model=model, version=1, status=VersionStatus.READY, sha256=hashlib.sha256(data).hexdigest(),
                           size=len(data), signature=signature_from_model(onnx.load_from_string(data)))
    limits = Limits()
    engine = InferenceEngine(lambda _: data, limits)
    inputs = MODELS[model].sample()
    body = request_body(inputs)
    expected = reference_outputs(path, inputs)

    def call() -> bytes:
        request = decode_request(body, None, limits)
        outputs = engine.infer(version, request)
        payload, _ = encode_response(model, "1", request.id, outputs, request.response_binary())
        return bytes(payload)

    with pinned():  # the first call builds the session: its threads inherit the affinity
        match = outputs_match(call(), expected)
        p50, p99, rps = timed_loop(call, duration, warmup)
    return [row("maas-engine", model, "in-process", "p50_ms", p50, match),
            row("maas-engine", model, "in-process", "p99_ms", p99, match),
            row("maas-engine", model, "in-process", "rps", rps, match)]


def bench_server(running: Any, system: str, model: str, path: Path, body_file: Path, duration: float, warmup: float,
                 points: tuple[tuple[int, str, tuple[str, ...]], ...] = POINTS,
                 binary_header_length: int | None = None) -> list[dict[str, Any]]:
    """Every load point of one system and model; with ``binary_header_length`` the body is a binary-extension
    request and the scenarios are named ``<point> binary``."""
    expected = reference_outputs(path, MODELS[model].sample())
    headers = dict(running.headers)
    suffix, check = "", outputs_match
    if binary_header_length is not None:
        headers |= {"Content-Type": "application/octet-stream",
                    "Inference-Header-Content-Length": str(binary_header_length)}
        suffix, check = " binary", binary_outputs_match
    rows = []
    for concurrency, point, metrics in points:
        scenario = point + suffix
        result = measure(running.url, running.infer_path(model), body_file, concurrency, duration, warmup, headers)
        match = result["first_status"] == 200 and check(result["first_body"], expected)
        rows += [row(system, model, scenario, metric, result[metric], match) for metric in metrics]
        if result["errors"]:
            rows.append(row(system, model, scenario, "errors", result["errors"], match))
    return rows


def run(models: dict[str, Path], quick: bool = False, rounds: int = 3, systems: tuple[str, ...] = ALL_SYSTEMS,
        duration: float | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """All rounds of every system on every model; rows carry ``round``."""
    duration = duration if duration is not None else (1.0 if quick else 10.0)
    warmup = min(1.0, max(0.1, duration / 5))
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="maas-bench-") as temp, contextlib.ExitStack() as stack:
        bodies, binary_bodies = {}, {}
        for model in models:
            bodies[model] = Path(temp) / f"{model}.json"
            bodies[model].write_bytes(request_body(MODELS[model].sample()))
            binary, header_length = binary_request(MODELS[model].sample())
            binary_bodies[model] = (Path(temp) / f"{model}.bin", header_length)
            binary_bodies[model][0].write_bytes(binary)
        running = {}
        for system in systems:
            if system in SERVER_SYSTEMS:
                log(f"starting {SERVER_SYSTEMS[system]}")
                workdir = Path(temp) / system
                workdir.mkdir()
                running[system] = stack.enter_context(serving(system, models, workdir))
        for index in range(rounds):
            for model, path in models.items():
                for system in systems:
                    log(f"round {index + 1}/{rounds} {model} {system}")
                    if system == "raw":
                        rows = bench_raw(model, path, duration, warmup)
                    elif system == "engine":
                        rows = bench_engine(model, path, duration, warmup)
                    else:
                        rows = bench_server(running[system], SERVER_SYSTEMS[system], model, path, bodies[model],
                                            duration, warmup)
                        if system == "maas":
                            binary_file, header_length = binary_bodies[model]
                            rows += bench_server(running[system], SERVER_SYSTEMS[system], model, path, binary_file,
                                                 duration, warmup, binary_header_length=header_length)
                    results += [{**r, "round": index} for r in rows]
    return results
