"""The disk artifact cache: content-addressed files, atomic writes, LRU by bytes, self-healing reads."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from maas.domain import ModelVersion, VersionStatus
from maas.errors import NotReady, StorageCorrupted
from maas.examples import EXAMPLE_REQUEST, example_model_path
from maas.inference.artifact_cache import DiskArtifactCache
from maas.inference.codec import decode_request
from maas.inference.engine import InferenceEngine
from maas.settings import Limits


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def version(data: bytes, number: int = 1, model: str = "m") -> ModelVersion:
    return ModelVersion(model=model, version=number, status=VersionStatus.READY, sha256=sha(data), size=len(data))


class Store:
    """A fake artifact store: a dict by sha256, counting fetches (what S3 would be asked)."""

    def __init__(self, *blobs: bytes):
        self.blobs = {sha(blob): blob for blob in blobs}
        self.fetches: list[str] = []

    def fetch(self, v: ModelVersion) -> bytes:
        assert v.sha256 is not None
        self.fetches.append(v.sha256)
        return self.blobs[v.sha256]


def test_miss_then_hit_writes_one_content_addressed_file(tmp_path: Path) -> None:
    data = b"model-bytes" * 100
    store = Store(data)
    cache = DiskArtifactCache(tmp_path / "c", 10_000, store.fetch)
    assert cache.read(version(data)) == data
    assert cache.read(version(data, 2)) == data  # another version, same bytes: one file
    assert store.fetches == [sha(data)]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [sha(data)]
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.entries, stats.bytes) == (1, 1, 1, len(data))
    assert sha(data) in cache and "../etc" not in cache


def test_a_second_process_reads_from_disk_without_fetching(tmp_path: Path) -> None:
    data = os.urandom(5000)
    DiskArtifactCache(tmp_path, 10_000, Store(data).fetch).read(version(data))
    store = Store(data)
    restarted = DiskArtifactCache(tmp_path, 10_000, store.fetch)
    assert restarted.stats.entries == 1 and restarted.stats.bytes == len(data)
    assert restarted.read(version(data)) == data
    assert store.fetches == []


def test_lru_eviction_by_bytes_keeps_recently_used(tmp_path: Path) -> None:
    a, b, c = (bytes([n]) * 400 for n in (1, 2, 3))
    store = Store(a, b, c)
    cache = DiskArtifactCache(tmp_path, 1000, store.fetch)
    cache.read(version(a))
    cache.read(version(b))
    cache.read(version(a))  # a is now the most recently used
    cache.read(version(c))  # 1200 bytes > 1000: b goes
    assert {p.name for p in tmp_path.iterdir()} == {sha(a), sha(c)}
    assert cache.stats.evictions == 1 and cache.stats.bytes == 800
    cache.read(version(b))
    assert store.fetches == [sha(a), sha(b), sha(c), sha(b)]


def test_order_survives_a_restart_via_mtime(tmp_path: Path) -> None:
    a, b, c = (bytes([n]) * 400 for n in (1, 2, 3))
    first = DiskArtifactCache(tmp_path, 1000, Store(a, b).fetch)
    first.read(version(a))
    first.read(version(b))
    past = time.time() - 100
    os.utime(tmp_path / sha(b), (past, past))  # b was used long ago, a recently
    second = DiskArtifactCache(tmp_path, 1000, Store(c).fetch)
    second.read(version(c))
    assert {p.name for p in tmp_path.iterdir()} == {sha(a), sha(c)}


def test_a_smaller_budget_at_start_evicts(tmp_path: Path) -> None:
    a, b = bytes([1]) * 400, bytes([2]) * 400
    DiskArtifactCache(tmp_path, 1000, Store(a, b).fetch).read(version(a))
    DiskArtifactCache(tmp_path, 1000, Store(a, b).fetch).read(version(b))
    shrunk = DiskArtifactCache(tmp_path, 500, Store().fetch)
    assert shrunk.stats.entries == 1 and len(list(tmp_path.iterdir())) == 1


def test_artifact_over_budget_is_served_uncached(tmp_path: Path) -> None:
    data = b"x" * 2000
    store = Store(data)
    cache = DiskArtifactCache(tmp_path, 1000, store.fetch)
    assert cache.read(version(data)) == data
    assert cache.read(version(data)) == data
    assert list(tmp_path.iterdir()) == [] and len(store.fetches) == 2


def test_corrupt_file_is_dropped_and_fetched_again(tmp_path: Path) -> None:
    data = os.urandom(3000)
    store = Store(data)
    cache = DiskArtifactCache(tmp_path, 10_000, store.fetch)
    cache.read(version(data))
    (tmp_path / sha(data)).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # a flipped bit
    assert cache.read(version(data)) == data
    assert (tmp_path / sha(data)).read_bytes() == data
    assert cache.stats.corrupt == 1 and len(store.fetches) == 2


def test_wrong_bytes_from_the_store_are_not_cached(tmp_path: Path) -> None:
    data = b"right" * 10
    store = Store(data)
    cache = DiskArtifactCache(tmp_path, 10_000, store.fetch)
    store.blobs[sha(data)] = b"wrong"
    assert cache.read(version(data)) == b"wrong"  # the engine's own check turns this into a 500
    assert list(tmp_path.iterdir()) == []


def test_engine_over_the_cache_heals_a_corrupt_file(tmp_path: Path) -> None:
    """The engine re-hashes whatever it gets: a corrupt cached file must not reach it."""
    data = example_model_path().read_bytes()
    store = Store(data)
    cache = DiskArtifactCache(tmp_path, 10_000_000, store.fetch)
    (tmp_path / sha(data)).write_bytes(b"garbage")
    engine = InferenceEngine(cache.read, Limits())
    request = decode_request(orjson.dumps(EXAMPLE_REQUEST), None, Limits())
    outputs = dict(engine.infer(version(data), request))
    assert outputs["label"].shape == (2,) and np.isfinite(outputs["probabilities"]).all()
    assert store.fetches == [sha(data)]
    # And a store returning wrong bytes still fails cleanly in the engine.
    bad = Store()
    bad.blobs[sha(data)] = b"not the model"
    fresh = InferenceEngine(DiskArtifactCache(tmp_path / "other", 10_000_000, bad.fetch).read, Limits())
    with pytest.raises(StorageCorrupted):
        fresh.infer(version(data), request)


def test_writes_are_atomic_and_stale_temp_files_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".tmp-crashed"
    stale.write_bytes(b"half a model")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh_temp = tmp_path / ".tmp-live-writer"
    fresh_temp.write_bytes(b"being written")
    data = b"abc" * 50
    cache = DiskArtifactCache(tmp_path, 10_000, Store(data).fetch)
    assert not stale.exists() and fresh_temp.exists()  # another live writer's file is left alone
    cache.read(version(data))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([sha(data), ".tmp-live-writer"])
    assert cache.stats.entries == 1


def test_full_disk_serves_uncached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"abc" * 50
    store = Store(data)
    cache = DiskArtifactCache(tmp_path, 10_000, store.fetch)

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    assert cache.read(version(data)) == data
    assert list(tmp_path.iterdir()) == []


def test_only_real_digests_become_paths(tmp_path: Path) -> None:
    cache = DiskArtifactCache(tmp_path, 10_000, Store().fetch)
    with pytest.raises(NotReady):
        cache.read(ModelVersion(model="m", version=1, status=VersionStatus.READY, sha256="../../etc/passwd"))
    with pytest.raises(ValueError):
        DiskArtifactCache(tmp_path, 0, Store().fetch)
