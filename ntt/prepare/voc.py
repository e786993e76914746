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

Everything is checked before anything is built or written: every image list of the tarballs, every listed
xml (parsed), every listed JPEG (there, readable, of the xml's ``<size>``); then the mask model is built
(only for masks still to make) and all outputs are moved into place together (:mod:`ntt.prepare.outputs`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ntt.data.splits import VOC_CLASSES
from ntt.prepare.box_to_mask import make_masks, plan_masks
from ntt.prepare.errors import PrepareError
from ntt.prepare.inputs import check_images, named
from ntt.prepare.outputs import StagedOutputs

log = logging.getLogger(__name__)

LABEL_IDS = {name: i for i, name in enumerate(VOC_CLASSES)}
# (output prefix, years, splits) in the authors' order
SETS = [
    ("voc07", ["2007"], ["train", "val", "trainval", "test"]),
    ("voc12", ["2012"], ["train", "val", "trainval"]),
    ("voc0712", ["2007", "2012"], ["train", "val", "trainval"]),
]
# every (year, split) image list the sets read; each is in one of the official tarballs
LISTS = list(dict.fromkeys((year, split) for _, years, splits in SETS for split in splits for year in years))
# the two jsons the benchmark uses (references, test set) -> their `_with_segm` versions get masks
MASKED = ["voc0712_trainval.json", "voc07_test.json"]
DOWNLOADS = (
    "VOC2007 trainval + test: host.robots.ox.ac.uk/pascal/VOC/voc2007/ (VOCtrainval_06-Nov-2007.tar, "
    "VOCtest_06-Nov-2007.tar); VOC2012 trainval: host.robots.ox.ac.uk/pascal/VOC/voc2012/ "
    "(VOCtrainval_11-May-2012.tar). Extract them into <root>/ (they create VOCdevkit/)."
)


def tarball(year: str, split: str) -> str:
    """The official tarball that holds a year's list (and its xml files and JPEGs)."""
    if split == "test":
        return "VOCtest_06-Nov-2007.tar"
    return {"2007": "VOCtrainval_06-Nov-2007.tar", "2012": "VOCtrainval_11-May-2012.tar"}[year]


def _reextract(root: Path) -> str:
    return (
        f"extract the VOC tarballs into {root} again (VOC2007 trainval: VOCtrainval_06-Nov-2007.tar, VOC2007 "
        "test: VOCtest_06-Nov-2007.tar, VOC2012: VOCtrainval_11-May-2012.tar)"
    )


def _value(parent: ET.Element, tag: str, xml_path, convert: Callable[[str], Any]):
    """``convert`` of the text of ``parent/tag``; a missing or malformed value names the file and element."""
    el = parent.find(tag)
    if el is None or el.text is None:
        raise PrepareError(f"{xml_path}: no <{parent.tag}><{tag}> value")
    try:
        return convert(el.text)
    except ValueError:
        raise PrepareError(f"{xml_path}: <{parent.tag}><{tag}> is {el.text!r}, not a number") from None


def _element(parent: ET.Element, tag: str, xml_path) -> ET.Element:
    el = parent.find(tag)
    if el is None:
        raise PrepareError(f"{xml_path}: no <{tag}> element in <{parent.tag}>")
    return el


def parse_voc_xml(xml_path: str | Path) -> dict:
    """One VOC annotation file -> size and 0-based boxes, non-difficult and difficult apart.

    Args:
        xml_path: ``Annotations/<name>.xml``.

    Returns:
        ``{"width", "height", "boxes": [[x1, y1, x2, y2, label], ...], "difficult": [...]}`` with
        coordinates already minus 1 (mmdet's convention).

    Raises:
        PrepareError: the file is missing, not xml, or lacks an element (the message names file and element).
    """
    try:
        root = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise PrepareError(f"VOC annotation {xml_path} not found") from None
    except (ET.ParseError, OSError) as exc:
        raise PrepareError(f"VOC annotation {xml_path} is not readable xml ({exc})") from exc
    size = _element(root, "size", xml_path)
    out = {
        "width": _value(size, "width", xml_path, int),
        "height": _value(size, "height", xml_path, int),
        "boxes": [],
        "difficult": [],
    }
    for obj in root.findall("object"):
        name = _value(obj, "name", xml_path, str).strip()
        if name not in LABEL_IDS:
            raise PrepareError(f"{xml_path}: unknown VOC class {name!r} (expected one of {list(LABEL_IDS)})")
        flag = obj.find("difficult")
        # mmdet reads the flag as int; a missing flag counts as not difficult (newer mmdet does the same)
        difficult = (
            _value(obj, "difficult", xml_path, int) if flag is not None and flag.text is not None else 0
        )
        bnd = _element(obj, "bndbox", xml_path)
        box = [int(_value(bnd, k, xml_path, float)) - 1 for k in ("xmin", "ymin", "xmax", "ymax")]
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


def _list_path(devkit: Path, year: str, split: str) -> Path:
    return devkit / f"VOC{year}" / "ImageSets" / "Main" / f"{split}.txt"


def _read_list(listing: Path) -> list[str]:
    return [ln.strip() for ln in listing.read_text().splitlines() if ln.strip()]


def convert_split(
    devkit: str | Path, years: list[str], split: str, *, annotations: dict[Path, dict] | None = None
) -> dict:
    """VOC image list(s) -> one COCO dict.

    Args:
        devkit: the ``VOCdevkit`` folder.
        years: ``["2007"]``, ``["2012"]`` or ``["2007", "2012"]`` (lists concatenated in this order).
        split: ``train``, ``val``, ``trainval`` or ``test``.
        annotations: the parsed xml files (:func:`parse_voc_xml`) by path; default: parsed here.
    """
    devkit = Path(devkit)
    entries = []
    listings = []
    for year in years:
        listing = _list_path(devkit, year, split)
        if not listing.is_file():
            raise PrepareError(f"{listing} not found: extract {tarball(year, split)} into {devkit.parent}")
        listings.append(listing)
        entries += [
            (devkit / f"VOC{year}" / "Annotations" / f"{n}.xml", f"{n}.jpg") for n in _read_list(listing)
        ]
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
            raise PrepareError(
                f"{Path(file_name).stem} is listed twice in {' + '.join(map(str, listings))}: remove the repeated line"
            )
        seen.add(file_name)
        parsed = annotations[xml_path] if annotations is not None else parse_voc_xml(xml_path)
        coco["images"].append(
            {"id": image_id, "file_name": file_name, "height": parsed["height"], "width": parsed["width"]}
        )
        for difficult, boxes in ((False, parsed["boxes"]), (True, parsed["difficult"])):
            for box in boxes:
                coco["annotations"].append(_annotation(ann_id, image_id, box, difficult))
                ann_id += 1
    return coco


def flatten_images(devkit: str | Path, out_dir: str | Path, *, copy: bool = False) -> int:
    """Every ``VOC20xx/JPEGImages/*.jpg`` into one folder (symlinks, or copies with `copy`).

    Files already there are kept; on an error the files made by this call are removed again.
    """
    devkit, out_dir = Path(devkit), Path(out_dir)
    made: list[Path] = []
    dst = out_dir
    try:
        if not out_dir.is_dir():
            out_dir.mkdir(parents=True)
            made.append(out_dir)
        n = 0
        for year_dir in sorted(devkit.glob("VOC20*")):
            jpegs = year_dir / "JPEGImages"
            if not jpegs.is_dir():
                continue
            for src in jpegs.iterdir():
                dst = out_dir / src.name
                if not dst.exists():
                    if dst.is_symlink():  # a link to where the devkit was before: point it at the JPEG now
                        dst.unlink()
                    if copy:
                        shutil.copy2(src, dst)
                    else:
                        os.symlink(os.path.relpath(src.resolve(), out_dir.resolve()), dst)
                    made.append(dst)
                n += 1
    except OSError as exc:
        for path in reversed(made):
            if path == out_dir:
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
        raise PrepareError(
            f"cannot make {dst}: {exc.strerror}: free some space (or fix the permissions)"
        ) from exc
    return n


def check_voc(root: str | Path) -> tuple[dict[str, dict], dict[str, Path]]:
    """Check the whole VOC tree and convert it in memory; nothing is written.

    Args:
        root: folder holding ``VOCdevkit/``.

    Returns:
        (output json name -> COCO dict for every set, JPEG file name -> its file in the devkit).

    Raises:
        PrepareError: naming what is missing or broken (image lists, xml files, JPEGs) and what to do.
    """
    root = Path(root)
    devkit = root / "VOCdevkit"
    missing = [
        p for p in (devkit / "VOC2007" / "Annotations", devkit / "VOC2012" / "Annotations") if not p.is_dir()
    ]
    if missing:
        raise PrepareError(f"PASCAL VOC not found: missing {', '.join(map(str, missing))}. {DOWNLOADS}")
    absent = [
        f"{_list_path(devkit, y, s)} (in {tarball(y, s)})"
        for y, s in LISTS
        if not _list_path(devkit, y, s).is_file()
    ]
    if absent:
        raise PrepareError(
            f"VOC image lists missing: {', '.join(absent)}: extract those tarballs into {root}"
        )
    # every listed image once, in list order: (its xml, its JPEG)
    listed: dict[Path, Path] = {}
    for year, split in LISTS:
        folder = devkit / f"VOC{year}"
        for name in _read_list(_list_path(devkit, year, split)):
            listed[folder / "Annotations" / f"{name}.xml"] = folder / "JPEGImages" / f"{name}.jpg"
    annotations, broken = {}, []
    for xml_path in listed:
        try:
            annotations[xml_path] = parse_voc_xml(xml_path)
        except PrepareError as exc:
            broken.append(str(exc))
    if broken:
        raise PrepareError(f"{named(broken)}: fix the xml file(s), or {_reextract(root)}")
    check_images(
        (
            (jpeg, annotations[xml]["width"], annotations[xml]["height"], str(xml))
            for xml, jpeg in listed.items()
        ),
        fix_missing=_reextract(root),
        fix_size="fix <size> in the xml to the JPEG's (or replace the JPEG)",
    )
    sets = {
        f"{prefix}_{split}.json": convert_split(devkit, years, split, annotations=annotations)
        for prefix, years, splits in SETS
        for split in splits
    }
    return sets, {jpeg.name: jpeg for jpeg in listed.values()}


def prepare_voc(
    root: str | Path,
    *,
    make_masker: Callable[[], Any] | None = None,
    copy_images: bool = False,
    contour_backend: str = "auto",
    overwrite: bool = False,
    check_only: bool = False,
) -> list[Path]:
    """Convert every VOC set, flatten the images and (with a mask model) add masks to the two used jsons.

    Args:
        root: folder holding ``VOCdevkit/``; outputs go to ``<root>/annotations`` and ``<root>/allimages``.
        make_masker: builds the mask model (:func:`ntt.prepare.mask_models.build_masker`), called only after
            the data passed every check and only when masks are still to make; None = boxes only.
        copy_images: copy the JPEGs instead of linking them.
        contour_backend: see :mod:`ntt.prepare.contours`.
        overwrite: redo `_with_segm` files that are up to date.
        check_only: check the data and stop (nothing built or written).

    Returns:
        The json files written.
    """
    root = Path(root)
    sets, jpegs = check_voc(root)
    ann_dir = root / "annotations"
    jobs = []
    if make_masker is not None:
        jobs = [plan_masks(ann_dir / name, jpegs, data=sets[name], overwrite=overwrite) for name in MASKED]
    if check_only:
        log.info("VOC under %s: image lists, xml files and %d JPEGs checked: ready", root, len(jpegs))
        return []
    box_jsons = {name: json.dumps(coco) for name, coco in sets.items()}  # before the masks fill two of them
    with StagedOutputs() as staged:
        # masks first: the mask model is built before any output is staged (a model that cannot be built
        # leaves the data root untouched)
        if make_masker is not None:
            make_masks(jobs, make_masker, staged, contour_backend=contour_backend)
        for name, text in box_jsons.items():
            staged.add(ann_dir / name, text)
            coco = sets[name]
            log.info("%s: %d images, %d boxes", ann_dir / name, len(coco["images"]), len(coco["annotations"]))
        n = flatten_images(root / "VOCdevkit", root / "allimages", copy=copy_images)
        log.info("%s: %d JPEGs", root / "allimages", n)
        written = staged.commit()
    if make_masker is None:
        log.warning("no mask model: wrote box jsons only (the benchmark reads the *_with_segm.json files)")
    return written
