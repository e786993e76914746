"""CD-FSOD (ArTaxOr, clipart1k, DIOR, DeepFish, NEU-DET, UODD): layout check + SAM masks (docs/method.md §1.6).

The benchmark is used in its own layout, one folder per dataset under ``<root>`` (default ``data/cdfsod``)::

    <root>/<Dataset>/train/  test/  annotations/{1,5,10}_shot.json  annotations/test.json

(the folder names ``conf/dataset/cdfsod_*.yaml`` read: ArTaxOr, clipart1k, DIOR, FISH, NEU-DET, UODD).
The shot files and test.json have boxes only; like the authors, ntt gives every box a SAM mask and
writes ``annotations/{1,5,10}_shot_with_segm.json`` (images in ``train/``) and
``annotations/test_with_segm.json`` (images in ``test/``), which the dataset configs read. Every json and
image is checked first (also by the layout check without a mask model); outputs are moved into place
together when all are made.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ntt.prepare.box_to_mask import make_masks, plan_masks, with_segm_path
from ntt.prepare.errors import PrepareError
from ntt.prepare.outputs import StagedOutputs

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
    "The CD-FSOD benchmark (CD-ViTO, ECCV 2024) distributes the six datasets in this layout; see the "
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
    make_masker: Callable[[], Any] | None = None,
    contour_backend: str = "auto",
    overwrite: bool = False,
    check_only: bool = False,
) -> list[Path]:
    """Check every dataset folder, then add masks to the shot files and test.json of each.

    The check reads every box json and the header of every image with boxes (there, readable, of the
    json's size), also without a mask model; nothing is built or written when one is bad.

    Args:
        root: folder holding the dataset folders.
        names: dataset folders to do (default: all six).
        make_masker: builds the mask model (:func:`ntt.prepare.mask_models.build_masker`), called only after
            every check passed and only when masks are still to make; None = check the layout only.
        contour_backend: see :mod:`ntt.prepare.contours`.
        overwrite: redo ``*_with_segm.json`` files that are up to date.
        check_only: check and stop (nothing built or written).

    Returns:
        Every ``*_with_segm.json`` of the datasets (made now or kept); empty without a mask model.
    """
    root = Path(root)
    unknown = [n for n in names or [] if n not in DATASETS]
    if unknown:
        raise PrepareError(
            f"unknown CD-FSOD dataset folder(s) {unknown} in --datasets: use some of {list(DATASETS)}"
        )
    missing = {k: v for k, v in check_layout(root, names).items() if v}
    if missing:
        lines = "; ".join(
            f"{k}: missing "
            + (
                ", ".join(str(Path(p).relative_to(root / k)) for p in v)
                if (root / k).is_dir()
                else "the whole folder"
            )
            for k, v in missing.items()
        )
        raise PrepareError(f"CD-FSOD layout incomplete under {root}: {lines}. {DOWNLOADS}")
    fix = "fix it, or download the dataset again (the links: lovelyqian/CDFSOD-benchmark)"
    planned = [
        (plan_masks(box_json, image_dir, overwrite=overwrite, fix=fix), with_segm_path(box_json))
        for name in names or list(DATASETS)
        for box_json, image_dir in jobs(root / name)
    ]
    if make_masker is None or check_only:
        log.info("CD-FSOD layout complete under %s: every json and image checked (no masks made)", root)
        return []
    with StagedOutputs() as staged:
        make_masks([job for job, _ in planned], make_masker, staged, contour_backend=contour_backend)
        staged.commit()
    return [output for _, output in planned]
