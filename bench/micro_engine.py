"""Micro-benchmark of the inference hot path against raw onnxruntime (not a test).

Per-request microseconds on the bundled iris model with a batch of one, for:

* raw ``session.run`` (the very session the engine caches, so only our overhead differs),
* ``decode_request`` + ``InferenceEngine.infer`` + ``encode_response`` with JSON tensors,
* the same with the binary tensor extension (request and response in binary),

and each path's ratio to raw onnxruntime, plus a per-stage breakdown.

    python bench/micro_engine.py [--iterations N] [--batch B]
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable

import numpy as np
import orjson
import tritonclient.http as triton

from maas.domain import ModelVersion, Signature, TensorSpec, VersionStatus
from maas.examples import example_model_path
from maas.inference.codec import decode_request, encode_response
from maas.inference.engine import InferenceEngine
from maas.settings import Limits


def per_call_us(fn: Callable[[], object], iterations: int, repeats: int = 7) -> float:
    for _ in range(max(iterations // 10, 100)):  # warm up
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        samples.append((time.perf_counter() - start) / iterations * 1e6)
    return min(samples)  # the least disturbed run: the host's noise only ever adds time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()

    data = example_model_path().read_bytes()
    version = ModelVersion(
        model="iris",
        version=1,
        status=VersionStatus.READY,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        signature=Signature(
            inputs=(TensorSpec(name="features", datatype="FP32", shape=(-1, 4)),),
            outputs=(
                TensorSpec(name="probabilities", datatype="FP32", shape=(-1, 3)),
                TensorSpec(name="label", datatype="INT64", shape=(-1,)),
            ),
        ),
    )
    limits = Limits()
    engine = InferenceEngine(lambda v: data, limits)
    session = engine.session(version)
    rng = np.random.default_rng(0)
    features = (rng.random((args.batch, 4)) * 7).astype(np.float32)

    json_body = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": list(features.shape),
                    "datatype": "FP32",
                    "data": features.tolist(),
                }
            ]
        }
    )
    infer_input = triton.InferInput("features", list(features.shape), "FP32")
    infer_input.set_data_from_numpy(features, binary_data=True)
    binary_body, json_size = triton.InferenceServerClient.generate_request_body([infer_input])

    def raw() -> object:
        return session.run(None, {"features": features})

    def json_path() -> object:
        request = decode_request(json_body, None, limits)
        outputs = engine.infer(version, request)
        return encode_response("iris", "1", request.id, outputs, request.response_binary())

    def binary_path() -> object:
        request = decode_request(binary_body, json_size, limits)
        outputs = engine.infer(version, request)
        return encode_response("iris", "1", request.id, outputs, request.response_binary())

    decoded_json = decode_request(json_body, None, limits)
    decoded_binary = decode_request(binary_body, json_size, limits)
    outputs = engine.infer(version, decoded_json)
    assert decoded_binary.response_binary() is True
    # Sanity: both paths give raw onnxruntime's numbers.
    for (_, got), want in zip(outputs, raw(), strict=True):  # type: ignore[call-overload]
        np.testing.assert_array_equal(got, want)

    n = args.iterations
    results = {
        "raw session.run": per_call_us(raw, n),
        "JSON   decode+infer+encode": per_call_us(json_path, n),
        "binary decode+infer+encode": per_call_us(binary_path, n),
    }
    stages = {
        "decode JSON": per_call_us(lambda: decode_request(json_body, None, limits), n),
        "decode binary": per_call_us(lambda: decode_request(binary_body, json_size, limits), n),
        "engine.infer": per_call_us(lambda: engine.infer(version, decoded_json), n),
        "encode JSON": per_call_us(lambda: encode_response("iris", "1", None, outputs, False), n),
        "encode binary": per_call_us(lambda: encode_response("iris", "1", None, outputs, True), n),
    }
    base = results["raw session.run"]
    print(f"iris, batch {args.batch}, best of 7 runs of {n} requests (per request)")
    for name, us in results.items():
        print(f"  {name:<28} {us:8.2f} us   x{us / base:5.2f} raw   (+{us - base:6.2f} us)")
    print("stages:")
    for name, us in stages.items():
        print(f"  {name:<28} {us:8.2f} us")


if __name__ == "__main__":
    main()
