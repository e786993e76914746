"""The official LVIS metric (`eval.backend=lvis`, ntt.eval.lvis): known answers on tiny crafted LVIS ground truth.

Every expected value is worked out by hand from LVISEval's rules (101 recall thresholds, precision made
monotone from the right): a class found perfectly has AP 1; a class with 2 instances of which only one is
found at the top score has precision 1 at recall thresholds 0.00..0.50 (51 of 101) and 0 above: AP 51/101.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import sys

import numpy as np
import pytest

from ntt.data.coco import ann_to_rle
from ntt.eval import make_evaluator
from ntt.eval.lvis import STAT_NAMES, LvisEvaluator, evaluate_lvis

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
# the optional package (pyproject extra `lvis`, `make setup-lvis`); the tests of its absence run without it
needs_lvis = pytest.mark.skipif(
    importlib.util.find_spec("lvis") is None,
    reason="the official LVIS metric needs the lvis package: make setup-lvis (pip install -e '.[lvis]')",
)

HALF = 51 / 101
# LVISEval's precision is tp / (tp + fp + eps) with eps = np.spacing(1): a perfect class scores 1 - 2.2e-16,
# and means over 101 thresholds round in the last bits; 1e-12 separates every hand value here (steps >= 1/101)
EXACT = 1e-12


def r(stats: dict) -> dict:
    """The stats rounded to 12 decimals (see EXACT), so hand values compare with ==."""
    return {k: round(v, 12) if isinstance(v, float) else v for k, v in stats.items()}


def rect(ann_id, image_id, cat, x, y, w, h):
    return {
        "id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
        "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]], "iscrowd": 0,
    }  # fmt: skip


def make_gt(anns, freq=None, neg=None, not_exhaustive=None, n_images=3, size=100):
    """LVIS v1 layout: category `frequency`, per image `neg_category_ids` / `not_exhaustive_category_ids`.
    Classes: 1 "rare_thing" (r), 2 "common_thing" (c), 3 "frequent_thing" (f) unless `freq` says otherwise."""
    freq = freq or {1: "r", 2: "c", 3: "f"}
    neg, not_exhaustive = neg or {}, not_exhaustive or {}
    names = {1: "rare_thing", 2: "common_thing", 3: "frequent_thing"}
    return {
        "images": [
            {"id": i, "file_name": f"{i}.png", "height": size, "width": size,
             "neg_category_ids": neg.get(i, []), "not_exhaustive_category_ids": not_exhaustive.get(i, [])}
            for i in range(1, n_images + 1)
        ],
        "categories": [{"id": c, "name": names[c], "frequency": f} for c, f in sorted(freq.items())],
        "annotations": copy.deepcopy(anns),  # the tests edit their copy
    }  # fmt: skip


def pred(gt, ann, score, cat=None, shift=0):
    """A prediction equal to a ground-truth annotation (box and RLE mask), moved `shift` px to the right."""
    im = next(i for i in gt["images"] if i["id"] == ann["image_id"])
    a = dict(ann, bbox=[ann["bbox"][0] + shift, *ann["bbox"][1:]])
    x, y, w, h = a["bbox"]
    a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    rle = ann_to_rle(a, im["height"], im["width"])
    return {
        "image_id": a["image_id"], "category_id": cat or a["category_id"], "bbox": list(a["bbox"]),
        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}, "score": score,
    }  # fmt: skip


ANNS = [rect(1, 1, 1, 10, 10, 40, 40), rect(2, 1, 3, 50, 50, 45, 40), rect(3, 2, 3, 5, 20, 60, 30)]


@needs_lvis
def test_ground_truth_as_prediction_is_perfect_and_groups_come_from_frequency():
    gt = make_gt(ANNS)
    m = evaluate_lvis(gt, [pred(gt, a, 0.9) for a in ANNS], category_ids=[1, 2, 3])
    for iou_type in ("bbox", "segm"):
        s = r(m[iou_type])
        assert list(s) == list(STAT_NAMES)
        assert s["AP"] == s["AP50"] == s["AP75"] == s["APr"] == s["APf"] == 1.0
        assert s["APc"] == -1.0  # no ground truth of a common class: LVIS's "absent"
        assert s["AR@300"] == 1.0
        # sizes: 40x40 and 45x40 and 60x30 are all 'medium' (32^2 .. 96^2): no small or large instance
        assert s["APm"] == 1.0 and s["APs"] == -1.0 and s["APl"] == -1.0
    rows = {row["category_id"]: r(row) for row in m["per_class"]}
    assert rows[1]["frequency"] == "r" and rows[1]["num_gt"] == 1 and rows[1]["segm_AP"] == 1.0
    assert rows[3]["num_gt"] == 2 and rows[2]["bbox_AP"] == -1.0
    assert m["backend"] == "lvis" and "official LVIS metric" in m["metric"] and m["num_results"] == 3
    # the groups are read from the json: call class 3 common instead, and APc takes its AP
    regrouped = evaluate_lvis(make_gt(ANNS, freq={1: "r", 2: "f", 3: "c"}), [pred(gt, a, 0.9) for a in ANNS], category_ids=[1, 2, 3])  # fmt: skip
    assert r(regrouped["bbox"])["APc"] == 1.0 and r(regrouped["bbox"])["APf"] == -1.0


@needs_lvis
def test_a_missed_instance_gives_the_hand_computed_ap():
    gt = make_gt(ANNS)
    results = [pred(gt, ANNS[0], 0.9), pred(gt, ANNS[1], 0.8)]  # class 3: one of its two instances
    m = evaluate_lvis(gt, results, category_ids=[1, 3], iou_types=["bbox"])
    assert r(m["bbox"])["APr"] == 1.0
    assert r(m["bbox"])["APf"] == pytest.approx(HALF, abs=EXACT)
    assert r(m["bbox"])["AP"] == pytest.approx((1 + HALF) / 2, abs=EXACT)
    assert r(m["bbox"])["AR@300"] == pytest.approx((1 + 0.5) / 2, abs=EXACT)
    assert "segm" not in m


@needs_lvis
def test_a_box_off_by_iou_0_6_counts_at_the_lower_thresholds_only():
    # ground truth 40 px wide, prediction moved 10 px: IoU = 30*40 / (50*40) = 0.6 -> a hit at IoU 0.50,
    # 0.55 and 0.60 (3 of the 10 thresholds), a miss above: AP = 3/10, AP50 = 1, AP75 = 0
    gt = make_gt(ANNS[:1])
    m = evaluate_lvis(gt, [pred(gt, ANNS[0], 0.9, shift=10)], category_ids=[1], iou_types=["bbox"])
    assert r(m["bbox"])["AP"] == pytest.approx(0.3, abs=EXACT)
    assert r(m["bbox"])["AP50"] == 1.0 and r(m["bbox"])["AP75"] == 0.0


@needs_lvis
def test_federated_rules_unlike_cocoeval():
    """A false positive counts only on an image where its class is annotated or a listed negative; on
    an image whose class is not exhaustively annotated, unmatched detections are ignored."""
    gt = make_gt(ANNS[:1])
    hit = pred(gt, ANNS[0], 0.9)
    stray = dict(pred(gt, ANNS[0], 0.95), image_id=2)  # class 1 on image 2, where it has no instance
    # class 1 neither present nor a negative on image 2: the stray detection is not judged
    assert evaluate_lvis(gt, [hit, stray], category_ids=[1])["bbox"]["AP"] == pytest.approx(1.0, abs=EXACT)
    # image 2 lists class 1 as a negative: the stray detection (higher score) is a false positive.
    # Ranked [FP 0.95, TP 0.9]: precision 1/2 at recall 1, made monotone: 0.5 at every threshold
    neg = make_gt(ANNS[:1], neg={2: [1]})
    assert evaluate_lvis(neg, [hit, stray], category_ids=[1])["bbox"]["AP"] == pytest.approx(0.5, abs=EXACT)
    # an unmatched detection on image 1, where class 1 is annotated: a false positive ...
    extra = pred(gt, ANNS[0], 0.95, shift=50)  # IoU 0 with the instance
    assert evaluate_lvis(gt, [hit, extra], category_ids=[1])["bbox"]["AP"] == pytest.approx(0.5, abs=EXACT)
    # ... unless image 1 is not exhaustively annotated for class 1
    ne = make_gt(ANNS[:1], not_exhaustive={1: [1]})
    assert evaluate_lvis(ne, [hit, extra], category_ids=[1])["bbox"]["AP"] == pytest.approx(1.0, abs=EXACT)


@needs_lvis
def test_segm_areas_come_from_the_masks_not_the_boxes():
    """A stray detection whose mask is small (20x20 = 400 px) but whose box is medium (60x60): in the segm
    pass it is judged by its mask, so it is outside the medium range and APm stays 1; with its box area it
    would be a medium false positive ranked first (APm 0.5)."""
    gt = make_gt([rect(1, 1, 1, 30, 30, 50, 50)])  # 2500 px: medium
    hit = pred(gt, gt["annotations"][0], 0.9)
    stray = pred(gt, rect(9, 1, 1, 0, 0, 20, 20), 0.95)  # IoU 0 with the instance
    stray["bbox"] = [0, 0, 60, 60]
    m = evaluate_lvis(gt, [hit, stray], category_ids=[1], iou_types=["segm"])
    assert r(m["segm"])["APm"] == 1.0
    assert r(m["segm"])["AP"] == 0.5  # area "all": the stray detection is a false positive there


@needs_lvis
def test_empty_results_and_selected_classes_only():
    gt = make_gt(ANNS)
    m = evaluate_lvis(gt, [], category_ids=[1, 3])
    assert r(m["bbox"])["AP"] == 0.0 and r(m["segm"])["APr"] == 0.0 and m["num_results"] == 0
    # a perfect detection of an unselected class changes nothing
    m = evaluate_lvis(gt, [pred(gt, ANNS[0], 0.9)], category_ids=[3], iou_types=["bbox"])
    assert r(m["bbox"])["AP"] == 0.0 and [row["category_id"] for row in m["per_class"]] == [3]
    # evaluated images only: image 2's instance of class 3 is not counted when only image 1 is evaluated
    m = evaluate_lvis(gt, [pred(gt, ANNS[1], 0.9)], category_ids=[3], image_ids=[1], iou_types=["bbox"])
    assert r(m["bbox"])["AP"] == 1.0 and m["per_class"][0]["num_gt"] == 1 and m["num_images"] == 1


@needs_lvis
def test_the_caller_data_is_not_modified_and_numpy_is_left_as_found(tmp_path):
    gt = make_gt(ANNS)
    results = [pred(gt, a, 0.9) for a in ANNS]
    before = json.dumps([gt, results], sort_keys=True)
    ev = make_evaluator(gt, backend="lvis", category_ids=[1, 3], image_ids=None, iou_types=("bbox", "segm"))
    assert isinstance(ev, LvisEvaluator)
    ev.process(results)
    ev.evaluate()
    assert json.dumps([gt, results], sort_keys=True) == before
    assert "float" not in np.__dict__  # the alias lent to lvis 0.5.3 is taken back
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    assert evaluate_lvis(path, results, category_ids=[1, 3], iou_types=["bbox"])["bbox"][
        "AP"
    ] == pytest.approx(1.0, abs=EXACT)


@needs_lvis
@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda gt: gt["categories"][0].pop("frequency"), r"categories \[1\] have no `frequency` of r/c/f"),
        (lambda gt: gt["images"][1].pop("neg_category_ids"), r"images \[2\] lack neg_category_ids"),
        (lambda gt: gt["annotations"][0].pop("area"), r"annotations \[1\] have no `area`"),
        (lambda gt: gt["annotations"][0].pop("segmentation"), r"annotations \[1\] have no segmentation"),
    ],
    ids=["no_frequency", "no_neg_category_ids", "no_area", "no_segmentation"],
)
def test_ground_truth_without_lvis_fields_is_refused(edit, message):
    gt = make_gt(ANNS)
    edit(gt)
    with pytest.raises(ValueError, match=message):
        LvisEvaluator(gt, category_ids=[1, 3])


@needs_lvis
def test_bad_calls_are_refused():
    gt = make_gt(ANNS)
    with pytest.raises(ValueError, match=r"evaluation image ids not in the json: \[9\]"):
        LvisEvaluator(gt, category_ids=[1], image_ids=[9])
    with pytest.raises(ValueError, match=r"category ids \[7\] are not in the json"):
        LvisEvaluator(gt, category_ids=[7])
    ev = LvisEvaluator(gt, category_ids=[1])
    ev.process([dict(pred(gt, ANNS[0], 0.9), image_id=42)])
    with pytest.raises(ValueError, match=r"image ids not in the ground truth: \[42\]"):
        ev.evaluate()
    ev.reset()
    ev.process([{k: v for k, v in pred(gt, ANNS[0], 0.9).items() if k != "segmentation"}])
    with pytest.raises(ValueError, match="segm evaluation needs a 'segmentation'"):
        ev.evaluate()


def test_without_the_lvis_package_the_message_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lvis", None)
    with pytest.raises(ImportError, match=r"pip install lvis"):
        LvisEvaluator(make_gt(ANNS), category_ids=[1])


def test_eval_lvis_without_the_package_stops_in_the_preflight(tmp_path, monkeypatch):
    """`ntt run eval=lvis` without the lvis package: one line saying how to install it (exit 2), before any
    stage ran (runs with or without the package: its import is made to fail)."""
    from helpers_pipeline import run_smoke

    from ntt.runner.preflight import PreflightError

    monkeypatch.setitem(sys.modules, "lvis", None)
    small = ("dataset=synthetic", "dataset.synthetic.num_images=9", "dataset.max_test_images=1")
    with pytest.raises(
        PreflightError, match=r"with eval.backend=lvis: eval.backend=lvis needs the lvis package"
    ):
        run_smoke(tmp_path, "eval=lvis", small=small)
    assert not (tmp_path / "run" / "refs.json").exists()


@needs_lvis
def test_eval_lvis_is_checked_before_any_image_is_segmented(tmp_path, caplog):
    """`ntt run eval=lvis` on a test json without LVIS's fields stops in the preflight (exit 2), naming the
    json and the missing fields, before any stage ran."""
    from helpers_pipeline import run_smoke

    from ntt.runner.preflight import PreflightError

    with caplog.at_level(logging.INFO), pytest.raises(PreflightError) as err:
        small = ("dataset=synthetic", "dataset.synthetic.num_images=9", "dataset.max_test_images=1")
        run_smoke(tmp_path, "eval=lvis", small=small)
    msg = str(err.value)
    assert "with eval.backend=lvis" in msg and "have no `frequency` of r/c/f" in msg
    assert "neg_category_ids" in msg
    assert not (tmp_path / "run" / "refs.json").exists()


@needs_lvis
@pytest.mark.slow  # about 20 s on 2 busy cores: the whole smoke pipeline
def test_ntt_run_eval_lvis_writes_the_lvis_metrics(tmp_path):
    """`ntt run eval=lvis` (smoke: tiny random models, plumbing only) on the synthetic shapes made LVIS-like:
    metrics.json holds LVISEval's keys, equal to evaluating predictions.json directly."""
    from helpers_pipeline import run_smoke

    from ntt.data.synthetic import generate_synthetic_dataset

    root = tmp_path / "data"
    generate_synthetic_dataset(root, num_images=9, seed=0)
    test_json = root / "test.json"
    gt = json.loads(test_json.read_text())
    for k, cat in enumerate(gt["categories"]):
        cat["frequency"] = "rcf"[k % 3]
    for im in gt["images"]:
        im.update(neg_category_ids=[], not_exhaustive_category_ids=[])
    test_json.write_text(json.dumps(gt))
    small = ("dataset=synthetic", "dataset.synthetic.num_images=9", "dataset.max_test_images=2")
    run_smoke(tmp_path, "eval=lvis", f"dataset.root={root}", small=small)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["backend"] == "lvis" and list(metrics["bbox"]) == list(STAT_NAMES)
    predictions = json.loads((tmp_path / "run" / "predictions.json").read_text())
    ids = sorted(im["id"] for im in gt["images"])[:2]
    direct = evaluate_lvis(
        test_json, predictions, category_ids=[c["id"] for c in gt["categories"]], image_ids=ids
    )
    assert metrics["bbox"] == direct["bbox"] and metrics["segm"] == direct["segm"]
    assert metrics["num_images"] == 2


@needs_lvis
def test_on_exhaustive_ground_truth_lvis_ap_equals_cocoeval_ap():
    """Cross-check with the authors' route: where every image lists every absent class as a negative (LVIS's
    federated rules then judge every detection, as COCOeval does), there is no crowd and at most 100
    detections per image, LVISEval and COCOeval compute the same AP, AP50 and AP75 (same matching, same
    101-point interpolation), and the same box-size APs in the bbox pass. The segm pass's size APs differ by
    design (LVIS takes a detection's area from its mask, pycocotools from its box)."""
    import random

    from ntt.eval import evaluate_coco

    rng = random.Random(3)
    anns, results, k = [], [], 0
    for img in range(1, 7):
        for _ in range(rng.randint(1, 4)):
            k += 1
            w, h = rng.randint(12, 60), rng.randint(12, 60)
            anns.append(rect(k, img, rng.randint(1, 3), rng.randint(0, 99 - w), rng.randint(0, 99 - h), w, h))
    gt = make_gt(anns, n_images=6)
    present = {i: {a["category_id"] for a in anns if a["image_id"] == i} for i in range(1, 7)}
    for im in gt["images"]:
        im["neg_category_ids"] = sorted({1, 2, 3} - present[im["id"]])
    for a in anns:  # a hit, a loose hit, or a miss, each with a random score; plus strays
        results.append(pred(gt, a, rng.random(), shift=rng.choice([0, 0, 3, 8, 20])))
        if rng.random() < 0.4:
            results.append(pred(gt, a, rng.random(), cat=rng.randint(1, 3), shift=rng.randint(-5, 5)))
    results = [r for r in results if 0 <= r["bbox"][0] and r["bbox"][0] + r["bbox"][2] <= 100]
    coco = evaluate_coco(gt, results, category_ids=[1, 2, 3])
    lvis = evaluate_lvis(gt, results, category_ids=[1, 2, 3])
    for iou_type, keys in (
        ("bbox", ("AP", "AP50", "AP75", "APs", "APm", "APl")),
        ("segm", ("AP", "AP50", "AP75")),
    ):
        for key in keys:
            assert lvis[iou_type][key] == pytest.approx(coco[iou_type][key], abs=EXACT), (iou_type, key)
    assert 0.2 < lvis["bbox"]["AP"] < 0.9  # a case with hits and misses, not a trivial 0 or 1
