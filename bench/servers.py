"""The HTTP systems of the bench, each in its own subprocess on 127.0.0.1, pinned to one server core.

* ``bare``: a raw ASGI callable around onnxruntime (orjson decode straight to numpy, one session per model,
  orjson encode), served by uvicorn (httptools + uvloop, no access log): the bound;
* ``fastapi``: a thin FastAPI app (a pydantic request model, a dict answer) around the same sessions: what
  most hand-written model servers look like;
* ``maas``: ``maas serve`` with a fresh ``MAAS_HOME``; each model pushed and deployed with the SDK.

All three answer OIP v2 JSON at ``POST /v2/models/{name}/infer``. The bounds run onnxruntime with one
intra-op thread (one server core); maas runs its own defaults.

    python -m bench.servers {bare|fastapi} PORT NAME=MODEL.onnx ...   (what ``start`` runs)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
SERVER_CORE = "0"
CLIENT_CORE = "1"
SYSTEMS = ("bare", "fastapi", "maas", "kserve", "mlserver")
PEERS = ("kserve", "mlserver")


def taskset(core: str) -> list[str]:
    """``taskset -c CORE`` when available and the machine has more than one core, else nothing."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", core]
    return []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Running:
    system: str
    url: str
    headers: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path

    def infer_path(self, model: str) -> str:
        return f"/v2/models/{model}/infer"


# -------------------------------------------------------------------------------- the bound apps


def _sessions(models: dict[str, str]) -> dict[str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return {name: ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
            for name, path in models.items()}


_DTYPES = {"FP32": "float32", "FP64": "float64", "INT64": "int64", "INT32": "int32"}
_DATATYPES = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32"}


def bare_app(models: dict[str, str]) -> Any:
    """A raw ASGI callable: no framework, no validation beyond what numpy and onnxruntime do."""
    import numpy as np
    import orjson

    sessions = _sessions(models)
    output_names = {name: [o.name for o in s.get_outputs()] for name, s in sessions.items()}
    json_headers = [(b"content-type", b"application/json")]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        parts = scope["path"].split("/")  # /v2/models/{name}/infer
        session = sessions.get(parts[3]) if len(parts) == 5 and parts[4] == "infer" else None
        if session is None:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        request = orjson.loads(body)
        feeds = {t["name"]: np.asarray(t["data"], dtype=_DTYPES[t["datatype"]]).reshape(t["shape"])
                 for t in request["inputs"]}
        names = output_names[parts[3]]
        results = session.run(names, feeds)
        payload = orjson.dumps({"model_name": parts[3], "outputs": [
            {"name": n, "shape": list(r.shape), "datatype": _DATATYPES[str(r.dtype)], "data": r.ravel()}
            for n, r in zip(names, results, strict=True)]}, option=orjson.OPT_SERIALIZE_NUMPY)
        headers = [*json_headers, (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    return app


def fastapi_app(models: dict[str, str]) -> Any:
    """A thin FastAPI app as most people write one: pydantic in, a dict out."""
    import numpy as np
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel

    class Tensor(BaseModel):
        name: str
        shape: list[int]
        datatype: str
        data: list[float]

    class InferRequest(BaseModel):
        inputs: list[Tensor]

    sessions = _sessions(models)
    app = FastAPI()

    def infer(name: str, request: InferRequest) -> dict[str, Any]:
        session = sessions.get(name)
        if session is None:
            raise HTTPException(404)
        feeds = {t.name: np.asarray(t.data, dtype=_DTYPES[t.datatype]).reshape(t.shape) for t in request.inputs}
        names = [o.name for o in session.get_outputs()]
        results = session.run(names, feeds)
        return {"model_name": name, "outputs": [
            {"name": n, "shape": list(r.shape), "datatype": _DATATYPES[str(r.dtype)], "data": r.ravel().tolist()}
            for n, r in zip(names, results, strict=True)]}

    infer.__annotations__.update(name=str, request=InferRequest)  # the classes are local: no string lookups
    app.post("/v2/models/{name}/infer")(infer)
    return app


def _serve_bound(kind: str, port: int, models: dict[str, str]) -> None:
    import uvicorn

    app = bare_app(models) if kind == "bare" else fastapi_app(models)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                http="auto", loop="auto", lifespan="on" if kind == "bare" else "auto")


# -------------------------------------------------------------------------------- start / stop


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: Path, path: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            httpx.get(url + path, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not start:\n{log.read_text(errors='replace')[-3000:]}")


def stop(running: Running) -> None:
    if running.system in PEERS:
        from bench import peers

        peers.stop(running.process)  # its own session: the server and any workers it started
        return
    if running.process.poll() is None:
        running.process.terminate()
        try:
            running.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait()


def _start_process(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen([*taskset(SERVER_CORE), *command], env=env, stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO)


def start(system: str, models: dict[str, Path], workdir: Path) -> Running:
    """Start ``system`` serving ``models`` (name -> .onnx) and return once it answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / f"{system}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if system in ("bare", "fastapi"):
        args = [f"{name}={path}" for name, path in models.items()]
        process = _start_process([sys.executable, "-m", "bench.servers", system, str(port), *args], env, log)
        running = Running(system, url, {}, process, log)
        try:
            _wait_ready(process, url, log, "/")
        except BaseException:
            stop(running)
            raise
        return running
    if system in PEERS:
        from bench import peers

        process, port = peers.start_peer(system, peers.ensure_venv(system), models, workdir,
                                         prefix=taskset(SERVER_CORE))
        return Running(system, f"http://127.0.0.1:{port}", {}, process, workdir / f"{system}.log")
    if system != "maas":
        raise ValueError(f"unknown system {system!r}")
    from maas.client import Client

    home = workdir / "maas-home"
    token = "maas_" + os.urandom(24).hex()
    env.update({"MAAS_HOME": str(home), "MAAS_ADMIN_TOKEN": token})
    process = _start_process([sys.executable, "-m", "maas", "serve", "--port", str(port), "--home", str(home)],
                             env, log)
    running = Running("maas", url, {"authorization": f"Bearer {token}"}, process, log)
    try:
        _wait_ready(process, url, log, "/v2/health/live")
        with Client(url, token, timeout=120) as client:
            for name, path in models.items():
                version = client.push(name, path)
                client.deploy(name, version["version"])
    except BaseException:
        stop(running)
        raise
    return running


@contextmanager
def serving(system: str, models: dict[str, Path], workdir: Path | None = None) -> Iterator[Running]:
    """``start`` ... ``stop``, always (try/finally)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{system}-") as temp:
        running = start(system, models, Path(workdir or temp))
        try:
            yield running
        finally:
            stop(running)


if __name__ == "__main__":
    _serve_bound(sys.argv[1], int(sys.argv[2]), dict(arg.split("=", 1) for arg in sys.argv[3:]))
