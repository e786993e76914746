"""Overlays and `ntt visualize RUN_DIR`: sizes, colours, contours, and the side-by-side pages of a run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DATA, require_path
from PIL import Image

from ntt.app.visualize import PALETTE, class_color, draw_instances, main, side_by_side, visualize_run

FRUITS = DATA / "fruits_nuts" / "data"


def grey(width=40, height=30):
    return Image.new("RGB", (width, height), (128, 128, 128))


def test_overlay_has_the_image_size_and_class_colours():
    masks = np.zeros((2, 30, 40), bool)
    masks[0, 5:25, 5:20] = True
    masks[1, 5:25, 25:38] = True
    boxes = [[5, 5, 19, 24], [25, 5, 37, 24]]
    out = draw_instances(grey(), masks, boxes, [0, 1], [0.9, 0.8], ["a", "b"], alpha=0.5)
    assert out.size == (40, 30)
    arr = np.asarray(out).astype(int)
    # the inside of a mask is blended 50/50 with its class colour, its border is the colour itself
    assert arr[20, 10].tolist() == [round((128 + c) / 2) for c in class_color(0)]
    assert arr[24, 10].tolist() == list(class_color(0))
    assert arr[20, 30].tolist() == [round((128 + c) / 2) for c in class_color(1)]
    assert arr[28, 2].tolist() == [128, 128, 128]  # background untouched


def test_score_threshold_and_empty_results_leave_the_image_alone():
    masks = np.ones((1, 30, 40), bool)
    out = draw_instances(grey(), masks, [[0, 0, 39, 29]], [0], [0.2], ["a"], score_thr=0.5)
    assert np.array_equal(np.asarray(out), np.asarray(grey()))
    empty = draw_instances(grey(), np.zeros((0, 30, 40), bool), np.zeros((0, 4)), [], [], ["a"])
    assert np.array_equal(np.asarray(empty), np.asarray(grey()))


def test_palette_is_deterministic_and_boxes_only_draws_rectangles():
    assert class_color(3) == PALETTE[3] and class_color(3 + len(PALETTE)) == PALETTE[3]
    out = np.asarray(draw_instances(grey(), None, [[10, 10, 30, 25]], [2], None, ["a", "b", "c"]))
    assert out[25, 20].tolist() == list(class_color(2))  # bottom edge of the box
    with pytest.raises(ValueError, match="masks are"):
        draw_instances(grey(), np.zeros((1, 5, 5), bool), [[0, 0, 1, 1]], [0], [1.0], ["a"])
    page = side_by_side(grey(), grey())
    assert page.size == (80, 30)


def fake_run(run_dir, images: int = 2):
    """A benchmark run directory on fruits_nuts whose predictions are the ground truth (no models)."""
    from pycocotools import mask as mask_utils

    from ntt.data.coco import CocoDataset

    ds = CocoDataset(FRUITS / "trainval.json", FRUITS / "images")
    preds = []
    for img_id in ds.image_ids[:images]:
        for a in ds.annotations(img_id):
            rle = mask_utils.encode(np.asfortranarray(ds.mask(a["id"]).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            preds.append(
                {
                    "image_id": img_id,
                    "category_id": a["category_id"],
                    "bbox": a["bbox"],
                    "score": 0.9,
                    "segmentation": rle,
                }
            )
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        f"dataset:\n  test_json: {FRUITS / 'trainval.json'}\n  test_image_root: {FRUITS / 'images'}\n"
        "  class_names: null\n  class_split: null\n"
    )
    (run_dir / "predictions.json").write_text(json.dumps(preds))
    return ds


def test_visualize_run_writes_side_by_side_pages(tmp_path):
    require_path(FRUITS, "fruits_nuts dataset")
    ds = fake_run(tmp_path / "run")
    files = visualize_run(tmp_path / "run", max_images=None)
    assert [f.name for f in files] == [f"img{i}.png" for i in ds.image_ids[:2]]
    info = ds.image_info(ds.image_ids[0])
    page = Image.open(files[0])
    assert page.size == (2 * info["width"], info["height"])  # two image-sized panels
    arr = np.asarray(page)
    # predictions == ground truth: both panels agree away from the titles and labels
    left, right = arr[:, : info["width"]], arr[:, info["width"] :]
    assert (left != right).any(axis=2).mean() < 0.05


def test_visualize_cli(tmp_path, capsys):
    require_path(FRUITS, "fruits_nuts dataset")
    fake_run(tmp_path / "run", images=1)
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "pics")]) == 0
    assert len(list((tmp_path / "pics").glob("*.png"))) == 1
    from ntt import cli

    # not a run directory: a clear error, no traceback (through `ntt`'s one user-error exit)
    assert cli.main(["visualize", str(tmp_path / "nowhere")]) == 2
