"""The process's inference memory: one bounded onnxruntime arena that every served session allocates from.

Why one arena with a cap: onnxruntime gives each session its own CPU arena by default, unbounded and
never shrunk. A 136-byte model whose ``ConstantOfShape`` size comes from the request grew a server from
0.75 GB to 6.87 GB for one 70-byte call, and kept it; five copies of a tiny model, each run once, held
5.4 GB. Measured on onnxruntime 1.2x (docs/performance.md, "Inference memory"):

- with a shared arena registered through ``create_and_register_allocator`` and capped by ``max_mem``,
  an allocation beyond the cap fails at once, before a byte is touched (a 4 GB request failed in
  microseconds with RSS unchanged), and the model's weights live in the same arena, so the cap bounds
  what all sessions hold together, weights and working memory;
- ``memory.enable_memory_arena_shrinkage`` on any run of any session using that arena returns every
  free region to the system (800 MB freed by one run of a one-element model afterwards). Asking for it
  on every request costs about 3 us per run and re-faults the working memory of every run, so the engine
  asks only after a run that took long (``TRIM_AFTER_S``: touching hundreds of megabytes takes longer
  than that) or failed, after loads and after evictions, through :func:`InferenceMemory.trim`.

The arena is process-wide (onnxruntime keeps one per device in its environment): the first engine
installs it with its cap, later engines share it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "MEMORY",
    "TRIM_AFTER_BYTES",
    "TRIM_AFTER_S",
    "InferenceMemory",
    "allocation_request",
    "default_inference_memory_bytes",
    "resident_bytes",
]

log = logging.getLogger(__name__)

#: A run slower than this may have grown the arena: the engine trims after it (a fast run cannot have
#: touched enough memory to matter, and trimming after every run would cost every request).
TRIM_AFTER_S = 0.05
#: Nor after a run whose outputs are this large: they were the arena's before they became numpy's.
TRIM_AFTER_BYTES = 8 * 1024 * 1024
#: What the process keeps outside the arena on Lambda (Python, onnxruntime's code, the codec's copies).
LAMBDA_RESERVE_MB = 384
MIN_INFERENCE_MEMORY_BYTES = 256 * 1024 * 1024

#: ``y = x + x`` on one float (63 bytes, built with ``onnx.helper``): the run that asks the shared arena
#: to shrink, so trimming needs no served session and imports no onnx.
_TRIM_MODEL = (b'\x08\x08:5\n\x0e\n\x01x\n\x01x\x12\x01y"\x03Add\x12\x01tZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12'
               b'\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r')

#: onnxruntime's words when the arena cannot give a buffer ("Available memory of X is smaller than
#: requested bytes of Y"; "Failed to allocate memory for requested buffer of size Y").
_REQUESTED = re.compile(r"(?:requested bytes of|requested buffer of size)\s+(\d+)")
_ALLOCATION = re.compile(r"Failed to allocate memory|Available memory of \d+ is smaller", re.IGNORECASE)


def allocation_request(error: BaseException) -> int | None:
    """The bytes onnxruntime failed to allocate when ``error`` is an arena allocation failure (0 when it
    does not say how many), else None."""
    text = str(error)
    if not _ALLOCATION.search(text):
        return None
    found = _REQUESTED.search(text)
    return int(found.group(1)) if found else 0


def _physical_bytes() -> int:
    """The memory this process may use: the machine's, or its cgroup's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw))
            break
    return total


def default_inference_memory_bytes() -> int:
    """On Lambda, half of the function's memory less ``LAMBDA_RESERVE_MB`` (model weights are not the
    arena's: the session cache, bounded by the same figure, takes the other half); elsewhere half of the
    memory this process may use (the rest is the server's, the page cache's and its neighbours').
    Never below 256 MiB."""
    lambda_mb = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "").strip()
    total = (int(lambda_mb) - LAMBDA_RESERVE_MB) * 1024 * 1024 if lambda_mb.isdigit() else _physical_bytes()
    return max(total // 2, MIN_INFERENCE_MEMORY_BYTES)


def resident_bytes() -> int:
    """This process's resident set size now (``/proc/self/statm``; 0 where there is no ``/proc``)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class InferenceMemory:
    """The shared, capped arena (see the module docstring). Thread-safe; one per process (``MEMORY``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._trim_lock = threading.Lock()
        self._cap: int | None = None
        self._trimmer: ort.InferenceSession | None = None
        self._trim_options: ort.RunOptions | None = None
        self._trim_feed: dict[str, Any] | None = None

    @property
    def cap(self) -> int | None:
        """The cap in force, or None before :meth:`install`."""
        return self._cap

    def install(self, cap_bytes: int) -> int:
        """Register the arena with ``cap_bytes`` (first call only) and return the cap in force."""
        with self._lock:
            if self._cap is not None:
                if cap_bytes != self._cap:
                    log.info("inference memory is already capped at %d bytes in this process; keeping it", self._cap)
                return self._cap
            import numpy as np
            import onnxruntime as ort

            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            # kSameAsRequested (1): grow by what is asked, so the cap is met where a request crosses it,
            # not at the next power of two.
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"max_mem": int(cap_bytes),
                                                                      "arena_extend_strategy": 1}))
            self._cap = int(cap_bytes)
            trimmer = ort.InferenceSession(_TRIM_MODEL, self.session_options(_quiet_options(ort)),
                                           providers=["CPUExecutionProvider"])
            options = ort.RunOptions()
            options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
            self._trimmer, self._trim_options = trimmer, options
            self._trim_feed = {"x": np.zeros(1, dtype=np.float32)}
            return self._cap

    @staticmethod
    def session_options(options: ort.SessionOptions) -> ort.SessionOptions:
        """``options`` set to allocate from the shared arena (call after :meth:`install`), without
        onnxruntime's memory patterns: a session that ran one shape twice keeps its pattern's block
        counted against the cap after the arena shrank (measured: three runs of 100 MiB left 156 of
        256 MiB to every later run). Without them small models ran no slower here (iris 10.0 against
        12.8 µs per run, a 3 MB MLP at batch 64 1.37 against 1.35 ms)."""
        options.add_session_config_entry("session.use_env_allocators", "1")
        options.enable_mem_pattern = False
        return options

    def trim(self) -> None:
        """Return the arena's free regions to the system (one tiny run; a no-op before ``install``)."""
        trimmer = self._trimmer
        if trimmer is None:
            return
        with self._trim_lock:
            trimmer.run(None, self._trim_feed or {}, self._trim_options)


def _quiet_options(ort: Any) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    return options


#: The process's one arena.
MEMORY = InferenceMemory()
