"""CD-FSOD (ArTaxOr, clipart1k, DIOR, DeepFish, NEU-DET, UODD): layout check + SAM masks (docs/method.md §1.6).

The benchmark is used in its own layout, one folder per dataset under ``<root>`` (default ``data/cdfsod``)::

    <root>/<Dataset>/train/  test/  annotations/{1,5,10}_shot.json  annotations/test.json

(the folder names ``conf/dataset/cdfsod_*.yaml`` read: ArTaxOr, clipart1k, DIOR, FISH, NEU-DET, UODD).
The shot files and test.json have boxes only; like the authors, ntt gives every box a SAM mask and
writes ``annotations/{1,5,10}_shot_with_segm.json`` (images in ``train/``) and
``annotations/test_with_segm.json`` (images in ``test/``), which the dataset configs read.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ntt.prepare.box_to_mask import PrepareError, add_masks

log = logging.getLogger(__name__)

# dataset folder -> config name (conf/dataset/cdfsod_<name>.yaml)
DATASETS = {
    "ArTaxOr": "artaxor",
    "clipart1k": "clipart1k",
    "DIOR": "dior",
    "FISH": "fish",
    "NEU-DET": "neu_det",
    "UODD": "uodd",
}
SHOTS = (1, 5, 10)
DOWNLOADS = (
    "the CD-FSOD benchmark (CD-ViTO, ECCV 2024) distributes the six datasets in this layout; see the "
    "benchmark's repository (lovelyqian/CDFSOD-benchmark) for the download links"
)


def jobs(dataset_dir: Path) -> list[tuple[Path, Path]]:
    """(box json, image folder) pairs that get masks in one dataset folder."""
    ann = dataset_dir / "annotations"
    pairs = [(ann / f"{k}_shot.json", dataset_dir / "train") for k in SHOTS]
    return pairs + [(ann / "test.json", dataset_dir / "test")]


def check_layout(root: str | Path, names: list[str] | None = None) -> dict[str, list[str]]:
    """What is missing per dataset folder (empty lists = ready for masks)."""
    root = Path(root)
    report = {}
    for name in names or list(DATASETS):
        d = root / name
        report[name] = [str(p) for pair in jobs(d) for p in pair if not p.exists()]
    return report


def prepare_cdfsod(
    root: str | Path,
    *,
    names: list[str] | None = None,
    masker=None,
    contour_backend: str = "auto",
    overwrite: bool = False,
) -> list[Path]:
    """Add masks to the shot files and test.json of each dataset.

    Args:
        root: folder holding the dataset folders.
        names: dataset folders to do (default: all six).
        masker: mask model (:func:`ntt.prepare.mask_models.build_masker`); None = check the layout only.
        contour_backend: see :mod:`ntt.prepare.contours`.
        overwrite: redo existing ``*_with_segm.json`` files.
    """
    unknown = [n for n in names or [] if n not in DATASETS]
    if unknown:
        raise PrepareError(f"unknown CD-FSOD dataset folder(s) {unknown}; expected some of {list(DATASETS)}")
    report = check_layout(root, names)
    missing = {k: v for k, v in report.items() if v}
    if missing:
        lines = [f"  {k}: missing {', '.join(v)}" for k, v in missing.items()]
        raise PrepareError(
            "CD-FSOD layout incomplete under " + str(root) + ":\n" + "\n".join(lines) + "\n" + DOWNLOADS
        )
    if masker is None:
        log.info("CD-FSOD layout complete under %s (no mask model given: nothing converted)", root)
        return []
    written = []
    for name in names or list(DATASETS):
        for box_json, image_dir in jobs(Path(root) / name):
            written.append(
                add_masks(box_json, image_dir, masker, contour_backend=contour_backend, overwrite=overwrite)
            )
    return written
