"""The local backend: content-addressed artifacts in a directory and the registry in SQLite (WAL).

Used by ``maas serve`` on one machine and as the fake behind unit and functional tests."""

from maas.backends.local.artifacts import FileArtifactStore
from maas.backends.local.backend import LocalBackend
from maas.backends.local.registry import SqliteRegistry

__all__ = ["FileArtifactStore", "LocalBackend", "SqliteRegistry"]
