"""LVIS v1 through the authors' pycocotools route (docs/method.md §6): json fix-ups, no images to move.

Input: ``<root>/original/lvis_v1_{train,val}.json`` (and optionally ``lvis_v1_minival.json``) from the
LVIS site, and COCO 2017 images in ``<coco>/{train2017,val2017}``. Output: ``<root>/lvis_v1_{train,val}.json``
(and ``lvis_v1_minival.json``) with

* ``file_name`` = ``train2017/<name>.jpg`` or ``val2017/<name>.jpg`` from ``coco_url`` (the authors kept
  only ``<name>.jpg`` and merged both folders into one; the image root here is the COCO folder instead,
  which gives the same files without copying 120k images);
* ``iscrowd = 0`` on every annotation (LVIS has no crowd flag; the sampler and COCOeval read it);
* minival masks copied from val **by annotation id** (the authors indexed val's list with the id, which
  is right only where ids equal list positions).

**Not the official LVIS metric.** ntt evaluates LVIS with pycocotools' COCOeval like the authors: no
federated handling of ``neg_category_ids`` / ``not_exhaustive_category_ids`` and maxDets 100 instead
of 300, so numbers are not comparable with published LVIS AP.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ntt.prepare.box_to_mask import PrepareError
from ntt.utils.files import write_text_atomic

log = logging.getLogger(__name__)

DOWNLOADS = "LVIS v1 annotations: lvisdataset.org (lvis_v1_train.json.zip, lvis_v1_val.json.zip)"


def fix_lvis_json(data: dict) -> dict:
    """file_name from coco_url (``<split>/<name>``) and iscrowd = 0, in place; returns `data`."""
    for im in data["images"]:
        url = im.get("coco_url")
        if not url:
            raise PrepareError(f"LVIS image {im.get('id')} has no coco_url")
        im["file_name"] = "/".join(url.split("/")[-2:])
    for ann in data["annotations"]:
        ann["iscrowd"] = 0
    return data


def prepare_lvis(root: str | Path, coco_root: str | Path) -> list[Path]:
    """Write the fixed LVIS jsons into `root` (see the module docstring).

    Args:
        root: LVIS folder (originals in ``<root>/original``).
        coco_root: COCO folder with ``train2017/`` and ``val2017/`` (the images LVIS uses).
    """
    root, coco_root = Path(root), Path(coco_root)
    orig = root / "original"
    needed = [
        orig / "lvis_v1_train.json",
        orig / "lvis_v1_val.json",
        coco_root / "train2017",
        coco_root / "val2017",
    ]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise PrepareError(
            f"LVIS layout incomplete; missing {', '.join(missing)}. {DOWNLOADS}; COCO 2017 images"
        )
    written = []
    val = None
    for name in ("lvis_v1_train.json", "lvis_v1_val.json"):
        data = fix_lvis_json(json.loads((orig / name).read_text()))
        if name == "lvis_v1_val.json":
            val = data
        write_text_atomic(root / name, json.dumps(data))
        written.append(root / name)
        log.info("%s: %d images, %d annotations", root / name, len(data["images"]), len(data["annotations"]))
    minival_src = orig / "lvis_v1_minival.json"
    if minival_src.is_file():
        minival = fix_lvis_json(json.loads(minival_src.read_text()))
        by_id = {a["id"]: a for a in val["annotations"]}
        absent = [a["id"] for a in minival["annotations"] if "segmentation" not in a and a["id"] not in by_id]
        if absent:
            raise PrepareError(
                f"minival annotations {absent[:5]} have no mask and no val annotation with that id"
            )
        for a in minival["annotations"]:
            if "segmentation" not in a or not a["segmentation"]:
                a["segmentation"] = by_id[a["id"]]["segmentation"]
        write_text_atomic(root / "lvis_v1_minival.json", json.dumps(minival))
        written.append(root / "lvis_v1_minival.json")
    return written
