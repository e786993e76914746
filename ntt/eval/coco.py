"""COCO evaluation (bbox + segm) on the selected classes, per-class AP table (method.md §6).

Protocol, as in the reference ``COCORefTestDataset.evaluate``:

- the ground truth is the test json restricted to the selected categories: annotations of other
  categories are dropped, every image is kept and the ``categories`` list still lists every category,
  so COCOeval gives the unselected categories precision -1 and averages over the selected ones;
- ``gt.loadRes(results)`` then ``COCOeval`` per iou type with ``params.imgIds`` = all test image ids and
  default parameters (IoU .50:.05:.95, maxDets 1/10/100, 101-point interpolation).

Two interchangeable backends: ``pycocotools`` (the reference) and ``faster_coco_eval`` (C++, optional
dependency, identical numbers). Empty results never reach ``loadRes`` (which crashes on ``[]`` in
pycocotools): an empty detection set is built directly, giving 0 where ground truth exists and -1 where
none does. Library prints are captured and logged at DEBUG level.

Usage (detectron2 style)::

    ev = CocoEvaluator(dataset.raw, category_ids=dataset.category_ids, image_ids=test_ids)
    ev.process(results)        # COCO result dicts: image_id, category_id, score, bbox (xywh), segmentation (RLE)
    metrics = ev.evaluate()    # {"bbox": {...}, "segm": {...}, "per_class": [...]}
    print(ev.summary_line())
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ntt.data.coco import filter_coco_gt, has_segmentation, load_coco_json

logger = logging.getLogger(__name__)

BACKENDS = ("pycocotools", "faster_coco_eval")
IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _backend_classes(backend: str):
    """Return (COCO, COCOeval) classes of a backend, importing lazily."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError as e:
            raise ImportError(
                "eval.backend=faster_coco_eval needs the faster-coco-eval package: pip install faster-coco-eval "
                "(or use eval.backend=pycocotools)"
            ) from e
        return COCO, COCOeval_faster
    raise ValueError(f"unknown eval backend {backend!r}; choose one of {BACKENDS}")


class CocoEvaluator:
    """COCOeval bbox/segm on a set of selected categories.

    Args:
        gt: Ground-truth COCO dict or path to the json (the full test json; it is restricted here).
        category_ids: Selected category ids (the classes in memory); metrics average over these.
        image_ids: Test image ids (``params.imgIds``); default every image of the json.
        backend: ``"pycocotools"`` (default, the reference) or ``"faster_coco_eval"``.
        iou_types: Subset of ``("bbox", "segm")``. ``segm`` is dropped with a warning when the ground
            truth has no masks (boxes-only datasets).

    Raises:
        ValueError: unknown backend / iou type, category ids not in the json, or image ids not in the json.
        ImportError: ``faster_coco_eval`` backend requested but not installed.
    """

    def __init__(
        self,
        gt: dict | str | Path,
        *,
        category_ids: Sequence[int],
        image_ids: Sequence[int] | None = None,
        backend: str = "pycocotools",
        iou_types: Sequence[str] = IOU_TYPES,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown eval backend {backend!r}; choose one of {BACKENDS}")
        bad = [t for t in iou_types if t not in IOU_TYPES]
        if bad or not iou_types:
            raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {list(iou_types)}")
        self._coco_cls, self._eval_cls = _backend_classes(backend)
        self.backend = backend
        if isinstance(gt, dict):
            source = "<ground-truth dict>"
            data = gt
        else:
            source = str(gt)
            data = load_coco_json(gt)
        self.category_ids = sorted(int(c) for c in category_ids)
        if not self.category_ids:
            raise ValueError("CocoEvaluator needs at least one selected category id")
        # All images kept in the GT (results on any json image are accepted); evaluation runs on image_ids.
        self._gt_data = filter_coco_gt(data, self.category_ids, None, source=source)
        all_ids = [int(im["id"]) for im in self._gt_data["images"]]
        if image_ids is None:
            self.image_ids = all_ids
        else:
            known = set(all_ids)
            self.image_ids = [int(i) for i in image_ids]
            unknown = [i for i in self.image_ids if i not in known]
            if unknown:
                raise ValueError(f"{source}: evaluation image ids not in the json: {unknown[:10]}")
        self._image_id_set = set(all_ids)
        self.names = {int(c["id"]): str(c.get("name", c["id"])) for c in self._gt_data["categories"]}

        types = list(dict.fromkeys(iou_types))
        if "segm" in types:
            eval_set = set(self.image_ids)
            gt_anns = [a for a in self._gt_data["annotations"] if int(a["image_id"]) in eval_set]
            no_mask = [int(a["id"]) for a in gt_anns if not has_segmentation(a)]
            if gt_anns and len(no_mask) == len(gt_anns):
                logger.warning("%s: ground truth has boxes only; skipping segm evaluation", source)
                types.remove("segm")
            elif no_mask:
                raise ValueError(
                    f"{source}: segm evaluation needs a segmentation on every ground-truth annotation; "
                    f"missing on annotation ids {no_mask[:10]} (use eval.iou_types=[bbox])"
                )
        if not types:
            raise ValueError(f"{source}: nothing to evaluate (iou_types {list(iou_types)})")
        self.iou_types = tuple(types)
        self._coco_gt = None
        self._results: list[dict] = []
        self._metrics: dict | None = None
        #: The COCOeval objects of the last :meth:`evaluate` call, by iou type (for inspection).
        self.cocoevals: dict[str, Any] = {}

    # ---- detectron2-style interface -------------------------------------------------------------

    def reset(self) -> None:
        """Forget the results collected so far."""
        self._results = []
        self._metrics = None
        self.cocoevals = {}

    def process(self, results: Iterable[dict]) -> None:
        """Collect COCO result dicts (``image_id``, ``category_id``, ``score``, ``bbox`` and/or ``segmentation``).

        Args:
            results: Result dicts; copied, the caller's dicts are never modified.
        """
        for r in results:
            if "image_id" not in r or "category_id" not in r or "score" not in r:
                raise ValueError(f"result lacks image_id/category_id/score: keys {sorted(r)}")
            self._results.append(dict(r))

    def _gt(self):
        if self._coco_gt is None:
            gt = self._coco_cls()
            gt.dataset = copy.deepcopy(self._gt_data)
            with self._captured("creating ground-truth index"):
                gt.createIndex()
            self._coco_gt = gt
        return self._coco_gt

    @contextlib.contextmanager
    def _captured(self, what: str):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            yield
        text = buf.getvalue().rstrip()
        if text:
            logger.debug("%s [%s]:\n%s", what, self.backend, text)

    def _load_results(self, gt, results: list[dict]):
        unknown = sorted({int(r["image_id"]) for r in results} - self._image_id_set)
        if unknown:
            raise ValueError(f"results refer to image ids not in the ground truth: {unknown[:10]}")
        if results:
            with self._captured("loading results"):
                return gt.loadRes([dict(r) for r in results])
        # Empty results: pycocotools' loadRes([]) crashes, so build the empty detection set directly.
        dt = self._coco_cls()
        dt.dataset = {
            "images": list(gt.dataset["images"]),
            "categories": copy.deepcopy(gt.dataset["categories"]),
            "annotations": [],
        }
        with self._captured("creating empty result index"):
            dt.createIndex()
        return dt

    def _run_cocoeval(self, gt, dt, iou_type: str):
        ev = self._eval_cls(gt, dt, iou_type)
        if self.backend == "faster_coco_eval":
            ev.print_function = lambda *a, **k: logger.debug(" ".join(str(x) for x in a))
        ev.params.imgIds = list(self.image_ids)
        with self._captured(f"COCOeval {iou_type}"):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return ev

    def evaluate(self) -> dict:
        """Run COCOeval for each iou type on the collected results.

        Returns:
            ``{"bbox": {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl}, "segm": {...},
            "per_class": [{"category_id", "name", "num_gt", "bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP",
            ...}], "num_images", "num_results", "backend"}``. Values are fractions in [0, 1]; -1 means
            "no ground truth" (COCO convention). Per-class AP is the mean of ``eval["precision"]`` over the
            valid (> -1) entries at area "all", maxDets 100.
        """
        gt = self._gt()
        results = self._results
        if any("segmentation" not in r for r in results) and "segm" in self.iou_types:
            raise ValueError("segm evaluation needs a 'segmentation' (RLE) in every result")
        out: dict[str, Any] = {}
        per_class = {
            cid: {"category_id": cid, "name": self.names.get(cid, str(cid)), "num_gt": 0}
            for cid in self.category_ids
        }
        eval_set = set(self.image_ids)
        for a in self._gt_data["annotations"]:
            if (
                int(a["image_id"]) in eval_set
                and not a.get("iscrowd", 0)
                and int(a["category_id"]) in per_class
            ):
                per_class[int(a["category_id"])]["num_gt"] += 1
        for iou_type in self.iou_types:
            dt = self._load_results(gt, results)
            ev = self._run_cocoeval(gt, dt, iou_type)
            self.cocoevals[iou_type] = ev
            stats = [float(s) for s in np.asarray(ev.stats)[: len(STAT_NAMES)]]
            out[iou_type] = dict(zip(STAT_NAMES, stats))
            for cid, row in zip(self.category_ids, self._per_class_ap(ev)):
                for key, val in row.items():
                    per_class[cid][f"{iou_type}_{key}"] = val
        out["per_class"] = [per_class[c] for c in self.category_ids]
        out["num_images"] = len(self.image_ids)
        out["num_results"] = len(results)
        out["backend"] = self.backend
        self._metrics = out
        return out

    def _per_class_ap(self, ev) -> list[dict]:
        precision = np.asarray(ev.eval["precision"])  # [T, R, K, A, M]
        cat_ids = [int(c) for c in ev.params.catIds]
        iou_thrs = np.asarray(ev.params.iouThrs)
        t50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
        t75 = int(np.argmin(np.abs(iou_thrs - 0.75)))
        area_all = list(ev.params.areaRngLbl).index("all")
        rows = []
        for cid in self.category_ids:
            k = cat_ids.index(cid)
            p = precision[:, :, k, area_all, -1]
            rows.append({"AP": _mean_valid(p), "AP50": _mean_valid(p[t50]), "AP75": _mean_valid(p[t75])})
        return rows

    # ---- reporting ------------------------------------------------------------------------------

    def summary_line(self, metrics: dict | None = None, *, header: bool = False) -> str:
        """One CSV line for copy-paste: bbox AP/AP50/AP75 then segm AP/AP50/AP75, in percent (2 decimals).

        Args:
            metrics: Output of :meth:`evaluate` (default: the last one).
            header: Return the column names line instead of the values.
        """
        cols = [f"{t}_{k}" for t in IOU_TYPES for k in ("AP", "AP50", "AP75")]
        if header:
            return ",".join(cols)
        metrics = metrics if metrics is not None else self._metrics
        if metrics is None:
            raise RuntimeError("call evaluate() before summary_line()")
        vals = []
        for col in cols:
            t, k = col.split("_", 1)
            v = metrics.get(t, {}).get(k)
            vals.append("" if v is None else f"{100.0 * v:.2f}" if v >= 0 else "-1")
        return ",".join(vals)


def _mean_valid(a: np.ndarray) -> float:
    valid = a[a > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def evaluate_coco(
    gt: dict | str | Path,
    results: Iterable[dict],
    *,
    category_ids: Sequence[int],
    image_ids: Sequence[int] | None = None,
    backend: str = "pycocotools",
    iou_types: Sequence[str] = IOU_TYPES,
) -> dict:
    """One-call convenience: build a :class:`CocoEvaluator`, process ``results``, evaluate.

    Args:
        gt: Ground-truth COCO dict or json path.
        results: COCO result dicts.
        category_ids: Selected category ids.
        image_ids: Test image ids (default all).
        backend: ``"pycocotools"`` or ``"faster_coco_eval"``.
        iou_types: Subset of ``("bbox", "segm")``.
    """
    ev = CocoEvaluator(
        gt, category_ids=category_ids, image_ids=image_ids, backend=backend, iou_types=iou_types
    )
    ev.process(results)
    return ev.evaluate()
