"""The inference Lambda handler in-process, against raw onnxruntime and a bare reference handler.

In one process and one run, per model, microseconds per call (median over rounds) of:

* ``raw``: ``InferenceSession.run`` on an already decoded numpy input (the limit);
* ``bare v1`` / ``bare v2``: a reference Lambda handler written here that does nothing but decode the API
  Gateway event's JSON body with orjson to numpy, run the session and encode the OIP v2 answer with orjson;
* ``maas v1/v2 json`` and ``maas v1/v2 binary``: ``functions/inference/handler.py`` (routing, the request
  guard, token check, signature checks, EMF metrics) under moto, fed the recorded events of
  ``tests/events`` (REST payload 1.0 and HTTP API 2.0), with JSON and with the binary tensor extension;
  the model pushed and deployed through ``maas.services`` and already in the ``/tmp`` artifact cache.

Every system's outputs are checked against raw onnxruntime. Reported: per-call µs, µs over raw, the ratio
maas/bare (the issue's target: <= 2x) and binary/JSON.

    python -m bench.lambda_bench [--model PATH ...] [--quick]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson

REPO = Path(__file__).resolve().parent.parent
BUCKET = "maas-bench-artifacts"
TABLE = "maas-bench-registry"
SYSTEM = "lambda-handler"
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_SESSION_TOKEN": "bench",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}
OIP_TYPES = {
    np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32", np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "UINT8",
}
NUMPY_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
    "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8,
}
NUMPY_OF_OIP = {name: dtype for dtype, name in OIP_TYPES.items()}


# ------------------------------------------------------------------------------------------- models


def tiny_models(directory: Path) -> dict[str, Path]:
    """Two deterministic models made with onnx.helper: a 20-feature logistic regression and a 512-value
    input linear layer (the issue's "20-feature" and "512-value input" cases)."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, width, classes in (("logreg20", 20, 2), ("dense512", 512, 10)):
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Add", ["z", "b"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
             helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0)],
            name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
            [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes]),
             helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"])],
            initializer=[numpy_helper.from_array(rng.normal(size=(width, classes)).astype(np.float32), "w"),
                         numpy_helper.from_array(rng.normal(size=(classes,)).astype(np.float32), "b")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        paths[name] = directory / f"{name}.onnx"
        save(model, str(paths[name]))
    return paths


def sample_inputs(session: ort.InferenceSession, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """A deterministic input for each of the session's inputs (dynamic dimensions become ``batch``)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else batch for d in spec.shape]
        dtype = NUMPY_TYPES[spec.type]
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.normal(size=shape).astype(dtype)
        else:
            feeds[spec.name] = rng.integers(0, 3, size=shape).astype(dtype)
    return feeds


def oip_json_body(feeds: dict[str, np.ndarray]) -> bytes:
    return orjson.dumps({"inputs": [{"name": name, "shape": list(value.shape), "datatype": OIP_TYPES[value.dtype],
                                     "data": value.ravel().tolist()} for name, value in feeds.items()]})


def oip_binary_body(feeds: dict[str, np.ndarray], outputs: list[str]) -> tuple[bytes, int]:
    """The binary tensor extension (request and response binary), as tritonclient writes it."""
    header = {"inputs": [{"name": name, "shape": list(value.shape), "datatype": OIP_TYPES[value.dtype],
                          "parameters": {"binary_data_size": value.nbytes}} for name, value in feeds.items()],
              "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs]}
    head = orjson.dumps(header)
    return head + b"".join(np.ascontiguousarray(v).tobytes() for v in feeds.values()), len(head)


def parse_json_answer(body: bytes) -> dict[str, np.ndarray]:
    answer = orjson.loads(body)
    return {o["name"]: np.array(o["data"], dtype=NUMPY_OF_OIP[o["datatype"]]).reshape(o["shape"])
            for o in answer["outputs"]}


def parse_binary_answer(body: bytes, header_length: int) -> dict[str, np.ndarray]:
    header = orjson.loads(body[:header_length])
    offset, result = header_length, {}
    for output in header["outputs"]:
        size = output["parameters"]["binary_data_size"]
        dtype = NUMPY_OF_OIP[output["datatype"]]
        result[output["name"]] = np.frombuffer(body[offset:offset + size], dtype=dtype).reshape(output["shape"])
        offset += size
    return result


def same_outputs(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> bool:
    if set(got) != set(want):
        return False
    return all(got[k].shape == want[k].shape and np.array_equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------------------------------- timing


def per_call_us(fn: Callable[[], object], quick: bool) -> float:
    """Median over rounds of the mean per-call time, each round ~0.25 s (0.05 s quick)."""
    started, calls = time.perf_counter(), 0
    while calls < 5 or time.perf_counter() - started < (0.02 if quick else 0.1):  # warm-up and calibration
        fn()
        calls += 1
    once = (time.perf_counter() - started) / calls
    iterations = max(int((0.05 if quick else 0.25) / once), 3)
    rounds = []
    for _ in range(3 if quick else 7):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        rounds.append((time.perf_counter() - start) / iterations * 1e6)
    return statistics.median(rounds)


# ------------------------------------------------------------------------------------ the bare handler


def bare_handler(session: ort.InferenceSession, model: str) -> Callable[[dict[str, Any], Any], dict[str, Any]]:
    """A reference Lambda handler: decode, run, encode, nothing else (no routing, auth, checks, metrics)."""
    output_names = [o.name for o in session.get_outputs()]

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        body = event["body"]
        request = orjson.loads(base64.b64decode(body) if event.get("isBase64Encoded") else body)
        feeds = {t["name"]: np.array(t["data"], dtype=NUMPY_OF_OIP[t["datatype"]]).reshape(t["shape"])
                 for t in request["inputs"]}
        outputs = session.run(None, feeds)
        answer = {"model_name": model, "outputs": [
            {"name": name, "datatype": OIP_TYPES[value.dtype], "shape": list(value.shape), "data": value.ravel()}
            for name, value in zip(output_names, outputs, strict=True)]}
        return {"statusCode": 200, "headers": {"Content-Type": "application/json"},
                "body": orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY).decode(), "isBase64Encoded": False}

    return handler


def answer_outputs(raw: dict[str, Any]) -> dict[str, np.ndarray]:
    assert raw["statusCode"] == 200, raw
    body = base64.b64decode(raw["body"]) if raw["isBase64Encoded"] else raw["body"].encode()
    headers = {k.lower(): v for k, v in raw["headers"].items()}
    if "inference-header-content-length" in headers:
        return parse_binary_answer(body, int(headers["inference-header-content-length"]))
    return parse_json_answer(body)


# ------------------------------------------------------------------------------------- the maas world


class InProcessValidator:
    """The real model checks without the sandbox child process (as tests/models.py does)."""

    def __init__(self, limits: Any):
        self._limits = limits

    def validate(self, path: Path) -> Any:
        from maas.inference.validation import inspect_model_file

        return inspect_model_file(path, self._limits)


def deploy_models(models: dict[str, Path], home: Path, endpoint_url: str | None = None) -> str:
    """Create the versioned bucket and the table, push and deploy each model through ``maas.services``
    (as the deploy tool does) and return an invoke token. AWS is moto: in-process or a server."""
    import boto3

    from maas.backends.aws import AwsBackend
    from maas.backends.aws.table import create_table
    from maas.domain import UploadPlan
    from maas.services.deployments import DeploymentService
    from maas.services.models import ModelService
    from maas.services.tokens import TokenService
    from maas.settings import Limits, Settings

    s3 = boto3.client("s3", endpoint_url=endpoint_url)
    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    create_table(boto3.client("dynamodb", endpoint_url=endpoint_url), TABLE)
    settings = Settings(home=home, limits=Limits(validation_timeout_s=60))
    backend = AwsBackend(settings, bucket=BUCKET, table=TABLE, validator=InProcessValidator(settings.limits),
                         endpoint_url=endpoint_url)
    service = ModelService(backend.registry, backend.artifacts, backend.validator, settings.limits)
    deployments = DeploymentService(backend.registry, service)
    for name, path in models.items():
        data = path.read_bytes()
        plan = UploadPlan(size=len(data), sha256=hashlib.sha256(data).hexdigest())
        service.create_model(name)
        pending = service.begin_version(name, plan=plan)
        backend.artifacts.receive_upload(pending.upload.upload_id, io.BytesIO(data), len(data))
        version = service.commit_version(name, pending.version.version, sha256=plan.sha256 or "", size=len(data))
        deployments.deploy(name, version.version)
    return TokenService(backend.registry).create("bench", ["invoke"])[1]


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def result(model: str, scenario: str, metric: str, value: float, unit: str, match: bool) -> dict[str, Any]:
    return {"system": SYSTEM, "model": model, "scenario": scenario, "metric": metric, "value": float(value),
            "unit": unit, "outputs_match": bool(match)}


def run(models: dict[str, Path], quick: bool) -> list[dict[str, Any]]:
    from moto import mock_aws

    sys.path.insert(0, str(REPO)) if str(REPO) not in sys.path else None
    from tests.functions import LambdaContext, api_event, load_handler

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="maas-lambda-bench-") as scratch, \
            environment({**FAKE_AWS, "MAAS_BUCKET": BUCKET, "MAAS_TABLE": TABLE, "MAAS_HOME": f"{scratch}/home",
                         "MAAS_ARTIFACT_CACHE_DIR": f"{scratch}/artifact-cache", "MAAS_ROUTE_TTL_S": "2",
                         "POWERTOOLS_METRICS_NAMESPACE": "maas", "POWERTOOLS_TRACE_DISABLED": "true"}), \
            mock_aws(), open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        # EMF metrics and logs go to stdout as on Lambda; here to /dev/null (writing them is still timed)
        token = deploy_models(models, Path(scratch) / "home")
        module = load_handler("inference", "maas_bench_inference")
        context = LambdaContext()
        def bench_model(name: str, path: Path) -> None:  # a function: the lambdas below bind its locals
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feeds = sample_inputs(session)
            output_names = [o.name for o in session.get_outputs()]
            want = dict(zip(output_names, session.run(None, feeds), strict=True))
            json_body = oip_json_body(feeds)
            binary_body, header_length = oip_binary_body(feeds, output_names)
            infer_path = f"/v2/models/{name}/infer"
            events = {
                "maas v1 json": api_event("v1_rest_json_infer_prod", model=name, token=token, body=json_body,
                                          path=infer_path),
                "maas v2 json": api_event("v2_http_json_infer_default", model=name, token=token, body=json_body,
                                          path=infer_path),
                "maas v1 binary": api_event("v1_rest_binary_infer_prod", model=name, token=token, body=binary_body,
                                            path=infer_path, header_length=header_length),
                "maas v2 binary": api_event("v2_http_binary_infer_default", model=name, token=token,
                                            body=binary_body, path=infer_path, header_length=header_length),
            }
            bare = bare_handler(session, name)
            calls: dict[str, tuple[Callable[[], Any], Callable[[], bool]]] = {
                "raw session.run": (lambda: session.run(None, feeds),
                                    lambda: same_outputs(dict(zip(output_names, session.run(None, feeds),
                                                                  strict=True)), want)),
            }
            for version, fixture in (("v1", "v1_rest_json_infer_prod"), ("v2", "v2_http_json_infer_default")):
                event = api_event(fixture, model=name, token=token, body=json_body, path=infer_path)
                calls[f"bare {version} json"] = (
                    lambda event=event: bare(event, context),
                    lambda event=event: same_outputs(answer_outputs(bare(event, context)), want))
            for label, event in events.items():
                module.handler(event, context)  # warm-up: the artifact lands in the /tmp cache, the session loads
                calls[label] = (lambda event=event: module.handler(event, context),
                                lambda event=event: same_outputs(answer_outputs(module.handler(event, context)),
                                                                 want))
            timings: dict[str, float] = {}
            for label, (call, check) in calls.items():
                match = check()
                timings[label] = per_call_us(call, quick) if match else math.nan
                results.append(result(name, label, "per_call", timings[label], "us", match))
                if label != "raw session.run":
                    results.append(result(name, label, "over_raw", timings[label] - timings["raw session.run"],
                                          "us", match))
            raw_us = timings["raw session.run"]
            for version in ("v1", "v2"):
                bare_us, maas_us = timings[f"bare {version} json"], timings[f"maas {version} json"]
                results.append(result(name, f"maas/bare {version} json", "ratio_per_call", maas_us / bare_us, "x",
                                      True))
                results.append(result(name, f"maas/bare {version} json", "ratio_over_raw",
                                      (maas_us - raw_us) / max(bare_us - raw_us, 1e-9), "x", True))
                results.append(result(name, f"binary/json maas {version}", "ratio_per_call",
                                      timings[f"maas {version} binary"] / maas_us, "x", True))

        for name, path in models.items():
            bench_model(name, path)
    return results


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'model':<12} {'system':<16} {'scenario':<22} {'metric':<16} {'value':>10} {'unit':<4} match")
    for r in results:
        print(f"{r['model']:<12} {r['system']:<16} {r['scenario']:<22} {r['metric']:<16} {r['value']:>10.2f} "
              f"{r['unit']:<4} {r['outputs_match']}")


def models_from_args(paths: list[str] | None, scratch: Path) -> dict[str, Path]:
    if paths:
        return {Path(p).stem.replace("_", "-").lower(): Path(p) for p in paths}
    return tiny_models(scratch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="an .onnx file (repeatable); default: two tiny models")
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="maas-bench-models-") as scratch:
        print_table(run(models_from_args(options.model, Path(scratch)), options.quick))


if __name__ == "__main__":
    main()
