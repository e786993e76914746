"""Torchvision-free box ops: ``box_iou``, ``nms``, ``batched_nms`` and inclusive mask boxes.

The NMS reproduces ``torchvision.ops.batched_nms`` (method.md §12b item 8) exactly on the boxes the method
feeds it (integer pixel indices stored as float):

* boxes are visited in order of descending score with a *stable* sort (torchvision's CPU and CUDA kernels
  call ``scores.sort(stable=True, descending=True)``), so equal scores keep the lower index first and NaN
  scores come first (torch sort semantics);
* area is ``(x2 - x1) * (y2 - y1)`` (no +1), IoU is ``inter / (area_i + area_j - inter)`` in float32, and a box
  is suppressed only when IoU is strictly greater than the threshold. A 0/0 IoU (two zero-area boxes) is NaN,
  which is never ``> thr``, so zero-area boxes never suppress and are never suppressed;
* the result is sorted by descending score (the visit order).

torchvision's batched variant offsets boxes per class (``_batched_nms_coordinate_trick``) or loops over classes
(``_batched_nms_vanilla``, then re-sorts the survivors by score); both equal "greedy NMS among the boxes of
one class, survivors in global rank order" for non-negative integer coordinates, which is what we compute
(one greedy pass per class present). For non-integer coordinates the offset trick can change low-order bits
of the IoU, and for negative coordinates torchvision's offsets can even let classes interact; neither occurs
in the method (boxes are pixel indices >= 0). torchvision's vanilla path re-sorts with a non-stable sort;
exact score ties among survivors may come back in another order there (not on the fixture).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["box_area", "box_iou", "nms", "batched_nms", "masks_to_boxes_inclusive"]


def box_area(boxes: Tensor) -> Tensor:
    """Area ``(x2 - x1) * (y2 - y1)`` of xyxy boxes (no +1, as torchvision).

    Args:
        boxes: ``[N, 4]`` xyxy boxes.

    Returns:
        ``[N]`` areas, same dtype as ``boxes``.
    """
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes with torchvision's float formula.

    Args:
        boxes1: ``[N, 4]`` xyxy boxes.
        boxes2: ``[M, 4]`` xyxy boxes.

    Returns:
        ``[N, M]`` IoU ``inter / (area1 + area2 - inter)``; 0/0 (two zero-area boxes) gives NaN, as torchvision.
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    # Per-coordinate [N, M] planes instead of [N, M, 2] broadcasts: same float ops, far fewer temporaries.
    w = torch.minimum(boxes1[:, None, 2], boxes2[None, :, 2]) - torch.maximum(
        boxes1[:, None, 0], boxes2[None, :, 0]
    )
    h = torch.minimum(boxes1[:, None, 3], boxes2[None, :, 3]) - torch.maximum(
        boxes1[:, None, 1], boxes2[None, :, 1]
    )
    inter = w.clamp_(min=0).mul_(h.clamp_(min=0))
    union = (area1[:, None] + area2[None, :]).sub_(inter)
    return inter.div_(union)


def _as_float_boxes(boxes: Tensor) -> Tensor:
    # torchvision's kernels only accept floating boxes; the reference passes float32 boxes.
    return boxes if boxes.is_floating_point() else boxes.float()


def _greedy_sorted(boxes: Tensor, iou_threshold: float, block: int) -> list[int]:
    """Greedy NMS over boxes already sorted by rank; returns kept positions (ascending)."""
    n = boxes.shape[0]
    removed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    col = torch.arange(n, device=boxes.device)
    # Rows are built block by block (memory bound block * n); the greedy pass itself runs on a CPU bool array,
    # a fraction of a millisecond for ~1000 boxes, with no GPU sync per box.
    for start in range(0, n, block):
        stop = min(n, start + block)
        over = box_iou(boxes[start:stop], boxes) > iou_threshold
        over &= col[None, :] > col[start:stop, None]  # only lower-ranked boxes get suppressed
        rows = over.cpu().numpy()
        any_row = rows.any(axis=1)
        for r in range(stop - start):
            i = start + r
            if removed[i]:
                continue
            keep.append(i)
            if any_row[r]:
                removed |= rows[r]
    return keep


def _greedy_nms(
    boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float, block: int
) -> Tensor:
    n = boxes.shape[0]
    device = boxes.device
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    boxes = _as_float_boxes(boxes)
    order = torch.sort(scores, descending=True, stable=True).indices
    if idxs is None:
        kept = torch.as_tensor(_greedy_sorted(boxes[order], iou_threshold, block), dtype=torch.int64)
        return order[kept.to(device)]
    # Suppression never crosses classes: run the greedy pass per class (torchvision's "vanilla" batched
    # variant) on rank-ordered members, then restore the global rank order of the survivors.
    cls_in_rank = idxs[order]
    by_class = torch.sort(cls_in_rank, stable=True).indices  # rank positions grouped by class, rank-ascending
    counts = torch.unique_consecutive(cls_in_rank[by_class], return_counts=True)[1].tolist()
    kept_pos: list[Tensor] = []
    start = 0
    for c in counts:
        pos = by_class[start : start + c]
        start += c
        k = torch.as_tensor(_greedy_sorted(boxes[order[pos]], iou_threshold, block), dtype=torch.int64)
        kept_pos.append(pos[k.to(device)])
    ranks = torch.sort(torch.cat(kept_pos)).values
    return order[ranks]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, *, block: int = 1024) -> Tensor:
    """Greedy NMS with torchvision semantics (see module docstring).

    Args:
        boxes: ``[N, 4]`` xyxy boxes (float; integer boxes are cast to float32).
        scores: ``[N]`` ranking scores.
        iou_threshold: a box is suppressed by a kept box when their IoU is strictly greater than this.
        block: number of IoU-matrix rows computed at once (memory bound ``block * N``).

    Returns:
        int64 indices of the kept boxes, sorted by descending score (stable: ties keep the lower index first).
    """
    return _greedy_nms(boxes, scores, None, iou_threshold, block)


def batched_nms(
    boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, *, block: int = 1024
) -> Tensor:
    """Class-aware NMS: boxes only suppress boxes with the same ``idxs`` value (torchvision ``batched_nms``).

    Args:
        boxes: ``[N, 4]`` xyxy boxes (float; integer boxes are cast to float32).
        scores: ``[N]`` ranking scores.
        idxs: ``[N]`` integer category of each box.
        iou_threshold: suppression when IoU is strictly greater than this.
        block: number of IoU-matrix rows computed at once.

    Returns:
        int64 indices of the kept boxes sorted by descending score (stable on ties).
    """
    return _greedy_nms(boxes, scores, idxs, iou_threshold, block)


def masks_to_boxes_inclusive(masks: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inclusive pixel-index boxes of binary masks, like ``sam2.utils.amg.batched_mask_to_box``.

    Args:
        masks: ``[N, H, W]`` bool (or 0/1) masks.
        dtype: dtype of the result (the reference feeds float32 boxes to NMS).

    Returns:
        ``[N, 4]`` boxes ``[x_min, y_min, x_max, y_max]`` of the set pixels (inclusive indices, so a one-pixel
        mask gives a zero-area box); ``[0, 0, 0, 0]`` for an empty mask.
    """
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, dtype=dtype, device=masks.device)
    masks = masks.bool()
    in_row = masks.any(dim=2)  # [N, H]
    in_col = masks.any(dim=1)  # [N, W]
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    bottom = torch.where(in_row, ar_h, -1).amax(dim=1)
    top = torch.where(in_row, ar_h, h).amin(dim=1)
    right = torch.where(in_col, ar_w, -1).amax(dim=1)
    left = torch.where(in_col, ar_w, w).amin(dim=1)
    out = torch.stack([left, top, right, bottom], dim=1)
    empty = ~in_row.any(dim=1)
    out = out.masked_fill(empty[:, None], 0)
    return out.to(dtype)
