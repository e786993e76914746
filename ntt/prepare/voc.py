"""PASCAL VOC 2007+2012 -> COCO jsons with SAM masks, as the authors prepared it (docs/method.md §1.5).

Input (the public VOC tarballs, extracted)::

    <root>/VOCdevkit/VOC2007/{Annotations,ImageSets/Main,JPEGImages}   trainval + test
    <root>/VOCdevkit/VOC2012/{Annotations,ImageSets/Main,JPEGImages}   trainval

Output (what ``conf/dataset/voc_split{1,2,3}.yaml`` read)::

    <root>/annotations/voc07_{train,val,trainval,test}.json, voc12_{train,val,trainval}.json,
                       voc0712_{train,val,trainval}.json                boxes (mmdet-style conversion)
    <root>/annotations/voc0712_trainval_with_segm.json, voc07_test_with_segm.json   + SAM masks
    <root>/allimages/*.jpg                                              every JPEG in one folder (links)

The conversion is mmdetection's ``pascal_voc.py`` as the authors ran it: 0-based boxes (xml value - 1),
``bbox = [x1, y1, x2 - x1, y2 - y1]`` as ints, ``area = w * h`` (int), the box rectangle as the initial
polygon, ``difficult`` objects kept after the others with ``iscrowd = 1`` (so COCOeval ignores them and
the reference sampler never picks them), ``ignore = 0``, category ids 0..19 in alphabetical order, image
and annotation ids counted from 0 in file-list order (VOC2007 list first for the 07+12 sets), and
``file_name`` the bare JPEG name (the authors flattened ``VOC20xx/JPEGImages/x.jpg`` to ``x.jpg``).
VOC2007 and VOC2012 names never collide (``000001`` vs ``2008_000001``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

from ntt.data.splits import VOC_CLASSES
from ntt.prepare.box_to_mask import PrepareError, add_masks
from ntt.utils.files import write_text_atomic

log = logging.getLogger(__name__)

LABEL_IDS = {name: i for i, name in enumerate(VOC_CLASSES)}
# (output prefix, years, splits) in the authors' order
SETS = [
    ("voc07", ["2007"], ["train", "val", "trainval", "test"]),
    ("voc12", ["2012"], ["train", "val", "trainval"]),
    ("voc0712", ["2007", "2012"], ["train", "val", "trainval"]),
]
# the two jsons the benchmark uses (references, test set) -> their `_with_segm` versions get masks
MASKED = ["voc0712_trainval.json", "voc07_test.json"]
DOWNLOADS = (
    "VOC2007 trainval + test: host.robots.ox.ac.uk/pascal/VOC/voc2007/ (VOCtrainval_06-Nov-2007.tar, "
    "VOCtest_06-Nov-2007.tar); VOC2012 trainval: host.robots.ox.ac.uk/pascal/VOC/voc2012/ "
    "(VOCtrainval_11-May-2012.tar). Extract them into <root>/ (they create VOCdevkit/)."
)


def parse_voc_xml(xml_path: str | Path) -> dict:
    """One VOC annotation file -> size and 0-based boxes, non-difficult and difficult apart.

    Args:
        xml_path: ``Annotations/<name>.xml``.

    Returns:
        ``{"width", "height", "boxes": [[x1, y1, x2, y2, label], ...], "difficult": [...]}`` with
        coordinates already minus 1 (mmdet's convention).
    """
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise PrepareError(f"cannot read VOC annotation {xml_path}: {exc}") from exc
    size = root.find("size")
    out = {
        "width": int(size.find("width").text),
        "height": int(size.find("height").text),
        "boxes": [],
        "difficult": [],
    }
    for obj in root.findall("object"):
        name = obj.find("name").text.strip()
        if name not in LABEL_IDS:
            raise PrepareError(f"{xml_path}: unknown VOC class {name!r} (expected one of {list(LABEL_IDS)})")
        flag = obj.find("difficult")
        # mmdet reads the flag as int; a missing flag counts as not difficult (newer mmdet does the same)
        difficult = int(flag.text) if flag is not None and flag.text is not None else 0
        bnd = obj.find("bndbox")
        box = [int(float(bnd.find(k).text)) - 1 for k in ("xmin", "ymin", "xmax", "ymax")]
        (out["difficult"] if difficult else out["boxes"]).append([*box, LABEL_IDS[name]])
    return out


def _annotation(ann_id: int, image_id: int, box: list[int], difficult: bool) -> dict:
    x1, y1, x2, y2, label = box
    w, h = x2 - x1, y2 - y1
    return {
        "segmentation": [[x1, y1, x1, y2, x2, y2, x2, y1]],
        "area": int(w * h),
        "ignore": 0,
        "iscrowd": 1 if difficult else 0,
        "image_id": image_id,
        "bbox": [x1, y1, w, h],
        "category_id": label,
        "id": ann_id,
    }


def convert_split(devkit: str | Path, years: list[str], split: str) -> dict | None:
    """VOC image list(s) -> one COCO dict, or None when a year's list file is missing (as mmdet skips it).

    Args:
        devkit: the ``VOCdevkit`` folder.
        years: ``["2007"]``, ``["2012"]`` or ``["2007", "2012"]`` (lists concatenated in this order).
        split: ``train``, ``val``, ``trainval`` or ``test``.
    """
    devkit = Path(devkit)
    entries = []
    for year in years:
        listing = devkit / f"VOC{year}" / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            log.info("no %s: skipping voc%s %s", listing, year, split)
            return None
        names = [ln.strip() for ln in listing.read_text().splitlines() if ln.strip()]
        entries += [(devkit / f"VOC{year}" / "Annotations" / f"{n}.xml", f"{n}.jpg") for n in names]
    coco = {
        "images": [],
        "type": "instance",
        "categories": [{"supercategory": "none", "id": i, "name": n} for i, n in enumerate(VOC_CLASSES)],
        "annotations": [],
    }
    seen = set()
    ann_id = 0
    for image_id, (xml_path, file_name) in enumerate(entries):
        if file_name in seen:
            raise PrepareError(f"{file_name} is listed twice in the VOC{'+'.join(years)} {split} lists")
        seen.add(file_name)
        parsed = parse_voc_xml(xml_path)
        coco["images"].append(
            {"id": image_id, "file_name": file_name, "height": parsed["height"], "width": parsed["width"]}
        )
        for difficult, boxes in ((False, parsed["boxes"]), (True, parsed["difficult"])):
            for box in boxes:
                coco["annotations"].append(_annotation(ann_id, image_id, box, difficult))
                ann_id += 1
    return coco


def flatten_images(devkit: str | Path, out_dir: str | Path, *, copy: bool = False) -> int:
    """Every ``VOC20xx/JPEGImages/*.jpg`` into one folder (symlinks, or copies with `copy`)."""
    devkit, out_dir = Path(devkit), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for year_dir in sorted(devkit.glob("VOC20*")):
        jpegs = year_dir / "JPEGImages"
        if not jpegs.is_dir():
            continue
        for src in jpegs.iterdir():
            dst = out_dir / src.name
            if not dst.exists():
                if copy:
                    shutil.copy2(src, dst)
                else:
                    os.symlink(os.path.relpath(src.resolve(), out_dir.resolve()), dst)
            n += 1
    return n


def prepare_voc(
    root: str | Path,
    *,
    masker=None,
    copy_images: bool = False,
    contour_backend: str = "auto",
    overwrite: bool = False,
) -> list[Path]:
    """Convert every VOC set, flatten the images and (with a masker) add masks to the two used jsons.

    Args:
        root: folder holding ``VOCdevkit/``; outputs go to ``<root>/annotations`` and ``<root>/allimages``.
        masker: a mask model from :func:`ntt.prepare.mask_models.build_masker`; None = boxes only.
        copy_images: copy the JPEGs instead of linking them.
        contour_backend: see :mod:`ntt.prepare.contours`.
        overwrite: redo existing `_with_segm` files.

    Returns:
        The json files written.
    """
    root = Path(root)
    devkit = root / "VOCdevkit"
    missing = [
        p for p in (devkit / "VOC2007" / "Annotations", devkit / "VOC2012" / "Annotations") if not p.is_dir()
    ]
    if missing:
        raise PrepareError(f"PASCAL VOC not found: missing {', '.join(map(str, missing))}. {DOWNLOADS}")
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for prefix, years, splits in SETS:
        for split in splits:
            coco = convert_split(devkit, years, split)
            if coco is None:
                continue
            path = ann_dir / f"{prefix}_{split}.json"
            write_text_atomic(path, json.dumps(coco))
            log.info("%s: %d images, %d boxes", path, len(coco["images"]), len(coco["annotations"]))
            written.append(path)
    n = flatten_images(devkit, root / "allimages", copy=copy_images)
    log.info("%s: %d JPEGs", root / "allimages", n)
    if masker is None:
        log.warning("no mask model: wrote box jsons only (the benchmark reads the *_with_segm.json files)")
        return written
    for name in MASKED:
        if not (ann_dir / name).is_file():
            raise PrepareError(f"{ann_dir / name} was not produced: is the VOC{name[3:5]} image list there?")
        written.append(
            add_masks(
                ann_dir / name,
                root / "allimages",
                masker,
                contour_backend=contour_backend,
                overwrite=overwrite,
            )
        )
    return written
