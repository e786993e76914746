"""``ntt segment``: segment a folder of your own images from a few references, in one command.

    ntt segment --refs REFS --images PHOTOS --out OUT [--sam2 sam2.1_hiera_t] [--dinov2 vits14]
                [--device auto] [--bank OUT/bank.ntt] [--classes a,b] [--score-thr 0] [--max-draw 20]
                [--no-overlays] [--outputs masks|boxes] [--export-coco DIR]
                [hydra overrides: proposer=cpu_fast matcher.nms_thr=0.6 ...]

References (``--refs``): a folder of images with mask PNGs, a COCO json or a prompt json
(``ntt.app.references`` describes each).

Targets (``--images``): a folder of images (jpg, png, ...; no json needed: sizes are read from the files,
EXIF orientation applied; overlays ntt wrote are skipped) or image files. Output in ``--out``:
``predictions.json`` (COCO results, RLE masks), ``dataset.json`` (the COCO ``images`` and ``categories`` the
results refer to), ``overlays/<name>.png`` (each the size of its image), ``bank.ntt`` (the reference bank:
reuse it with ``--bank``; ``ntt bank`` shows and edits it), ``counts.csv`` (detections per class per image,
scoring >= ``--score-thr``), and ``failed.json`` when some images could not be segmented (the others are
kept; exit status 1). ``--outputs boxes``: boxes, labels and scores only (bbox results, no masks: faster on
large images). ``--export-coco DIR``: also a COCO dataset folder of the images and their detections
(``ntt.app.cocodataset``) for FiftyOne or CVAT.

Nothing finished is lost: each image's result is appended to ``predictions.jsonl`` as it finishes, and a
rerun of the same command keeps the bank and those results and segments only the rest (``ntt.app.outputs``
says what decides it). Ctrl-C writes the jsons of the images done so far and exits with status 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ntt.app.outputs import (
    BANK_FILE,
    LINES_FILE,
    append_line,
    bank_key,
    check_writable,
    file_sha,
    image_key,
    naming,
    open_lines,
    read_lines,
    record_bank,
    saved_bank,
    settings_key,
    skip_own_outputs,
    write_png_atomic,
    write_results,
)
from ntt.app.references import add_references, load_reference_specs
from ntt.backbones.checkpoints import MissingCheckpointError, check_checkpoints
from ntt.bank_edit import subset
from ntt.utils.config import config_hash
from ntt.utils.files import CACHE_FILE, FileDigests

__all__ = ["segment_folder", "main"]

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Segmenting a folder


@dataclass
class _Image:
    """One target image: its id in the results, file, ``file_name`` and line key."""

    id: int
    path: Path
    file_name: str
    key: str


def segment_folder(
    seg,
    images: list[Path],
    out_dir: str | os.PathLike,
    *,
    image_root: Path | None = None,
    overlays: bool = True,
    score_thr: float = 0.0,
    max_draw: int | None = 20,
    outputs: str = "masks",
) -> dict[str, Any]:
    """Segment images, writing ``predictions.json``, ``dataset.json``, overlays and ``failed.json``.

    Resumes (``ntt.app.outputs``): each image's result is appended to ``predictions.jsonl`` as it finishes,
    and the images that already have a line made with this bank and these settings are not segmented again
    (their overlays are redrawn from the line when missing or drawn with other ``score_thr`` / ``max_draw``).
    The jsons are merged from the lines at the end, and also when stopped by Ctrl-C or an error. A failing
    image is recorded (with its error) and the others go on; a rerun retries it.

    Args:
        seg: a ``Segmenter`` with references or a loaded bank.
        images: image files (ids 1..N in this order).
        out_dir: output folder.
        image_root: folder the ``file_name`` entries are relative to (default: each file's parent).
        overlays: write ``overlays/<name>.png``.
        score_thr: overlays draw detections scoring at least this.
        max_draw: overlays draw at most this many detections (best first).
        outputs: ``masks`` or ``boxes`` (bbox results only; part of each line's key).

    Returns:
        ``{"images", "detections", "failed", "missing", "reused", "segmented"}``: counts and the failed list.
    """
    out = Path(out_dir)
    with naming(out):
        out.mkdir(parents=True, exist_ok=True)
        if overlays:
            (out / "overlays").mkdir(exist_ok=True)
    if seg.bank is None:
        seg.build()
    digests = FileDigests(out / CACHE_FILE)
    settings = settings_key(seg, digests)
    if outputs != "masks":  # a masks run's keys stay those of before (its lines are kept)
        settings = config_hash("outputs", settings, outputs)
    targets = []
    for img_id, path in enumerate(images, start=1):
        rel = path.relative_to(image_root).as_posix() if image_root is not None else path.name
        targets.append(_Image(img_id, path, rel, image_key(settings, file_sha(digests, path), rel)))
    lines = out / LINES_FILE
    entries = [(t.id, t.file_name, t.key) for t in targets]  # what write_results lists, in id order
    done, stale = read_lines(lines, {t.key for t in targets})
    if stale:
        log.info("%s: %d line(s) of other settings, banks or older images ignored", lines, stale)
    todo = [t for t in targets if not done.get(t.key, {}).get("ok")]
    if len(todo) < len(targets):
        log.info(
            "%d of %d image(s) already segmented with this bank and these settings (%s): kept; segmenting %d",
            len(targets) - len(todo),
            len(targets),
            lines,
            len(todo),
        )
    pictures = _overlay_files(out / "overlays", targets) if overlays else None
    drawn = [score_thr, max_draw] if overlays else None  # recorded in each line: a rerun redraws others
    try:
        with open_lines(lines) as sink:
            if pictures is not None:
                _redraw_overlays(seg, targets, done, pictures, drawn, sink, lines)
            _segment(seg, todo, pictures, drawn, sink, lines, outputs)
    except BaseException as stop:
        _merge_what_is_done(out, lines, entries, seg.bank, stop, score_thr)
        raise
    summary = write_results(
        out, entries, read_lines(lines, {t.key for t in targets})[0], seg.bank, count_thr=score_thr
    )
    with naming(out / CACHE_FILE):
        digests.save()
    failed = summary["failed"]
    log.info(
        "%d images, %d detections -> %s%s",
        summary["images"],
        summary["detections"],
        out,
        f"; {len(failed)} failed (see failed.json)" if failed else "",
    )
    return {**summary, "reused": len(targets) - len(todo), "segmented": len(todo)}


def _overlay_files(folder: Path, targets: list[_Image]) -> dict[int, Path]:
    """Overlay file per image id: ``<stem>.png``, made unique with the image id for equal stems."""
    files: dict[int, Path] = {}
    stems: dict[str, int] = {}
    for t in targets:
        stem = t.path.stem
        stems[stem] = stems.get(stem, 0) + 1
        files[t.id] = folder / (f"{stem}.png" if stems[stem] == 1 else f"{stem}_{t.id}.png")
    return files


def _segment(
    seg,
    todo: list[_Image],
    pictures: dict[int, Path] | None,
    drawn,
    sink,
    lines: Path,
    outputs: str = "masks",
) -> None:
    """Segment the images to do, appending each one's line (after its overlay) as it finishes."""
    sizes = _read_sizes(todo, sink, lines)  # unreadable images are recorded now, as failures
    readable = [t for t in todo if t.id in sizes]
    if not readable:
        return
    results = seg.iter_predict([t.path for t in readable], errors="yield", outputs=outputs)
    for inst, t in zip(results, readable):  # results first: the generator ends (its bar completes)
        if isinstance(inst, Exception):  # one bad image must not lose the others
            log.error("image %s failed: %s (recorded in failed.json; the others go on)", t.path, inst)
            error = {
                "error": f"{type(inst).__name__}: {inst}",
                "traceback": "".join(traceback.format_exception(inst)),
            }
            record = _line(t, False, sizes[t.id], failure=error)
        else:
            if pictures is not None:
                write_png_atomic(inst.overlay(score_thr=drawn[0], max_instances=drawn[1]), pictures[t.id])
            record = _line(t, True, sizes[t.id], results=inst.to_coco(t.id), overlay=drawn)
        append_line(sink, lines, record)  # a line means the image is complete, overlay included


def _redraw_overlays(seg, targets, done: dict[str, dict], pictures, drawn, sink, lines: Path) -> None:
    """Kept images whose overlay is missing or was drawn with other settings: drawn again from their line
    (the same picture as drawing their Instances), and the line appended again with the new settings."""
    from ntt.app.visualize import draw_results
    from ntt.data.images import read_image

    bank = seg.bank
    for t in targets:
        rec = done.get(t.key)
        if rec is None or not rec["ok"] or (rec.get("overlay") == drawn and pictures[t.id].is_file()):
            continue
        picture = draw_results(
            read_image(t.path)[0],
            rec["results"],
            bank.category_names,
            bank.category_ids,
            score_thr=drawn[0],
            max_instances=drawn[1],
        )
        write_png_atomic(picture, pictures[t.id])
        append_line(sink, lines, {**rec, "overlay": drawn})


def _line(t: _Image, ok: bool, size: tuple[int, int] | None, **fields: Any) -> dict[str, Any]:
    """An image's line: its key, ``file_name``, success, size (when it was read) and ``fields``."""
    line: dict[str, Any] = {"key": t.key, "file_name": t.file_name, "ok": ok}
    if size is not None:
        line["width"], line["height"] = size
    return {**line, **fields}


def _read_sizes(todo: list[_Image], sink, lines: Path) -> dict[int, tuple[int, int]]:
    """The upright size of each readable image, by id; an unreadable one gets its failure line."""
    from ntt.data.images import read_image

    sizes = {}
    for t in todo:
        try:
            pil, _ = read_image(t.path)
        except (OSError, ValueError) as err:
            log.error("image %s cannot be read: %s (recorded in failed.json)", t.path, err)
            append_line(sink, lines, _line(t, False, None, failure={"error": f"{type(err).__name__}: {err}"}))
            continue
        sizes[t.id] = pil.size
    return sizes


def _merge_what_is_done(
    out: Path, lines: Path, entries: list, bank, stop: BaseException, count_thr: float = 0.0
) -> None:
    """On Ctrl-C or an error: the jsons of the images finished so far (best effort: the disk may be full)."""
    try:
        records = read_lines(lines, {key for *_, key in entries})[0]
        summary = write_results(out, entries, records, bank, count_thr=count_thr)
    except Exception as err:  # noqa: BLE001 - the original error is the one to report
        log.error("could not write the results of the finished images: %s", err)
        return
    if isinstance(stop, KeyboardInterrupt):
        log.warning(
            "interrupted: %d of %d image(s) done and kept (%s, predictions.json, dataset.json); rerun the "
            "same command to segment the other %d",
            len(entries) - summary["missing"],
            len(entries),
            lines,
            summary["missing"],
        )


def _target_images(items: list[str], out: Path) -> tuple[list[Path], Path | None]:
    from ntt.data.images import list_images

    files = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            files.extend(skip_own_outputs(list_images(p), out, p))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--images: {p} is neither an image file nor a folder")
    if not files:
        raise ValueError(f"--images {' '.join(items)}: no image files besides the overlays ntt wrote")
    return files, Path(items[0]) if len(items) == 1 and Path(items[0]).is_dir() else None


OFFLINE_HINT = (
    "  no weights at hand? `--sam2 tiny_random --dinov2 tiny_random` gives an offline plumbing run "
    "(random weights: the masks and scores mean nothing)"
)

EPILOG = """\
references (--refs), one of:
  a folder       one sub-folder per class, a mask PNG beside each image (one instance per mask):
                   refs/dog/1.jpg + refs/dog/1.mask.png (or refs/images/dog/1.jpg + refs/masks/dog/1.png)
  a COCO json    images, annotations (polygons, RLE or boxes only), categories; images under --ref-images:
                   --refs refs/instances.json --ref-images refs/images
  a prompt json  boxes (x1, y1, x2, y2), clicks or mask files per image, paths relative to the json:
                   {"references": [{"image": "a.jpg", "class": "dog", "boxes": [[10, 20, 200, 240]]}]}

Extra KEY=VALUE arguments are Hydra overrides of conf/ (proposer=cpu_fast, matcher.nms_thr=0.6,
paths.checkpoints=/models ...). No checkpoints yet: `ntt download sam2.1_hiera_t dinov2_vits14`, or
`--sam2 tiny_random --dinov2 tiny_random` for an offline plumbing run (random weights, no accuracy).

Stopped (Ctrl-C, kill, full disk)? Rerun the same command: the finished images are kept (OUT/predictions.jsonl)
and only the others are segmented; an edited image is redone, a changed setting redoes every image.
"""


def main(argv: list[str] | None = None) -> int:
    """``ntt segment``: references + a folder of images -> COCO results json and overlay PNGs."""
    ap = argparse.ArgumentParser(
        prog="ntt segment",
        description="Segment a folder of your own images from a few references, in one command.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--refs", help="references: a folder (class sub-folders with mask PNGs), a COCO json or a prompt json"
    )
    ap.add_argument(
        "--ref-images", default=None, help="image folder of a COCO reference json (default: its folder)"
    )
    ap.add_argument("--bank", default=None, help="a saved reference bank (bank.ntt) instead of --refs")
    ap.add_argument(
        "--classes",
        default=None,
        help="look for these classes of the bank only, comma-separated (a,b); bank.ntt keeps them all",
    )
    ap.add_argument("--images", nargs="+", required=True, help="a folder of images, or image files")
    ap.add_argument("--out", required=True, help="output folder (a rerun resumes in it)")
    ap.add_argument("--sam2", default="sam2.1_hiera_t", help="conf/backbone/sam2 option (sam2.1_hiera_t)")
    ap.add_argument("--dinov2", default="vits14", help="conf/backbone/dinov2 option (vits14)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1")
    ap.add_argument(
        "--score-thr", type=float, default=0.0, help="overlays and counts.csv: detections scoring >= this"
    )
    ap.add_argument(
        "--max-draw", type=int, default=20, help="overlays: at most this many detections, best first"
    )
    ap.add_argument("--no-overlays", action="store_true", help="write no overlay PNGs")
    ap.add_argument(
        "--outputs",
        choices=("masks", "boxes"),
        default="masks",
        help="masks (RLE masks + boxes) or boxes (boxes, labels, scores only: faster on large images)",
    )
    ap.add_argument(
        "--export-coco",
        default=None,
        metavar="DIR",
        help="also write a COCO dataset folder (DIR/images, DIR/annotations/instances_default.json) that "
        "FiftyOne and CVAT import",
    )
    args, rest = ap.parse_known_args(argv)
    bad = [r for r in rest if "=" not in r]
    if bad:
        ap.error(f"unrecognised arguments {bad} (extra arguments must be Hydra overrides KEY=VALUE)")
    if (args.refs is None) == (args.bank is None):
        ap.error("give exactly one of --refs or --bank")
    from ntt.app.segmenter import Segmenter
    from ntt.utils.errors import UserError

    out = Path(args.out)
    try:
        images, root = _target_images(args.images, out)
        check_writable(out)  # before any model is built or reference encoded
        if args.bank is not None:
            seg = Segmenter.load(args.bank, device=args.device, overrides=rest)
            check_checkpoints([seg.cfg.backbone.sam2, seg.cfg.backbone.dinov2])  # all missing files at once
            _ = seg.sam2, seg.dinov2  # a missing checkpoint fails now, not on every image
        else:
            specs = load_reference_specs(args.refs, args.ref_images)
            seg = Segmenter.from_config(
                sam2=args.sam2, dinov2=args.dinov2, device=args.device, overrides=rest
            )
            try:
                check_checkpoints(
                    [seg.cfg.backbone.sam2, seg.cfg.backbone.dinov2]
                )  # all missing files at once
                _ = seg.sam2, seg.dinov2  # both models are needed: a missing checkpoint fails now, not midway
            except MissingCheckpointError as err:
                raise MissingCheckpointError(f"{err}\n{OFFLINE_HINT}") from err
            seg = _bank_for(seg, specs, out)
        if args.classes is not None:  # the subset's prototypes enter every image's key: other classes redo
            seg.use_bank(subset(seg.bank, _class_list(args.classes), what="--classes"))
        summary = segment_folder(
            seg,
            images,
            out,
            image_root=root,
            overlays=not args.no_overlays,
            score_thr=args.score_thr,
            max_draw=args.max_draw,
            outputs=args.outputs,
        )
        if args.export_coco is not None:
            from ntt.app.cocodataset import export_segment_folder

            export_segment_folder(out, images, root, Path(args.export_coco))
    except KeyboardInterrupt:  # segment_folder has written what is done and said so
        return 130
    except UserError:
        raise
    except (OSError, ValueError) as err:  # a file or value the API refused: the user's to fix
        raise UserError(str(err)) from err
    print(
        f"{summary['images']} images, {summary['detections']} detections -> {out}/predictions.json"
        + ("" if args.no_overlays else f", overlays in {out}/overlays")
        + ("" if args.export_coco is None else f", COCO dataset in {args.export_coco}")
    )
    return 1 if summary["failed"] else 0


def _class_list(text: str) -> list[str]:
    """``--classes a,b``: the names, stripped (a class name with a comma cannot be chosen here)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _bank_for(seg, specs, out: Path):
    """The segmenter with the folder's bank when it was made from these references and settings (kept),
    else with a new bank encoded from them and saved (``bank.ntt`` + ``bank_inputs.json``)."""
    from ntt.bank import MemoryBank

    digests = FileDigests(out / CACHE_FILE)
    key = bank_key(seg, specs, digests)
    kept = saved_bank(out, key)
    if kept is not None:
        log.info("reference bank %s: made from these references and settings, kept (not encoded again)", kept)
        seg.use_bank(MemoryBank.load(kept))
        return seg
    add_references(seg, specs)
    seg.build()
    with naming(out / BANK_FILE):
        seg.save(out / BANK_FILE)
    record_bank(out, key, specs, digests)
    with naming(out / CACHE_FILE):
        digests.save()
    return seg
