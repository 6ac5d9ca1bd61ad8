"""File digests, shared by the commit path (which re-hashes what it validates) and the stores."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1024 * 1024


def sha256_file(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in chunks so large models never sit in memory."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
