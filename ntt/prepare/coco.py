"""COCO 2017 (few-shot and all-classes benchmarks): nothing to convert, only a layout check.

Expected under ``<root>`` (default ``data/coco``, what ``conf/dataset/coco_{fewshot,all}.yaml`` read)::

    <root>/train2017/*.jpg   <root>/val2017/*.jpg
    <root>/annotations/instances_train2017.json   <root>/annotations/instances_val2017.json
"""

from __future__ import annotations

import json
from pathlib import Path

from ntt.prepare.box_to_mask import PrepareError

REQUIRED = {
    "annotations/instances_train2017.json": "images.cocodataset.org/annotations/annotations_trainval2017.zip",
    "annotations/instances_val2017.json": "images.cocodataset.org/annotations/annotations_trainval2017.zip",
    "train2017": "images.cocodataset.org/zips/train2017.zip",
    "val2017": "images.cocodataset.org/zips/val2017.zip",
}


def check_coco(root: str | Path, *, deep: bool = False) -> list[str]:
    """Check the COCO layout; raise with what is missing and where to download it.

    Args:
        root: the COCO folder.
        deep: also check that every image named in the val2017 json exists (reads the json, ~1 s).

    Returns:
        One line per checked item (for the command's report).
    """
    root = Path(root)
    missing = [f"{root / rel}  (from {url})" for rel, url in REQUIRED.items() if not (root / rel).exists()]
    if missing:
        raise PrepareError("COCO 2017 layout incomplete; missing:\n  " + "\n  ".join(missing))
    report = [f"{root / rel}: present" for rel in REQUIRED]
    if deep:
        val = json.loads((root / "annotations/instances_val2017.json").read_text())
        absent = [
            im["file_name"] for im in val["images"] if not (root / "val2017" / im["file_name"]).is_file()
        ]
        if absent:
            raise PrepareError(
                f"{len(absent)} val2017 images named in the json are missing, e.g. {absent[:3]}"
            )
        report.append(f"val2017: all {len(val['images'])} images of the json present")
    return report
