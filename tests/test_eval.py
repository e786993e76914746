"""CocoEvaluator: known answers, crowd / class-selection protocol, empty results, backend equality."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
from conftest import DATA
from pycocotools import mask as mask_utils

from ntt.data.coco import CocoDataset, ann_to_mask, ann_to_rle
from ntt.data.synthetic import generate_synthetic_dataset
from ntt.eval import STAT_NAMES, CocoEvaluator, evaluate_coco

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CLARIFAI = DATA / "coco_val2017_clarifai10/datasets/upload/image_segmentation/coco"
BACKENDS = ("pycocotools", "faster_coco_eval")
HALF = 51 / 101  # precision 1 on recall thresholds 0.00..0.50 (51 of the 101), 0 above


def rect(ann_id, image_id, cat, x, y, w, h, crowd=0):
    return {
        "id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
        "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]], "iscrowd": crowd,
    }  # fmt: skip


def make_gt(anns, n_images=2, size=100):
    return {
        "images": [
            {"id": i + 1, "file_name": f"{i + 1}.png", "height": size, "width": size} for i in range(n_images)
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
        "annotations": anns,
    }


def pred(gt, ann, score, cat=None):
    """A prediction identical to a ground-truth annotation (box and RLE mask)."""
    im = next(i for i in gt["images"] if i["id"] == ann["image_id"])
    rle = ann_to_rle(ann, im["height"], im["width"])
    return {
        "image_id": ann["image_id"], "category_id": cat or ann["category_id"], "bbox": list(ann["bbox"]),
        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}, "score": score,
    }  # fmt: skip


def run(gt, results, cats, backend="pycocotools", **kw):
    return evaluate_coco(gt, results, category_ids=cats, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ground_truth_as_prediction_is_perfect(backend):
    anns = [rect(1, 1, 1, 10, 10, 40, 40), rect(2, 1, 2, 50, 50, 45, 40), rect(3, 2, 1, 5, 20, 60, 30)]
    gt = make_gt(anns)
    m = run(gt, [pred(gt, a, 1.0) for a in anns], [1, 2], backend)
    for t in ("bbox", "segm"):
        assert set(m[t]) == set(STAT_NAMES)
        for k in ("AP", "AP50", "AP75", "AR100"):
            assert m[t][k] == pytest.approx(1.0, abs=1e-12)  # pycocotools: tp / (tp + fp + eps) = 1 - 2e-16
    assert [r["category_id"] for r in m["per_class"]] == [1, 2]
    assert all(r[k] == pytest.approx(1.0, abs=1e-12) for r in m["per_class"] for k in ("bbox_AP", "segm_AP"))
    assert m["per_class"][0]["num_gt"] == 2 and m["per_class"][0]["name"] == "a"


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_of_two_found(backend):
    """2 GT (one per image), one perfect detection, the other missed.

    Sorted detections: one TP -> recall [0.5], precision [1.0]. COCOeval's 101 recall thresholds
    0.00, 0.01, ..., 1.00: searchsorted(rc=[0.5], t, "left") is 0 for t <= 0.50 (51 thresholds, precision 1)
    and 1 (past the end, precision left at 0) for the 50 thresholds above. AP = 51/101 at every IoU.
    """
    anns = [rect(1, 1, 1, 10, 10, 40, 40), rect(2, 2, 1, 30, 30, 50, 40)]
    gt = make_gt(anns)
    m = run(gt, [pred(gt, anns[0], 0.9)], [1], backend)
    for t in ("bbox", "segm"):
        assert m[t]["AP"] == pytest.approx(HALF, abs=1e-12)
        assert m[t]["AP50"] == pytest.approx(HALF, abs=1e-12)
        assert m[t]["AP75"] == pytest.approx(HALF, abs=1e-12)
        assert m[t]["AR100"] == pytest.approx(0.5, abs=1e-12)
        assert m[t]["APm"] == pytest.approx(HALF, abs=1e-12) and m[t]["APs"] == m[t]["APl"] == -1
    assert m["per_class"][0]["bbox_AP"] == pytest.approx(HALF, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_false_positive_ranked_first(backend):
    """1 GT; an FP (score .9) above the TP (score .8).

    Cumulative: tp [0, 1], fp [1, 1] -> recall [0, 1], precision [0, .5]; COCOeval makes precision
    non-increasing from the right -> [.5, .5], so every recall threshold gets 0.5: AP = 0.5 exactly.
    """
    anns = [rect(1, 1, 1, 10, 10, 40, 40)]
    gt = make_gt(anns, n_images=1)
    fp = pred(gt, rect(9, 1, 1, 55, 55, 40, 40), 0.9)
    m = run(gt, [fp, pred(gt, anns[0], 0.8)], [1], backend)
    for t in ("bbox", "segm"):
        assert m[t]["AP"] == pytest.approx(0.5, abs=1e-12)
        assert m[t]["AR100"] == 1.0
    # same detections, TP first: AP 1
    m = run(gt, [dict(fp, score=0.7), pred(gt, anns[0], 0.8)], [1], backend)
    assert m["bbox"]["AP"] == pytest.approx(1.0, abs=1e-12) and m["segm"]["AP"] == pytest.approx(
        1.0, abs=1e-12
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_crowd_region_ignored(backend):
    """A detection on an iscrowd=1 region is neither TP nor FP, and an undetected crowd region is no miss."""
    obj = rect(1, 1, 1, 10, 10, 40, 40)
    crowd_mask = np.zeros((100, 100), np.uint8)
    crowd_mask[55:95, 55:95] = 1
    rle = mask_utils.encode(np.asfortranarray(crowd_mask))
    crowd = {"id": 2, "image_id": 1, "category_id": 1, "bbox": [55, 55, 40, 40], "area": 1600, "iscrowd": 1,
             "segmentation": {"size": [100, 100], "counts": rle["counts"].decode()}}  # fmt: skip
    gt = make_gt([obj, crowd], n_images=1)
    on_crowd = pred(gt, crowd, 0.95)
    for results in ([on_crowd, pred(gt, obj, 0.9)], [pred(gt, obj, 0.9)]):
        m = run(gt, results, [1], backend)
        assert m["bbox"]["AP"] == pytest.approx(1.0, abs=1e-12) and m["segm"]["AP"] == pytest.approx(
            1.0, abs=1e-12
        )
    assert m["per_class"][0]["num_gt"] == 1
    # control: without the crowd annotation the same detection is a top-ranked false positive
    m = run(make_gt([obj], n_images=1), [on_crowd, pred(gt, obj, 0.9)], [1], backend)
    assert m["bbox"]["AP"] == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_crowd_region_real_coco(backend):
    if not CLARIFAI.exists():
        pytest.skip(f"shared dataset not found at {CLARIFAI}")
    ds = CocoDataset(CLARIFAI / "annotations/instances_val2017_subset.json", CLARIFAI / "images")
    crowd = [a for a in ds.all_annotations() if a["iscrowd"]][0]
    results = [pred(ds.raw, a, 0.9) for a in ds.all_annotations() if not a["iscrowd"]]
    results.append(pred(ds.raw, crowd, 1.0))  # uncompressed-RLE crowd region, detected with top score
    used = sorted({a["category_id"] for a in ds.all_annotations()})
    m = run(ds.raw, results, used, backend)
    assert m["bbox"]["AP"] == pytest.approx(1.0, abs=1e-12) and m["segm"]["AP"] == pytest.approx(
        1.0, abs=1e-12
    )
    assert len(m["per_class"]) == 18


@pytest.mark.parametrize("backend", BACKENDS)
def test_unselected_classes_ignored(backend):
    anns = [rect(1, 1, 1, 10, 10, 40, 40), rect(2, 2, 1, 30, 30, 50, 40), rect(3, 1, 2, 55, 55, 40, 40)]
    gt = make_gt(anns)
    perfect_1 = [pred(gt, anns[0], 0.9), pred(gt, anns[1], 0.8)]
    # class-2 GT (unselected) is never detected and does not lower AP; class-2/3 detections are ignored too
    extra = [pred(gt, anns[2], 0.99), pred(gt, anns[0], 0.97, cat=3)]
    m = run(gt, perfect_1 + extra, [1], backend)
    assert m["bbox"]["AP"] == pytest.approx(1.0, abs=1e-12) and m["segm"]["AP"] == pytest.approx(
        1.0, abs=1e-12
    )
    assert [r["category_id"] for r in m["per_class"]] == [1]
    # selecting class 2 as well: its GT is missed -> class AP 0, mean (1 + 0) / 2
    m = run(gt, perfect_1, [1, 2], backend)
    assert m["bbox"]["AP"] == pytest.approx(0.5, abs=1e-12)
    assert [r["bbox_AP"] for r in m["per_class"]] == pytest.approx([1.0, 0.0], abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_results(backend, capsys):
    anns = [rect(1, 1, 1, 10, 10, 40, 40)]
    gt = make_gt(anns)
    ev = CocoEvaluator(gt, category_ids=[1, 2], backend=backend)
    m = ev.evaluate()
    for t in ("bbox", "segm"):
        assert m[t]["AP"] == m[t]["AP50"] == m[t]["AR100"] == m[t]["APm"] == 0.0
        assert m[t]["APs"] == m[t]["APl"] == -1.0  # no small / large ground truth
    assert [(r["bbox_AP"], r["segm_AP"]) for r in m["per_class"]] == [(0.0, 0.0), (-1.0, -1.0)]
    assert m["num_results"] == 0
    assert ev.summary_line() == "0.00,0.00,0.00,0.00,0.00,0.00"
    assert capsys.readouterr().out == ""  # library prints are captured, not printed


def test_image_subset_and_reset():
    anns = [rect(1, 1, 1, 10, 10, 40, 40), rect(2, 2, 1, 30, 30, 50, 40)]
    gt = make_gt(anns)
    ev = CocoEvaluator(gt, category_ids=[1], image_ids=[1])
    ev.process([pred(gt, anns[0], 0.9)])
    ev.process([pred(gt, anns[1], 0.1, cat=2)])  # on a non-evaluated image: ignored
    m = ev.evaluate()
    assert m["bbox"]["AP"] == pytest.approx(1.0, abs=1e-12)
    assert m["num_images"] == 1 and m["per_class"][0]["num_gt"] == 1
    assert ev.summary_line(header=True) == "bbox_AP,bbox_AP50,bbox_AP75,segm_AP,segm_AP50,segm_AP75"
    assert ev.summary_line() == "100.00,100.00,100.00,100.00,100.00,100.00"
    ev.reset()
    assert ev.evaluate()["bbox"]["AP"] == 0.0


def test_errors_and_options(tmp_path, monkeypatch, caplog):
    anns = [rect(1, 1, 1, 10, 10, 40, 40)]
    gt = make_gt(anns)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    assert run(path, [pred(gt, anns[0], 1.0)], [1])["bbox"]["AP"] == pytest.approx(1.0)  # gt given as a path
    with pytest.raises(ValueError, match="unknown eval backend"):
        CocoEvaluator(gt, category_ids=[1], backend="lvis")
    with pytest.raises(ValueError, match="image ids not in the ground truth: \\[42\\]"):
        run(gt, [dict(pred(gt, anns[0], 1.0), image_id=42)], [1])
    with pytest.raises(ValueError, match="evaluation image ids not in the json"):
        CocoEvaluator(gt, category_ids=[1], image_ids=[5])
    with pytest.raises(ValueError, match="category ids \\[7\\]"):
        CocoEvaluator(gt, category_ids=[7])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoEvaluator(tmp_path / "missing.json", category_ids=[1])
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)
    with pytest.raises(ImportError, match="pip install faster-coco-eval"):
        CocoEvaluator(gt, category_ids=[1], backend="faster_coco_eval")
    # boxes-only ground truth: segm skipped with a warning
    boxes = make_gt([{k: v for k, v in anns[0].items() if k != "segmentation"}])
    with caplog.at_level(logging.WARNING, logger="ntt.eval.coco"):
        ev = CocoEvaluator(boxes, category_ids=[1])
    assert ev.iou_types == ("bbox",) and "boxes only" in caplog.text
    ev.process([{k: v for k, v in pred(gt, anns[0], 1.0).items() if k != "segmentation"}])
    m = ev.evaluate()
    assert m["bbox"]["AP"] == pytest.approx(1.0) and "segm" not in m
    assert ev.summary_line() == "100.00,100.00,100.00,,,"


def _random_predictions(coco: dict, rng: np.random.Generator, tie_scores: bool) -> list[dict]:
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    cats = [c["id"] for c in coco["categories"]]
    out = []

    def add(img, cat, mask, score):
        if mask.sum() == 0:
            return
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        if tie_scores:
            score = round(score, 1)
        out.append({"image_id": img, "category_id": cat, "score": float(score),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})  # fmt: skip

    for a in coco["annotations"]:
        h, w = sizes[a["image_id"]]
        for _ in range(int(rng.integers(0, 3))):  # 0, 1 or 2 (duplicate) detections per object
            m = ann_to_mask(a, h, w)
            dy, dx = (int(v) for v in rng.integers(-6, 7, 2))
            shifted = np.zeros_like(m)
            shifted[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = m[
                max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
            ]
            cat = a["category_id"] if rng.random() < 0.85 else int(rng.choice(cats))
            add(a["image_id"], cat, shifted, rng.random())
    for img, (h, w) in sizes.items():
        for _ in range(int(rng.integers(2, 6))):  # random false positives, small to large
            bw, bh = (int(v) for v in rng.integers(4, 130, 2))
            x, y = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
            m = np.zeros((h, w), bool)
            m[y : y + bh, x : x + bw] = True
            add(img, int(rng.choice(cats)), m, rng.random())
    return out


@pytest.mark.parametrize("tie_scores", [False, True])
def test_backends_identical(tmp_path, tie_scores):
    paths = generate_synthetic_dataset(
        tmp_path, num_images=6, image_size=(300, 400), min_size=16, max_size=220, seed=11
    )
    coco = json.loads(paths.annotations.read_text())
    results = _random_predictions(coco, np.random.default_rng(5), tie_scores)
    assert len(results) > 30
    evs = {}
    for backend in BACKENDS:
        ev = CocoEvaluator(coco, category_ids=[1, 2, 4], image_ids=[1, 2, 3, 5, 6], backend=backend)
        ev.process(results)
        evs[backend] = (ev, ev.evaluate())
    (ev_a, m_a), (ev_b, m_b) = evs["pycocotools"], evs["faster_coco_eval"]
    for t in ("bbox", "segm"):
        stats = np.array([m_a[t][k] for k in STAT_NAMES])
        assert np.all(stats > 0) and np.all(stats < 1)  # a non-trivial case: every stat in (0, 1)
        for k in STAT_NAMES:
            assert abs(m_a[t][k] - m_b[t][k]) < 1e-12, (t, k, m_a[t][k], m_b[t][k])
        pa, pb = (np.asarray(e.cocoevals[t].eval["precision"]) for e in (ev_a, ev_b))
        ra, rb = (np.asarray(e.cocoevals[t].eval["recall"]) for e in (ev_a, ev_b))
        assert pa.shape == pb.shape == (10, 101, 4, 4, 3)
        assert np.abs(pa - pb).max() < 1e-12 and np.abs(ra - rb).max() < 1e-12
    for ra, rb in zip(m_a["per_class"], m_b["per_class"]):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=1e-12), k
