"""The session cache: an LRU keyed by artifact sha256, bounded by what its entries cost in bytes.

Loads of one key happen once however many requests ask at the same time; other keys stay served
meanwhile. What an entry costs is the loader's to say: the engine measures the resident memory a
session holds (``maas.inference.engine``)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["CacheStats", "SessionCache"]

V = TypeVar("V")



@dataclass(slots=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    bytes: int
    entries: int
    max_bytes: int


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    cost: int


@dataclass(slots=True)
class _Loading:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0


class SessionCache(Generic[V]):
    """A thread-safe LRU keyed by artifact sha256, bounded by the sum of the entries' costs (bytes).

    ``get_or_load`` runs the loader outside the cache lock, under a per-key lock, so concurrent first
    requests for one key load it once while other keys stay served. The entry just loaded is always
    kept, even alone over the budget (a model bigger than the cache still serves, one at a time).
    A loader that raises caches nothing; the next caller tries again.
    """

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry[V]] = OrderedDict()
        self._loading: dict[str, _Loading] = {}
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def get_or_load(self, key: str, loader: Callable[[], tuple[V, int]]) -> tuple[V, bool]:
        """The cached value for ``key`` and True, or ``loader()``'s value (cached, cost = its int) and
        False."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                return entry.value, True
            loading = self._loading.get(key)
            if loading is None:
                loading = self._loading[key] = _Loading()
            loading.users += 1
        try:
            with loading.lock:
                with self._lock:
                    entry = self._entries.get(key)
                    if entry is not None:  # loaded by the thread we waited for
                        self._entries.move_to_end(key)
                        self._hits += 1
                        return entry.value, True
                value, cost = loader()
                with self._lock:
                    self._misses += 1
                    self._insert(key, _Entry(value, max(int(cost), 0)))
                return value, False
        finally:
            with self._lock:
                loading.users -= 1
                if loading.users == 0 and self._loading.get(key) is loading:
                    del self._loading[key]

    def _insert(self, key: str, entry: _Entry[V]) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.cost
        self._entries[key] = entry
        self._bytes += entry.cost
        while self._bytes > self._max_bytes and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.cost
            self._evictions += 1

    def evict_oldest(self, keep: str | None = None) -> bool:
        """Drop the least recently used entry other than ``keep``; False when there is none."""
        with self._lock:
            for key in self._entries:
                if key != keep:
                    evicted = self._entries.pop(key)
                    self._bytes -= evicted.cost
                    self._evictions += 1
                    return True
            return False

    def get(self, key: str) -> V | None:
        """The cached value (marked recently used), without loading or counting a hit or miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry.value

    def discard(self, key: str) -> bool:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self._bytes -= entry.cost
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                bytes=self._bytes,
                entries=len(self._entries),
                max_bytes=self._max_bytes,
            )
