"""COCO annotation -> binary mask, identical to ``pycocotools.coco.COCO.annToMask``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["ann_to_rle", "ann_to_mask", "read_mask", "read_masks", "mask_bbox_xywh", "mask_digest"]


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


def read_mask(mask, height: int, width: int, what: str = "mask") -> torch.Tensor:
    """A binary mask from a PNG path, an array or a tensor, checked against the image size.

    A mask image is foreground where its grey value is >= 128 (0/255 masks), or > 0 when its maximum is 1
    (0/1 masks). Colour and alpha are converted to grey first (PIL ``convert("L")``).

    Args:
        mask: path, ``PIL.Image``, ``[H, W]`` array / tensor (bool, 0/1 or 0..255).
        height: image height.
        width: image width.
        what: how to name the mask in errors (e.g. its file).

    Returns:
        ``[H, W]`` bool tensor.
    """
    from PIL import Image

    if isinstance(mask, (str, os.PathLike)):
        if not Path(mask).is_file():
            raise FileNotFoundError(f"{what}: mask file not found: {mask}")
        with Image.open(mask) as m:
            arr = np.asarray(m.convert("L"))
    elif isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L"))
    else:
        arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{what}: a mask must be [H, W], got shape {arr.shape}")
    if arr.shape != (height, width):
        raise ValueError(
            f"{what}: mask is {arr.shape[1]}x{arr.shape[0]} (WxH) but its image is {width}x{height}: "
            "masks must be in the pixels of the (upright) image"
        )
    if arr.dtype == bool:
        out = arr
    else:
        out = arr > (0 if arr.max(initial=0) <= 1 else 127)
    return torch.from_numpy(np.ascontiguousarray(out))


def mask_bbox_xywh(mask: torch.Tensor) -> list[float]:
    """COCO box ``[x, y, w, h]`` of a binary mask, as pycocotools' ``toBbox`` (extent + 1)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    return [float(x1), float(y1), float(x2 - x1 + 1), float(y2 - y1 + 1)]


def read_masks(masks, height: int, width: int, source: str) -> list[torch.Tensor]:
    """One or several masks as ``[H, W]`` bool tensors (``read_mask`` each; errors name ``source`` and the mask).

    Args:
        masks: a path, one ``[H, W]`` or several ``[N, H, W]`` masks as an array or tensor, or a list of them.
        height: image height.
        width: image width.
        source: how to name the image in errors.
    """
    if isinstance(masks, (str, os.PathLike)):
        return [read_mask(masks, height, width, f"{source}: {Path(masks).name}")]
    if isinstance(masks, (np.ndarray, torch.Tensor)) and masks.ndim == 3:
        return [read_mask(m, height, width, f"{source}: mask {i}") for i, m in enumerate(masks)]
    if isinstance(masks, (list, tuple)):
        return [read_mask(m, height, width, f"{source}: mask {i}") for i, m in enumerate(masks)]
    return [read_mask(masks, height, width, f"{source}: mask")]


def mask_digest(mask: torch.Tensor) -> str:
    """sha256 of a binary mask as ``[H, W]`` uint8 0/1 bytes, row-major (a reference's provenance).

    Args:
        mask: ``[H, W]`` bool (or 0/1) mask.
    """
    import hashlib

    arr = np.ascontiguousarray(torch.as_tensor(mask).to(torch.bool).cpu().numpy().astype(np.uint8))
    return hashlib.sha256(arr.tobytes()).hexdigest()
