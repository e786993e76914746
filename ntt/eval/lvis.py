"""The official LVIS metric (method.md §6.1): the `lvis` package's LVISEval, bbox + segm, on the selected classes.

What it computes that pycocotools' COCOeval (``ntt.eval.coco``, the authors' route) does not:

- federated ground truth: a detection of class c on an image counts only where c is annotated there or
  listed in the image's ``neg_category_ids``; an unmatched detection of a class in the image's
  ``not_exhaustive_category_ids`` is ignored, not a false positive;
- at most 300 detections per image (ntt's matcher keeps 100, ``matcher.num_out``);
- AP of the three frequency groups, read from each category's ``frequency`` field of the ground truth:
  APr (rare, ``"r"``: 1-10 training images), APc (common, ``"c"``) and APf (frequent, ``"f"``).

The keys of :meth:`LvisEvaluator.evaluate` per iou type are LVISEval's own: AP, AP50, AP75, APs, APm, APl,
APr, APc, APf, AR@300, ARs@300, ARm@300, ARl@300 (fractions; -1 = no ground truth in that group). As in
detectron2's LVIS evaluator, the segm pass gets the results without their boxes, so that LVISResults takes
each detection's area from its mask (with a box it would use the box area for the small/medium/large
ranges).

lvis 0.5.3 (its last release) still calls ``np.float``, removed in NumPy 1.24: the alias is lent for the
duration of the call and removed again. Library log lines below ERROR are silenced during the call.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ntt.data.coco import has_segmentation, load_coco_json

logger = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
MAX_DETS = 300  # LVISResults' default: the official value for LVIS
STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
    f"AR@{MAX_DETS}", f"ARs@{MAX_DETS}", f"ARm@{MAX_DETS}", f"ARl@{MAX_DETS}",
)  # fmt: skip
FREQUENCIES = ("r", "c", "f")
INSTALL = "eval.backend=lvis needs the lvis package: pip install lvis (or pip install 'ntt[lvis]')"
METRIC = f"official LVIS metric (lvis LVISEval: federated, maxDets {MAX_DETS}, APr/APc/APf)"


def _lvis_api():
    """(LVIS, LVISResults, LVISEval) of the `lvis` package, imported on first use."""
    try:
        from lvis import LVIS, LVISEval, LVISResults
    except ImportError as err:
        raise ImportError(INSTALL) from err
    return LVIS, LVISResults, LVISEval


@contextlib.contextmanager
def _lvis_call():
    """Lend ``np.float`` (lvis 0.5.3's accumulate uses it; NumPy >= 1.24 has none) and quiet the library."""
    lent = "float" not in np.__dict__
    if lent:
        np.float = float  # type: ignore[attr-defined]
    lib = logging.getLogger("lvis")
    level = lib.level
    lib.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # its Logger.warn calls
            yield
    finally:
        lib.setLevel(level)
        if lent:
            del np.float


def lvis_gt_problems(data: dict, category_ids: Sequence[int], image_ids: Sequence[int]) -> list[str]:
    """What an LVIS evaluation of this ground truth would crash on or get wrong, one line each.

    Args:
        data: the ground-truth json (LVIS v1 layout).
        category_ids: the selected classes.
        image_ids: the evaluated images.
    """
    problems = []
    cats = {int(c["id"]): c for c in data.get("categories", [])}
    unknown = [c for c in category_ids if int(c) not in cats]
    if unknown:
        problems.append(f"category ids {unknown[:10]} are not in the json's categories")
    no_freq = [c for c in category_ids if int(c) in cats and cats[int(c)].get("frequency") not in FREQUENCIES]
    if no_freq:
        problems.append(
            f"categories {no_freq[:10]} have no `frequency` of r/c/f (it decides APr/APc/APf): use the "
            "official LVIS v1 json"
        )
    images = {int(im["id"]): im for im in data.get("images", [])}
    wanted = {int(i) for i in image_ids}
    fields = ("neg_category_ids", "not_exhaustive_category_ids")
    no_fed = [i for i in sorted(wanted) if i in images and any(f not in images[i] for f in fields)]
    if no_fed:
        problems.append(
            f"images {no_fed[:10]} lack neg_category_ids / not_exhaustive_category_ids (the federated "
            "labels of LVIS): use the official LVIS v1 json"
        )
    no_area = [
        a.get("id") for a in data.get("annotations", []) if int(a["image_id"]) in wanted and "area" not in a
    ]
    if no_area:
        problems.append(f"annotations {no_area[:10]} have no `area` (LVISEval's size ranges read it)")
    return problems


class LvisEvaluator:
    """LVISEval bbox/segm on a set of selected categories (same interface as ``CocoEvaluator``).

    Args:
        gt: ground-truth LVIS dict or json path (the full test json; only the selected categories count).
        category_ids: the selected category ids (the classes in memory); metrics average over these.
        image_ids: evaluated image ids (default: every image of the json).
        iou_types: subset of ``("bbox", "segm")``.

    Raises:
        ImportError: the ``lvis`` package is not installed (the message says how to install it).
        ValueError: unknown iou type, image ids not in the json, or a ground truth without LVIS's fields
            (``frequency``, ``neg_category_ids``, ``not_exhaustive_category_ids``, ``area``; all listed).
    """

    backend = "lvis"

    def __init__(
        self,
        gt: dict | str | Path,
        *,
        category_ids: Sequence[int],
        image_ids: Sequence[int] | None = None,
        iou_types: Sequence[str] = IOU_TYPES,
    ) -> None:
        _lvis_api()
        bad = [t for t in iou_types if t not in IOU_TYPES]
        if bad or not iou_types:
            raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {list(iou_types)}")
        self.source = "<ground-truth dict>" if isinstance(gt, dict) else str(gt)
        self._gt_data = gt if isinstance(gt, dict) else load_coco_json(gt)
        self.category_ids = sorted(int(c) for c in category_ids)
        if not self.category_ids:
            raise ValueError("LvisEvaluator needs at least one selected category id")
        all_ids = [int(im["id"]) for im in self._gt_data["images"]]
        self.image_ids = all_ids if image_ids is None else [int(i) for i in image_ids]
        unknown = sorted(set(self.image_ids) - set(all_ids))
        if unknown:
            raise ValueError(f"{self.source}: evaluation image ids not in the json: {unknown[:10]}")
        problems = lvis_gt_problems(self._gt_data, self.category_ids, self.image_ids)
        if "segm" in iou_types:
            wanted = set(self.image_ids)
            no_mask = [
                a["id"]
                for a in self._gt_data["annotations"]
                if int(a["image_id"]) in wanted and not has_segmentation(a)
            ]
            if no_mask:
                problems.append(
                    f"annotations {no_mask[:10]} have no segmentation (use eval.iou_types=[bbox])"
                )
        if problems:
            raise ValueError(f"{self.source}: cannot evaluate with the LVIS metric: " + "; ".join(problems))
        self.iou_types = tuple(dict.fromkeys(iou_types))
        self.names = {int(c["id"]): str(c.get("name", c["id"])) for c in self._gt_data["categories"]}
        self.frequency = {int(c["id"]): c.get("frequency") for c in self._gt_data["categories"]}
        self._results: list[dict] = []
        #: The LVISEval objects of the last :meth:`evaluate` call, by iou type (for inspection).
        self.lvisevals: dict[str, Any] = {}

    def reset(self) -> None:
        """Forget the results collected so far."""
        self._results = []
        self.lvisevals = {}

    def process(self, results: Iterable[dict]) -> None:
        """Collect COCO/LVIS result dicts (``image_id``, ``category_id``, ``score``, ``bbox``, ``segmentation``).

        Args:
            results: result dicts; copied, the caller's dicts are never modified.
        """
        for r in results:
            if "image_id" not in r or "category_id" not in r or "score" not in r:
                raise ValueError(f"result lacks image_id/category_id/score: keys {sorted(r)}")
            self._results.append(dict(r))

    def _ground_truth(self):
        """A fresh LVIS index of a copy of the ground truth (LVISEval writes into its annotations)."""
        lvis_cls, _, _ = _lvis_api()
        gt = lvis_cls.__new__(lvis_cls)  # LVIS() only reads a path; the json is parsed already
        gt.logger = logging.getLogger("lvis.lvis")
        gt.dataset = copy.deepcopy(self._gt_data)
        gt._create_index()
        return gt

    def _detections(self, gt, iou_type: str):
        _, results_cls, _ = _lvis_api()
        keep = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
        wanted = set(self.image_ids)
        dets = [{k: r[k] for k in keep} for r in self._results if int(r["image_id"]) in wanted]
        if dets:
            return results_cls(gt, dets, max_dets=MAX_DETS)
        # LVISResults reads results[0]: an empty detection set is built directly (AP 0 where gt exists)
        empty = results_cls.__new__(results_cls)
        empty.logger = logging.getLogger("lvis.results")
        empty.dataset = {**gt.dataset, "annotations": []}
        empty._create_index()
        return empty

    def evaluate(self) -> dict:
        """Run LVISEval for each iou type on the collected results.

        Returns:
            ``{"bbox": {AP, AP50, AP75, APs, APm, APl, APr, APc, APf, AR@300, ARs@300, ARm@300, ARl@300},
            "segm": {...}, "per_class": [{"category_id", "name", "frequency", "num_gt", "bbox_AP",
            "bbox_AP50", "bbox_AP75", "segm_AP", ...}], "num_images", "num_results", "backend": "lvis",
            "metric"}``. Fractions in [0, 1]; -1 = no ground truth (LVIS convention).
        """
        unknown = sorted(
            {int(r["image_id"]) for r in self._results} - {int(i["id"]) for i in self._gt_data["images"]}
        )
        if unknown:
            raise ValueError(f"results refer to image ids not in the ground truth: {unknown[:10]}")
        for iou_type, key in (("bbox", "bbox"), ("segm", "segmentation")):
            if iou_type in self.iou_types and any(key not in r for r in self._results):
                raise ValueError(f"{iou_type} evaluation needs a '{key}' in every result")
        _, _, eval_cls = _lvis_api()
        out: dict[str, Any] = {}
        wanted = set(self.image_ids)
        per_class = {
            c: {
                "category_id": c,
                "name": self.names.get(c, str(c)),
                "frequency": self.frequency.get(c),
                "num_gt": 0,
            }
            for c in self.category_ids
        }
        for a in self._gt_data["annotations"]:
            if int(a["image_id"]) in wanted and int(a["category_id"]) in per_class:
                per_class[int(a["category_id"])]["num_gt"] += 1
        with _lvis_call():
            for iou_type in self.iou_types:
                gt = self._ground_truth()
                ev = eval_cls(gt, self._detections(gt, iou_type), iou_type=iou_type)
                ev.params.cat_ids = list(self.category_ids)
                ev.params.img_ids = sorted(wanted)
                ev.run()
                self.lvisevals[iou_type] = ev
                out[iou_type] = {k: float(ev.results[k]) for k in STAT_NAMES}
                for cid, row in zip(self.category_ids, _per_class_ap(ev)):
                    for key, val in row.items():
                        per_class[cid][f"{iou_type}_{key}"] = val
        out["per_class"] = [per_class[c] for c in self.category_ids]
        out["num_images"] = len(self.image_ids)
        out["num_results"] = len(self._results)
        out["backend"] = self.backend
        out["metric"] = METRIC
        return out


def _per_class_ap(ev) -> list[dict]:
    """Per selected class (params.cat_ids order): AP, AP50, AP75 at area "all" from LVISEval's precision."""
    precision = np.asarray(ev.eval["precision"])  # [T, R, K, A]
    iou_thrs = np.asarray(ev.params.iou_thrs)
    t50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    t75 = int(np.argmin(np.abs(iou_thrs - 0.75)))
    rows = []
    for k in range(precision.shape[2]):
        p = precision[:, :, k, 0]
        rows.append({"AP": _mean_valid(p), "AP50": _mean_valid(p[t50]), "AP75": _mean_valid(p[t75])})
    return rows


def _mean_valid(a: np.ndarray) -> float:
    valid = a[a > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def evaluate_lvis(
    gt: dict | str | Path,
    results: Iterable[dict],
    *,
    category_ids: Sequence[int],
    image_ids: Sequence[int] | None = None,
    iou_types: Sequence[str] = IOU_TYPES,
) -> dict:
    """One call: build a :class:`LvisEvaluator`, process ``results``, evaluate.

    Args:
        gt: ground-truth LVIS dict or json path.
        results: result dicts.
        category_ids: selected category ids.
        image_ids: evaluated image ids (default all).
        iou_types: subset of ``("bbox", "segm")``.
    """
    ev = LvisEvaluator(gt, category_ids=category_ids, image_ids=image_ids, iou_types=iou_types)
    ev.process(results)
    return ev.evaluate()
