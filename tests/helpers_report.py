"""Folders for `ntt report` tests, made without models: a run, a study and an `ntt segment` output.

The run is on a small synthetic dataset (ntt.data.synthetic, generated in the test's folder: no shared data)
with predictions made from its ground truth so that the numbers are known and not all zero: the first test
image has every instance missed plus one false positive, the second is perfect, the third has half of its
instances, the fourth failed (a failure line with a traceback, as the test stage writes it). metrics.json is
what the test stage writes (`ntt.eval` on the same results and images).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SCORE = 0.9
FP_SCORE = 0.8


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def fake_run(
    run_dir: Path, data_dir: Path, *, seed: int = 33, shots: int = 2, drop_extra: int = 0, fail: bool = True
) -> dict:
    """Write a run directory; returns its metrics.json content.

    Args:
        run_dir: the run directory to make.
        data_dir: where the synthetic dataset is generated (shared by the runs of a study).
        seed: the run's seed (metrics.json).
        shots: the run's shots (metrics.json).
        drop_extra: also leave out the first N instances of the perfect image (a study's seeds differ).
        fail: the fourth image failed (else it has no detection).
    """
    from ntt.data.coco import CocoDataset
    from ntt.data.synthetic import generate_synthetic_dataset
    from ntt.eval import evaluate_coco

    paths = generate_synthetic_dataset(
        data_dir, num_images=12, image_size=(120, 160), min_size=24, max_size=50
    )
    ds = CocoDataset(paths.test, paths.image_root)
    ids = list(ds.image_ids)
    assert len(ids) == 4, ids
    missed_all, perfect, half, failed = ids
    preds = []
    for img_id in (perfect, half):
        anns = ds.annotations(img_id)
        keep = anns[drop_extra:] if img_id == perfect else anns[: max(1, len(anns) // 2)]
        for a in keep:
            preds.append(
                {
                    "image_id": img_id,
                    "category_id": a["category_id"],
                    "bbox": a["bbox"],
                    "score": SCORE,
                    "segmentation": _rle(ds.mask(a["id"])),
                }
            )
    box = np.zeros((120, 160), bool)
    box[2:12, 2:22] = True  # a corner no shape starts in: matches nothing
    preds.append(
        {
            "image_id": missed_all,
            "category_id": 1,
            "bbox": [2, 2, 20, 10],
            "score": FP_SCORE,
            "segmentation": _rle(box),
        }
    )
    run_dir.mkdir(parents=True)
    (run_dir / "predictions").mkdir()
    lines = (run_dir / "predictions" / "rank0.jsonl").write_text
    if not fail:
        lines = lambda text: None  # noqa: E731 - no failure line
    lines(
        json.dumps(
            {
                "image_id": failed,
                "key": "k",
                "file": str(ds.image_path(failed)),
                "ok": False,
                "error": "RuntimeError: out of memory <when> decoding",
                "traceback": 'Traceback (most recent call last):\n  File "x.py", line 1\nRuntimeError: out of memory',
            }
        )
        + "\n"
    )
    (run_dir / "config.yaml").write_text(
        f"dataset:\n  name: synthetic\n  test_json: {paths.test}\n  test_image_root: {paths.image_root}\n"
        "  class_names: null\n  class_split: null\n  test_image_ids: null\n  max_test_images: null\n"
        f"shots: {shots}\nseed: {seed}\n"
    )
    (run_dir / "predictions.json").write_text(json.dumps(preds))
    metrics = {
        "dataset": "synthetic",
        "sam2": "sam2_fake",
        "dinov2": "dinov2_fake",
        "shots": shots,
        "seed": seed,
        "variant": "fake",
        "num_images": len(ids),
        "num_detections": len(preds),
        "failed_images": [failed] if fail else [],
        "missing_images": [],
        "ntt_version": "0",
        "study": "fakestudy",
        "config_id": f"cfg{seed}",
        "setting_id": "set1",
        "identity": {"dataset": {"name": "synthetic"}, "shots": shots, "seed": seed},
    }
    metrics.update(
        evaluate_coco(ds.raw, [dict(p) for p in preds], category_ids=list(ds.category_ids), image_ids=ids)
    )
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def fake_segment_output(out: Path, data_dir: Path) -> dict:
    """An `ntt segment` output folder: 3 images (one failed), 3 detections, overlays; returns dataset.json."""
    from PIL import Image

    out.mkdir(parents=True)
    (out / "overlays").mkdir()
    images = [
        {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "sub/b.jpg", "width": 64, "height": 48},
        {"id": 3, "file_name": "c.jpg", "width": 64, "height": 48},
    ]
    dataset = {
        "images": images,
        "annotations": [],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "score": 0.9},
        {"image_id": 1, "category_id": 2, "bbox": [20, 1, 10, 10], "score": 0.2},
        {"image_id": 2, "category_id": 2, "bbox": [1, 1, 10, 10], "score": 0.7},
    ]
    (out / "dataset.json").write_text(json.dumps(dataset))
    (out / "predictions.json").write_text(json.dumps(results))
    (out / "failed.json").write_text(
        json.dumps([{"image_id": 3, "file_name": "c.jpg", "error": "OSError: truncated"}])
    )
    Image.new("RGB", (64, 48), (200, 30, 30)).save(out / "overlays" / "a.png")
    Image.new("RGB", (64, 48), (30, 30, 200)).save(out / "overlays" / "b.png")
    return dataset
