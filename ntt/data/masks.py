"""COCO annotation -> binary mask, identical to ``pycocotools.coco.COCO.annToMask``."""

from __future__ import annotations

import numpy as np

__all__ = ["ann_to_rle", "ann_to_mask"]


def ann_to_rle(ann: dict, height: int, width: int) -> dict:
    """Convert a COCO annotation's ``segmentation`` to a compressed RLE (as ``COCO.annToRLE``).

    Args:
        ann: COCO annotation dict (polygons, uncompressed RLE or compressed RLE in ``segmentation``).
        height: image height (the json image entry's ``height``).
        width: image width.

    Returns:
        A compressed RLE dict usable with ``pycocotools.mask.decode``.

    Raises:
        ValueError: the annotation has no usable ``segmentation`` (the message names the annotation id).
    """
    from pycocotools import mask as mask_utils

    segm = ann.get("segmentation")
    ann_id = ann.get("id", "?")
    if segm is None or (isinstance(segm, list) and len(segm) == 0):
        raise ValueError(f"annotation {ann_id} (image {ann.get('image_id', '?')}) has no segmentation")
    h, w = int(height), int(width)
    if isinstance(segm, list):
        # polygons: one object may consist of several parts; merge them into one RLE
        rles = mask_utils.frPyObjects(segm, h, w)
        return mask_utils.merge(rles)
    if isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        return mask_utils.frPyObjects(segm, h, w)  # uncompressed RLE
    if isinstance(segm, dict) and "counts" in segm:
        return segm  # compressed RLE
    raise ValueError(f"annotation {ann_id}: unsupported segmentation of type {type(segm).__name__}")


def ann_to_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """Decode a COCO annotation to a binary ``uint8 [height, width]`` mask (equals ``COCO.annToMask``).

    Args:
        ann: COCO annotation dict.
        height: image height from the json.
        width: image width from the json.

    Returns:
        ``np.ndarray`` uint8 ``[height, width]`` with values in {0, 1}.
    """
    from pycocotools import mask as mask_utils

    return mask_utils.decode(ann_to_rle(ann, height, width))
