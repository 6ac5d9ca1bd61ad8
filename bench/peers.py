"""Peer model servers over OIP v2 REST on loopback, each in its own virtual environment (not a test).

Peers, installed on first use under ``bench/.venvs/<peer>`` (ignored by git) with pinned versions:

* ``kserve``: KServe's model server (``kserve`` 0.21.0) with a tiny custom ``kserve.Model`` running
  onnxruntime, one uvicorn worker, gRPC off;
* ``mlserver``: MLServer 1.7.1 with a custom runtime (an ``MLModel`` wrapping onnxruntime; MLServer ships
  no ONNX runtime), ``parallel_workers`` 0 (its fastest setting for small models). Outputs are encoded
  with their own shape (``NumpyCodec.encode_output`` would turn a ``[batch]`` label into ``[batch, 1]``).

Each peer serves every model on 127.0.0.1 on a free port in a subprocess and is stopped at the end. A small
asyncio HTTP/1.1 keep-alive client in this process drives it: p50/p99 at concurrency 1, throughput at
concurrency 8, bounded durations. Outputs are checked against raw onnxruntime. A peer whose install or
start fails is reported with value NaN and a ``skipped: <reason>`` scenario, never with made-up numbers.

    python -m bench.peers [--model PATH ...] [--quick] [--peers kserve mlserver]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import onnxruntime as ort

from bench.lambda_bench import models_from_args, oip_json_body, parse_json_answer, same_outputs, sample_inputs

VENVS = Path(__file__).resolve().parent / ".venvs"
INSTALL_TIMEOUT_S = 300
START_TIMEOUT_S = 60
PINS = {
    "kserve": ["kserve==0.21.0", "onnxruntime==1.32.0"],
    "mlserver": ["mlserver==1.7.1", "onnxruntime==1.32.0"],
}

KSERVE_SERVER = '''
import sys, json, uuid
import numpy as np, onnxruntime as ort
import kserve
from kserve.protocol.infer_type import InferOutput, InferResponse

TYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.int64): "INT64",
         np.dtype(np.int32): "INT32", np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "UINT8"}


class OnnxModel(kserve.Model):
    def __init__(self, name, path):
        super().__init__(name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        self.ready = True

    def predict(self, payload, headers=None, response_headers=None):
        feeds = {i.name: i.as_numpy() for i in payload.inputs}
        outputs = []
        for name, value in zip(self.names, self.session.run(None, feeds)):
            output = InferOutput(name=name, shape=list(value.shape), datatype=TYPES[value.dtype])
            output.set_data_from_numpy(value, binary_data=False)
            outputs.append(output)
        return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name, infer_outputs=outputs)


port, models = int(sys.argv[1]), json.loads(sys.argv[2])
kserve.ModelServer(http_port=port, enable_grpc=False, workers=1).start(
    [OnnxModel(name, path) for name, path in models.items()])
'''

MLSERVER_RUNTIME = '''
import numpy as np, onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

TYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.int64): "INT64",
         np.dtype(np.int32): "INT32", np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "UINT8"}


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(self.settings.parameters.uri, options,
                                            providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        outputs = self.session.run(None, feeds)
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[ResponseOutput(name=n, shape=list(v.shape), datatype=TYPES[v.dtype],
                                                         data=v.ravel().tolist())
                                          for n, v in zip(self.names, outputs)])
'''


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ensure_venv(peer: str) -> Path:
    """The peer's interpreter, creating its venv and installing the pinned packages if needed."""
    python = VENVS / peer / "bin" / "python"
    marker = VENVS / peer / ".bench-installed"
    if marker.exists() and marker.read_text() == " ".join(PINS[peer]):
        return python
    subprocess.run([sys.executable if not Path("/usr/bin/python3").exists() else "/usr/bin/python3", "-m", "venv",
                    str(VENVS / peer)], check=True, capture_output=True, timeout=120)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PINS[peer]],
                   check=True, capture_output=True, timeout=INSTALL_TIMEOUT_S)
    marker.write_text(" ".join(PINS[peer]))
    return python


def start_peer(peer: str, python: Path, models: dict[str, Path], scratch: Path,
               prefix: list[str] | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``peer`` serving ``models``; ``prefix`` goes before the command (``taskset -c 0``)."""
    port = free_port()
    log = open(scratch / f"{peer}.log", "wb")  # noqa: SIM115  # closed with the process
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    if peer == "kserve":
        script = scratch / "kserve_server.py"
        script.write_text(KSERVE_SERVER)
        command = [str(python), str(script), str(port), json.dumps({k: str(v) for k, v in models.items()})]
        cwd = scratch
    else:
        root = scratch / "mlserver"
        root.mkdir()
        (root / "onnx_runtime.py").write_text(MLSERVER_RUNTIME)
        (root / "settings.json").write_text(json.dumps({
            "host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
            "parallel_workers": 0, "debug": False}))
        for name, path in models.items():
            (root / name).mkdir()
            (root / name / "model-settings.json").write_text(json.dumps({
                "name": name, "implementation": "onnx_runtime.OnnxRuntime", "parameters": {"uri": str(path)}}))
        command = [str(python.parent / "mlserver"), "start", str(root)]
        cwd = root
    process = subprocess.Popen([*(prefix or []), *command], cwd=cwd, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{peer} exited with {process.returncode}: "
                               + (scratch / f"{peer}.log").read_text(errors="replace")[-800:])
        try:
            ready = all(urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{name}/ready", timeout=1).status
                        == 200 for name in models)
            if ready:
                return process, port
        except OSError:
            pass
        time.sleep(0.2)
    stop(process)
    raise RuntimeError(f"{peer} not ready within {START_TIMEOUT_S} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: the server and its workers only
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# ------------------------------------------------------------------------------------ the load loop


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    body = b""
    while True:  # chunked
        size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return status, body
        body += await reader.readexactly(size + 2)
        body = body[:-2]


async def _worker(port: int, request: bytes, until: float, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            writer.write(request)
            status, _ = await _read_response(reader)
            if status != 200:
                raise RuntimeError(f"HTTP {status}")
            latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


async def _load(port: int, request: bytes, concurrency: int, seconds: float) -> tuple[list[float], float]:
    latencies: list[float] = []
    await _worker(port, request, time.perf_counter() + min(0.5, seconds / 4), [])  # warm-up
    started = time.perf_counter()
    until = started + seconds
    await asyncio.gather(*(_worker(port, request, until, latencies) for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


def http_request(port: int, path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def one_answer(port: int, path: str, body: bytes) -> bytes:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return bytes(answer.read())


# ------------------------------------------------------------------------------------------- the run


def run(models: dict[str, Path], quick: bool, peers: tuple[str, ...] = ("kserve", "mlserver")) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    seconds = 1.5 if quick else 8.0

    def add(system: str, model: str, scenario: str, metric: str, value: float, unit: str, match: bool) -> None:
        results.append({"system": system, "model": model, "scenario": scenario, "metric": metric,
                        "value": float(value), "unit": unit, "outputs_match": bool(match)})

    def measure(peer: str, port: int, name: str, path: Path) -> None:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = sample_inputs(session)
        want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
        body = oip_json_body(feeds)
        route = f"/v2/models/{name}/infer"
        match = same_outputs(parse_json_answer(one_answer(port, route, body)), want)
        request = http_request(port, route, body)
        latencies, _ = asyncio.run(_load(port, request, 1, seconds))
        latencies.sort()
        add(peer, name, "http json c1", "p50", statistics.median(latencies) * 1e6, "us", match)
        add(peer, name, "http json c1", "p99", latencies[int(0.99 * (len(latencies) - 1))] * 1e6, "us", match)
        done, elapsed = asyncio.run(_load(port, request, 8, seconds))
        add(peer, name, "http json c8", "throughput", len(done) / elapsed, "req/s", match)

    for peer in peers:
        with tempfile.TemporaryDirectory(prefix=f"maas-peer-{peer}-") as directory:
            scratch = Path(directory)
            try:
                python = ensure_venv(peer)
                process, port = start_peer(peer, python, models, scratch)
            except Exception as error:  # reported, not hidden
                reason = str(error).replace("\n", " ")[:200]
                for model in models:
                    add(peer, model, f"skipped: {reason}", "throughput", math.nan, "req/s", False)
                continue
            try:
                for name, path in models.items():
                    try:
                        measure(peer, port, name, path)
                    except Exception as error:  # reported, not hidden
                        log = (scratch / f"{peer}.log").read_text(errors="replace")[-300:].replace("\n", " ")
                        add(peer, name, f"skipped: {error!r}: {log}"[:300], "throughput", math.nan, "req/s", False)
            finally:
                stop(process)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="an .onnx file (repeatable); default: two tiny models")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--peers", nargs="+", default=["kserve", "mlserver"], choices=sorted(PINS))
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="maas-bench-models-") as scratch:
        results = run(models_from_args(options.model, Path(scratch)), options.quick, tuple(options.peers))
    print(f"{'system':<10} {'model':<12} {'scenario':<16} {'metric':<11} {'value':>10} {'unit':<6} match")
    for r in results:
        print(f"{r['system']:<10} {r['model']:<12} {r['scenario']:<16} {r['metric']:<11} {r['value']:>10.1f} "
              f"{r['unit']:<6} {r['outputs_match']}")


if __name__ == "__main__":
    main()
