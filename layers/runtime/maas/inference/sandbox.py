"""The sandbox: every run of an untrusted model that is not a served request happens in a child process.

Why a child: onnxruntime is native code fed hostile input. A crafted model can allocate without bound,
spin, or crash the process; in a child, each of those becomes a verdict instead of taking the server
down. Three jobs run there, all through ``python -m maas.inference.validate_worker``:

- ``validate``: the content checks and one run on zeros (``maas.inference.validation``), at commit;
- ``smoke``: the deploy smoke test's run on inputs made from the signature and its checks of the
  outputs (``maas.inference.smoke``), before a deploy loads the version into the server;
- ``quantize``: int8 optimization with its accuracy and latency checks (``maas.inference.optimize``),
  which runs the parent and every candidate many times.

Each child gets:

- the limits and ``child_rlimits`` as JSON on argv; the worker applies the rlimits to itself as its
  first action, before importing onnx/onnxruntime or reading a byte of the model. (Not ``preexec_fn``:
  it is documented as unsafe in threaded parents, and the API server is threaded; the limits bind
  before any untrusted input is touched either way);
- a wall-clock timeout, stdin closed, a minimal environment and an empty temporary working directory
  (nothing relative to resolve, nothing to find; the quantize job writes its model there).

One ``Sandbox`` bounds how many children run at once (``Limits.max_concurrent_validations``, all jobs
together): five concurrent commits once peaked at 9.6 GB. The rest wait up to
``validation_queue_timeout_s``, then get 503 with Retry-After.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from maas.domain import Signature
from maas.errors import InvalidInput, ModelRejected, Unavailable, Unhealthy
from maas.settings import MIN_VALIDATION_MEMORY_BYTES, Limits

__all__ = ["Sandbox", "SubprocessValidator", "child_rlimits", "sandbox_of"]

log = logging.getLogger(__name__)

WORKER_MODULE = "maas.inference.validate_worker"

#: RLIMIT_FSIZE of a validate or smoke child: it never writes files (results go to a pipe), so any
#: write is refused. The quantize child writes its model (and onnxruntime's quantizer its temporary
#: copies): four times the model limit.
_NO_FILES = 0
_MAX_REASON_CHARS = 400


def child_rlimits(limits: Limits, *, file_bytes: int = _NO_FILES, cpu_seconds: float | None = None) -> dict[str, int]:
    """The resource limits a child puts on itself, by ``resource.RLIMIT_*`` name.

    RLIMIT_CPU backs up the wall-clock timeout (a child that somehow outlives the parent's kill still
    stops); RLIMIT_AS turns a memory bomb into MemoryError/bad_alloc instead of the OOM killer picking a
    victim (possibly the server); no core dumps (they would contain the model) and no file writes
    beyond ``file_bytes``; a few file descriptors (``Limits.validation_max_open_files``); and no more than
    ``Limits.validation_max_new_tasks`` new threads or processes (RLIMIT_NPROC counts every task of
    the user, so the limit is what the user runs now plus that allowance; left out where ``/proc``
    cannot be read, e.g. macOS. Root ignores it, as it ignores RLIMIT_NPROC generally).
    """
    rlimits = {
        "RLIMIT_AS": max(limits.validation_memory_bytes, MIN_VALIDATION_MEMORY_BYTES),
        "RLIMIT_CPU": math.ceil(cpu_seconds if cpu_seconds is not None else limits.validation_timeout_s) + 1,
        "RLIMIT_CORE": 0,
        "RLIMIT_FSIZE": file_bytes,
        "RLIMIT_NOFILE": limits.validation_max_open_files,
    }
    running = _user_task_count()
    if running is not None:
        rlimits["RLIMIT_NPROC"] = running + limits.validation_max_new_tasks
    return rlimits


def _user_task_count() -> int | None:
    """Threads of all processes whose real uid is ours, from ``/proc`` (what RLIMIT_NPROC counts
    against); None where ``/proc`` is not there. About 3 ms per 100 processes."""
    uid = os.getuid()
    try:
        entries = [entry.name for entry in os.scandir("/proc") if entry.name.isdigit()]
    except OSError:
        return None
    total = 0
    for pid in entries:
        try:
            with open(f"/proc/{pid}/status", "rb") as status:
                text = status.read()
        except OSError:
            continue  # exited meanwhile, or not ours to read
        real_uid, threads = -1, 0
        for line in text.splitlines():
            if line.startswith(b"Uid:"):
                real_uid = int(line.split()[1])
            elif line.startswith(b"Threads:"):
                threads = int(line.split()[1])
        if real_uid == uid:
            total += threads
    return total or None


def _child_env(workdir: str) -> dict[str, str]:
    """A minimal environment: no credentials or config of the server leak into the child. PATH and
    PYTHONPATH (Lambda layers live on it) and LD_LIBRARY_PATH (Lambda's runtime needs it) are kept;
    math libraries are pinned to one thread, matching onnxruntime's settings. HOME and TMPDIR are the
    child's empty working directory: onnxruntime keeps a usage database under ``~/.cache`` and would
    otherwise open (and try to write) files in the server user's home while it holds hostile input."""
    env = {key: os.environ[key] for key in ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH") if key in os.environ}
    env.update(
        HOME=workdir,
        TMPDIR=workdir,
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONNOUSERSITE="1",
        PYTHONIOENCODING="utf-8",
    )
    return env


class _NoVerdict(Exception):
    """The child answered nothing usable; ``reason`` says how it ended, for the job to word."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Sandbox:
    """Runs the worker's jobs in resource-limited children, at most ``max_concurrent_validations`` at once."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.max_concurrent_validations)

    # -- the jobs

    def validate(self, path: Path) -> Signature:
        """Signature of the model at ``path``, or ModelRejected with the reason.

        ``OSError`` if ``path`` does not exist (a storage problem, not a verdict on the model);
        ``Unavailable`` (503, Retry-After) when every slot stays taken for ``validation_queue_timeout_s``:
        nothing is decided about the model, a retry validates it.
        """
        path = Path(path).resolve(strict=True)
        try:
            answer = self._run("validate", path, {}, timeout=self.limits.validation_timeout_s)
        except _NoVerdict as failure:
            raise ModelRejected(f"validation {failure.reason}") from None
        return _signature(answer)

    def smoke_test(self, data: bytes, signature: Signature, what: str) -> None:
        """Run the smoke test of ``data`` (``maas.inference.smoke``) in a child: None when it passed,
        ``Unhealthy`` (the deploy rolls back) with the reason when it did not, ran out of time or memory."""
        with tempfile.TemporaryDirectory(prefix="maas-smoke-") as folder:
            path = Path(folder) / "model.onnx"
            path.write_bytes(data)
            try:
                answer = self._run("smoke", path, {"signature": signature.model_dump(mode="json"), "what": what},
                                   timeout=self.limits.validation_timeout_s)
            except _NoVerdict as failure:
                raise Unhealthy(f"{what}: {failure.reason}") from None
        if answer.get("ok") is not True:
            raise Unhealthy(_reason(answer, f"{what} failed"))

    def quantize(self, model: bytes, signature: Signature, tolerance: float, /, *, goal: str,
                 derived: bytes | None = None) -> tuple[bytes, dict[str, Any]]:
        """``maas.inference.optimize.quantize`` in a child (``maas.services.optimize.Quantizer``): the
        derived bytes and the report, or the same ``ModelRejected`` / ``InvalidInput`` it raises; a child
        that runs out of time or memory is a ``ModelRejected`` naming the bound."""
        limit = self.limits.optimize_timeout_s
        with tempfile.TemporaryDirectory(prefix="maas-quantize-") as folder:
            parent_path, derived_path = Path(folder) / "parent.onnx", Path(folder) / "derived.onnx"
            parent_path.write_bytes(model)
            if derived is not None:
                derived_path.write_bytes(derived)
            args = {"signature": signature.model_dump(mode="json"), "tolerance": tolerance, "goal": goal,
                    "derived": derived is not None}
            try:
                answer = self._run("quantize", parent_path, args, timeout=limit,
                                   file_bytes=4 * self.limits.max_model_bytes)
            except _NoVerdict as failure:
                raise ModelRejected(f"optimization {failure.reason}", extra={"check": "sandbox"}) from None
            if answer.get("ok") is True:
                report = answer.get("report")
                return derived_path.read_bytes(), report if isinstance(report, dict) else {}
        reason = _reason(answer, "optimization failed")
        if answer.get("error") == "InvalidInput":
            raise InvalidInput(reason, field=str(answer.get("field") or "version"))
        extra = answer.get("extra")
        raise ModelRejected(reason, extra=extra if isinstance(extra, dict) else None)

    # -- the child

    def _run(self, job: str, path: Path, args: dict[str, Any], *, timeout: float,
             file_bytes: int = _NO_FILES) -> dict[str, Any]:
        if not self._slots.acquire(timeout=self.limits.validation_queue_timeout_s):
            raise Unavailable(f"{self.limits.max_concurrent_validations} model checks are running, the most this "
                              "server runs at once; try again in a few seconds", retry_after=5)
        try:
            return self._child(job, path, args, timeout, file_bytes)
        finally:
            self._slots.release()

    def _child(self, job: str, path: Path, args: dict[str, Any], timeout: float, file_bytes: int) -> dict[str, Any]:
        rlimits = child_rlimits(self.limits, file_bytes=file_bytes, cpu_seconds=timeout)
        config = {"job": job, "args": args, "limits": self.limits.model_dump(mode="json"), "rlimits": rlimits}
        command = [sys.executable, "-P", "-m", WORKER_MODULE, str(path), json.dumps(config, separators=(",", ":"))]
        with tempfile.TemporaryDirectory(prefix=f"maas-{job}-") as workdir:
            try:
                result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                                        env=_child_env(workdir), cwd=workdir, check=False)
            except subprocess.TimeoutExpired:
                raise _NoVerdict(f"timed out after {timeout:g} s") from None
        return _answer(job, result, rlimits)


def _answer(job: str, result: subprocess.CompletedProcess[bytes], rlimits: dict[str, int]) -> dict[str, Any]:
    """The child's answer line, or ``_NoVerdict`` saying how it ended (killed, crashed, out of CPU)."""
    answer = _last_json_line(result.stdout)
    if answer is not None and result.returncode == 0:
        return answer
    code = result.returncode
    # No verdict: a crash, a kill, or a broken child environment (which would reject every model:
    # operators need the child's stderr to tell which; users get the one-line reason only).
    log.warning("%s child gave no verdict (return code %s); stderr tail: %s", job, code,
                result.stderr[-2000:].decode("utf-8", "replace"))
    if code < 0 and -code == signal.SIGXCPU:
        raise _NoVerdict(f"used more than its CPU time limit of {rlimits['RLIMIT_CPU']} s")
    detail = f"signal {-code}" if code < 0 else f"exit code {code}"
    raise _NoVerdict(f"process exceeded its memory limit or crashed ({detail})")


def _signature(answer: dict[str, Any]) -> Signature:
    """A validate job's answer as a signature, or ``ModelRejected`` with the child's reason."""
    if answer.get("ok") is True:
        try:
            return Signature.model_validate(answer.get("signature"))
        except ValueError:
            raise ModelRejected("validation process returned an unreadable signature") from None
    raise ModelRejected(_reason(answer, "validation failed"))


def _reason(answer: dict[str, Any], default: str) -> str:
    """The child's reason (already cleaned of paths by the code that raised it), on one bounded line."""
    reason = answer.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        return default
    text = " ".join(reason.split())
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


class SubprocessValidator:
    """``maas.ports.Validator`` over a ``Sandbox`` (its ``validate`` job); ``sandbox`` also runs the
    smoke tests and optimizations of the process that validates (one bound on children for all)."""

    def __init__(self, limits: Limits, sandbox: Sandbox | None = None) -> None:
        self.limits = limits
        self.sandbox = sandbox or Sandbox(limits)

    def validate(self, path: Path) -> Signature:
        return self.sandbox.validate(path)

    def _verdict(self, result: subprocess.CompletedProcess[bytes]) -> Signature:
        """What a finished validate child's outcome means (its answer, or how it died)."""
        try:
            answer = _answer("validate", result, child_rlimits(self.limits))
        except _NoVerdict as failure:
            raise ModelRejected(f"validation {failure.reason}") from None
        return _signature(answer)


def sandbox_of(validator: object) -> Sandbox | None:
    """The sandbox behind a backend's validator, when it has one (tests' in-process validators do not:
    their smoke tests and optimizations run in the test process)."""
    sandbox = getattr(validator, "sandbox", None)
    return sandbox if isinstance(sandbox, Sandbox) else None


def _last_json_line(stdout: bytes) -> dict[str, Any] | None:
    for line in reversed(stdout.decode("utf-8", "replace").splitlines()):
        line = line.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None
    return None
