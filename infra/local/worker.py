"""One Lambda execution environment: a process that imports a function's handler from its code asset
and runs one invocation at a time (what Lambda's runtime does), with the function's environment and
its role's credentials already in ``os.environ``.

Everything the handler prints (stdout and stderr, Powertools' JSON lines included) goes to a file
that the worker reads back after each invocation and ships to the function's log group with the
role's own credentials, as Lambda's log agent would: a role without ``logs:PutLogEvents`` on its
group loses its logs (and the EMF metrics in them) here as on AWS."""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any


class Context:
    """The attributes of Lambda's context object that handlers and Powertools read."""

    def __init__(self, spec: dict[str, Any], request_id: str, deadline: float) -> None:
        self.function_name = spec["name"]
        self.function_version = "$LATEST"
        self.invoked_function_arn = spec["arn"]
        self.memory_limit_in_mb = spec["memory"]
        self.aws_request_id = request_id
        self.log_group_name = spec["log_group"]
        self.log_stream_name = spec["log_stream"]
        self._deadline = deadline

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


class LogShipper:
    """Lambda's log agent: the invocation's lines into the function's log group, as the role."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.group = spec["log_group"]
        self.stream = spec["log_stream"]
        self._client: Any = None
        self._stream_ready = False

    def ship(self, lines: list[str]) -> str | None:
        """None when shipped, else why not (the role's error, as Lambda would hit it)."""
        try:
            import boto3

            if self._client is None:
                self._client = boto3.client("logs")
            if not self._stream_ready:
                self._client.create_log_stream(logGroupName=self.group, logStreamName=self.stream)
                self._stream_ready = True
            now = int(time.time() * 1000)
            events = [{"timestamp": now, "message": line} for line in lines if line]
            if events:
                self._client.put_log_events(logGroupName=self.group, logStreamName=self.stream, logEvents=events)
        except Exception as error:  # any failure: the logs are lost, the invocation is not
            return f"{type(error).__name__}: {error}"
        return None


def _load(spec: dict[str, Any]) -> Any:
    module_name, _, attribute = spec["handler"].rpartition(".")
    module = importlib.import_module(module_name)
    return getattr(module, attribute)


def serve(connection: Connection, spec: dict[str, Any]) -> None:
    """The worker's main loop (a spawned process): receive ``(request_id, event, timeout)``, answer
    ``{"payload"|"error", "log_error", "lines"}``."""
    os.environ.clear()
    os.environ.update(spec["environment"])
    sys.path[:0] = spec["paths"]
    os.makedirs(spec["tmp"], exist_ok=True)
    os.chdir(spec["task_root"])
    log_path = os.path.join(spec["tmp"], ".worker-output")
    log_fd = os.open(log_path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    offset = 0
    shipper = LogShipper(spec)
    function: Any = None
    init_error: dict[str, Any] | None = None
    try:
        function = _load(spec)
    except Exception as error:
        traceback.print_exc()
        init_error = {"errorType": "Runtime.ImportModuleError",
                      "errorMessage": f"Unable to import module {spec['handler']!r}: {error}"}
    while True:
        try:
            request_id, event, timeout = connection.recv()
        except (EOFError, OSError):
            return
        print(f"START RequestId: {request_id} Version: $LATEST", flush=True)
        started = time.monotonic()
        answer: dict[str, Any]
        if init_error is not None:
            answer = {"error": init_error}
        else:
            try:
                result = function(event, Context(spec, request_id, started + timeout))
                answer = {"payload": json.dumps(result)}
            except Exception as error:
                traceback.print_exc()
                answer = {"error": {"errorType": type(error).__name__, "errorMessage": str(error),
                                    "stackTrace": traceback.format_tb(error.__traceback__)}}
        elapsed = (time.monotonic() - started) * 1000
        print(f"END RequestId: {request_id}", flush=True)
        print(f"REPORT RequestId: {request_id}\tDuration: {elapsed:.2f} ms\tMemory Size: {spec['memory']} MB",
              flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        with open(log_path, "rb") as log:
            log.seek(offset)
            output = log.read()
        offset += len(output)
        lines = output.decode("utf-8", "replace").splitlines()
        answer["log_error"] = shipper.ship(lines)
        answer["lines"] = lines
        connection.send(answer)
