"""Run the inference engine against the bomb corpus in a process of its own and print what happened as
one JSON line: ``python -m tests.memory_probe CAP_MIB``.

A process of its own because the arena the engine caps is process-wide (the first engine installs it):
the test process keeps its default cap, this one gets ``CAP_MIB``. Each case records the answer's
status and problem type and the resident memory before and after, which the tests judge.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from maas.domain import ModelVersion, VersionStatus
from maas.errors import MaasError
from maas.inference.codec import DecodedRequest
from maas.inference.engine import InferenceEngine
from maas.inference.memory import resident_bytes
from maas.ports import NullMetrics
from tests.bombs import constant_of_shape, corpus

MIB = 1024 * 1024
INDEX = [{"name": "i", "datatype": "INT64", "shape": [1], "data": [1]}]


class Errors(NullMetrics):
    """Counts what the engine reports as the version's errors (deploy health reads the same flag)."""

    def __init__(self) -> None:
        self.errors: dict[str, int] = {}

    def invocation(self, model: str, version: int, *, latency_s: float, error: bool, routed: bool = True) -> None:
        self.errors[model] = self.errors.get(model, 0) + int(error)


def _weights_model(mib: int, tag: str) -> bytes:
    """y = w[i] with ``mib`` MiB of float weights (held by the session, so by the arena; the index is
    an input, so no optimisation can fold the weights away)."""
    weights = np.full(mib * MIB // 4, 0.5, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["w", "i"], ["y"])],
        f"weights_{tag}", [helper.make_tensor_value_info("i", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _fill_model() -> bytes:
    """``ConstantOfShape(n)`` answered as it is: its output is arena memory while the caller holds it."""
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["n"], ["y"],
                          value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))],
        "fill", [helper.make_tensor_value_info("n", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _folded_model(mib: int) -> bytes:
    """A ~200-byte model whose session holds ``mib`` MiB: a ``ConstantOfShape`` of a constant size,
    which onnxruntime folds into a weight when it builds the session."""
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["size"], ["w"],
                          value=helper.make_tensor("half", TensorProto.FLOAT, [1], [0.5])),
         helper.make_node("Gather", ["w", "i"], ["y"])],
        "folded", [helper.make_tensor_value_info("i", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[numpy_helper.from_array(np.array([mib * MIB // 4], dtype=np.int64), "size")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _copy(data: bytes, tag: str) -> bytes:
    """The same model under another sha256 (its doc string differs)."""
    model = onnx.load_from_string(data)
    model.doc_string = tag
    return model.SerializeToString()


def main(cap_mib: int) -> dict[str, Any]:
    from maas.settings import Limits

    store: dict[str, bytes] = {}
    metrics = Errors()
    engine = InferenceEngine(lambda version: store[version.sha256],
                             Limits(inference_memory_bytes=cap_mib * MIB, session_cache_bytes=cap_mib * MIB,
                                    max_inference_seconds=2, max_output_bytes=16 * MIB), metrics)

    def version(name: str, data: bytes) -> ModelVersion:
        sha = hashlib.sha256(data).hexdigest()
        store[sha] = data
        return ModelVersion(model=name, version=1, status=VersionStatus.READY, sha256=sha, size=len(data))

    def request(inputs: list[dict[str, Any]]) -> DecodedRequest:
        arrays = {item["name"]: np.asarray(item["data"], dtype=np.int64 if item["datatype"] == "INT64"
                                           else np.float32).reshape(item["shape"]) for item in inputs}
        return DecodedRequest(inputs=arrays, datatypes={item["name"]: item["datatype"] for item in inputs},
                              requested_outputs=None, id=None)

    def attempt(target: ModelVersion, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        before = resident_bytes()
        started = time.monotonic()
        try:
            outputs = engine.infer(target, request(inputs))
            outcome: dict[str, Any] = {"status": 200, "y": float(np.sum(outputs[0][1]))}
        except MaasError as error:
            outcome = {"status": error.status, "type": error.slug, "detail": error.detail}
        return {**outcome, "seconds": time.monotonic() - started, "rss_before": before, "rss_after": resident_bytes()}

    report: dict[str, Any] = {"bombs": {}}
    for bomb in corpus():
        target = version(bomb.name.replace("_", "-"), bomb.model)
        harmless = attempt(target, bomb.harmless)
        hostile = attempt(target, bomb.hostile)
        report["bombs"][bomb.name] = {"bound": bomb.bound, "harmless": harmless, "hostile": hostile,
                                      "again": attempt(target, bomb.harmless)}

    # a run under the cap that touches a lot of memory: answered, and the memory given back
    big = version("big-run", constant_of_shape())
    report["under_cap"] = attempt(big, [{"name": "n", "datatype": "INT64", "shape": [1],
                                         "data": [(cap_mib // 2) * MIB // 4]}])
    # five copies of one tiny model, each run once on a large input: nothing accumulates
    copies = []
    for index in range(5):
        target = version(f"copy-{index}", _copy(constant_of_shape(), f"copy {index}"))
        copies.append(attempt(target, [{"name": "n", "datatype": "INT64", "shape": [1],
                                        "data": [(cap_mib // 2) * MIB // 4]}]))
    report["copies"] = copies
    # the arena's whole cap stays usable: runs of one shape repeated, then one of twice the size
    two_fifths = [{"name": "n", "datatype": "INT64", "shape": [1], "data": [(cap_mib * 2 // 5) * MIB // 4]}]
    fresh = version("repeated", _copy(constant_of_shape(), "repeated"))
    repeated = [attempt(fresh, two_fifths) for _ in range(3)]
    repeated.append(attempt(fresh, [{"name": "n", "datatype": "INT64", "shape": [1],
                                   "data": [(cap_mib * 4 // 5) * MIB // 4]}]))
    report["repeated"] = repeated

    # the arena held by another run's output (onnxruntime's outputs are views of arena memory until
    # released): a run that would fit alone is refused as busy, 503, not counted against its version
    fill = version("fill", _fill_model())
    held = engine.session(fill).run(None, {"n": np.array([(cap_mib * 3 // 5) * MIB // 4], dtype=np.int64)})
    held_shape = [int(d) for d in np.shape(held[0])]
    report["busy"] = attempt(big, [{"name": "n", "datatype": "INT64", "shape": [1],
                                    "data": [(cap_mib * 3 // 5) * MIB // 4]}])
    del held
    report["busy"]["held_shape"] = held_shape
    report["after_busy"] = attempt(big, [{"name": "n", "datatype": "INT64", "shape": [1],
                                          "data": [(cap_mib * 3 // 5) * MIB // 4]}])

    # sessions are kept by the resident memory each was measured to hold: a model whose weights take
    # most of the session budget evicts the ones before it
    heavy = version("heavy", _weights_model(cap_mib // 2, "a"))
    report["heavy"] = attempt(heavy, INDEX)
    folded = version("folded", _folded_model(cap_mib // 4))
    cached_before = engine.cache.stats.bytes
    report["folded"] = attempt(folded, INDEX)
    report["folded_cost"] = engine.cache.stats.bytes - cached_before
    report["folded_bytes"] = len(store[folded.sha256])
    report["cache"] = {"folded_cached": folded.sha256 in engine.cache, "entries": engine.cache.stats.entries,
                       "bytes": engine.cache.stats.bytes,
                       "max_bytes": engine.cache.stats.max_bytes, "heavy_cached": heavy.sha256 in engine.cache}

    # the Loop bomb stopped by its deadline while another thread's runs keep being answered
    loop = next(bomb for bomb in corpus() if bomb.name == "loop")
    loop_version = version("loop", loop.model)
    small = version("small", _copy(constant_of_shape(), "small"))
    waits: list[float] = []
    stop = threading.Event()

    def others() -> None:
        while not stop.is_set():
            started = time.monotonic()
            engine.infer(small, request([{"name": "n", "datatype": "INT64", "shape": [1], "data": [4]}]))
            waits.append(time.monotonic() - started)
            time.sleep(0.01)

    engine.warm(small)
    watcher = threading.Thread(target=others)
    watcher.start()
    report["loop_meanwhile"] = attempt(loop_version, loop.hostile)
    stop.set()
    watcher.join()
    report["other_waits"] = {"count": len(waits), "max": max(waits)}
    report["errors"] = metrics.errors
    report["cap"] = engine.memory_cap
    return report


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
