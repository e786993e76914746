"""Reference masks from SAM2 prompts: boxes and clicked points become instance masks.

The practitioner path (``ntt.app.segmenter``, ``ntt segment``) accepts references given as boxes or clicks instead of
masks. Each prompt is decoded by SAM2 on the reference image (stretched to the SAM input frame, as the test
path feeds it) and its low-res logits are upsampled to the image size exactly as detections are
(``ntt.postprocess.resize_masks_to_image``).

Which decoder output is used:

* a box: the single-mask output (index 0), as the reference's box -> mask preparation
  (``multimask_output=False``, docs/method.md §1.5); a box is not ambiguous.
* one positive click: the best of the three multimask outputs by predicted IoU, as the proposer does for
  its grid points (docs/method.md §5.2); a single click is ambiguous (part / object / group).
* several clicks (or any negative click) on one instance: the single-mask output (index 0), SAM's own
  recommendation when the prompt is no longer ambiguous.

A box whose mask comes out empty falls back to the box rectangle (as the reference's preparation does when
no contour survives, docs/method.md §1.5), with a warning; clicks that give an empty mask are an error.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
from torch import Tensor

from ntt.postprocess import resize_masks_to_image
from ntt.proposals import select_best_multimask
from ntt.utils.config import REFERENCE_MASK_PRECISIONS

__all__ = ["normalize_boxes", "normalize_points", "masks_from_boxes", "masks_from_points", "sam2_box_mask"]

log = logging.getLogger(__name__)


def normalize_boxes(boxes) -> np.ndarray:
    """Boxes as a float64 ``[N, 4]`` xyxy array.

    Args:
        boxes: one box ``[x1, y1, x2, y2]`` or a sequence / array of them (pixels of the image).

    Raises:
        ValueError: not 4 numbers per box, or ``x2 <= x1`` / ``y2 <= y1``.
    """
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must be [x1, y1, x2, y2] or a list of them, got shape {arr.shape}")
    bad = np.nonzero((arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1]))[0]
    if bad.size:
        raise ValueError(
            f"box {arr[bad[0]].tolist()} is empty: boxes are [x1, y1, x2, y2] with x2 > x1 and y2 > y1 "
            "(not COCO's [x, y, w, h])"
        )
    return arr


def normalize_points(points, point_labels=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Clicks as one ``(xy [n, 2], labels [n])`` pair per instance.

    Args:
        points: one click ``[x, y]`` (one instance); an ``[N, 2]`` array (N instances, one click each);
            or a list of instances, each a list of ``[x, y]`` clicks (``[[[x, y], [x, y]], [[x, y]]]``).
        point_labels: same nesting without the last axis: 1 = positive (default), 0 = negative click.

    Raises:
        ValueError: a malformed click or labels that do not match the clicks.
    """
    try:
        regular = np.asarray(points, dtype=np.float64)
    except ValueError:  # ragged: instances with different numbers of clicks
        regular = None
    if regular is not None and regular.ndim in (1, 2, 3):
        arr = regular.reshape((1, 1, -1) if regular.ndim == 1 else (len(regular), -1, regular.shape[-1]))
        instances = list(arr)
        if point_labels is None:
            labels = [np.ones(len(p), dtype=np.int64) for p in instances]
        else:
            lab = np.asarray(point_labels, dtype=np.int64)
            if lab.size != arr.shape[0] * arr.shape[1]:
                raise ValueError(
                    f"point_labels has {lab.size} labels for {arr.shape[0] * arr.shape[1]} clicks"
                )
            labels = list(lab.reshape(arr.shape[:2]))
    else:
        instances = [np.asarray(inst, dtype=np.float64).reshape(-1, 2) for inst in points]
        if point_labels is None:
            labels = [np.ones(len(p), dtype=np.int64) for p in instances]
        else:
            labels = [np.atleast_1d(np.asarray(v, dtype=np.int64)) for v in point_labels]
    out = []
    if len(labels) != len(instances):
        raise ValueError(f"point_labels has {len(labels)} entries but points has {len(instances)} instances")
    for i, (xy, lab) in enumerate(zip(instances, labels)):
        if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) == 0:
            raise ValueError(f"points: instance {i} must be a list of [x, y] clicks, got shape {xy.shape}")
        if lab.shape != (len(xy),) or not np.isin(lab, (0, 1)).all():
            raise ValueError(
                f"point_labels: instance {i} needs {len(xy)} labels of 0 or 1, got {lab.tolist()}"
            )
        if not (lab == 1).any():
            raise ValueError(f"points: instance {i} has no positive click (label 1)")
        out.append((xy, lab))
    return out


def _to_frame(xy: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
    """Image pixels -> SAM input frame (the image is stretched to ``size x size``)."""
    scale = np.array([size / width, size / height], dtype=np.float64)
    return xy * scale


@torch.inference_mode()
def masks_from_boxes(sam2, image_sam: Tensor, boxes: np.ndarray, height: int, width: int) -> Tensor:
    """Instance masks from box prompts (single-mask output; empty masks fall back to the box).

    Args:
        sam2: SAM2 backbone (``encode_image`` / ``decode``, ``image_size``).
        image_sam: ``[3, S, S]`` stretched image in [0, 1] (``S = sam2.image_size``).
        boxes: ``[N, 4]`` xyxy boxes in image pixels (:func:`normalize_boxes`).
        height: image height.
        width: image width.

    Returns:
        ``[N, height, width]`` bool masks (CPU).
    """
    size = int(sam2.image_size)
    feats = sam2.encode_image(image_sam[None])
    frame = _to_frame(boxes.reshape(-1, 2), height, width, size).reshape(-1, 4)
    logits, _ = sam2.decode(feats, boxes=torch.as_tensor(frame, dtype=torch.float32))
    masks = resize_masks_to_image(logits[:, 0], height, width).cpu()
    for i in range(len(boxes)):
        if not bool(masks[i].any()):
            x1, y1, x2, y2 = (int(round(v)) for v in boxes[i])
            log.warning(
                "SAM2 gave an empty mask for box %s: using the box rectangle as the reference mask",
                boxes[i].tolist(),
            )
            masks[i, max(0, y1) : min(height, y2), max(0, x1) : min(width, x2)] = True
    return masks


@torch.inference_mode()
def masks_from_points(
    sam2, image_sam: Tensor, points: list[tuple[np.ndarray, np.ndarray]], height: int, width: int
) -> Tensor:
    """Instance masks from clicks (one positive click: best multimask output; otherwise single-mask).

    Args:
        sam2: SAM2 backbone (``encode_image`` / ``decode``, ``image_size``).
        image_sam: ``[3, S, S]`` stretched image in [0, 1].
        points: per instance ``(xy [n, 2], labels [n])`` in image pixels (:func:`normalize_points`).
        height: image height.
        width: image width.

    Returns:
        ``[N, height, width]`` bool masks (CPU).

    Raises:
        ValueError: an instance's clicks give an empty mask (the message names the clicks).
    """
    size = int(sam2.image_size)
    feats = sam2.encode_image(image_sam[None])
    out = []
    for xy, lab in points:
        pts = torch.as_tensor(_to_frame(xy, height, width, size), dtype=torch.float32)[None]
        logits, ious = sam2.decode(feats, points=pts, point_labels=torch.as_tensor(lab)[None])
        if len(xy) == 1:
            chosen, _, _ = select_best_multimask(logits, ious)
        else:
            chosen = logits[:, 0]
        mask = resize_masks_to_image(chosen, height, width)[0].cpu()
        if not bool(mask.any()):
            raise ValueError(
                f"SAM2 gave an empty mask for the clicks {xy.tolist()} (labels {lab.tolist()}): click inside "
                "the object, add clicks, or give a box or a mask instead"
            )
        out.append(mask)
    return torch.stack(out) if out else torch.zeros((0, height, width), dtype=torch.bool)


def sam2_box_mask(sam2, image: Tensor, bbox_xywh, *, precision: str = "float32") -> Tensor:
    """A reference's mask as FSOD-VFM makes it (``extract_masks_from_support``): SAM2's single-mask output for
    the box ``[x, y, x + w, y + h]`` on the whole image, at full resolution (method.md §3.4 step 1).

    The image is stretched to SAM2's input as the test images are (``sam2.input_resize``,
    ``ntt.data.images.sam2_input``) and the box is decoded as ``proposer=boxes`` decodes one
    (``ntt.boxproposals``: FSOD-VFM's predictor, stability fallback on).

    Args:
        sam2: ``ntt.backbones.sam2.SAM2Backbone``.
        image: ``[3, H, W]`` float32 in [0, 1] (``uint8 / 255``).
        bbox_xywh: the reference's COCO box.
        precision: ``float32`` (ntt) or ``bfloat16`` = FSOD-VFM: the image encoder and the decoder run under
            ``torch.autocast(bfloat16)`` (its ``set_image`` and ``predict`` are inside one), the box decoded
            alone (one ``predict`` call per box: the bfloat16 sums depend on the batch) and the stability
            test done in bfloat16 (``matcher.semantics.reference_mask_precision``, method.md §3.4).

    Returns:
        ``[H, W]`` bool mask (on the image's device).
    """
    from PIL import Image

    from ntt.boxproposals import boxes_to_frame, choose_single_output
    from ntt.data.images import sam2_input

    if precision not in REFERENCE_MASK_PRECISIONS:
        raise ValueError(
            f"reference mask precision must be one of {', '.join(REFERENCE_MASK_PRECISIONS)}, got {precision!r}"
        )
    height, width = image.shape[-2:]
    size = int(getattr(sam2, "image_size", 1024))
    arr = torch.round(image.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    image_sam = sam2_input(
        Image.fromarray(arr, mode="RGB"), size, getattr(sam2, "input_resize", "pil_bicubic")
    )
    device = next(sam2.parameters()).device if isinstance(sam2, torch.nn.Module) else torch.device("cpu")
    x, y, w, h = (float(v) for v in list(bbox_xywh)[:4])
    box = boxes_to_frame(np.asarray([[x, y, x + w, y + h]]), width=width, height=height, size=size).to(device)
    low = precision == "bfloat16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if low else contextlib.nullcontext()
    with autocast:
        feats = sam2.encode_image(image_sam[None].to(device))
        # float32: ntt's usual padded decoder chunk (as proposer=boxes decodes); bfloat16: alone, as theirs
        logits4, ious4 = sam2.decode(feats, boxes=box, chunk=1 if low else None)
    logits, _, _ = choose_single_output(
        logits4, ious4, stability_fallback=True, decoder_dtype=torch.bfloat16 if low else None
    )
    return resize_masks_to_image(logits, height, width)[0].to(image.device)
