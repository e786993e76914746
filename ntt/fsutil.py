"""Atomic file writes that honour the user's umask.

`tempfile.mkstemp` creates its file readable by its owner only (0600); a plain rename then leaves every
artifact (refs.json, memory files, manifests) unreadable to the group even when the user's umask says
otherwise. These helpers write to a temp file in the same folder, give it the mode a plain `open()` would
(0666 minus the umask), and rename it into place, so a killed run never leaves a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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
