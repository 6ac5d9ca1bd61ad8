"""Child-process entry point of ``SubprocessValidator``:
``python -m maas.inference.validate_worker <model path> <config JSON>``.

The config is ``{"limits": <maas.settings.Limits>, "rlimits": {"RLIMIT_AS": n, ...}}``. The worker
applies the rlimits to itself first, with the stdlib only, before numpy/onnx/onnxruntime are imported
or a byte of the model is read; then it runs ``inspect_model_file`` and writes exactly one JSON line to
the real stdout: ``{"ok": true, "signature": {...}}`` or ``{"ok": false, "reason": "..."}``. Anything
else that prints (Python or native code) goes to stderr, so it cannot corrupt that line. Everything is
caught: a verdict always comes back unless the process is killed.
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

    from maas.errors import ModelRejected
    from maas.inference.validation import inspect_model_file
    from maas.settings import Limits

    try:
        signature = inspect_model_file(Path(path), Limits.model_validate(config["limits"]))
    except ModelRejected as exc:
        return {"ok": False, "reason": exc.detail}
    except OSError:
        return {"ok": False, "reason": "the artifact could not be read"}
    return {"ok": True, "signature": signature.model_dump(mode="json")}


def main(argv: list[str]) -> int:
    """Run the validation and write the verdict line; always exits 0 when a verdict was written."""
    result_fd = os.dup(1)
    os.dup2(2, 1)  # from here on, stray output (Python or native) lands on stderr
    try:
        answer = _run(argv)
    except MemoryError:
        answer = {"ok": False, "reason": "validation process exceeded its memory limit"}
    except BaseException as exc:  # the parent maps every non-ok answer to a rejection
        answer = {"ok": False, "reason": f"validation failed unexpectedly ({type(exc).__name__})"}
    os.write(result_fd, (json.dumps(answer) + "\n").encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
