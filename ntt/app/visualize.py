"""Pictures of results: instance overlays (class colours, contours, labels, scores) and GT-vs-prediction pages.

Shared by the Python API (``Instances.overlay``), ``ntt segment`` (one overlay PNG per image) and
``ntt visualize RUN_DIR`` (side by side ground truth | prediction for a benchmark run). Every overlay is
exactly the size of its image; a side-by-side page is two image-sized panels next to each other. Colours
come from a fixed palette indexed by class (the same class has the same colour in every picture); text
uses PIL's bundled default font (nothing is downloaded). The drawing itself lives in ``ntt.utils.draw``
(shared with the HTML report, ``ntt report``); its names are re-exported here.

    ntt visualize RUN_DIR [--out DIR] [--max-images N] [--score-thr S] [--max-draw M] [--root DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ntt.utils.draw import (
    PALETTE,
    class_color,
    draw_instances,
    draw_results,
    ground_truth_and_prediction,
    side_by_side,
)
from ntt.utils.errors import UserError
from ntt.utils.files import resolve_run_path

__all__ = [
    "PALETTE",
    "class_color",
    "draw_instances",
    "draw_results",
    "side_by_side",
    "visualize_run",
    "main",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Benchmark runs


def visualize_run(
    run_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    max_images: int | None = 20,
    score_thr: float = 0.0,
    max_draw: int | None = 30,
    root: str | Path | None = None,
) -> list[Path]:
    """Side-by-side ground truth | prediction PNGs of a benchmark run (``ntt run`` output directory).

    Reads ``config.yaml`` (test json and image root) and ``predictions.json`` (COCO results) of the run.

    Args:
        run_dir: the run directory.
        out_dir: where to write ``img<ID>.png`` (default ``<run_dir>/visualize``).
        max_images: the first N evaluated images (in predictions order; None = all).
        score_thr: draw predictions scoring at least this.
        max_draw: draw at most this many predictions per image (best first).
        root: directory the config's relative paths start from (default: the current directory, then
            the run directory).

    Returns:
        The written files.
    """
    from omegaconf import OmegaConf
    from tqdm import tqdm

    from ntt.data.coco import CocoDataset
    from ntt.data.images import load_in_annotation_frame

    run_dir = Path(run_dir)
    cfg_file, pred_file = run_dir / "config.yaml", run_dir / "predictions.json"
    for f, what in ((cfg_file, "the run's resolved config"), (pred_file, "the test stage's results")):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found ({what}): is {run_dir} an `ntt run` directory?")
    cfg = OmegaConf.load(cfg_file)
    base = Path(root) if root is not None else None
    test_json = resolve_run_path(str(cfg.dataset.test_json), base, run_dir)
    image_root = resolve_run_path(str(cfg.dataset.test_image_root), base, run_dir)
    if not test_json.is_file():
        raise FileNotFoundError(
            f"dataset.test_json={cfg.dataset.test_json} of {cfg_file} not found (looked in {test_json}): run "
            "from the directory the benchmark ran in, or pass --root"
        )
    ds = CocoDataset(
        test_json,
        image_root,
        class_names=cfg.dataset.get("class_names"),
        class_split=cfg.dataset.get("class_split"),
    )
    exif = bool(cfg.dataset.get("exif_orientation", False))
    by_image: dict[int, list[dict]] = {}
    for r in json.loads(pred_file.read_text()):
        by_image.setdefault(int(r["image_id"]), []).append(r)
    ids = list(by_image)
    if max_images is not None:
        ids = ids[: int(max_images)]
    out = Path(out_dir) if out_dir is not None else run_dir / "visualize"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for img_id in tqdm(ids, desc="visualize", unit="img"):
        try:
            info = ds.image_info(img_id)
        except KeyError:
            log.warning("image %d of predictions.json is not in %s: skipped", img_id, test_json)
            continue
        pil = load_in_annotation_frame(ds.image_path(img_id), info["width"], info["height"], apply_exif=exif)
        page = ground_truth_and_prediction(
            pil, ds, img_id, by_image[img_id], score_thr=score_thr, max_draw=max_draw
        )
        target = out / f"img{img_id}.png"
        page.save(target)
        written.append(target)
    log.info("%d side-by-side pictures -> %s", len(written), out)
    return written


def main(argv: list[str] | None = None) -> int:
    """``ntt visualize RUN_DIR``: side-by-side ground truth | prediction PNGs of a benchmark run."""
    ap = argparse.ArgumentParser(prog="ntt visualize", description=main.__doc__)
    ap.add_argument("run_dir", help="an `ntt run` output directory (with config.yaml and predictions.json)")
    ap.add_argument("--out", default=None, help="output folder (default RUN_DIR/visualize)")
    ap.add_argument("--max-images", type=int, default=20, help="first N images (0 = all; default 20)")
    ap.add_argument("--score-thr", type=float, default=0.0, help="draw predictions scoring at least this")
    ap.add_argument("--max-draw", type=int, default=30, help="predictions drawn per image, best first (30)")
    ap.add_argument("--root", default=None, help="folder the config's relative dataset paths start from")
    args = ap.parse_args(argv)
    try:
        files = visualize_run(
            args.run_dir,
            out_dir=args.out,
            max_images=args.max_images or None,
            score_thr=args.score_thr,
            max_draw=args.max_draw,
            root=args.root,
        )
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from err
    print(f"{len(files)} pictures in {files[0].parent if files else args.out}")
    return 0
