"""The template's Lambda functions, each run from its own code asset in worker processes.

A zip function runs from its code asset (``Code.S3Key`` -> ``cdk.out/asset.<hash>``) and handler string;
its layers put their asset's ``python/`` on the path (an unbundled synth leaves the runtime layer's
source, which serves as well); third-party packages come from the local environment, not from the
manylinux dependency layers. An image function runs from a task root made by replaying its
Dockerfile's ``COPY`` steps into ``LAMBDA_TASK_ROOT`` (``RUN pip`` steps are the local environment
again) with the image's ``CMD`` as handler.

Limits applied as Lambda does: the function's timeout (the worker is killed, ``Sandbox.Timedout``),
the 6 MB request and response payloads of a synchronous invoke, reserved concurrency (or 4 workers).
Memory size is reported, not enforced."""

from __future__ import annotations

import json
import multiprocessing
import re
import shlex
import shutil
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.local.template import ACCOUNT, REGION, Assembly, Resolver

MAX_INVOKE_REQUEST_BYTES = 6 * 1024 * 1024  # Lambda: "Request must be smaller than 6291456 bytes"
MAX_INVOKE_RESPONSE_BYTES = 6 * 1024 * 1024 + 100
DEFAULT_CONCURRENCY = 4


@dataclass
class InvokeResult:
    """What a synchronous ``Invoke`` returns: the payload, or Lambda's error object."""

    payload: bytes = b"null"
    error: dict[str, Any] | None = None
    lines: list[str] = field(default_factory=list)
    log_error: str | None = None

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class FunctionSpec:
    logical_id: str
    name: str
    arn: str
    handler: str
    task_root: Path
    paths: list[str]
    environment: dict[str, str]
    role_arn: str
    timeout: float
    memory: int
    log_group: str
    concurrency: int


def function_name(stack_name: str, logical_id: str) -> str:
    return f"{stack_name}-{logical_id}"[:64]


def _layer_path(directory: Path) -> Path | None:
    """A bundled layer has ``python/``; an unbundled runtime layer is the ``maas`` package itself."""
    if (directory / "python").is_dir():
        return directory / "python"
    if (directory / "__init__.py").is_file():
        return directory.parent
    return None  # a dependency layer left unbundled: the local environment provides its packages


def image_task_root(context: Path, dockerfile: str, into: Path) -> tuple[Path, str]:
    """Replays the Dockerfile's ``COPY <src>... <dest>`` steps under ``${LAMBDA_TASK_ROOT}``; returns
    the task root and the handler from ``CMD``."""
    text = (context / dockerfile).read_text()
    task_root = into / "var-task"
    task_root.mkdir(parents=True, exist_ok=True)
    handler = None
    for raw in re.sub(r"\\\n", " ", text).splitlines():
        line = raw.strip()
        if line.startswith("COPY ") and "${LAMBDA_TASK_ROOT}" in line:
            *sources, target = shlex.split(line[5:])
            destination = task_root / target.replace("${LAMBDA_TASK_ROOT}", "").strip("/")
            for source in sources:
                path = context / source
                if path.is_dir():
                    shutil.copytree(path, destination, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    target_file = destination if not target.endswith("/") else destination / path.name
                    target_file.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target_file)
        elif line.startswith("CMD "):
            command = json.loads(line[4:])
            handler = command[0]
    if handler is None:
        raise ValueError(f"{dockerfile}: no CMD names the handler")
    return task_root, handler


def _local_path(value: str, scratch: Path) -> str:
    """Lambda's only writable disk is /tmp: values naming it point into the function's scratch dir."""
    return str(scratch) + value[4:] if value == "/tmp" or value.startswith("/tmp/") else value


def specs(assembly: Assembly, resolver: Resolver, scratch: Path, base_environment: Mapping[str, str]) -> list[
        FunctionSpec]:
    """One spec per ``AWS::Lambda::Function`` of maas (CDK's own custom-resource providers, which only
    run at deploy time, are left out)."""
    found = []
    for logical_id, properties in assembly.of_type("AWS::Lambda::Function"):
        if logical_id.startswith("Custom"):
            continue
        name = function_name(assembly.stack_name, logical_id)
        tmp = scratch / name / "tmp"
        if properties.get("PackageType") == "Image":
            context, dockerfile = assembly.image_asset(properties["Code"], resolver)
            task_root, handler = image_task_root(context, dockerfile, scratch / name)
            paths = [str(task_root)]
        else:
            task_root = assembly.file_asset(properties["Code"])
            handler = properties["Handler"]
            paths = [str(task_root)]
            for layer in properties.get("Layers", []):
                layer_id = layer["Ref"]
                content = assembly.resources[layer_id]["Properties"]["Content"]
                path = _layer_path(assembly.file_asset(content))
                if path is not None:
                    paths.append(str(path))
        variables = resolver.resolve(properties.get("Environment", {}).get("Variables", {}), logical_id)
        log_group = resolver.resolve((properties.get("LoggingConfig") or {}).get("LogGroup"), logical_id) \
            or f"/aws/lambda/{name}"
        environment = {
            **base_environment,
            **{key: _local_path(str(value), tmp) for key, value in variables.items()},
            "AWS_LAMBDA_FUNCTION_NAME": name,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(properties.get("MemorySize", 128)),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_LOG_GROUP_NAME": log_group,
            "LAMBDA_TASK_ROOT": str(task_root),
            "TMPDIR": str(tmp),
        }
        found.append(FunctionSpec(
            logical_id=logical_id, name=name, arn=f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}",
            handler=handler, task_root=task_root, paths=paths, environment=environment,
            role_arn=resolver.resolve(properties["Role"], logical_id), timeout=float(properties.get("Timeout", 3)),
            memory=int(properties.get("MemorySize", 128)), log_group=log_group,
            concurrency=min(DEFAULT_CONCURRENCY, int(properties.get("ReservedConcurrentExecutions")
                                                     or DEFAULT_CONCURRENCY)),
        ))
    return found


class _Worker:
    def __init__(self, spec: FunctionSpec, credentials: Mapping[str, str]) -> None:
        from infra.local.worker import serve

        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        payload = {
            "name": spec.name, "arn": spec.arn, "handler": spec.handler, "memory": spec.memory,
            "log_group": spec.log_group, "log_stream": f"local/[$LATEST]{uuid.uuid4().hex}",
            "environment": {**spec.environment, **credentials}, "paths": spec.paths,
            "task_root": str(spec.task_root), "tmp": spec.environment["TMPDIR"],
        }
        self.process = context.Process(target=serve, args=(child, payload), daemon=True,
                                       name=f"lambda-{spec.name}")
        self.process.start()
        child.close()

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.connection.close()


class FunctionPool:
    """A function's execution environments: started on demand up to its concurrency, reused warm."""

    def __init__(self, spec: FunctionSpec, credentials: Callable[[], Mapping[str, str]],
                 on_result: Callable[[FunctionSpec, InvokeResult], None] | None = None) -> None:
        self.spec = spec
        self._credentials = credentials
        self._idle: list[_Worker] = []
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(spec.concurrency)
        self._on_result = on_result
        self.invocations = 0

    def invoke(self, event: Any) -> InvokeResult:
        request = json.dumps(event)
        if len(request.encode()) > MAX_INVOKE_REQUEST_BYTES:
            return InvokeResult(error={"errorType": "RequestEntityTooLargeException",
                                       "errorMessage": f"Request must be smaller than {MAX_INVOKE_REQUEST_BYTES} "
                                                       "bytes for the InvokeFunction operation"})
        if not self._slots.acquire(timeout=self.spec.timeout):
            return InvokeResult(error={"errorType": "TooManyRequestsException",
                                       "errorMessage": "Rate Exceeded. (reserved concurrency)"})
        try:
            result = self._run(event)
        finally:
            self._slots.release()
        if self._on_result is not None:
            self._on_result(self.spec, result)
        return result

    def _run(self, event: Any) -> InvokeResult:
        with self._lock:
            self.invocations += 1
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = _Worker(self.spec, self._credentials())
            with self._lock:
                self._all.append(worker)
        request_id = str(uuid.uuid4())
        # a cold start's import counts against the timeout on Lambda too; allow it a little more here
        try:
            worker.connection.send((request_id, event, self.spec.timeout))
            if not worker.connection.poll(self.spec.timeout + 30):
                self._discard(worker)
                return InvokeResult(error={"errorType": "Sandbox.Timedout", "errorMessage": (
                    f"RequestId: {request_id} Error: Task timed out after {self.spec.timeout:.2f} seconds")})
            answer = worker.connection.recv()
        except (EOFError, OSError, BrokenPipeError):
            self._discard(worker)
            return InvokeResult(error={"errorType": "Runtime.ExitError",
                                       "errorMessage": f"RequestId: {request_id} Error: Runtime exited"})
        with self._lock:
            self._idle.append(worker)
        result = InvokeResult(error=answer.get("error"), lines=answer.get("lines", []),
                              log_error=answer.get("log_error"))
        if result.error is None:
            payload = answer["payload"].encode()
            if len(payload) > MAX_INVOKE_RESPONSE_BYTES:
                result.error = {"errorType": "Function.ResponseSizeTooLarge", "errorMessage": (
                    f"Response payload size exceeded maximum allowed payload size ({MAX_INVOKE_RESPONSE_BYTES} "
                    "bytes).")}
            else:
                result.payload = payload
        return result

    def _discard(self, worker: _Worker) -> None:
        worker.stop()
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)

    def stop(self) -> None:
        with self._lock:
            workers, self._all, self._idle = list(self._all), [], []
        for worker in workers:
            worker.stop()
