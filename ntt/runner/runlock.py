"""One run at a time per run directory: an exclusive lock file holding the owner's PID.

A second run of the same config (same run directory) refuses at once and names the process holding the
lock, rather than waiting: two runs writing the same artifacts would both do all the work. The lock is
an OS file lock (`flock`), released by the kernel when its process exits in any way (kill -9 included),
so a lock left by a dead process is simply taken over; the PID in the file is information only.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from ntt.utils.errors import RunLockedError

LOCK_FILE = ".ntt.lock"


class RunLock:
    """Exclusive, non-blocking lock of a run directory (a context manager).

    Args:
        run_dir: the run directory (created if needed).
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise `RunLockedError` naming the holder's PID and host."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 256).decode("utf-8", "replace").strip() or "a process"
            os.close(fd)
            raise RunLockedError(
                f"run directory {self.path.parent} is in use by another ntt run ({holder}). Wait for it to "
                "finish (then rerun: finished work is reused), or choose another run_dir. The lock goes away "
                "by itself when that process exits."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Release the lock (the file stays; removing it would race with a run about to lock it)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
