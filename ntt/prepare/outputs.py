"""All-or-nothing outputs of one `ntt prepare` command (:class:`StagedOutputs`).

A command makes every output before any is in place: each file is written to a hidden temp file beside its
destination (``.<name>.<random>.staged``, with the umask's mode as `ntt.utils.files` writes), and `commit`
renames them all at the end. An error before the commit removes the temp files (and the folders made for
them), so a failure part-way leaves the previous outputs as they were.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from ntt.prepare.errors import PrepareError
from ntt.utils.files import default_file_mode

log = logging.getLogger(__name__)


class StagedOutputs:
    """The files one command writes, moved into place together by :meth:`commit`.

    Use it as a context manager: leaving the block without a commit (an error) discards what was staged.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temp file, destination)
        self._made_dirs: list[Path] = []
        self._remove_after: list[Path] = []

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def add(self, path: str | os.PathLike, text: str) -> None:
        """Stage `text` (utf-8) as the new content of `path`."""
        path = Path(path)
        self._make_dirs(path.parent)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".staged", dir=path.parent)
        except OSError as exc:
            raise PrepareError(
                f"cannot write into {path.parent}: {exc.strerror}: fix its permissions"
            ) from exc
        self._staged.append((Path(tmp), path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(text.encode("utf-8"))
            os.chmod(tmp, default_file_mode())
        except OSError as exc:
            raise PrepareError(
                f"cannot write {path}: {exc.strerror}: free some space (or fix the permissions) and rerun; "
                "no output was changed"
            ) from exc

    def remove_after_commit(self, path: str | os.PathLike) -> None:
        """A work file (a mask step's partial results) that the commit makes obsolete."""
        self._remove_after.append(Path(path))

    def commit(self) -> list[Path]:
        """Move every staged file into place; returns the destinations in the order they were staged."""
        done = []
        for tmp, dest in self._staged:
            os.replace(tmp, dest)
            done.append(dest)
        self._staged, self._made_dirs = [], []
        for path in self._remove_after:
            path.unlink(missing_ok=True)
        self._remove_after = []
        return done

    def discard(self) -> None:
        """Remove the staged temp files and the folders made for them (nothing of it is in place)."""
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        for folder in reversed(self._made_dirs):
            try:
                folder.rmdir()
            except OSError:  # not empty: something else lives there now
                log.debug("kept %s (not empty)", folder)
        self._staged, self._made_dirs, self._remove_after = [], [], []

    def _make_dirs(self, folder: Path) -> None:
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except OSError as exc:
                raise PrepareError(
                    f"cannot create the folder {d}: {exc.strerror}: fix its permissions"
                ) from exc
            self._made_dirs.append(d)
