"""``ntt segment``: segment a folder of your own images from a few references, in one command.

    ntt segment --refs REFS --images PHOTOS --out OUT [--sam2 sam2.1_hiera_t] [--dinov2 vits14]
                [--device auto] [--bank OUT/bank.ntt] [--score-thr 0] [--max-draw 20] [--no-overlays]
                [hydra overrides: proposer=cpu_fast matcher.nms_thr=0.6 ...]

References (``--refs``): a folder of images with mask PNGs, a COCO json or a prompt json
(``ntt.app.references`` describes each).

Targets (``--images``): a folder of images (jpg, png, ...; no json needed: sizes are read from the files,
EXIF orientation applied) or image files. Output in ``--out``: ``predictions.json`` (COCO results, RLE
masks), ``dataset.json`` (the COCO ``images`` and ``categories`` the results refer to), ``overlays/<name>.png``
(each the size of its image), ``bank.ntt`` (the reference bank: reuse it with ``--bank``), and
``failed.json`` when some images could not be segmented (the others are kept; exit status 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import traceback
from pathlib import Path
from typing import Any

from ntt.app.references import add_references, load_reference_specs
from ntt.utils.files import write_json_atomic

__all__ = ["segment_folder", "main"]

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Segmenting a folder


def segment_folder(
    seg,
    images: list[Path],
    out_dir: str | os.PathLike,
    *,
    image_root: Path | None = None,
    overlays: bool = True,
    score_thr: float = 0.0,
    max_draw: int | None = 20,
) -> dict[str, Any]:
    """Segment images, writing ``predictions.json``, ``dataset.json``, overlays and ``failed.json``.

    A failing image is recorded (with its error) and the others go on.

    Args:
        seg: a ``Segmenter`` with references or a loaded bank.
        images: image files (ids 1..N in this order).
        out_dir: output folder.
        image_root: folder the ``file_name`` entries are relative to (default: each file's parent).
        overlays: write ``overlays/<name>.png``.
        score_thr: overlays draw detections scoring at least this.
        max_draw: overlays draw at most this many detections (best first).

    Returns:
        ``{"images", "detections", "failed"}`` counts and the failed list.
    """
    from ntt.data.images import read_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if overlays:
        (out / "overlays").mkdir(exist_ok=True)
    if seg.bank is None:
        seg.build()
    results: list[dict] = []
    image_records: list[dict] = []
    failed: list[dict] = []
    readable: list[tuple[int, Path]] = []
    for img_id, path in enumerate(images, start=1):
        rel = path.relative_to(image_root).as_posix() if image_root is not None else path.name
        try:
            pil, _ = read_image(path)
        except (OSError, ValueError) as err:
            log.error("image %s cannot be read: %s (recorded in failed.json)", path, err)
            failed.append({"image_id": img_id, "file_name": rel, "error": f"{type(err).__name__}: {err}"})
            continue
        image_records.append({"id": img_id, "file_name": rel, "width": pil.size[0], "height": pil.size[1]})
        readable.append((img_id, path))
    names = {}
    stems: dict[str, int] = {}
    for img_id, path in readable:  # unique overlay names even for equal stems in different folders
        stem = path.stem
        stems[stem] = stems.get(stem, 0) + 1
        names[img_id] = stem if stems[stem] == 1 else f"{stem}_{img_id}"

    for (img_id, path), inst in zip(readable, seg.iter_predict([p for _, p in readable], errors="yield")):
        if isinstance(inst, Exception):  # one bad image must not lose the others
            log.error("image %s failed: %s (recorded in failed.json; the others go on)", path, inst)
            failed.append(
                {
                    "image_id": img_id,
                    "file_name": path.name,
                    "error": f"{type(inst).__name__}: {inst}",
                    "traceback": "".join(traceback.format_exception(inst)),
                }
            )
            continue
        results.extend(inst.to_coco(img_id))
        if overlays:
            inst.overlay(score_thr=score_thr, max_instances=max_draw).save(
                out / "overlays" / f"{names[img_id]}.png"
            )
    bank = seg.bank
    categories = [{"id": int(c), "name": n} for c, n in zip(bank.category_ids, bank.category_names)]
    write_json_atomic(out / "predictions.json", results, indent=None)
    write_json_atomic(
        out / "dataset.json", {"images": image_records, "annotations": [], "categories": categories}
    )
    if failed:
        write_json_atomic(out / "failed.json", failed)
    elif (out / "failed.json").exists():
        (out / "failed.json").unlink()
    log.info(
        "%d images, %d detections -> %s%s",
        len(images) - len(failed),
        len(results),
        out,
        f"; {len(failed)} failed (see failed.json)" if failed else "",
    )
    return {"images": len(images) - len(failed), "detections": len(results), "failed": failed}


def _target_images(items: list[str]) -> tuple[list[Path], Path | None]:
    from ntt.data.images import list_images

    if len(items) == 1 and Path(items[0]).is_dir():
        return list_images(items[0]), Path(items[0])
    files = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            files.extend(list_images(p))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--images: {p} is neither an image file nor a folder")
    return files, None


def main(argv: list[str] | None = None) -> int:
    """``ntt segment``: references + a folder of images -> COCO results json and overlay PNGs."""
    ap = argparse.ArgumentParser(
        prog="ntt segment",
        description=__doc__.split("\n\n", 1)[0],
        epilog="Extra KEY=VALUE arguments are Hydra overrides of conf/ (proposer=cpu_fast, matcher.nms_thr=0.6, "
        "paths.checkpoints=/models ...). See `ntt segment --help` and the README's Quick start.",
    )
    ap.add_argument(
        "--refs", help="references: a folder (class sub-folders with mask PNGs), a COCO json or a prompt json"
    )
    ap.add_argument(
        "--ref-images", default=None, help="image folder of a COCO reference json (default: its folder)"
    )
    ap.add_argument("--bank", default=None, help="a saved reference bank (bank.ntt) instead of --refs")
    ap.add_argument("--images", nargs="+", required=True, help="a folder of images, or image files")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--sam2", default="sam2.1_hiera_t", help="conf/backbone/sam2 option (sam2.1_hiera_t)")
    ap.add_argument("--dinov2", default="vits14", help="conf/backbone/dinov2 option (vits14)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1")
    ap.add_argument("--score-thr", type=float, default=0.0, help="overlays: draw detections scoring >= this")
    ap.add_argument(
        "--max-draw", type=int, default=20, help="overlays: at most this many detections, best first"
    )
    ap.add_argument("--no-overlays", action="store_true", help="write no overlay PNGs")
    args, rest = ap.parse_known_args(argv)
    bad = [r for r in rest if "=" not in r]
    if bad:
        ap.error(f"unrecognised arguments {bad} (extra arguments must be Hydra overrides KEY=VALUE)")
    if (args.refs is None) == (args.bank is None):
        ap.error("give exactly one of --refs or --bank")
    from ntt.app.segmenter import Segmenter
    from ntt.utils.errors import UserError

    try:
        images, root = _target_images(args.images)
        if args.bank is not None:
            seg = Segmenter.load(args.bank, device=args.device, overrides=rest)
        else:
            specs = load_reference_specs(args.refs, args.ref_images)
            seg = Segmenter.from_config(
                sam2=args.sam2, dinov2=args.dinov2, device=args.device, overrides=rest
            )
            _ = seg.sam2, seg.dinov2  # both models are needed: a missing checkpoint fails now, not midway
            add_references(seg, specs)
            seg.build()
            seg.save(Path(args.out) / "bank.ntt")
        summary = segment_folder(
            seg,
            images,
            args.out,
            image_root=root,
            overlays=not args.no_overlays,
            score_thr=args.score_thr,
            max_draw=args.max_draw,
        )
    except UserError:
        raise
    except (OSError, ValueError) as err:  # a file or value the API refused: the user's to fix
        raise UserError(str(err)) from err
    print(
        f"{summary['images']} images, {summary['detections']} detections -> {args.out}/predictions.json"
        + ("" if args.no_overlays else f", overlays in {args.out}/overlays")
    )
    return 1 if summary["failed"] else 0
