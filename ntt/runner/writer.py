"""Per-image result lines encoded and written off the critical path, in image order.

A test loop hands each finished image to :class:`ResultWriter` as a job: a function that builds the image's
JSONL record (``ntt.runner.lines.success_line``: RLE encoding of the full-resolution masks, the trace file) and
the file it goes to. With ``async_write`` a background thread runs the jobs in submission order, encodes,
appends the line and flushes, while the loop already runs the next image; the queue holds at most
``depth`` jobs (each keeps one image's detections alive), so memory stays bounded and the loop waits when
the writer falls behind. Without it, the job runs at once in the loop's thread (same bytes either way).

An exception while building a record becomes that image's failure line (``on_error``). Leaving the ``with``
block (normally, on an exception or on KeyboardInterrupt) drains the queue and stops the thread, so every
image that finished is on disk; a kill -9 loses at most the queued lines, and a rerun redoes those images.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import IO, Any

__all__ = ["ResultWriter"]

log = logging.getLogger(__name__)

Job = tuple[IO[str], Callable[[], dict], Callable[[BaseException], dict]]
_STOP = object()


class ResultWriter:
    """Writes per-image records to their JSONL files, in submission order.

    Args:
        async_write: encode and write in a background thread (``io.async_write``); else in the caller.
        depth: jobs the background queue holds at most (``io.write_queue``).
        fail_fast: an exception while building a record is raised in the loop (at the next ``submit`` or
            at the end) instead of becoming the image's failure line.
    """

    def __init__(self, *, async_write: bool = True, depth: int = 2, fail_fast: bool = False) -> None:
        if int(depth) < 1:
            raise ValueError(f"io.write_queue={depth}: the writer needs a queue of at least 1 image")
        self.async_write = bool(async_write)
        self.fail_fast = bool(fail_fast)
        self.busy_s = 0.0  # seconds spent building and writing records (in whichever thread ran them)
        self._queue: queue.Queue = queue.Queue(maxsize=int(depth))
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> ResultWriter:
        if self.async_write:
            self._thread = threading.Thread(target=self._drain, name="ntt-result-writer", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if exc_type is None:
            self._raise_pending()

    def submit(
        self, sink: IO[str], make: Callable[[], dict], on_error: Callable[[BaseException], dict]
    ) -> None:
        """Queue one image's record (waits while the queue is full).

        Args:
            sink: the open JSONL file the line is appended to.
            make: builds the record (runs in the writer thread when asynchronous).
            on_error: builds the failure record from an exception raised by ``make``.
        """
        self._raise_pending()
        if self._thread is None:
            self._run((sink, make, on_error))
        else:
            self._queue.put((sink, make, on_error))

    def write_now(self, sink: IO[str], record: dict) -> None:
        """Queue an already-built record (a failure found by the loop), keeping the order."""
        self.submit(sink, lambda: record, _reraise)

    def close(self) -> None:
        """Write every queued record and stop the thread (idempotent)."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _drain(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            self._run(job)

    def _run(self, job: Job) -> None:
        sink, make, on_error = job
        t0 = time.perf_counter()
        try:
            try:
                record = make()
            except Exception as exc:  # noqa: BLE001 - one image's encoding failure must not lose the others
                if self.fail_fast:
                    raise
                record = on_error(exc)
            sink.write(json.dumps(record) + "\n")
            sink.flush()
        except BaseException as exc:  # noqa: BLE001 - in the writer thread: kept for the loop, which raises it
            if self._thread is None:
                raise
            if self._error is None:
                self._error = exc
            log.error("result writer: %s: %s", type(exc).__name__, exc)
        finally:
            self.busy_s += time.perf_counter() - t0


def _reraise(exc: BaseException) -> Any:
    raise exc
