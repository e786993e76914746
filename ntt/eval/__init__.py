"""Evaluation on the selected classes: COCOeval bbox + segm (:mod:`ntt.eval.coco`, the authors' route) or the
official LVIS metric (:mod:`ntt.eval.lvis`)."""

from collections.abc import Sequence

from ntt.eval.coco import BACKENDS, STAT_NAMES, CocoEvaluator, evaluate_coco
from ntt.eval.lvis import LvisEvaluator, evaluate_lvis

EVAL_BACKENDS = (*BACKENDS, "lvis")

__all__ = [
    "BACKENDS",
    "EVAL_BACKENDS",
    "STAT_NAMES",
    "CocoEvaluator",
    "LvisEvaluator",
    "evaluate_coco",
    "evaluate_lvis",
    "make_evaluator",
]


def make_evaluator(
    gt,
    *,
    backend: str,
    category_ids: Sequence[int],
    image_ids: Sequence[int] | None,
    iou_types: Sequence[str],
):
    """The evaluator of `eval.backend`: ``lvis`` -> :class:`LvisEvaluator`, else :class:`CocoEvaluator`.

    Args:
        gt: ground-truth dict or json path.
        backend: ``pycocotools``, ``faster_coco_eval`` or ``lvis``.
        category_ids: the selected classes.
        image_ids: the evaluated images (None: all).
        iou_types: subset of ``("bbox", "segm")``.
    """
    if backend == "lvis":
        return LvisEvaluator(gt, category_ids=category_ids, image_ids=image_ids, iou_types=iou_types)
    return CocoEvaluator(
        gt, category_ids=category_ids, image_ids=image_ids, backend=backend, iou_types=iou_types
    )
