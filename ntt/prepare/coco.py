"""COCO 2017 (few-shot and all-classes benchmarks): nothing to convert, only a layout check.

Expected under ``<root>`` (default ``data/coco``, what ``conf/dataset/coco_{fewshot,all}.yaml`` read)::

    <root>/train2017/*.jpg   <root>/val2017/*.jpg
    <root>/annotations/instances_train2017.json   <root>/annotations/instances_val2017.json

The quick check is about the files, not their content: folders that are folders and hold images, jsons
that are files and look whole (start with ``{`` and end with ``}``: a cut download does not). ``--deep``
also reads the val2017 json and checks each of its images (there, readable, of the json's size).
"""

from __future__ import annotations

import os
from pathlib import Path

from ntt.data.images import IMAGE_EXTENSIONS
from ntt.prepare.errors import PrepareError
from ntt.prepare.inputs import MAX_NAMED, check_coco_records, check_images, named, read_coco_json

REQUIRED = {
    "annotations/instances_train2017.json": "images.cocodataset.org/annotations/annotations_trainval2017.zip",
    "annotations/instances_val2017.json": "images.cocodataset.org/annotations/annotations_trainval2017.zip",
    "train2017": "images.cocodataset.org/zips/train2017.zip",
    "val2017": "images.cocodataset.org/zips/val2017.zip",
}


def _has_image(folder: Path) -> bool:
    """Whether the folder holds at least one image file (stops at the first: train2017 has 118k)."""
    with os.scandir(folder) as entries:
        return any(Path(e.name).suffix.lower() in IMAGE_EXTENSIONS for e in entries)


def _looks_whole(path: Path) -> bool:
    """A json object that was not cut short: first and last non-blank bytes are ``{`` and ``}``."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
        f.seek(max(0, path.stat().st_size - 64))
        tail = f.read().rstrip()
    return head.startswith(b"{") and tail.endswith(b"}")


def check_coco(root: str | Path, *, deep: bool = False) -> list[str]:
    """Check the COCO layout; raise with what is missing or broken and where to download it.

    Args:
        root: the COCO folder.
        deep: also read the val2017 json and check every image it names (header only: ~seconds).

    Returns:
        One line per checked item (for the command's report).
    """
    root = Path(root)
    missing = [rel for rel in REQUIRED if not (root / rel).exists()]
    if missing:
        urls = ", ".join(dict.fromkeys(REQUIRED[rel] for rel in missing))
        raise PrepareError(
            f"COCO 2017 layout incomplete under {root}; missing: {', '.join(missing)}: download {urls} and "
            f"extract them into {root}"
        )
    problems = []
    for rel, url in REQUIRED.items():
        path = root / rel
        if rel.endswith(".json"):
            if not path.is_file():
                problems.append(f"{path} is not a file: download {url}")
            elif not _looks_whole(path):
                problems.append(f"{path} is not a whole json object (cut short?): download {url} again")
        elif not path.is_dir():
            problems.append(f"{path} is not a folder: extract {url} into {root}")
        elif not _has_image(path):
            problems.append(f"{path} holds no images: extract {url} into {root}")
    if problems:
        raise PrepareError(f"COCO 2017 layout under {root}: {named(problems)}")
    report = [f"{root / rel}: present" for rel in REQUIRED]
    if deep:
        val_json = root / "annotations/instances_val2017.json"
        fix = f"download {REQUIRED['annotations/instances_val2017.json']} again"
        val = read_coco_json(val_json, fix=fix)
        check_coco_records(val, val_json, fix=fix)
        folder = root / "val2017"
        absent = [im["file_name"] for im in val["images"] if not (folder / im["file_name"]).is_file()]
        if absent:
            raise PrepareError(
                f"{len(absent)} val2017 images named in {val_json.name} are missing from {folder}, e.g. "
                f"{', '.join(absent[:MAX_NAMED])}: extract {REQUIRED['val2017']} there"
            )
        n = check_images(
            ((folder / im["file_name"], im["width"], im["height"], f"{val_json.name} (image id {im['id']})")
             for im in val["images"]),
            fix_missing=f"extract {REQUIRED['val2017']} into {root} again",
            fix_size=f"download {REQUIRED['val2017']} again (or the json)",
        )  # fmt: skip
        report.append(f"val2017: all {n} images of the json present")
    return report
