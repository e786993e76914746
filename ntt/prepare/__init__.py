"""`ntt prepare <benchmark>`: public downloads -> what the dataset configs read (docs/method.md §1.3-1.6).

    ntt prepare coco   [--root data/coco] [--deep]             layout check (nothing to convert)
    ntt prepare voc    [--root data/voc] [--mask-model M]      VOC xml -> COCO json, allimages/, SAM masks
    ntt prepare cdfsod [--root data/cdfsod] [--datasets A,B]   layout check + SAM masks for shots/test
    ntt prepare lvis   [--root data/lvis] [--coco data/coco]   LVIS json fix-ups (pycocotools route)
    ntt prepare masks  BOX_JSON IMAGE_DIR [--out OUT]          the box -> mask step on any COCO json
    ntt prepare fsod-vfm-shots SHOT_JSON --ref-json J --out O  FSOD-VFM's shot file -> refs json (refs_file)

Every command checks all of its input first (files there, jsons and xml files readable, images there and of
the recorded size; ``--check-only`` stops there), builds the mask model only then, and moves its outputs into
place only when all are made: bad input gives one line naming the file (exit status 2) and writes nothing.

Mask models (``--mask-model``): ``sam_vit_h`` (default, the paper's: needs ``pip install
segment-anything torchvision`` and ``ntt download sam_vit_h``) or ``sam2:<conf/backbone/sam2 option>``.
The data root defaults to ``$NTT_DATA`` or ``./data`` as in ``conf/paths/default.yaml``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ntt.prepare.contours import BACKENDS
from ntt.prepare.errors import PrepareError
from ntt.prepare.mask_models import MASK_MODELS_HELP
from ntt.utils.errors import UserError


def _data_root() -> Path:
    return Path(os.environ.get("NTT_DATA") or "data")


def _add_mask_args(p: argparse.ArgumentParser, *, optional: bool) -> None:
    p.add_argument(
        "--mask-model",
        default=None if optional else "sam_vit_h",
        help=MASK_MODELS_HELP + (" (omit: layout check only)" if optional else ""),
    )
    p.add_argument(
        "--device", default="auto", help="torch device for the mask model (auto: cuda if available)"
    )
    p.add_argument(
        "--checkpoints", default=None, help="checkpoint folder (default $NTT_CHECKPOINTS or ./checkpoints)"
    )
    p.add_argument("--contours", default="auto", choices=BACKENDS, help="contour tracer")
    p.add_argument("--overwrite", action="store_true", help="redo *_with_segm.json files that are up to date")
    p.add_argument(
        "--check-only", action="store_true", help="check the data and stop (no model built, nothing written)"
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ntt prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="benchmark", required=True)
    p = sub.add_parser("coco", help="check the COCO 2017 layout")
    p.add_argument("--root", type=Path, default=None)
    p.add_argument("--deep", action="store_true", help="also check every val2017 image of the json")
    p = sub.add_parser("voc", help="VOC 2007+2012 -> COCO jsons + masks")
    p.add_argument("--root", type=Path, default=None)
    p.add_argument("--copy-images", action="store_true", help="copy JPEGs into allimages/ instead of linking")
    p.add_argument("--boxes-only", action="store_true", help="convert only, no masks")
    _add_mask_args(p, optional=False)
    p = sub.add_parser("cdfsod", help="CD-FSOD layout check + masks")
    p.add_argument("--root", type=Path, default=None)
    p.add_argument("--datasets", default=None, help="comma-separated folders (default: all six)")
    _add_mask_args(p, optional=True)
    p = sub.add_parser("lvis", help="LVIS v1 json fix-ups")
    p.add_argument("--root", type=Path, default=None)
    p.add_argument("--coco", type=Path, default=None)
    p = sub.add_parser("fsod-vfm-shots", help="FSOD-VFM's shot file -> ntt's refs json (dataset.refs_file)")
    p.add_argument("shot_json", type=Path, help="e.g. FSOD-VFM's data/coco/few_shot_10shot_seed33.json")
    p.add_argument("--ref-json", type=Path, required=True, help="the run's dataset.ref_json")
    p.add_argument("--out", type=Path, required=True, help="the refs json to write")
    p.add_argument("--min-iou", type=float, default=0.5, help="least IoU of a listed box and its annotation")
    p = sub.add_parser("masks", help="box -> mask on one COCO json")
    p.add_argument("box_json", type=Path)
    p.add_argument("image_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: <box_json stem>_with_segm.json")
    _add_mask_args(p, optional=False)
    return ap


def _mask_model(args):
    """A builder of the mask model asked for (None: none asked): called only once the data passed its checks."""
    if not getattr(args, "mask_model", None):
        return None

    def build():
        from ntt.prepare import mask_models

        device = args.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return mask_models.build_masker(args.mask_model, checkpoint_dir=args.checkpoints, device=device)

    return build


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ntt prepare`; raises `PrepareError` (a user error: exit status 2) when it cannot go on."""
    args = build_parser().parse_args(argv)
    try:
        _run(args, _data_root())
    except PrepareError:
        raise
    except UserError as exc:  # e.g. a missing checkpoint: the same message, on one line
        raise PrepareError("; ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())) from exc
    except OSError as exc:  # a file that vanished or cannot be read: name it
        if exc.filename is None:
            raise
        raise PrepareError(f"cannot use {exc.filename}: {exc.strerror}") from exc
    return 0


def _run(args, data: Path) -> None:
    if args.benchmark == "coco":
        from ntt.prepare.coco import check_coco

        for line in check_coco(args.root or data / "coco", deep=args.deep):
            print(line)
    elif args.benchmark == "voc":
        from ntt.prepare.voc import prepare_voc

        root = args.root or data / "voc"
        written = prepare_voc(
            root,
            make_masker=None if args.boxes_only else _mask_model(args),
            copy_images=args.copy_images,
            contour_backend=args.contours,
            overwrite=args.overwrite,
            check_only=args.check_only,
        )
        print("\n".join(map(str, written)) if written else f"PASCAL VOC under {root}: checked, ready")
    elif args.benchmark == "cdfsod":
        from ntt.prepare.cdfsod import prepare_cdfsod

        names = [n.strip() for n in args.datasets.split(",")] if args.datasets else None
        root = args.root or data / "cdfsod"
        written = prepare_cdfsod(
            root,
            names=names,
            make_masker=_mask_model(args),
            contour_backend=args.contours,
            overwrite=args.overwrite,
            check_only=args.check_only,
        )
        print("\n".join(map(str, written)) if written else f"CD-FSOD layout complete under {root}")
    elif args.benchmark == "fsod-vfm-shots":
        from ntt.prepare.fsodvfm_shots import convert_shots

        print(convert_shots(args.shot_json, args.ref_json, args.out, min_iou=args.min_iou))
    elif args.benchmark == "lvis":
        from ntt.prepare.lvis import prepare_lvis

        for p in prepare_lvis(args.root or data / "lvis", args.coco or data / "coco"):
            print(p)
    else:
        from ntt.prepare.box_to_mask import make_masks, plan_masks, with_segm_path
        from ntt.prepare.outputs import StagedOutputs

        job = plan_masks(args.box_json, args.image_dir, output_json=args.out, overwrite=args.overwrite)
        if args.check_only:
            print(f"{args.box_json} and its images: checked, ready")
            return
        with StagedOutputs() as staged:
            make_masks([job], _mask_model(args), staged, contour_backend=args.contours)
            staged.commit()
        print(args.out or with_segm_path(args.box_json))
