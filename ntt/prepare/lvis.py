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

**The metric.** By default ntt evaluates LVIS with pycocotools' COCOeval like the authors: no federated
handling of ``neg_category_ids`` / ``not_exhaustive_category_ids`` and maxDets 100 instead of 300, so
numbers are not comparable with published LVIS AP. ``eval=lvis`` runs the official metric (method.md
§6.1); every other field of the LVIS jsons (``frequency``, the federated lists) is kept for it.

Every input json is read and checked before any output is written; the outputs are moved into place
together (:mod:`ntt.prepare.outputs`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ntt.prepare.errors import PrepareError
from ntt.prepare.inputs import read_coco_json
from ntt.prepare.outputs import StagedOutputs

log = logging.getLogger(__name__)

DOWNLOADS = "LVIS v1 annotations: lvisdataset.org (lvis_v1_train.json.zip, lvis_v1_val.json.zip)"


def fix_lvis_json(data: dict, source: str | Path = "LVIS json") -> dict:
    """file_name from coco_url (``<split>/<name>``) and iscrowd = 0, in place; returns `data`.

    Args:
        data: the content of an LVIS json.
        source: its file (named by the errors).
    """
    official = f"use the official LVIS v1 json ({DOWNLOADS})"
    for im in data["images"]:
        url = im.get("coco_url") if isinstance(im, dict) else None
        if not isinstance(url, str) or not url:
            name = im.get("id") if isinstance(im, dict) else im
            raise PrepareError(f"{source}: image {name} has no coco_url: {official}")
        im["file_name"] = "/".join(url.split("/")[-2:])
    if not isinstance(data.get("annotations"), list):
        raise PrepareError(f"{source}: no 'annotations' list: {official}")
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or "id" not in ann:
            raise PrepareError(f"{source}: annotation {ann!r:.80} is not an object with an id: {official}")
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

    def read(name: str) -> dict:
        return fix_lvis_json(read_coco_json(orig / name, fix=f"download it again ({DOWNLOADS})"), orig / name)

    val = read("lvis_v1_val.json")
    minival = None
    if (orig / "lvis_v1_minival.json").is_file():
        minival = read("lvis_v1_minival.json")
        by_id = {a["id"]: a for a in val["annotations"]}
        need = [a for a in minival["annotations"] if not a.get("segmentation")]
        absent = [a["id"] for a in need if not by_id.get(a["id"], {}).get("segmentation")]
        if absent:
            raise PrepareError(
                f"{orig / 'lvis_v1_minival.json'}: annotations {absent[:5]} have no mask and no annotation with "
                f"that id and a mask in {orig / 'lvis_v1_val.json'}: use the official files ({DOWNLOADS})"
            )
        for a in need:
            a["segmentation"] = by_id[a["id"]]["segmentation"]
    train = read("lvis_v1_train.json")  # the largest (~1 GB) last: every check is done once it is read
    outputs = {"lvis_v1_train.json": train, "lvis_v1_val.json": val}
    if minival is not None:
        outputs["lvis_v1_minival.json"] = minival
    with StagedOutputs() as staged:
        for name, data in outputs.items():
            staged.add(root / name, json.dumps(data))
            log.info(
                "%s: %d images, %d annotations", root / name, len(data["images"]), len(data["annotations"])
            )
        return staged.commit()
