"""Child-process entry point of the sandbox (``maas.inference.sandbox``):
``python -m maas.inference.validate_worker <model path> <config JSON>``.

The config is ``{"job": "validate" | "smoke" | "quantize", "args": {...}, "limits": <Limits>,
"rlimits": {"RLIMIT_AS": n, ...}}`` (no job: validate). The worker applies the rlimits to itself first,
with the stdlib only, before numpy/onnx/onnxruntime are imported or a byte of the model is read; then it
runs the job and writes exactly one JSON line to the real stdout: ``{"ok": true, ...}`` (validate: the
signature; quantize: the report, the derived model written to ``derived.onnx`` beside the parent) or
``{"ok": false, "reason": "...", "error": <class>, "extra": {...}}``. Anything else that prints (Python
or native code) goes to stderr, so it cannot corrupt that line. Everything is caught: a verdict always
comes back unless the process is killed.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any


def apply_rlimits(rlimits: dict[str, int]) -> None:
    """Set each ``resource.RLIMIT_*`` soft and hard limit, never above the hard limit this process
    inherited (raising it would fail unprivileged). Hard limits only go down, so nothing later in
    this process can lift them. The CPU hard limit is one second above the soft one: SIGXCPU comes
    first, SIGKILL follows if it is ignored.

    RLIMIT_NPROC is the exception that is checked first: the parent sets it from the user's task
    count in its own ``/proc``, which undercounts when the same uid also runs processes in other PID
    namespaces (containers sharing a uid without user namespaces). A limit below the real count would
    stop onnxruntime from starting its thread and so reject every model; so the limit is tried as a
    soft limit with one probe thread first, and skipped (with a note on stderr) if the probe fails."""
    for name, value in rlimits.items():
        which = getattr(resource, name)
        if name == "RLIMIT_NPROC" and not _threads_start_under(which, value):
            sys.stderr.write(f"validate_worker: RLIMIT_NPROC={value} would leave no room for a thread; not set\n")
            continue
        _, inherited_hard = resource.getrlimit(which)
        wanted_hard = value + 1 if name == "RLIMIT_CPU" else value
        if inherited_hard != resource.RLIM_INFINITY:
            wanted_hard = min(wanted_hard, inherited_hard)
        resource.setrlimit(which, (min(value, wanted_hard), wanted_hard))


def _threads_start_under(which: int, value: int) -> bool:
    """Whether a thread can still start with the soft limit ``which`` at ``value`` (the soft limit
    is restored when it cannot; the hard limit is not touched here)."""
    import threading

    soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY and value > hard:
        value = hard
    resource.setrlimit(which, (value, hard))
    try:
        probe = threading.Thread(target=lambda: None)
        probe.start()
        probe.join()
    except RuntimeError:  # "can't start new thread"
        resource.setrlimit(which, (soft, hard))
        return False
    return True


def _run(argv: list[str]) -> dict[str, Any]:
    if len(argv) != 2:
        return {"ok": False, "reason": "validation worker needs <model path> <config JSON>"}
    path, config_json = argv
    config = json.loads(config_json)
    apply_rlimits(config["rlimits"])

    from pathlib import Path

    from maas.errors import MaasError
    from maas.settings import Limits

    limits = Limits.model_validate(config["limits"])
    job = config.get("job", "validate")
    args = config.get("args") or {}
    try:
        if job == "validate":
            return _validate(Path(path), limits)
        if job == "smoke":
            return _smoke(Path(path), args)
        if job == "quantize":
            return _quantize(Path(path), args, limits)
    except MaasError as error:
        return {"ok": False, "reason": error.detail, "error": type(error).__name__,
                "field": getattr(error, "field", None), "extra": _plain(error.extra)}
    except OSError:
        return {"ok": False, "reason": "the artifact could not be read"}
    return {"ok": False, "reason": f"unknown job {job!r}"}


def _validate(path: Any, limits: Any) -> dict[str, Any]:
    from maas.inference.validation import inspect_model_file

    signature = inspect_model_file(path, limits)
    return {"ok": True, "signature": signature.model_dump(mode="json")}


def _smoke(path: Any, args: dict[str, Any]) -> dict[str, Any]:
    from maas.domain import Signature
    from maas.inference.smoke import run_smoke_test

    run_smoke_test(path.read_bytes(), Signature.model_validate(args["signature"]), str(args["what"]))
    return {"ok": True}


def _quantize(path: Any, args: dict[str, Any], limits: Any) -> dict[str, Any]:
    from maas.domain import Signature
    from maas.inference.optimize import quantize

    derived_path = path.with_name("derived.onnx")
    derived = derived_path.read_bytes() if args.get("derived") else None
    data, report = quantize(path.read_bytes(), Signature.model_validate(args["signature"]), float(args["tolerance"]),
                            goal=str(args["goal"]), derived=derived, limits=limits)
    derived_path.write_bytes(data)
    return {"ok": True, "report": report.as_dict()}


def _plain(value: Any) -> Any:
    """``extra`` as JSON can carry it (reports are dicts of numbers and strings already)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return None
    return value


def main(argv: list[str]) -> int:
    """Run the validation and write the verdict line; always exits 0 when a verdict was written."""
    result_fd = os.dup(1)
    os.dup2(2, 1)  # from here on, stray output (Python or native) lands on stderr
    try:
        answer = _run(argv)
    except MemoryError:
        answer = {"ok": False, "reason": "the model exceeded the sandbox's memory limit"}
    except BaseException as exc:  # the parent maps every non-ok answer to a rejection
        answer = {"ok": False, "reason": f"validation failed unexpectedly ({type(exc).__name__})"}
    os.write(result_fd, (json.dumps(answer) + "\n").encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
