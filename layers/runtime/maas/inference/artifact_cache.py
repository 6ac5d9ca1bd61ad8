"""A content-addressed disk cache of model artifacts, in front of the artifact store.

On Lambda the engine's in-memory session cache dies with the container, but ``/tmp`` survives as
long as the execution environment does and is far faster than S3: a container that loses its sessions
(memory pressure, a model evicted by a bigger one) rebuilds them from disk without a storage read.
Elsewhere it saves the artifact store's bandwidth the same way.

Files are named by their sha256 (``<dir>/<sha256>``), so versions sharing bytes share one file and a
name can never be confused with another model's. Writes go to a temporary file renamed into place, so
a crash mid-write leaves a temporary file (removed on the next start), never a truncated artifact
under a real name. Reads re-hash the file: a corrupted file (a bad disk, a partial copy by hand) is
dropped and fetched again once, instead of failing every load with ``StorageCorrupted`` until the
container is recycled. Hashing costs a fraction of building the onnxruntime session that follows.

Eviction is least-recently-used by total bytes; a hit touches the file's mtime, so the order survives
a restart of the process (a second container on the same directory starts with the right order).
Caching is best effort: a full disk or an artifact larger than the budget is served uncached.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from maas.domain import ModelVersion
from maas.errors import NotReady

__all__ = ["DiskArtifactCache", "DiskCacheStats"]

log = logging.getLogger("maas.inference.artifact_cache")

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_TEMP_PREFIX = ".tmp-"
#: temporary files older than this are leftovers of a crashed writer (a live write takes seconds)
_STALE_TEMP_S = 3600.0


@dataclass(slots=True, frozen=True)
class DiskCacheStats:
    hits: int
    misses: int
    corrupt: int
    evictions: int
    bytes: int
    entries: int
    max_bytes: int


class DiskArtifactCache:
    """``read(version) -> bytes`` for ``InferenceEngine(read_artifact=cache.read)``: the cached file
    when it is intact, else ``fetch(version)`` (stored for next time when its bytes are right).

    Thread-safe; several processes may share the directory (each keeps its own view of the LRU order
    and budget, and files appear and disappear atomically)."""

    def __init__(self, directory: Path, max_bytes: int, fetch: Callable[[ModelVersion], bytes]):
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self._dir = Path(directory)
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._max_bytes = max_bytes
        self._fetch = fetch
        self._lock = threading.Lock()
        #: sha256 -> size, least recently used first
        self._entries: OrderedDict[str, int] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._corrupt = 0
        self._evictions = 0
        self._scan()

    # -- reading

    def read(self, version: ModelVersion) -> bytes:
        sha256 = version.sha256
        if not sha256 or not _SHA256_HEX.fullmatch(sha256):
            # The name becomes a path: only a real digest may (the engine checks READY before this).
            raise NotReady(f"model {version.model!r} version {version.version} has no artifact digest")
        path = self._dir / sha256
        data = self._read_file(path)
        if data is not None:
            if hashlib.sha256(data).hexdigest() == sha256:
                self._touch(sha256, path, len(data))
                return data
            log.warning("cached artifact %s is corrupt; fetching it again", sha256)
            with self._lock:
                self._corrupt += 1
            self._drop(sha256, path)
        with self._lock:
            self._misses += 1
        data = self._fetch(version)
        if len(data) <= self._max_bytes and hashlib.sha256(data).hexdigest() == sha256:
            self._store(sha256, path, data)
        # Wrong bytes are returned uncached: the engine re-hashes them and raises StorageCorrupted.
        return data

    def __contains__(self, sha256: object) -> bool:
        return isinstance(sha256, str) and _SHA256_HEX.fullmatch(sha256) is not None and \
            (self._dir / sha256).is_file()

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def stats(self) -> DiskCacheStats:
        with self._lock:
            return DiskCacheStats(hits=self._hits, misses=self._misses, corrupt=self._corrupt,
                                  evictions=self._evictions, bytes=self._bytes, entries=len(self._entries),
                                  max_bytes=self._max_bytes)

    # -- internals

    @staticmethod
    def _read_file(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:  # unreadable: treat as absent, the store still has the bytes
            log.warning("cannot read cached artifact %s: %s", path.name, error.strerror)
            return None

    def _touch(self, sha256: str, path: Path, size: int) -> None:
        with contextlib.suppress(OSError):
            os.utime(path)
        with self._lock:
            self._hits += 1
            self._account(sha256, size)
            self._entries.move_to_end(sha256)
        self._evict(keep=sha256)

    def _store(self, sha256: str, path: Path, data: bytes) -> None:
        temp = self._dir / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            with open(temp, "xb") as handle:
                handle.write(data)
            os.replace(temp, path)
        except OSError as error:  # a full /tmp must not fail the request: serve uncached
            log.warning("cannot cache artifact %s: %s", sha256, error.strerror)
            with contextlib.suppress(OSError):
                temp.unlink()
            return
        with self._lock:
            self._account(sha256, len(data))
            self._entries.move_to_end(sha256)
        self._evict(keep=sha256)

    def _account(self, sha256: str, size: int) -> None:
        """Record ``sha256`` with ``size`` bytes (under the lock); idempotent."""
        old = self._entries.get(sha256)
        if old is None:
            self._entries[sha256] = size
            self._bytes += size
        elif old != size:
            self._entries[sha256] = size
            self._bytes += size - old

    def _drop(self, sha256: str, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with self._lock:
            size = self._entries.pop(sha256, None)
            if size is not None:
                self._bytes -= size

    def _evict(self, keep: str) -> None:
        while True:
            with self._lock:
                if self._bytes <= self._max_bytes:
                    return
                victim = next((key for key in self._entries if key != keep), None)
                if victim is None:
                    return
                size = self._entries.pop(victim)
                self._bytes -= size
                self._evictions += 1
            with contextlib.suppress(FileNotFoundError):
                (self._dir / victim).unlink()

    def _scan(self) -> None:
        """Index what an earlier process left (oldest access first) and clear crashed writes."""
        now = time.time()
        found: list[tuple[float, str, int]] = []
        with os.scandir(self._dir) as entries:
            for entry in entries:
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if entry.name.startswith(_TEMP_PREFIX):
                    if now - info.st_mtime > _STALE_TEMP_S:
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
                elif _SHA256_HEX.fullmatch(entry.name):
                    found.append((info.st_mtime, entry.name, info.st_size))
        with self._lock:
            for _, sha256, size in sorted(found):
                self._account(sha256, size)
        self._evict(keep="")
