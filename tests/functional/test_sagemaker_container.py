"""The SageMaker GPU container (functions/sagemaker): its ASGI app in-process on CPU with the bundled
iris model in a temp ``SM_MODEL_DIR`` (SageMaker's ``/opt/ml/model``), the real ``main()`` (uvicorn) in
a subprocess on 127.0.0.1, and the Dockerfile and pins checked statically (no Docker engine here).

Answers are compared with a raw ``onnxruntime.InferenceSession.run`` on the same input; requests use
the JSON protocol and Triton's binary extension, with the header length in the content type (how
SageMaker's Triton clients send it) or in ``Inference-Header-Content-Length``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as triton
from packaging.markers import default_environment
from packaging.requirements import Requirement
from starlette.testclient import TestClient

from maas.examples import EXAMPLE_REQUEST, example_model_path
from tests.functions import REPO, load_handler

PROBLEM = "application/problem+json"
TRITON_BINARY = "application/vnd.sagemaker-triton.binary+json"
FEATURES = np.array(EXAMPLE_REQUEST["inputs"][0]["data"], dtype=np.float32)
SAGEMAKER_DIR = REPO / "functions" / "sagemaker"
DOCKERFILE = SAGEMAKER_DIR / "Dockerfile"
REQUIREMENTS = SAGEMAKER_DIR / "requirements.txt"
LAYER_REQUIREMENTS = REPO / "layers" / "deps" / "inference" / "requirements.txt"
ENV_NAMES = ("SM_MODEL_DIR", "MAAS_MODEL_NAME", "MAAS_MODEL_VERSION", "MAAS_MODEL_SHA256", "MAAS_ORT_PROVIDERS",
             "MAAS_MAX_REQUEST_BYTES", "MAAS_SAGEMAKER_HOST", "SAGEMAKER_BIND_TO_PORT")


@pytest.fixture(scope="module")
def handler() -> ModuleType:
    return load_handler("sagemaker", "maas_fn_sagemaker_test")


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    """What raw onnxruntime answers for the example input."""
    session = ort.InferenceSession(str(example_model_path()), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {"features": FEATURES}), strict=True))


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "opt-ml-model"
    directory.mkdir()
    shutil.copy(example_model_path(), directory / "iris.onnx")
    return directory


def make_app(handler: ModuleType, env: pytest.MonkeyPatch, model_dir: Path, *, load: bool = True,
             **variables: str) -> Any:
    env.setenv("SM_MODEL_DIR", str(model_dir))
    for name, value in variables.items():
        env.setenv(name, value)
    app = handler.build()
    if load:
        app.load()
    return app


@pytest.fixture
def client(handler: ModuleType, env: pytest.MonkeyPatch, model_dir: Path) -> Iterator[TestClient]:
    # Without `with`, TestClient skips the lifespan: the model is loaded here, synchronously.
    yield TestClient(make_app(handler, env, model_dir, MAAS_MODEL_NAME="iris", MAAS_MODEL_VERSION="3"),
                     base_url="http://sagemaker")


def assert_problem(response: httpx.Response, status: int, *, private: tuple[str, ...] = ()) -> dict[str, Any]:
    """A problem+json answer with ``status`` that leaks no paths, code locations nor tracebacks."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["detail"]
    text = response.text
    for secret in ("Traceback", "site-packages", ".py", "/opt/program", *private):
        assert secret not in text
    return body


def infer_json(client: TestClient, body: Any = EXAMPLE_REQUEST, **headers: str) -> httpx.Response:
    return client.post("/invocations", content=orjson.dumps(body),
                       headers={"Content-Type": "application/json", **headers})


# ----------------------------------------------------------------------------------------- /ping


def test_ping_is_503_until_the_model_is_loaded_then_200(handler: ModuleType, env: pytest.MonkeyPatch,
                                                         model_dir: Path) -> None:
    app = make_app(handler, env, model_dir, load=False)
    http = TestClient(app)
    assert_problem(http.get("/ping"), 503)
    assert_problem(infer_json(http), 503)
    app.load()
    answer = http.get("/ping")
    assert answer.status_code == 200
    assert answer.json()["status"] == "ready"
    assert answer.json()["providers"] == ["CPUExecutionProvider"]  # CUDA first where onnxruntime has it


def test_the_lifespan_loads_the_model_in_the_background(handler: ModuleType, env: pytest.MonkeyPatch,
                                                        model_dir: Path) -> None:
    with TestClient(make_app(handler, env, model_dir, load=False)) as http:
        deadline = time.monotonic() + 10
        while (status := http.get("/ping").status_code) == 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert status == 200
        assert infer_json(http).status_code == 200


@pytest.mark.parametrize("files", [[], ["a.onnx", "b.onnx"], ["model.onnx:garbage"], ["notes.txt"]],
                         ids=["empty", "ambiguous", "not-onnx", "no-onnx-file"])
def test_ping_is_503_without_a_servable_model(handler: ModuleType, env: pytest.MonkeyPatch, tmp_path: Path,
                                              files: list[str]) -> None:
    directory = tmp_path / "model"
    directory.mkdir()
    for spec in files:
        name, _, content = spec.partition(":")
        if content:
            (directory / name).write_bytes(content.encode())
        else:
            shutil.copy(example_model_path(), directory / name)
    http = TestClient(make_app(handler, env, directory))
    problem = assert_problem(http.get("/ping"), 503, private=(str(tmp_path),))
    assert problem["detail"].startswith("the model could not be loaded")
    assert http.get("/ping").headers["retry-after"]
    assert_problem(infer_json(http), 503, private=(str(tmp_path),))


def test_model_onnx_wins_over_other_onnx_files(handler: ModuleType, env: pytest.MonkeyPatch,
                                               model_dir: Path) -> None:
    shutil.copy(example_model_path(), model_dir / "model.onnx")
    (model_dir / "iris.onnx").write_bytes(b"not a model")
    http = TestClient(make_app(handler, env, model_dir))
    assert http.get("/ping").status_code == 200
    assert infer_json(http).status_code == 200


def test_a_model_changed_after_hashing_is_refused(handler: ModuleType, env: pytest.MonkeyPatch,
                                                  model_dir: Path) -> None:
    """The sha256 taken at start-up is what the engine checks the bytes against."""
    app = make_app(handler, env, model_dir, load=False)
    real_warm = app.engine.warm

    def tamper_then_warm(version: Any) -> None:
        (model_dir / "iris.onnx").write_bytes(example_model_path().read_bytes() + b"\x00")
        real_warm(version)

    app.engine.warm = tamper_then_warm
    app.load()
    problem = assert_problem(TestClient(app).get("/ping"), 503, private=(str(model_dir),))
    assert "sha256" in problem["detail"]


def test_the_registered_sha256_is_enforced_when_given(handler: ModuleType, env: pytest.MonkeyPatch,
                                                       model_dir: Path) -> None:
    digest = hashlib.sha256(example_model_path().read_bytes()).hexdigest()
    matching = TestClient(make_app(handler, env, model_dir, MAAS_MODEL_SHA256=digest.upper()))
    assert matching.get("/ping").status_code == 200
    other = TestClient(make_app(handler, env, model_dir, MAAS_MODEL_SHA256="0" * 64))
    problem = assert_problem(other.get("/ping"), 503, private=(str(model_dir),))
    assert "sha256" in problem["detail"]
    env.setenv("MAAS_MODEL_SHA256", "not-a-digest")
    assert handler.main(["serve"]) == 2


# ----------------------------------------------------------------------------------- /invocations


def test_json_invocation_answers_what_onnxruntime_answers(client: TestClient,
                                                          expected: dict[str, np.ndarray]) -> None:
    answer = infer_json(client, {**EXAMPLE_REQUEST, "id": "req-1"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-maas-model-version"] == "3"
    body = answer.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("iris", "3", "req-1")
    outputs = {output["name"]: output for output in body["outputs"]}
    assert set(outputs) == set(expected)
    for name, array in expected.items():
        assert outputs[name]["shape"] == list(array.shape)
        np.testing.assert_array_equal(np.array(outputs[name]["data"], dtype=array.dtype).reshape(array.shape),
                                      array)


def _binary_request(binary_outputs: bool) -> tuple[bytes, int]:
    tensor = triton.InferInput("features", list(FEATURES.shape), "FP32")
    tensor.set_data_from_numpy(FEATURES, binary_data=True)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary_outputs) for name in ("probabilities", "label")]
    body, json_size = triton.InferenceServerClient.generate_request_body([tensor], outputs=outputs)
    assert json_size is not None
    return body, json_size


@pytest.mark.parametrize("style", ["content-type", "header", "both"])
def test_binary_invocation_with_either_header_length_style(client: TestClient, expected: dict[str, np.ndarray],
                                                           style: str) -> None:
    body, json_size = _binary_request(binary_outputs=True)
    headers = {"Content-Type": f"{TRITON_BINARY};json-header-size={json_size}"}
    if style == "header":
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(json_size)}
    elif style == "both":
        headers["Inference-Header-Content-Length"] = str(json_size)
    answer = client.post("/invocations", content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    # The answer says its JSON length both ways: SageMaker passes only the content type on.
    content_type = answer.headers["content-type"]
    match = re.fullmatch(re.escape(TRITON_BINARY) + r";json-header-size=(\d+)", content_type)
    assert match is not None, content_type
    assert answer.headers["inference-header-content-length"] == match.group(1)
    result = triton.InferenceServerClient.parse_response_body(answer.content, header_length=int(match.group(1)))
    for name, array in expected.items():
        got = result.as_numpy(name)
        assert got.dtype == array.dtype
        np.testing.assert_array_equal(got, array)


def test_binary_inputs_with_json_outputs(client: TestClient, expected: dict[str, np.ndarray]) -> None:
    body, json_size = _binary_request(binary_outputs=False)
    answer = client.post("/invocations", content=body,
                         headers={"Content-Type": f"{TRITON_BINARY}; json-header-size={json_size}"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    outputs = {output["name"]: output["data"] for output in answer.json()["outputs"]}
    np.testing.assert_array_equal(np.array(outputs["probabilities"], dtype=np.float32).reshape(2, 3),
                                  expected["probabilities"])


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"inputs": [{**EXAMPLE_REQUEST["inputs"][0], "datatype": "FP64"}]}, 422, "inputs[0].datatype"),
        ({"inputs": [{"name": "features", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]}, 422,
         "inputs[0].shape"),
        ({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]}, 422,
         "inputs[0].data"),
        ({"inputs": [{**EXAMPLE_REQUEST["inputs"][0], "name": "nope"}]}, 422, "inputs"),
        ({"inputs": "features"}, 422, "inputs"),
        ([1, 2], 400, "body"),
    ],
    ids=["dtype", "shape", "count", "name", "not-a-list", "not-an-object"],
)
def test_invalid_requests_are_4xx_problems(client: TestClient, model_dir: Path, body: Any, status: int,
                                           field: str) -> None:
    problem = assert_problem(infer_json(client, body), status, private=(str(model_dir),))
    assert problem["field"] == field


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        (b"{not json", {"Content-Type": "application/json"}, 400),
        (orjson.dumps(EXAMPLE_REQUEST), {"Content-Type": "text/plain"}, 415),
        (orjson.dumps(EXAMPLE_REQUEST), {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        (orjson.dumps(EXAMPLE_REQUEST), {"Content-Type": f"{TRITON_BINARY};json-header-size=abc"}, 400),
        (orjson.dumps(EXAMPLE_REQUEST), {"Content-Type": f"{TRITON_BINARY};json-header-size=0"}, 400),
        (orjson.dumps(EXAMPLE_REQUEST), {"Content-Type": f"{TRITON_BINARY};json-header-size=99999"}, 400),
        (orjson.dumps(EXAMPLE_REQUEST), {"Content-Type": f"{TRITON_BINARY};json-header-size=10",
                                         "Inference-Header-Content-Length": "11"}, 400),
        (orjson.dumps(EXAMPLE_REQUEST), {"Content-Type": "application/json", "Origin": "https://evil.example"}, 403),
    ],
    ids=["not-json", "text-plain", "form", "size-not-a-number", "size-zero", "size-past-body", "sizes-disagree",
         "cross-origin"],
)
def test_malformed_requests_are_4xx_problems(client: TestClient, content: bytes, headers: dict[str, str],
                                             status: int) -> None:
    assert_problem(client.post("/invocations", content=content, headers=headers), status)


def test_a_request_without_content_type_is_read_as_json(client: TestClient) -> None:
    assert client.post("/invocations", content=orjson.dumps(EXAMPLE_REQUEST)).status_code == 200


def test_an_oversize_body_is_413(handler: ModuleType, env: pytest.MonkeyPatch, model_dir: Path) -> None:
    http = TestClient(make_app(handler, env, model_dir, MAAS_MAX_REQUEST_BYTES="1024"))
    padded = {**EXAMPLE_REQUEST, "id": "x" * 2000}
    problem = assert_problem(infer_json(http, padded), 413)
    assert "1024" in problem["detail"]
    assert infer_json(http).status_code == 200  # still serving


def test_an_oversize_streamed_body_is_refused_before_it_is_all_read(handler: ModuleType, env: pytest.MonkeyPatch,
                                                                    model_dir: Path) -> None:
    """No Content-Length (chunked): the body is counted as it arrives and refused once past the cap."""
    app = make_app(handler, env, model_dir, MAAS_MAX_REQUEST_BYTES="1024")
    chunks = [{"type": "http.request", "body": b"x" * 600, "more_body": True} for _ in range(100)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return chunks.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/invocations",
             "headers": [(b"content-type", b"application/json")]}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert len(chunks) == 98  # read two 600-byte chunks, then stopped


def test_routes_and_methods(client: TestClient) -> None:
    assert_problem(client.get("/v2/models/iris/infer"), 404)
    not_allowed = assert_problem(client.get("/invocations"), 405)
    assert not_allowed["title"] == "Method not allowed"
    assert client.get("/invocations").headers["allow"] == "POST"
    assert client.post("/ping").headers["allow"] == "GET"


# ------------------------------------------------------------------------------------- providers


def test_cuda_is_preferred_when_onnxruntime_offers_it(handler: ModuleType) -> None:
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert handler.choose_providers(gpu_build) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert handler.choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert handler.choose_providers(gpu_build, "CPUExecutionProvider") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="CUDAExecutionProvider not available"):
        handler.choose_providers(["CPUExecutionProvider"], "CUDAExecutionProvider, CPUExecutionProvider")


def test_the_engine_builds_sessions_with_the_chosen_providers(handler: ModuleType, env: pytest.MonkeyPatch,
                                                              model_dir: Path) -> None:
    app = make_app(handler, env, model_dir, MAAS_ORT_PROVIDERS="CPUExecutionProvider")
    assert app.version is not None
    assert app.engine.session(app.version).get_providers() == ["CPUExecutionProvider"]


# ------------------------------------------------------------------------------------ the process


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_main_serves_over_http_and_stops(model_dir: Path) -> None:
    port = _free_port()
    environment = {**{k: v for k, v in os.environ.items() if k not in ENV_NAMES}, "SM_MODEL_DIR": str(model_dir),
                   "MAAS_SAGEMAKER_HOST": "127.0.0.1", "SAGEMAKER_BIND_TO_PORT": str(port)}
    process = subprocess.Popen([sys.executable, str(SAGEMAKER_DIR / "handler.py"), "serve"], env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        status = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status = httpx.get(f"{base}/ping", timeout=1).status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                break
            time.sleep(0.05)
        answer = None
        if status == 200:
            answer = httpx.post(f"{base}/invocations", content=orjson.dumps(EXAMPLE_REQUEST),
                                headers={"Content-Type": "application/json"}, timeout=5)
    finally:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    log = output.decode()
    assert status == 200, log
    assert answer is not None and answer.status_code == 200, log
    assert [o["data"] for o in answer.json()["outputs"] if o["name"] == "label"] == [[0, 2]]
    # uvicorn shuts down gracefully on SIGTERM (what `docker stop` and SageMaker send), then re-raises it
    assert process.returncode in (0, -signal.SIGTERM), log
    assert "shutdown complete" in log
    assert "loaded from iris.onnx" in log and "CPUExecutionProvider" in log  # the start-up log line


def test_main_refuses_a_bad_configuration(handler: ModuleType, env: pytest.MonkeyPatch, model_dir: Path) -> None:
    env.setenv("SM_MODEL_DIR", str(model_dir))
    env.setenv("MAAS_MODEL_VERSION", "latest")
    assert handler.main(["serve"]) == 2
    env.setenv("MAAS_MODEL_VERSION", "1")
    env.setenv("MAAS_ORT_PROVIDERS", "NoSuchExecutionProvider")
    assert handler.main(["serve"]) == 2


def test_the_command_line_is_sagemakers(handler: ModuleType, env: pytest.MonkeyPatch) -> None:
    args = handler.parse_args(["serve"])
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8080)
    assert handler.parse_args([]).command == "serve"
    env.setenv("SAGEMAKER_BIND_TO_PORT", "9090")
    env.setenv("MAAS_SAGEMAKER_HOST", "127.0.0.1")
    assert (handler.parse_args(["serve"]).host, handler.parse_args(["serve"]).port) == ("127.0.0.1", 9090)
    assert handler.parse_args(["serve", "--host", "::1", "--port", "1"]).port == 1
    with pytest.raises(SystemExit):
        handler.parse_args(["train"])


# ------------------------------------------------------------------------------- the image, statically


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def _pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
            assert match is not None, f"not an exact pin: {line!r}"
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_the_dockerfile_builds_from_the_repository_root() -> None:
    instructions = _instructions()
    base = [args for name, args in instructions if name == "FROM"]
    assert len(base) == 1
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", base[0]), base
    copies: dict[str, str] = {}
    for name, args in instructions:
        if name == "COPY":
            assert not args.startswith("--from"), args
            source, destination = args.split()
            assert (REPO / source).exists(), f"COPY source {source} is not in the repository"
            copies[source.rstrip("/")] = destination
    assert copies["functions/sagemaker/requirements.txt"] == "/tmp/requirements.txt"
    assert copies["layers/runtime/maas"] == "/opt/program/maas/"
    assert copies["functions/sagemaker/handler.py"] == "/opt/program/handler.py"
    runs = " ".join(args for name, args in instructions if name == "RUN")
    assert "--no-deps" in runs and "-r /tmp/requirements.txt" in runs and "pip check" in runs
    assert ("EXPOSE", "8080") in instructions
    entrypoint = [json.loads(args) for name, args in instructions if name == "ENTRYPOINT"]
    command = [json.loads(args) for name, args in instructions if name == "CMD"]
    # `docker run <image> serve` runs ENTRYPOINT + ["serve"]; a bare `docker run` runs ENTRYPOINT + CMD.
    assert entrypoint == [["python", "/opt/program/handler.py"]]
    assert command == [["serve"]]


def test_the_image_pins_match_the_inference_layer_and_form_a_closure() -> None:
    pins = _pins(REQUIREMENTS)
    layer = _pins(LAYER_REQUIREMENTS)
    assert "onnxruntime" not in pins  # the GPU build provides the same module; never both
    assert {"onnxruntime-gpu", "uvicorn"} <= set(pins)
    for name in set(pins) & set(layer):
        assert pins[name] == layer[name], f"{name}: {pins[name]} here, {layer[name]} in the inference layer"
    # PyPI's onnxruntime-gpu is a CUDA 12 build up to 1.26 and a CUDA 13 build from 1.27: it must
    # match the base image's CUDA major, or the CUDA provider cannot load and serving drops to CPU.
    gpu = tuple(int(part) for part in pins["onnxruntime-gpu"].split(".")[:2])
    assert gpu <= (1, 26)
    # Closure: every runtime requirement (CPython 3.12 on Linux, no extras) of every pinned package is
    # pinned too. onnxruntime-gpu's requirements are the CPU build's, which is installed here.
    marker_env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
                  "sys_platform": "linux", "platform_system": "Linux", "extra": ""}
    from importlib import metadata

    for name in pins:
        distribution = "onnxruntime" if name == "onnxruntime-gpu" else name
        for raw in metadata.requires(distribution) or []:
            requirement = Requirement(raw)
            if requirement.marker is not None and not requirement.marker.evaluate(marker_env):
                continue
            assert requirement.name.lower().replace("_", "-") in pins, f"{name} needs {requirement.name}"
