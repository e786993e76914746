"""The reference sources of ``ntt segment`` (``--refs``): a folder, a COCO json or a prompt json.

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

:func:`load_reference_specs` reads any of them into :class:`RefSpec` records; :func:`add_references` adds
them to a ``Segmenter``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RefSpec", "load_reference_specs", "add_references"]

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
        source: how messages and the bank's provenance name it (file and entry).
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
    source: str = ""


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
        if not images:  # a class without references would silently vanish from the results
            raise ValueError(
                f"class folder {d} holds no reference image: add an image with its mask PNG "
                "(<name>.jpg + <name>.mask.png), or remove the folder"
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
        image = ds.image_path(ann["image_id"], check=False)
        if not image.is_file():  # named for this json and its own option, not the dataset config's key
            raise FileNotFoundError(
                f"{json_path}: annotation {ann.get('id')}: image {image} not found; give the folder the json's "
                f"file_name entries are relative to with --ref-images (Python: image_root=), now {image_root}"
            )
        base = dict(
            image=image,
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
