"""Where a test loop's time goes: per-section seconds, accumulated cheaply, never changing a result.

A loop makes a :class:`SectionTimer` current (``with timer.active():``); code on the per-image path marks its
expensive parts with ``with section("dinov2"):``. With no current timer (``ntt segment``, the API, the
benchmarks) a section is a no-op. On CUDA the timer synchronises the device at both ends of a section, so the
seconds belong to that section and not to whichever later call waits for the kernels (a few synchronisations
per image; switched off with ``io.timing=false``). Timers are per thread (a ``ContextVar``): the background
result writer's time is counted separately (``ntt.runner.writer.ResultWriter.busy_s``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar

__all__ = ["MODEL_SECTIONS", "SectionTimer", "section", "section_report", "timing"]

# the model sections: everything else is "outside the models" (issue 10: < 10% at the paper's settings)
MODEL_SECTIONS = ("dinov2", "sam2_encoder", "sam2_decoder")

_current: ContextVar[SectionTimer | None] = ContextVar("ntt_section_timer", default=None)


class SectionTimer:
    """Seconds per named section, summed over a loop.

    Args:
        device: the run's device; on ``cuda*`` each section is bracketed by ``torch.cuda.synchronize``.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.seconds: dict[str, float] = {}
        self.device = str(device)
        self._sync = self.device.startswith("cuda")

    def synchronize(self) -> None:
        """Wait for the device's queued kernels (CUDA only; nothing on CPU)."""
        if self._sync:
            import torch

            torch.cuda.synchronize(self.device)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to section ``name``."""
        self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)

    @contextmanager
    def active(self) -> Iterator[SectionTimer]:
        """Make this timer the one :func:`section` adds to, in this thread, for the ``with`` block."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)


def timing(timer: SectionTimer | None):
    """``timer.active()``, or a do-nothing context when timing is off (``timer`` None)."""
    return nullcontext() if timer is None else timer.active()


@contextmanager
def section(name: str) -> Iterator[None]:
    """Time the ``with`` block into the current :class:`SectionTimer` (no-op when there is none)."""
    timer = _current.get()
    if timer is None:
        yield
        return
    timer.synchronize()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timer.synchronize()
        timer.add(name, time.perf_counter() - t0)


def section_report(seconds: dict[str, float], total: float, images: int) -> dict[str, object]:
    """Seconds per image per section, ``other`` (the rest of ``total``) and ``outside_models_fraction``.

    Args:
        seconds: summed seconds per measured section (``SectionTimer.seconds``).
        total: the loop's summed wall seconds over its images (the sections are parts of it).
        images: images the loop processed.
    """
    n = max(1, int(images))
    per_image = {k: v / n for k, v in seconds.items()}
    per_image["other"] = max(0.0, total - sum(seconds.values())) / n
    models = sum(seconds.get(k, 0.0) for k in MODEL_SECTIONS)
    return {
        "sections_seconds_per_image": per_image,
        "outside_models_fraction": (total - models) / total if total > 0 else None,
    }
