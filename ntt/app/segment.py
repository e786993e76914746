"""``ntt segment``: segment a folder of your own images from a few references, in one command.

    ntt segment --refs REFS --images PHOTOS --out OUT [--sam2 sam2.1_hiera_t] [--dinov2 vits14]
                [--device auto] [--bank OUT/bank.ntt] [--score-thr 0] [--max-draw 20] [--no-overlays]
                [hydra overrides: proposer=cpu_fast matcher.nms_thr=0.6 ...]

References (``--refs``), in one of three forms:

* a folder of images with mask PNGs, one binary mask per reference instance, either
  ``REFS/<class>/<name>.jpg`` + ``REFS/<class>/<name>.mask.png`` (``<name>_mask.png`` and, for a non-PNG
  image, ``<name>.png`` are accepted too), or the FSS-1000 layout
  ``REFS/images/<class>/<name>.jpg`` + ``REFS/masks/<class>/<name>.png``. Foreground = grey >= 128 (or > 0
  for 0/1 masks).
* a COCO json (``images``, ``annotations``, ``categories``): every annotation is a reference; masks from
  ``segmentation`` (polygons or RLE), boxes-only annotations become masks through SAM2 box prompts.
  Images are looked up under ``--ref-images`` (default: the json's folder).
* a prompt json: ``{"references": [{"image": "a.jpg", "class": "dog", "boxes": [[x1, y1, x2, y2]]},
  {"image": "b.jpg", "class": "dog", "points": [[x, y]]}, {"image": "c.jpg", "class": "cat",
  "mask": "c_mask.png"}]}`` (a bare list works too; paths relative to the json; boxes are corner
  coordinates, not COCO's xywh; ``points`` and ``point_labels`` as in ``Segmenter.add_reference``).

Targets (``--images``): a folder of images (jpg, png, ...; no json needed: sizes are read from the files,
EXIF orientation applied) or image files. Output in ``--out``: ``predictions.json`` (COCO results, RLE
masks), ``dataset.json`` (the COCO ``images`` and ``categories`` the results refer to), ``overlays/<name>.png``
(each the size of its image), ``bank.ntt`` (the reference bank: reuse it with ``--bank``), and
``failed.json`` when some images could not be segmented (the others are kept; exit status 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RefSpec", "load_reference_specs", "add_references", "segment_folder", "main"]

log = logging.getLogger(__name__)

MASK_SUFFIXES = (".mask.png", "_mask.png")


@dataclass
class RefSpec:
    """References of one class on one image, as read from a reference source.

    Args:
        image: the image file.
        cls: class name.
        masks: mask files / arrays (one per instance), or None.
        boxes: xyxy boxes, or None.
        points: clicks (see ``Segmenter.add_reference``), or None.
        point_labels: labels of the clicks, or None.
        category_id: the category id (COCO sources), or None.
        bboxes_xywh: COCO boxes of the masks (COCO sources), or None.
        json_size: ``(width, height)`` the annotations were made at (COCO sources), or None.
    """

    image: Path
    cls: str
    masks: list[Any] | None = None
    boxes: list[list[float]] | None = None
    points: Any = None
    point_labels: Any = None
    category_id: int | None = None
    bboxes_xywh: list[list[float]] | None = None
    json_size: tuple[int, int] | None = None
    source: str = field(default="")


# ----------------------------------------------------------------------------------------------------------
# Reference sources


def _is_image(p: Path) -> bool:
    from ntt.data.images import IMAGE_EXTENSIONS

    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.lower().endswith(MASK_SUFFIXES)


def _specs_from_folder(folder: Path) -> list[RefSpec]:
    fss = (folder / "images").is_dir() and (folder / "masks").is_dir()
    image_dir = folder / "images" if fss else folder
    if not fss and any(_is_image(p) for p in folder.iterdir()):
        raise ValueError(
            f"{folder}: reference images must be in one sub-folder per class "
            "(REFS/<class>/<name>.jpg + REFS/<class>/<name>.mask.png)"
        )
    class_dirs = sorted(d for d in image_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise ValueError(
            f"{folder}: no class folders. Lay references out as REFS/<class>/<name>.jpg + "
            "REFS/<class>/<name>.mask.png, or REFS/images/<class>/<name>.jpg + REFS/masks/<class>/<name>.png"
        )
    specs: list[RefSpec] = []
    for d in class_dirs:
        files = sorted(p for p in d.iterdir() if _is_image(p))
        stems_non_png = {p.stem for p in files if p.suffix.lower() != ".png"}
        # <name>.png beside <name>.jpg is that image's mask, not a reference image
        images = (
            files
            if fss
            else [p for p in files if not (p.suffix.lower() == ".png" and p.stem in stems_non_png)]
        )
        for img in images:
            if fss:
                cands = [folder / "masks" / d.name / (img.stem + ".png")]
            else:
                cands = [d / (img.stem + s) for s in MASK_SUFFIXES]
                if img.suffix.lower() != ".png":
                    cands.append(d / (img.stem + ".png"))
            mask = next((c for c in cands if c.is_file()), None)
            if mask is None:
                raise ValueError(
                    f"reference image {img} has no mask: expected "
                    + " or ".join(str(c.relative_to(folder)) for c in cands)
                )
            specs.append(RefSpec(image=img, cls=d.name, masks=[mask], source=str(img.relative_to(folder))))
    if not specs:
        raise ValueError(f"{folder}: no reference images found in the class folders")
    return specs


def _specs_from_coco(data: dict, json_path: Path, image_root: Path) -> list[RefSpec]:
    from ntt.data.coco import CocoDataset, has_segmentation

    ds = CocoDataset(data, image_root)
    specs: list[RefSpec] = []
    for ann in data.get("annotations", []):
        info = ds.image_info(ann["image_id"])
        cid = int(ann["category_id"])
        if cid not in ds.category_ids:
            raise ValueError(f"{json_path}: annotation {ann.get('id')} has unknown category id {cid}")
        w, h = info["width"], info["height"]
        base = dict(
            image=ds.image_path(ann["image_id"]),
            cls=ds.name_of(cid),
            category_id=cid,
            json_size=(w, h),
            source=f"{json_path.name}: annotation {ann.get('id')} (image {info['file_name']})",
        )
        if has_segmentation(ann):
            specs.append(RefSpec(masks=[ds.mask(ann["id"])], bboxes_xywh=[list(ann["bbox"])], **base))
        elif "bbox" in ann:
            x, y, bw, bh = (float(v) for v in ann["bbox"][:4])
            specs.append(RefSpec(boxes=[[x, y, x + bw, y + bh]], **base))
        else:
            raise ValueError(f"{json_path}: annotation {ann.get('id')} has neither a segmentation nor a bbox")
    if not specs:
        raise ValueError(f"{json_path}: no annotations: a reference json needs at least one")
    return specs


PROMPT_KEYS = {"image", "class", "mask", "masks", "boxes", "points", "point_labels"}


def _specs_from_prompts(entries: list, json_path: Path) -> list[RefSpec]:
    base = json_path.parent
    specs: list[RefSpec] = []
    for i, e in enumerate(entries):
        where = f"{json_path}: reference {i}"
        if not isinstance(e, dict):
            raise ValueError(f"{where}: expected an object, got {type(e).__name__}")
        unknown = sorted(set(e) - PROMPT_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(PROMPT_KEYS)}")
        for key in ("image", "class"):
            if key not in e:
                raise ValueError(f"{where}: missing '{key}'")
        kinds = [k for k in ("mask", "masks", "boxes", "points") if k in e]
        if len(kinds) != 1:
            raise ValueError(
                f"{where}: give exactly one of mask, masks, boxes, points (got {kinds or 'none'})"
            )
        masks = None
        if "mask" in e or "masks" in e:
            files = [e["mask"]] if "mask" in e else list(e["masks"])
            masks = [base / f for f in files]
        specs.append(
            RefSpec(
                image=base / e["image"],
                cls=str(e["class"]),
                masks=masks,
                boxes=e.get("boxes"),
                points=e.get("points"),
                point_labels=e.get("point_labels"),
                source=f"{json_path.name}: reference {i} ({e['image']})",
            )
        )
    if not specs:
        raise ValueError(f"{json_path}: no references")
    return specs


def load_reference_specs(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None
) -> list[RefSpec]:
    """Read references from a folder of images + masks, a COCO json, or a prompt json (module docstring).

    Args:
        path: the folder or json file.
        image_root: for a COCO json: the folder its ``file_name`` entries are relative to (default: the
            json's folder).

    Raises:
        FileNotFoundError: no such path. ValueError: malformed input (the message names the file and entry).
    """
    path = Path(path)
    if path.is_dir():
        return _specs_from_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"references not found: {path} (a folder, a COCO json or a prompt json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid json: {err}") from err
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return _specs_from_coco(data, path, Path(image_root) if image_root is not None else path.parent)
    if isinstance(data, dict) and isinstance(data.get("references"), list):
        return _specs_from_prompts(data["references"], path)
    if isinstance(data, list):
        return _specs_from_prompts(data, path)
    raise ValueError(
        f"{path}: neither a COCO json (images, annotations, categories) nor a prompt json "
        '({"references": [{"image", "class", "boxes" | "points" | "mask"}]})'
    )


def _image_for_json(path: Path, size: tuple[int, int]):
    """The image in the frame of its annotations: upright if that matches the json size, else as stored."""
    from ntt.data.images import load_rgb, read_image, resize_pil

    pil, _ = read_image(path)
    if pil.size == tuple(size):
        return pil
    stored = load_rgb(path)
    if stored.size == tuple(size):
        log.info(
            "%s: the json size matches the stored frame, not the EXIF-rotated one: using the stored frame",
            path,
        )
        return stored
    log.warning(
        "%s decodes to %dx%d but its json says %dx%d: resizing to the json size", path, *pil.size, *size
    )
    return resize_pil(pil, *size)


def add_references(seg, specs: list[RefSpec]) -> int:
    """Add reference specs to a ``Segmenter``; returns the number of instances added.

    Args:
        seg: the ``ntt.app.segmenter.Segmenter``.
        specs: from :func:`load_reference_specs`.
    """
    from tqdm import tqdm

    total = 0
    cache: dict[Path, Any] = {}
    for spec in tqdm(specs, desc="references", unit="ref", disable=len(specs) < 20):
        try:
            image: Any = spec.image
            if spec.json_size is not None:
                if spec.image not in cache:
                    cache.clear()  # annotations come grouped by image more often than not
                    cache[spec.image] = _image_for_json(spec.image, spec.json_size)
                image = cache[spec.image]
            total += seg.add_reference(
                image,
                spec.cls,
                masks=spec.masks,
                boxes=spec.boxes,
                points=spec.points,
                point_labels=spec.point_labels,
                category_id=spec.category_id,
                bboxes_xywh=spec.bboxes_xywh,
                name=spec.source or spec.image.name,
            )
        except (ValueError, OSError) as err:
            raise type(err)(f"reference {spec.source or spec.image}: {err}") from err
    return total


# ----------------------------------------------------------------------------------------------------------
# Segmenting a folder


def _write_json(path: Path, obj: Any, indent: int | None = 1) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    os.replace(tmp, path)


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
    categories = [{"id": int(c), "name": n} for c, n in zip(bank.category_ids, bank.names)]
    _write_json(out / "predictions.json", results, indent=None)
    _write_json(out / "dataset.json", {"images": image_records, "annotations": [], "categories": categories})
    if failed:
        _write_json(out / "failed.json", failed)
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
