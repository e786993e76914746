"""How wrong each image is: missed ground truth, false positives and the image's own AP50 (pycocotools).

One COCOeval pass (``ntt.eval.CocoEvaluator``, the selected classes, the run's evaluated images) gives the
per-image, per-class matchings (``evalImgs``: area "all", at most 100 detections per class and image, the
COCO defaults). From them, at IoU 0.50 (mask IoU, box IoU when the ground truth has no masks):

* **missed**: ground-truth instances (not crowd) that no detection scoring >= ``score_thr`` matched;
* **false positives**: detections scoring >= ``score_thr`` that matched no ground truth (a detection
  matched to a crowd region counts as neither);
* **AP50**: COCO's 101-point interpolated average precision at IoU 0.50 of the image alone, with all its
  detections (no score threshold), averaged over the classes that have ground truth in the image (None
  for an image without ground truth).

Images are ranked by **errors = missed + false positives**, most first; ties by AP50, lowest first (an image
without ground truth after those with), then by image id. COCOeval matches greedily in score order, so the
matchings of the detections above a threshold do not depend on those below it: counting above
``score_thr`` from one pass equals evaluating the thresholded detections.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ntt.eval import CocoEvaluator

__all__ = ["ImageScore", "WRONGNESS_DEFINITION", "score_images", "rank_images"]

IOU = 0.5
RECALL_POINTS = np.linspace(0.0, 1.0, 101)

WRONGNESS_DEFINITION = (
    "Per image, at IoU 0.50 ({iou_kind}, pycocotools COCOeval matching: area all, at most 100 detections per "
    "class): missed = ground-truth instances (not crowd) matched by no detection scoring >= {thr:g}; false "
    "positives = detections scoring >= {thr:g} that match no ground truth; AP50 = the image's own 101-point "
    "interpolated AP at IoU 0.50 with all its detections, averaged over the classes it has ground truth of. "
    "Images are sorted by errors = missed + false positives (most first), then by AP50 (lowest first; no "
    "ground truth: after), then by image id."
)


@dataclass(frozen=True)
class ImageScore:
    """The errors of one image (see the module docstring).

    Args:
        image_id: the image.
        num_gt: its ground-truth instances (selected classes, not crowd).
        num_shown: its detections scoring >= the threshold.
        missed: ground truth not found at IoU 0.50 by a detection above the threshold.
        false_positives: detections above the threshold matching no ground truth.
        ap50: its own AP at IoU 0.50 (None without ground truth).
    """

    image_id: int
    num_gt: int
    num_shown: int
    missed: int
    false_positives: int
    ap50: float | None

    @property
    def errors(self) -> int:
        return self.missed + self.false_positives


def _interpolated_ap(scores: list[float], hits: list[bool], num_gt: int) -> float:
    """COCO's 101-point interpolated AP of one class in one image (``COCOeval.accumulate``'s rule)."""
    if num_gt == 0:
        return -1.0
    if not scores:
        return 0.0
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    tp = np.cumsum(np.asarray(hits, dtype=np.float64)[order])
    fp = np.cumsum(1.0 - np.asarray(hits, dtype=np.float64)[order])
    recall = tp / num_gt
    precision = tp / np.maximum(tp + fp, np.spacing(1))
    for i in range(len(precision) - 1, 0, -1):  # precision envelope, as accumulate does
        precision[i - 1] = max(precision[i - 1], precision[i])
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    sampled = [precision[i] if i < len(precision) else 0.0 for i in idx]
    return float(np.mean(sampled))


def score_images(
    gt: dict,
    results: list[dict],
    *,
    category_ids: list[int],
    image_ids: list[int],
    iou_type: str,
    score_thr: float,
) -> dict[int, ImageScore]:
    """The :class:`ImageScore` of every image of ``image_ids``.

    Args:
        gt: the test json (COCO dict); restricted to ``category_ids`` as the run's evaluation does.
        results: COCO result dicts of the run (predictions.json).
        category_ids: the selected classes.
        image_ids: the evaluated images.
        iou_type: ``"segm"`` (mask IoU) or ``"bbox"``.
        score_thr: detections scoring at least this count as shown (missed / false positives).
    """
    ev = CocoEvaluator(gt, category_ids=category_ids, image_ids=image_ids, iou_types=(iou_type,))
    ev.process(results)
    ev.evaluate()
    coco_eval = ev.cocoevals[iou_type]
    t50 = int(np.argmin(np.abs(np.asarray(coco_eval.params.iouThrs) - IOU)))
    per_image: dict[int, dict] = {
        i: {"gt": 0, "shown": 0, "missed": 0, "fp": 0, "aps": []} for i in image_ids
    }
    for e in coco_eval.evalImgs:
        if e is None or e["aRng"] != coco_eval.params.areaRng[0]:  # area "all" only
            continue
        acc = per_image[int(e["image_id"])]
        scores = [float(s) for s in e["dtScores"]]
        dt_matched = np.asarray(e["dtMatches"])[t50] if len(scores) else np.zeros(0)
        dt_ignored = np.asarray(e["dtIgnore"])[t50] if len(scores) else np.zeros(0)
        gt_ignored = np.asarray(e["gtIgnore"], dtype=bool)
        gt_matched = np.asarray(e["gtMatches"])[t50] if len(e["gtIds"]) else np.zeros(0)
        score_of = dict(zip((int(d) for d in e["dtIds"]), scores, strict=True))
        num_gt = int((~gt_ignored).sum())
        acc["gt"] += num_gt
        for g in range(len(e["gtIds"])):
            if gt_ignored[g]:
                continue
            match = int(gt_matched[g])
            if match == 0 or score_of.get(match, -np.inf) < score_thr:
                acc["missed"] += 1
        kept_scores, hits = [], []
        for d, s in enumerate(scores):
            if dt_ignored[d]:
                continue
            kept_scores.append(s)
            hits.append(bool(dt_matched[d]))
            if s >= score_thr:
                acc["shown"] += 1
                acc["fp"] += int(not dt_matched[d])
        if num_gt:
            acc["aps"].append(_interpolated_ap(kept_scores, hits, num_gt))
    return {
        i: ImageScore(
            image_id=i,
            num_gt=a["gt"],
            num_shown=a["shown"],
            missed=a["missed"],
            false_positives=a["fp"],
            ap50=float(np.mean(a["aps"])) if a["aps"] else None,
        )
        for i, a in per_image.items()
    }


def rank_images(scores: dict[int, ImageScore]) -> list[ImageScore]:
    """The images most wrong first: errors (descending), AP50 (ascending, None last), image id."""
    return sorted(
        scores.values(),
        key=lambda s: (-s.errors, s.ap50 is None, s.ap50 if s.ap50 is not None else 0.0, s.image_id),
    )
