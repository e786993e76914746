"""COCO result encoding: RLE masks, xywh boxes (method.md §5.8 item 3).

Per-process result shards and their merge live in `ntt.runner.lines` (per-image JSONL lines, resumable).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from pycocotools import mask as mask_utils

__all__ = ["encode_masks_rle", "detections_to_coco"]

log = logging.getLogger(__name__)


def encode_masks_rle(masks: torch.Tensor) -> list[dict]:
    """COCO RLE of binary masks with ``counts`` as ``str`` (JSON-ready).

    One pycocotools call encodes all masks; the Fortran-ordered ``[H, W, N]`` array it needs is produced by a
    single transpose on the masks' device before the copy to host.

    Args:
        masks: ``[N, H, W]`` bool masks (any device).

    Returns:
        ``N`` dicts ``{"size": [H, W], "counts": str}``.
    """
    n = masks.shape[0]
    if n == 0:
        return []
    # [N, W, H] C-contiguous == [H, W, N] Fortran-contiguous: no second copy on the host.
    nwh = masks.to(torch.uint8).permute(0, 2, 1).contiguous().cpu().numpy()
    fortran = nwh.transpose(2, 1, 0)
    assert fortran.flags.f_contiguous
    rles = mask_utils.encode(fortran)
    for r in rles:
        r["counts"] = r["counts"].decode("utf-8")
    return rles


def detections_to_coco(
    det,
    image_id: int,
    category_ids: Sequence[int],
    *,
    box_plus_one: bool = False,
    rles: Sequence[dict] | None = None,
    prompt_boxes: bool = False,
) -> list[dict]:
    """COCO result dicts of one image's detections, in rank order (the reference's format).

    Args:
        det: :class:`ntt.postprocess.Detections` (masks, inclusive ``boxes_xyxy``, scores, labels).
        image_id: COCO image id.
        category_ids: ascending-sorted selected category ids (class index -> category id).
        box_plus_one: fix flag: width/height ``x2 - x1 + 1`` (mask extent) instead of the reference's
            ``x2 - x1``. Empty masks keep ``[0, 0, 0, 0]``.
        rles: the masks' RLEs when already encoded (a study pass encodes each proposal once for all banks);
            :func:`encode_masks_rle` of ``det.masks`` otherwise.
        prompt_boxes: ``det.boxes_xyxy`` holds each detection's prompt box (float64 image pixels,
            ``ntt.boxproposals.with_prompt_boxes``): written as floats ``[x1, y1, x2 - x1, y2 - y1]``, as
            FSOD-VFM writes its clipped boxes (``matcher.output_box=prompt``, method.md §5.14).

    Returns:
        list of ``{"image_id", "category_id", "bbox" (ints), "score", "segmentation"}``.
    """
    n = len(det.scores)
    if n == 0:
        return []
    # Mask boxes are integer pixel indices; the reference writes them as JSON integers.
    boxes = det.boxes_xyxy.detach().cpu()
    boxes = boxes.double().numpy() if prompt_boxes else boxes.round().to(torch.int64).numpy()
    scores = det.scores.detach().cpu().double().numpy()
    labels = det.labels.detach().cpu().numpy()
    rles = encode_masks_rle(det.masks) if rles is None else [dict(r) for r in rles]
    out = []
    for k in range(n):
        if prompt_boxes:  # Python floats, as FSOD-VFM's `[x1, y1, x2 - x1, y2 - y1]` of its clipped box
            x1, y1, x2, y2 = (float(v) for v in boxes[k])
            w, h = x2 - x1, y2 - y1
        else:
            x1, y1, x2, y2 = (int(v) for v in boxes[k])
            w, h = x2 - x1, y2 - y1
            if box_plus_one and (x1, y1, x2, y2) != (0, 0, 0, 0):
                w, h = w + 1, h + 1
        out.append(
            {
                "image_id": int(image_id),
                "category_id": int(category_ids[int(labels[k])]),
                "bbox": [x1, y1, w, h],
                "score": float(scores[k]),
                "segmentation": rles[k],
            }
        )
    return out
