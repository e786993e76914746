"""Content identity of input files: sha256, recomputed only when a file's size or mtime changes.

A stage is skipped only when everything it read is unchanged (docs/ARCHITECTURE.md, "Resume"): the
config values and the content of every input file. Hashing a 1 GB checkpoint or 5000 images on every
rerun would be slow, so the digests are cached per run directory (`file_hashes.json`) under the file's
absolute path with its size and mtime; a file whose size or mtime changed is hashed again. A file modified
within two seconds of being hashed is never trusted to the cache (coarse-mtime file systems could miss a
second edit within the same tick).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_FILE = "file_hashes.json"
_RACY_NS = 2_000_000_000


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes (read in chunks of `chunk_size` bytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def _still_valid(entry: dict | None, st: os.stat_result) -> bool:
    """A cached digest is trusted when size and mtime match and it was hashed well after the last write."""
    return (
        entry is not None
        and entry.get("size") == st.st_size
        and entry.get("mtime_ns") == st.st_mtime_ns
        and entry.get("hashed_at_ns", 0) - st.st_mtime_ns > _RACY_NS
    )


class FileDigests:
    """sha256 of files with a size + mtime fast path, optionally persisted in a json cache.

    Args:
        cache_file: where the cache is kept between runs (None: in memory only).
        shared: a dict shared by several instances in one process (the run directories of a study pass):
            a file hashed for one of them is not read again for the others (same size + mtime rules).
    """

    def __init__(self, cache_file: str | os.PathLike | None = None, *, shared: dict | None = None) -> None:
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self._shared = shared
        self._entries: dict[str, dict] = {}
        self._dirty = False
        if self.cache_file is not None and self.cache_file.is_file():
            try:
                data = json.loads(self.cache_file.read_text())
                if isinstance(data, dict):
                    self._entries = {k: v for k, v in data.items() if isinstance(v, dict)}
            except (OSError, json.JSONDecodeError):
                log.debug("ignoring an unreadable digest cache %s", self.cache_file)

    def sha256(self, path: str | os.PathLike | None) -> str | None:
        """The file's sha256, or None when it does not exist (the stage needing it will say so).

        Args:
            path: the file.
        """
        if path is None:
            return None
        p = Path(path)
        try:
            st = p.stat()
        except OSError:
            return None
        if not p.is_file():
            return None
        key = str(p.resolve())
        entry = self._entries.get(key)
        if _still_valid(entry, st):
            if self._shared is not None:
                self._shared.setdefault(key, entry)
            return str(entry["sha256"])
        shared = self._shared.get(key) if self._shared is not None else None
        if _still_valid(shared, st):  # hashed for another run directory of this process
            self._entries[key] = dict(shared)
            self._dirty = True
            return str(shared["sha256"])
        digest = sha256_file(p)
        self._entries[key] = {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "hashed_at_ns": time.time_ns(),
            "sha256": digest,
        }
        if self._shared is not None:
            self._shared[key] = self._entries[key]
        self._dirty = True
        return digest

    def save(self) -> None:
        """Write the cache (atomically) if anything was hashed since it was read."""
        if self.cache_file is None or not self._dirty:
            return
        from ntt.fsutil import write_text_atomic

        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.cache_file, json.dumps(self._entries, indent=0, sort_keys=True) + "\n")
        self._dirty = False
