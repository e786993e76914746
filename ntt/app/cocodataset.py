"""A COCO dataset folder of segmented images (images + instances json) that annotation tools import as is.

    DIR/images/<file_name>                       the images (copies; upright pixels where EXIF rotated them)
    DIR/annotations/instances_default.json       COCO "instances": images, annotations, categories

Each detection becomes an annotation: ``id`` (1..), ``image_id``, ``category_id``, ``bbox`` (xywh, the
results' integer box), ``area`` (the mask's pixel count; the box's ``w * h`` without masks), ``iscrowd`` 0,
``segmentation`` (compressed RLE ``{"size": [h, w], "counts": str}``, exactly the predicted mask; absent for
``outputs=boxes``) and ``score``. Images carry ``id``, ``file_name``, ``width``, ``height`` (the upright frame the
masks are in).

The layout is CVAT's "COCO 1.0" one (a zip of DIR: ``images/`` + ``annotations/instances_<subset>.json``) and
FiftyOne reads it with ``data_path`` / ``labels_path`` (docs/practitioner.md, "Exporting a COCO dataset").
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ntt.app.outputs import naming
from ntt.utils.files import write_json_atomic

__all__ = [
    "ANNOTATIONS_FILE",
    "IMAGES_DIR",
    "write_coco_dataset",
    "export_instances",
    "export_segment_folder",
]

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
ANNOTATIONS_FILE = "annotations/instances_default.json"


def _annotation(result: dict, ann_id: int) -> dict[str, Any]:
    """A COCO annotation of one result dict (``image_id, category_id, bbox, score[, segmentation]``)."""
    x, y, w, h = result["bbox"]
    ann = {
        "id": ann_id,
        "image_id": int(result["image_id"]),
        "category_id": int(result["category_id"]),
        "bbox": [x, y, w, h],
        "iscrowd": 0,
        "score": result["score"],
    }
    seg = result.get("segmentation")
    if seg is not None:
        from pycocotools import mask as mask_utils

        rle = {"size": list(seg["size"]), "counts": seg["counts"]}
        ann["area"] = int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}))
        ann["segmentation"] = rle
    else:
        ann["area"] = int(w * h)
    return ann


def _put_image(src, dest: Path) -> None:
    """Copy an image file, or save its upright pixels when EXIF rotates it (the annotations' frame)."""
    from PIL import Image, ImageOps

    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(src, (str, os.PathLike)):
        with Image.open(src) as im:
            rotated = im.getexif().get(0x0112, 1) not in (None, 1)
            if not rotated:
                with naming(dest):
                    shutil.copyfile(src, dest)
                return
            upright = ImageOps.exif_transpose(im)
        log.info("%s: EXIF-rotated: its upright pixels are written (the frame of the masks)", src)
    else:
        upright = src  # a PIL image: already upright
    with naming(dest):
        upright.save(dest)


def write_coco_dataset(
    out_dir: str | os.PathLike,
    images: Sequence[dict],
    results: Iterable[dict],
    categories: Sequence[dict],
) -> Path:
    """Write ``DIR/images/`` and ``DIR/annotations/instances_default.json`` (see the module doc).

    Args:
        out_dir: the dataset folder (created; files already there are replaced).
        images: ``{"id", "file_name", "width", "height", "source"}`` per image; ``source`` is the image file
            or an upright ``PIL.Image`` (saved under ``file_name``).
        results: COCO result dicts (``image_id``, ``category_id``, ``bbox``, ``score``, optional RLE
            ``segmentation``) as ``Instances.to_coco`` and ``ntt segment``'s ``predictions.json`` hold them.
        categories: ``{"id", "name"}`` per class.

    Returns:
        The annotations json.
    """
    out = Path(out_dir)
    names = [im["file_name"] for im in images]
    if len(set(names)) != len(names):
        raise ValueError(f"COCO export to {out}: two images share a file_name; give them distinct names")
    for im in images:
        _put_image(im["source"], out / IMAGES_DIR / im["file_name"])
    anns = [_annotation(r, k) for k, r in enumerate(results, start=1)]
    doc = {
        "info": {"description": "ntt predictions (scores in each annotation's 'score')"},
        "licenses": [],
        "images": [{k: im[k] for k in ("id", "file_name", "width", "height")} for im in images],
        "annotations": anns,
        "categories": [{"id": int(c["id"]), "name": str(c["name"]), "supercategory": ""} for c in categories],
    }
    path = out / ANNOTATIONS_FILE
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, doc)
    log.info("COCO dataset: %d images, %d annotations -> %s", len(images), len(anns), out)
    return path


def export_instances(instances: Sequence, out_dir: str | os.PathLike) -> Path:
    """A COCO dataset folder of ``Segmenter.predict`` results (image ids 1..N in this order).

    Args:
        instances: :class:`ntt.app.instances.Instances`, each with its ``path`` or its ``image`` (kept by
            ``predict(..., keep_image=True)``, the default); file names are the paths' names (else
            ``image_<id>.png``).
        out_dir: the dataset folder.
    """
    images, results = [], []
    for img_id, inst in enumerate(instances, start=1):
        if inst.path is not None:
            source, file_name = inst.path, Path(inst.path).name
        elif inst.image is not None:
            source, file_name = inst.image, f"image_{img_id}.png"
        else:
            raise ValueError(f"COCO export: result {img_id} keeps neither its path nor its image")
        images.append(
            {
                "id": img_id,
                "file_name": file_name,
                "width": inst.width,
                "height": inst.height,
                "source": source,
            }
        )
        results.extend(inst.to_coco(img_id))
    first = instances[0] if len(instances) else None
    categories = (
        [] if first is None else [{"id": c, "name": n} for c, n in zip(first.category_ids, first.names)]
    )
    return write_coco_dataset(out_dir, images, results, categories)


def export_segment_folder(out: Path, image_files: Sequence[Path], root: Path | None, dest: Path) -> Path:
    """The COCO dataset of an ``ntt segment`` output folder (its ``dataset.json`` + ``predictions.json``):
    the images segmented without failure, with their detections.

    Args:
        out: the ``ntt segment`` output folder.
        image_files: the target image files (as ``segment_folder`` got them).
        root: the folder ``file_name`` is relative to (None: each file's name).
        dest: the dataset folder.
    """
    dataset = json.loads((out / "dataset.json").read_text())
    results = json.loads((out / "predictions.json").read_text())
    failed_file = out / "failed.json"
    failed = {f["image_id"] for f in json.loads(failed_file.read_text())} if failed_file.is_file() else set()
    by_name = {(p.relative_to(root).as_posix() if root is not None else p.name): p for p in image_files}
    images = [
        {**im, "source": by_name[im["file_name"]]} for im in dataset["images"] if im["id"] not in failed
    ]
    kept = {im["id"] for im in images}
    return write_coco_dataset(
        dest, images, [r for r in results if r["image_id"] in kept], dataset["categories"]
    )
