"""Evaluation: COCOeval bbox + segm on the selected classes (see :mod:`ntt.eval.coco`)."""

from ntt.eval.coco import BACKENDS, STAT_NAMES, CocoEvaluator, evaluate_coco

__all__ = ["BACKENDS", "STAT_NAMES", "CocoEvaluator", "evaluate_coco"]
