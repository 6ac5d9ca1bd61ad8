"""Deadlines that really stop onnxruntime: ``RunOptions.terminate``, set by one watchdog thread.

A model whose work depends on its input values (a ``Loop`` whose trip count is an input, a ``Range``
or ``ConstantOfShape`` of a requested size) passes validation and the smoke test, then one request
holds a server thread for as long as it likes: 3e6 trips held one for 20 s. onnxruntime checks the
run's terminate flag between kernels (and between a ``Loop``'s iterations), so a run past its deadline
stops within a kernel's time once the flag is set.

Why one polling thread rather than a timer per run: a ``threading.Timer`` starts a thread per request
(~50-100 µs, more than a small model's run). Here a run costs a ``RunOptions`` (~0.5 µs) and two dict
operations; the watchdog wakes every ``resolution_s`` and looks at the runs in flight only."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any


class Watchdog:
    """Sets ``terminate`` on the ``RunOptions`` of runs past their deadline (within ``resolution_s``)."""

    def __init__(self, resolution_s: float = 0.05) -> None:
        self.resolution_s = resolution_s
        self._runs: dict[int, tuple[float, Any]] = {}
        self._fired: set[int] = set()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def arm(self, options: Any, seconds: float) -> int:
        """Watch ``options`` (an ``onnxruntime.RunOptions``) for ``seconds``; returns the run's key."""
        key = next(self._ids)
        self._runs[key] = (time.monotonic() + seconds, options)
        if self._thread is None:
            self._start()
        return key

    def disarm(self, key: int) -> bool:
        """Stop watching a run; True if its deadline had passed (its ``terminate`` was set)."""
        self._runs.pop(key, None)
        if key in self._fired:
            with self._lock:
                self._fired.discard(key)
            return True
        return False

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="maas-run-watchdog", daemon=True)
                self._thread.start()

    def _watch(self) -> None:
        while True:
            time.sleep(self.resolution_s)
            now = time.monotonic()
            for key, (deadline, options) in list(self._runs.items()):
                if deadline <= now and self._runs.pop(key, None) is not None:
                    with self._lock:
                        self._fired.add(key)
                    options.terminate = True


#: the process's watchdog (started on the first armed run)
WATCHDOG = Watchdog()
