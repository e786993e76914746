"""The output folder of ``ntt segment``: what it keeps so that a stopped run loses no work.

    OUT/predictions.jsonl   one line per finished (or failed) image, appended and flushed as the image
                            finishes: the resume state (Ctrl-C and kill -9 keep every finished image)
    OUT/predictions.json    COCO results    } merged from the lines in image order (at the end, and on
    OUT/dataset.json        images, classes } Ctrl-C or an error: the images finished so far); failed.json
    OUT/counts.csv          per image: detections per class (score >= --score-thr) and their total
    OUT/bank.ntt            the reference bank; OUT/bank_inputs.json: the key it was made under
    OUT/overlays/<name>.png, OUT/file_hashes.json (cached content digests of the inputs)

Listing a folder of images skips the overlays ntt wrote (:func:`skip_own_outputs`).

Each line carries its image's key (:func:`image_key`): the image file's name and content digest, the bank's
content (its class prototypes) and every setting that changes a detection (both backbones, checkpoints by
content, every inference parameter). A rerun keeps the lines made under the present keys and segments the
other images: an edited image is redone, a changed setting or bank redoes every image. This happens in the
same folder (the user's ``--out`` keeps its name and always describes the latest settings); the lines of
other settings stay in the file, ignored, and count again if those settings come back. The bank is kept
while the references (by content) and the settings it records are unchanged (:func:`bank_key`).

Every OS error while writing names its file (:func:`naming`): a write that fails for a full disk says only
``[Errno 28]``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from ntt import __version__
from ntt.utils.config import config_hash, to_plain
from ntt.utils.errors import UserError
from ntt.utils.files import FileDigests, sha256_file, write_bytes_atomic, write_json_atomic
from ntt.utils.identity import backbone_identity, drop_inert_matcher

__all__ = [
    "LINES_FILE",
    "BANK_FILE",
    "BANK_INPUTS_FILE",
    "OutputError",
    "naming",
    "check_writable",
    "OVERLAY_SUFFIX",
    "skip_own_outputs",
    "write_png_atomic",
    "settings_key",
    "image_key",
    "file_sha",
    "bank_key",
    "saved_bank",
    "record_bank",
    "read_lines",
    "open_lines",
    "append_line",
    "write_results",
    "counts_csv",
    "COUNTS_FILE",
]

log = logging.getLogger(__name__)

LINES_FILE = "predictions.jsonl"
COUNTS_FILE = "counts.csv"
BANK_FILE = "bank.ntt"
BANK_INPUTS_FILE = "bank_inputs.json"


class OutputError(UserError):
    """A file of the output folder could not be written (the message names it and says why)."""


def _reason(err: OSError) -> str:
    return f"[Errno {err.errno}] {err.strerror}" if err.errno is not None else str(err)


@contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Turn an ``OSError`` raised in the body into an :class:`OutputError` naming ``path``.

    Args:
        path: the file (or folder) the body writes.
    """
    try:
        yield
    except OSError as err:
        raise OutputError(f"cannot write {path}: {_reason(err)}") from err


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and make sure a file can be written in it (before any slow work).

    Raises:
        OutputError: naming the folder and what to do.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ntt-write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(
            f"output folder {folder} is not writable ({_reason(err)}): pass another --out, or fix its permissions"
        ) from err


OVERLAY_SUFFIX = ".overlay.png"  # what earlier examples of the Python API wrote beside each photo


def skip_own_outputs(files: list[Path], out: Path | None, folder: str | os.PathLike) -> list[Path]:
    """A folder's image files minus the overlays ntt wrote (``*.overlay.png``, and ``overlays/`` of the output
    folder ``out``), so that a second run does not segment the pictures of the first.

    Args:
        files: the folder's image files (``ntt.data.images.list_images``).
        out: the output folder of this run, or None.
        folder: the folder listed (for the log line).
    """
    overlays = (out / "overlays").resolve() if out is not None else None
    kept = [
        f
        for f in files
        if not f.name.lower().endswith(OVERLAY_SUFFIX)
        and not (overlays is not None and f.resolve().is_relative_to(overlays))
    ]
    if len(kept) < len(files):
        log.info("%s: %d overlay(s) written by ntt skipped", folder, len(files) - len(kept))
    return kept


def write_png_atomic(image, path: Path) -> None:
    """Save a ``PIL.Image`` as PNG through a temp file + rename (a killed run leaves no half picture)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    with naming(path):
        write_bytes_atomic(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------
# Keys


def file_sha(digests: FileDigests, path: Path) -> str | None:
    """The file's sha256, or None when it cannot be read (that image then fails and names why)."""
    try:
        return digests.sha256(path)
    except OSError:
        return None


def _backbone_identity(cfg, which: str, digests: FileDigests) -> dict[str, Any]:
    """``backbone.<which>`` with its checkpoint path replaced by the file's name and content digest."""
    return backbone_identity(cfg.backbone[which], lambda path: file_sha(digests, path), which=which)


def _bank_content(bank) -> str:
    """What of a bank changes a detection: its classes (ids, names) and prototypes (bytes)."""
    protos = bank.prototypes().detach().cpu().contiguous().numpy()
    return config_hash(
        "bank",
        list(bank.category_ids),
        list(bank.category_names),
        hashlib.sha256(protos.tobytes()).hexdigest(),
    )


def settings_key(seg, digests: FileDigests) -> str:
    """What every image's detections depend on besides the image: both backbones (checkpoints by content),
    every inference parameter of ``seg.params`` and the bank's content.

    Args:
        seg: the ``Segmenter``, with its bank.
        digests: content digests of the input files.
    """
    return config_hash(
        "segment",
        __version__,
        _backbone_identity(seg.cfg, "sam2", digests),
        _backbone_identity(seg.cfg, "dinov2", digests),
        seg.params.to_dict(),  # as asdict, less the fields added later while at their default
        _bank_content(seg.bank),
    )


def image_key(settings: str, image_sha: str | None, file_name: str) -> str:
    """One image's line key: the settings, the image file's content and its name in the results.

    Args:
        settings: :func:`settings_key`.
        image_sha: sha256 of the image file (None when unreadable).
        file_name: its ``file_name`` in dataset.json.
    """
    return config_hash("image", settings, image_sha, file_name)


def _content_id(item, digests: FileDigests) -> Any:
    """A file as (name, content digest); an array as (shape, dtype, content digest)."""
    import numpy as np

    if isinstance(item, (str, os.PathLike)):
        return [Path(item).name, file_sha(digests, Path(item))]
    arr = np.ascontiguousarray(np.asarray(item))
    return [list(arr.shape), str(arr.dtype), hashlib.sha256(arr.tobytes()).hexdigest()]


def bank_key(seg, specs: Iterable, digests: FileDigests) -> str:
    """What a bank built from ``specs`` depends on: the references (files by content, prompts, classes) and
    every config node the bank file records (``backbone``, ``proposer``, ``matcher``), so that a kept bank
    is the file a new build would write.

    Args:
        seg: the ``Segmenter`` (its config).
        specs: the ``ntt.app.references.RefSpec`` records.
        digests: content digests of the input files.
    """
    refs = [
        {
            "source": s.source,
            "class": s.cls,
            "image": _content_id(s.image, digests),
            "masks": None if s.masks is None else [_content_id(m, digests) for m in s.masks],
            "boxes": s.boxes,
            "points": s.points,
            "point_labels": s.point_labels,
            "category_id": s.category_id,
            "bboxes_xywh": s.bboxes_xywh,
            "json_size": s.json_size,
        }
        for s in specs
    ]
    cfg = seg.cfg
    return config_hash(
        "bank",
        __version__,
        refs,
        _backbone_identity(cfg, "sam2", digests),
        _backbone_identity(cfg, "dinov2", digests),
        to_plain(cfg.proposer),
        drop_inert_matcher(to_plain(cfg.matcher)),
    )


def saved_bank(out: Path, key: str) -> Path | None:
    """The folder's ``bank.ntt`` when it was made under ``key`` and is unchanged since; else None."""
    bank, inputs = out / BANK_FILE, out / BANK_INPUTS_FILE
    try:
        info = json.loads(inputs.read_text())
        return bank if info["key"] == key and sha256_file(bank) == info["bank_sha256"] else None
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: build it again
        return None


def record_bank(out: Path, key: str, specs: Iterable, digests: FileDigests) -> None:
    """Write ``bank_inputs.json``: the key ``bank.ntt`` was made under, its digest, the references' digests."""
    inputs = out / BANK_INPUTS_FILE
    with naming(inputs):
        write_json_atomic(
            inputs,
            {
                "key": key,
                "bank_sha256": sha256_file(out / BANK_FILE),
                "references": {s.source: file_sha(digests, Path(s.image)) for s in specs},
            },
        )


# ----------------------------------------------------------------------------------------------------------
# Lines


def read_lines(path: Path, keys: set[str]) -> tuple[dict[str, dict], int]:
    """Per key of ``keys``, the latest line made under it (a success supersedes a failure); and how many
    lines were made under other keys (other settings, older images: ignored)."""
    records: dict[str, dict] = {}
    stale = 0
    if not path.is_file():
        return records, stale
    with open(path) as f:
        for raw in f:
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:  # a line cut by a kill: that image is simply redone
                continue
            if not isinstance(rec, dict) or rec.get("key") not in keys:
                stale += isinstance(rec, dict)
                continue
            prev = records.get(rec["key"])
            if prev is None or not prev["ok"] or rec["ok"]:
                records[rec["key"]] = rec
    return records, stale


@contextmanager
def open_lines(path: Path) -> Iterator[IO[str]]:
    """The lines file opened for appending; a line cut by a kill is ended first, so the next one parses."""
    with naming(path):
        cut = path.is_file() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
        sink = open(path, "a")
    try:
        if cut:
            append_line(sink, path, None)
        yield sink
    finally:
        sink.close()


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def append_line(sink: IO[str], path: Path, record: dict | None) -> None:
    """Append one record (None: just end the current line) and flush it to the OS (kill -9 keeps it)."""
    with naming(path):
        sink.write("" if record is None else json.dumps(record))
        sink.write("\n")
        sink.flush()


# ----------------------------------------------------------------------------------------------------------
# The merged jsons


def write_results(
    out: Path, images: list[tuple[int, str, str]], records: dict[str, dict], bank, *, count_thr: float = 0.0
) -> dict:
    """``predictions.json``, ``dataset.json``, ``counts.csv`` and ``failed.json`` of the images that have a line.

    Args:
        out: the output folder.
        images: ``(image id, file_name, key)`` of every image, in id order.
        records: the lines by key (:func:`read_lines`).
        bank: the ``MemoryBank`` (its classes are the ``categories``).
        count_thr: ``counts.csv`` counts the detections scoring at least this.

    Returns:
        ``{"images", "detections", "failed", "missing"}``: images with results, detections, the failed
        records, and the images without a line (not reached).
    """
    results: list[dict] = []
    image_records: list[dict] = []
    failed: list[dict] = []
    missing = 0
    for img_id, file_name, key in images:
        rec = records.get(key)
        if rec is None:
            missing += 1
            continue
        if "width" in rec:  # an image that was read (a failed one too, as it is listed in the results' set)
            image_records.append(
                {"id": img_id, "file_name": file_name, "width": rec["width"], "height": rec["height"]}
            )
        if rec["ok"]:
            results.extend({**r, "image_id": img_id} for r in rec["results"])
        else:
            failed.append({"image_id": img_id, "file_name": file_name, **rec["failure"]})
    categories = [{"id": int(c), "name": n} for c, n in zip(bank.category_ids, bank.category_names)]
    for name, obj, indent in (
        ("predictions.json", results, None),
        ("dataset.json", {"images": image_records, "annotations": [], "categories": categories}, 1),
    ):
        with naming(out / name):
            write_json_atomic(out / name, obj, indent=indent)
    counts = out / COUNTS_FILE
    with naming(counts):
        write_bytes_atomic(counts, counts_csv(images, records, bank, count_thr).encode())
    failed_file = out / "failed.json"
    with naming(failed_file):
        if failed:
            write_json_atomic(failed_file, failed)
        elif failed_file.exists():
            failed_file.unlink()
    done = sum(1 for _, _, key in images if records.get(key, {}).get("ok"))
    return {"images": done, "detections": len(results), "failed": failed, "missing": missing}


def counts_csv(images: list[tuple[int, str, str]], records: dict[str, dict], bank, count_thr: float) -> str:
    """``counts.csv``: a header ``image, <class names in label order>, total``, then one row per segmented
    image (id order) with its detections per class scoring at least ``count_thr`` (a NaN score never counts).
    One column per class of the bank: ``C + 2`` columns whatever the images hold.

    Args:
        images: ``(image id, file_name, key)`` of every image, in id order.
        records: the lines by key (:func:`read_lines`).
        bank: the ``MemoryBank`` (its classes are the columns).
        count_thr: count detections with ``score >= count_thr``.
    """
    import csv

    column = {int(c): k for k, c in enumerate(bank.category_ids)}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", *bank.category_names, "total"])
    for _, file_name, key in images:
        rec = records.get(key)
        if rec is None or not rec["ok"]:
            continue
        row = [0] * len(column)
        for r in rec["results"]:
            if r["score"] >= count_thr:
                row[column[int(r["category_id"])]] += 1
        writer.writerow([file_name, *row, sum(row)])
    return buf.getvalue()
