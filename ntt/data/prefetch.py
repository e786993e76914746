"""Test images decoded and resized ahead of the models, in DataLoader worker processes.

The test loop (``ntt.runner.testloop``) reads its images through
:func:`prefetch_images`: a ``torch.utils.data.DataLoader`` over the images still to do (``batch_size=None``,
order kept) whose item is :func:`ntt.data.images.load_test_image` exactly as the loops called it before
(decode, EXIF handling, size check against the json, stretch to 1024: the same bytes, in any process).
With ``num_workers > 0`` the next images are decoded in worker processes while the models run on the
current one (``prefetch_factor`` each); ``num_workers = 0`` does everything in this process, when asked.

A failure to read an image never raises in a worker: the item carries the error text and the traceback
(and the exception itself when it can be pickled), so the loop records it as that image's failure with its
path, exactly like a failure in the loop. Log records of a worker (e.g. the EXIF-orientation warning) are
sent back with the item and re-emitted by this process's loggers (so they reach the run's log file once).
Workers are forked (the platform default), run torch with one thread (DataLoader's setting) and never
touch CUDA; on CUDA the loaded images come through pinned memory.
"""

from __future__ import annotations

import logging
import pickle
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from ntt.utils.config import resolve_num_workers  # re-exported: the loop's worker count

__all__ = ["ImageSpec", "LoadedImage", "TestImageDataset", "prefetch_images", "resolve_num_workers"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSpec:
    """One test image to load.

    Attributes:
        img_id: the json's image id.
        path: the image file.
        height: the json's ``height`` (the decoded size must match).
        width: the json's ``width``.
    """

    img_id: int
    path: str
    height: int
    width: int


@dataclass
class LoadedImage:
    """One loaded test image, or why it could not be loaded.

    Attributes:
        img_id: the json's image id.
        image: ``[3, 1024, 1024]`` float32 in [0, 1] (None on failure); on the loop's device once yielded
            by :func:`prefetch_images`.
        error: ``"<ExceptionType>: <message>"`` of the failure (None on success).
        traceback: the failure's formatted traceback (from the process that loaded it).
        exception: the exception itself when it could be sent between processes (for ``fail_fast``).
        records: ``(logger name, level, message)`` logged while loading in a worker process.
        wait_s: seconds the loop waited for this image (filled in by :func:`prefetch_images`).
        semantic: FSOD-VFM's DINOv2 input of the original image (``[3, S, S]``, method.md §5.13), when the
            loader was asked for it; None otherwise.
    """

    img_id: int
    image: torch.Tensor | None = None
    error: str | None = None
    traceback: str | None = None
    exception: BaseException | None = None
    records: list[tuple[str, int, str]] = field(default_factory=list)
    wait_s: float = 0.0
    semantic: torch.Tensor | None = None

    def pin_memory(self) -> LoadedImage:
        """A copy with the image in pinned memory (DataLoader's pin-memory thread calls this on CUDA)."""
        return self if self.image is None else replace(self, image=self.image.pin_memory())

    def raise_error(self) -> None:
        """Raise the load failure (the original exception when it came back, else a RuntimeError)."""
        if self.exception is not None:
            raise self.exception
        raise RuntimeError(self.error)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


class TestImageDataset(torch.utils.data.Dataset):
    """Map-style dataset: item ``k`` is :class:`LoadedImage` of ``specs[k]`` (never raises).

    Args:
        specs: the images, in loop order.
        size: output side (1024 for SAM2).
        apply_exif: ``dataset.exif_orientation``.
        semantic_input: ``(long_side, input_size)``: also load FSOD-VFM's DINOv2 input of each image.
        resize: how the image is stretched to ``size`` (``backbone.sam2.input_resize``).
    """

    def __init__(
        self,
        specs: list[ImageSpec],
        *,
        size: int = 1024,
        apply_exif: bool = False,
        semantic_input: tuple[int, int] | None = None,
        resize: str = "pil_bicubic",
    ) -> None:
        self.specs = list(specs)
        self.size = int(size)
        self.resize = resize
        self.apply_exif = bool(apply_exif)
        self.semantic_input = semantic_input

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, k: int) -> LoadedImage:
        in_worker = torch.utils.data.get_worker_info() is not None
        if not in_worker:
            return self._load(self.specs[k])
        # in a worker: keep ntt's log records for the main process instead of printing them from here
        ntt_logger = logging.getLogger("ntt")
        collect, propagate = _Collect(), ntt_logger.propagate
        ntt_logger.addHandler(collect)
        ntt_logger.propagate = False
        try:
            item = self._load(self.specs[k])
        finally:
            ntt_logger.removeHandler(collect)
            ntt_logger.propagate = propagate
        item.records = collect.records
        if item.exception is not None:
            try:
                pickle.dumps(item.exception)
            except Exception:  # noqa: BLE001 - an exception that cannot travel: its text and traceback do
                item.exception = None
        return item

    def _load(self, spec: ImageSpec) -> LoadedImage:
        from ntt.data import images  # looked up per call: tests replace images.load_test_image

        try:
            image = images.load_test_image(
                spec.path,
                self.size,
                height=spec.height,
                width=spec.width,
                apply_exif=self.apply_exif,
                resize=self.resize,
            )
            semantic = None
            if self.semantic_input is not None:  # FSOD-VFM's DINOv2 input: from the original image
                semantic = images.load_long_side_input(
                    spec.path, *self.semantic_input, apply_exif=self.apply_exif
                )
        except Exception as exc:  # one bad image must not lose the others: it becomes that image's failure
            return LoadedImage(
                spec.img_id,
                error=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc(),
                exception=exc,
            )
        return LoadedImage(spec.img_id, image=image, semantic=semantic)


def _as_is(item: LoadedImage) -> LoadedImage:
    return item


def prefetch_images(
    specs: list[ImageSpec],
    *,
    device: str,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    apply_exif: bool = False,
    size: int = 1024,
    semantic_input: tuple[int, int] | None = None,
    resize: str = "pil_bicubic",
) -> Iterator[LoadedImage]:
    """Yield every image of ``specs`` in order, loaded ahead by ``num_workers`` processes, on ``device``.

    The worker processes start when this generator is first advanced and stop when it is exhausted or
    closed: start the loop's threads (the result writer) after the first item, so workers never fork a
    process with a busy thread.

    Args:
        specs: the images, in loop order.
        device: where the images go (pinned memory + non-blocking copy on CUDA).
        num_workers: decoding processes; 0 = in this process, as each image is needed.
        prefetch_factor: images each worker keeps ready.
        apply_exif: ``dataset.exif_orientation``.
        size: output side.
        semantic_input: ``(long_side, input_size)``: also load FSOD-VFM's DINOv2 input of each image.
        resize: how each image is stretched to ``size`` (``backbone.sam2.input_resize``).
    """
    if not specs:
        return
    workers = min(int(num_workers), len(specs))
    cuda = str(device).startswith("cuda")
    loader = torch.utils.data.DataLoader(
        TestImageDataset(
            specs, size=size, apply_exif=apply_exif, semantic_input=semantic_input, resize=resize
        ),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        prefetch_factor=int(prefetch_factor) if workers > 0 else None,
        pin_memory=cuda and workers > 0,
        collate_fn=_as_is,
    )
    it = iter(loader)
    try:
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            for name, level, message in item.records:
                logging.getLogger(name).log(level, "%s", message)
            if item.image is not None:
                item.image = item.image.to(device, non_blocking=cuda)
            if item.semantic is not None:
                item.semantic = item.semantic.to(device, non_blocking=cuda)
            item.wait_s = time.perf_counter() - t0
            yield item
    finally:
        del it  # stops the worker processes now, also when the loop ends early
