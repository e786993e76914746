"""COCO result encoding (RLE masks, xywh boxes) and per-process result shards (ALGORITHM 5.8.3, 7.5)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from pycocotools import mask as mask_utils

__all__ = ["encode_masks_rle", "detections_to_coco", "write_results_shard", "merge_result_shards"]

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
    det, image_id: int, category_ids: Sequence[int], *, box_plus_one: bool = False
) -> list[dict]:
    """COCO result dicts of one image's detections, in rank order (the reference's format).

    Args:
        det: :class:`ntt.postprocess.Detections` (masks, inclusive ``boxes_xyxy``, scores, labels).
        image_id: COCO image id.
        category_ids: ascending-sorted selected category ids (class index -> category id).
        box_plus_one: fix flag: width/height ``x2 - x1 + 1`` (mask extent) instead of the reference's
            ``x2 - x1``. Empty masks keep ``[0, 0, 0, 0]``.

    Returns:
        list of ``{"image_id", "category_id", "bbox" (ints), "score", "segmentation"}``.
    """
    n = len(det.scores)
    if n == 0:
        return []
    # Boxes are integer pixel indices; the reference writes them as JSON integers.
    boxes = det.boxes_xyxy.detach().cpu().round().to(torch.int64).numpy()
    scores = det.scores.detach().cpu().double().numpy()
    labels = det.labels.detach().cpu().numpy()
    rles = encode_masks_rle(det.masks)
    out = []
    for k in range(n):
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


def write_results_shard(path: str | os.PathLike, results: list[dict]) -> None:
    """Write one process's results as JSON, atomically (temp file + rename).

    Args:
        path: shard file.
        results: COCO result dicts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, path)


def merge_result_shards(paths: Iterable[str | os.PathLike], image_order: Sequence[int]) -> list[dict]:
    """Merge result shards into one list ordered by the dataset's image order.

    Detections of one image keep their rank order. The output does not depend on how images were split into
    shards, nor on the order of ``paths``; an image found in several shards (a distributed sampler padding
    the last batch) is taken once, from the first shard (in ``paths`` order) that holds it.

    Args:
        paths: shard files written by :func:`write_results_shard`.
        image_order: all image ids in dataset order.

    Returns:
        the merged list of result dicts.

    Raises:
        ValueError: a shard holds an image id that is not in ``image_order``.
    """
    per_image: dict[int, list[dict]] = {}
    for p in paths:
        with open(p) as f:
            shard = json.load(f)
        groups: dict[int, list[dict]] = {}
        for r in shard:
            groups.setdefault(int(r["image_id"]), []).append(r)
        for img, dets in groups.items():
            if img in per_image:
                if per_image[img] != dets:
                    log.warning(
                        "image %d appears in several shards with different results; keeping first", img
                    )
                continue
            per_image[img] = dets
    known = set(int(i) for i in image_order)
    unknown = sorted(set(per_image) - known)
    if unknown:
        raise ValueError(f"result shards hold image ids not in the dataset order: {unknown[:10]}")
    merged: list[dict] = []
    for img in image_order:
        merged.extend(per_image.get(int(img), []))
    return merged
