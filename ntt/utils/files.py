"""Files: atomic writes that honour the user's umask, and the content identity (sha256) of input files.

Atomic writes. `tempfile.mkstemp` creates its file readable by its owner only (0600); a plain rename then
leaves every artifact (refs.json, memory files, manifests) unreadable to the group even when the user's umask
says otherwise. These helpers write to a temp file in the same folder, give it the mode a plain `open()` would
(0666 minus the umask), and rename it into place, so a killed run never leaves a half-written file.

Content identity. A stage is skipped only when everything it read is unchanged (docs/ARCHITECTURE.md,
"Resume"): the config values and the content of every input file. Hashing a 1 GB checkpoint or 5000 images on
every rerun would be slow, so the digests are cached per run directory (`file_hashes.json`) under the file's
absolute path with its size and mtime; a file whose size or mtime changed is hashed again. A file modified
within two seconds of being hashed is never trusted to the cache (coarse-mtime file systems could miss a
second edit within the same tick).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_FILE = "file_hashes.json"
_RACY_NS = 2_000_000_000


def current_umask() -> int:
    """The process umask (read by setting and restoring it; os offers no plain getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0666 minus the umask."""
    return 0o666 & ~current_umask()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temp file + rename, with the umask's file mode.

    Args:
        path: destination file (its folder is created if needed).
        data: the bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (utf-8) to `path` atomically with the umask's file mode.

    Args:
        path: destination file.
        text: the content.
    """
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> None:
    """Write `obj` as JSON (one trailing newline) atomically with the umask's file mode.

    Args:
        path: destination file.
        obj: JSON-able data (keys kept in insertion order).
        indent: `json.dumps` indent (None: one line).
    """
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


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
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.cache_file, json.dumps(self._entries, indent=0, sort_keys=True) + "\n")
        self._dirty = False


def resolve_run_path(path: str, root: Path | None, run_dir: Path) -> Path:
    """A data path recorded in a run's config.yaml, found again from wherever the reader runs.

    Relative paths were relative to the folder the run was started from: try ``root`` (the user's
    ``--root``), then the current folder, then the run directory; absolute paths are kept.
    """
    p = Path(path)
    if p.is_absolute():
        return p
    for base in [b for b in (root, Path.cwd(), run_dir) if b is not None]:
        if (base / p).exists():
            return base / p
    return (root or Path.cwd()) / p
