"""FSOD-VFM's semantic side on the DINOv2 patch grid (method.md §3.4, §5.13): encoder input, pooling, scores.

FSOD-VFM (ICLR 2026, commit f5559b6: support_util.py, metric.py, model/dinov2.py) encodes the *whole* image,
reference or target alike, pools a mask on the patch grid and scores by plain cosine:

* encoder input (``get_dinov2_features``): PIL bicubic to a long side of 630 px (aspect kept, both sides
  floored to a multiple of 14), then its transform's ``Resize((630, 630))`` (PIL bicubic again, so the image
  ends up square after all), ``ToTensor`` (``uint8 / 255`` in float32), ImageNet normalisation;
  ``get_intermediate_layers(n=1, norm=False)``: the last block's patch tokens *before* the final LayerNorm;
* pooling (``resize_mask_to_features``): the full-resolution mask resized to the grid as
  ``cv2.resize(m.astype(float32), (w, h))`` (INTER_LINEAR) ``> 0.5``, then the masked mean of the grid;
  a reference divides by the count (an empty mask drops the reference), a proposal by ``count + 1e-7`` and
  is normalised with ``F.normalize(eps=1e-2)`` (an empty mask gives the zero vector, cosine 0);
* prototypes (``extract_support_features`` + ``compute_prototype_weights``): per class the mean of its
  reference vectors, L2-normalised;
* score (``generate_coco_style_predictions_upn``): ``cos(proposal, prototype)`` unclamped, label = argmax
  (``torch.max``), score = that cosine.

Every function repeats FSOD-VFM's tensor layout and operation order, so the results are bit-identical to
theirs on CPU (tests/test_gridmatching.py against tests/fixtures/fsod_vfm_refs, made with their functions).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# masks onto the patch grid as cv2.resize(m.astype(float32), (w, h)) > 0.5 (OpenCV's INTER_LINEAR, measured
# against the opencv-python wheels): the one implementation, shared with FSOD-VFM's diffusion (§5.12); the
# fsod_vfm_refs fixture checks it against cv2 again on reference and proposal masks
from ntt.diffusion import resize_masks_linear

__all__ = [
    "FSOD_VFM_INPUT_SIZE",
    "FSOD_VFM_LONG_SIDE",
    "FSOD_VFM_PATCH",
    "class_prototypes",
    "cosine_top1",
    "long_side_input",
    "long_side_size",
    "query_embeddings",
    "reference_vectors",
    "resize_masks_linear",
    "sam_iou_decay",
]

FSOD_VFM_LONG_SIDE = 630  # resize_with_aspect_ratio(target_long_side=630) in get_dinov2_features
FSOD_VFM_PATCH = 14  # its patch_size argument
FSOD_VFM_INPUT_SIZE = 630  # main.py's --dinov2_image_size default -> get_dinov2_transform((630, 630))
QUERY_COUNT_EPS = 1e-7  # metric.py: masked sum / (valid_pixel_count + 1e-7)
QUERY_NORM_EPS = 1e-2  # metric.py: F.normalize(..., eps=1e-2)


# ----------------------------------------------------------------------------------------------------------
# Encoder input


def long_side_size(
    width: int, height: int, *, long_side: int = FSOD_VFM_LONG_SIDE, patch: int = FSOD_VFM_PATCH
):
    """``resize_with_aspect_ratio``'s output size: long side ``long_side``, each side floored to ``patch``.

    Args:
        width: image width.
        height: image height.
        long_side: target long side (630).
        patch: both sides become multiples of it (14), at least one patch.

    Returns:
        ``(new_width, new_height)``.
    """
    aspect = width / height
    if width >= height:
        new_w, new_h = long_side, int(long_side / aspect)
    else:
        new_h, new_w = long_side, int(long_side * aspect)
    return max(new_w // patch, 1) * patch, max(new_h // patch, 1) * patch


def long_side_input(
    image,
    *,
    long_side: int = FSOD_VFM_LONG_SIDE,
    patch: int = FSOD_VFM_PATCH,
    size: int | None = FSOD_VFM_INPUT_SIZE,
) -> Tensor:
    """FSOD-VFM's DINOv2 input of an RGB image, in [0, 1] (the encoder normalises it).

    Args:
        image: an 8-bit RGB ``PIL.Image`` (as read by ``Image.open(path).convert("RGB")``).
        long_side: first resize, long side (630).
        patch: the first resize floors both sides to a multiple of it (14).
        size: the transform's square ``Resize((size, size))`` (630, main.py's default); None = none (the
            aspect-kept image goes to the encoder, what ``resize_with_aspect_ratio`` alone would give).

    Returns:
        ``[3, S, S']`` float32: ``uint8 / 255`` computed in float32 as ``ToTensor`` does.
    """
    from PIL import Image

    img = image.resize(long_side_size(*image.size, long_side=long_side, patch=patch), resample=Image.BICUBIC)
    if size is not None:  # torchvision's Resize on a PIL image is PIL's resize (antialias is PIL's own)
        img = img.resize((int(size), int(size)), resample=Image.BICUBIC)
    arr = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    return arr.permute(2, 0, 1).contiguous().to(torch.float32).div(255)


# ----------------------------------------------------------------------------------------------------------
# Pooling, prototypes, scores (FSOD-VFM's layout: features [1, D, h, w], one mask at a time)


def _channels_first(feats: Tensor) -> Tensor:
    """``[h, w, D]`` grid (ntt's encoders) -> FSOD-VFM's contiguous ``[1, D, h, w]``."""
    return feats.permute(2, 0, 1)[None].contiguous()


def _masked_sums(feats_chw: Tensor, grid_mask: Tensor) -> tuple[Tensor, Tensor]:
    mask = grid_mask.to(device=feats_chw.device, dtype=torch.float32)
    masked = feats_chw * mask[None, None]
    return masked.sum(dim=[2, 3]), mask.sum()


def reference_vectors(feats: Tensor, grid_masks: Tensor) -> tuple[Tensor, Tensor]:
    """Masked means of a reference image's grid, one per mask (``extract_support_features``).

    Args:
        feats: ``[h, w, D]`` DINOv2 grid of the whole reference image.
        grid_masks: ``[k, h, w]`` bool masks on that grid (:func:`resize_masks_linear`).

    Returns:
        ``(vectors [k, D] float32, valid [k] bool)``; a mask empty on the grid has ``valid`` False and a zero
        row (FSOD-VFM drops that reference).
    """
    chw = _channels_first(feats.float())
    k, d = grid_masks.shape[0], chw.shape[1]
    out = torch.zeros(k, d, dtype=torch.float32, device=chw.device)
    valid = torch.zeros(k, dtype=torch.bool)
    for i in range(k):
        sums, count = _masked_sums(chw, grid_masks[i])
        if count > 0:
            out[i] = (sums / count)[0]
            valid[i] = True
    return out, valid


def class_prototypes(vectors: list[Tensor]) -> Tensor:
    """Per class the mean of its reference vectors, L2-normalised (``compute_prototype_weights``).

    Args:
        vectors: per class a ``[k_c, D]`` tensor of its valid reference vectors (``k_c >= 1``).

    Returns:
        ``[C, D]`` unit rows (computed in FSOD-VFM's ``[D, C]`` layout, then transposed).
    """
    protos = [v.mean(dim=0) for v in vectors]
    return F.normalize(torch.stack(protos, dim=1), dim=0).T


def query_embeddings(feats: Tensor, grid_masks: Tensor) -> Tensor:
    """FSOD-VFM's proposal vectors: ``normalize(masked sum / (count + 1e-7), eps=1e-2)``, one per mask.

    Args:
        feats: ``[h, w, D]`` DINOv2 grid of the whole target image.
        grid_masks: ``[n, h, w]`` bool proposal masks on that grid.

    Returns:
        ``[n, D]`` float32; an empty mask gives a zero row (cosine 0 with every prototype, never NaN).
    """
    chw = _channels_first(feats.float())
    out = torch.empty(grid_masks.shape[0], chw.shape[1], dtype=torch.float32, device=chw.device)
    for i in range(grid_masks.shape[0]):
        sums, count = _masked_sums(chw, grid_masks[i])
        out[i] = F.normalize(sums / (count + QUERY_COUNT_EPS), eps=QUERY_NORM_EPS)[0]
    return out


def cosine_top1(embeddings: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unclamped cosine to each prototype, label = ``torch.max`` over classes, score = that cosine.

    Row by row as FSOD-VFM (``feat_vec @ proto_feat`` with ``proto_feat`` a contiguous ``[D, C]``), so the
    products are the same BLAS calls.

    Args:
        embeddings: ``[n, D]`` proposal vectors (:func:`query_embeddings`).
        prototypes: ``[C, D]`` unit prototypes.

    Returns:
        ``(sim [n, C], labels [n] int64, scores [n])``.
    """
    proto_dc = prototypes.to(embeddings.device, torch.float32).T.contiguous()
    n, c = embeddings.shape[0], proto_dc.shape[1]
    sim = torch.empty(n, c, dtype=torch.float32, device=embeddings.device)
    for i in range(n):
        sim[i] = (embeddings[i : i + 1] @ proto_dc)[0]
    if n == 0 or c == 0:
        return sim, torch.zeros(n, dtype=torch.int64, device=sim.device), sim.new_zeros(n)
    scores, labels = torch.max(sim, dim=1)
    return sim, labels, scores


def sam_iou_decay(scores: Tensor, pred_ious: Tensor) -> Tensor:
    """``score * sigmoid(20 * (iou - 0.45))``: SAM's predicted IoU as a soft gate on the score.

    The optional decay of later NTT code (commented out there, method.md §5.13): a proposal SAM itself
    doubts (predicted IoU well below 0.45) loses its score; one above ~0.6 keeps it.

    Args:
        scores: ``[n]`` classification scores.
        pred_ious: ``[n]`` SAM's predicted IoU of each proposal.
    """
    return scores * torch.sigmoid(20.0 * (pred_ious.to(scores.dtype) - 0.45))
