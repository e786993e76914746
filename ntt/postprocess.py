"""Post-processing of classified proposals (method.md §5.5-5.8): class-aware NMS, resize to the image,
semantic-aware soft merging, top-k.

Parity is the default; the two deviations are named flags: ``drop_empty_masks`` (method.md §12b item 3:
masks empty at full resolution get a NaN score in the reference, and NaN sorts first) and ``box_plus_one``
(method.md §9.1 item 7: exclusive box extents for the NMS boxes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from ntt.ops import batched_nms, masks_to_boxes_inclusive

__all__ = [
    "Detections",
    "resize_masks_to_image",
    "semantic_soft_merge",
    "postprocess_detections",
    "rank_top_k",
    "upsample_logits",
]

log = logging.getLogger(__name__)

# Pixels per float32 matmul chunk in the intersection counts: partial sums stay < 2**24 (exact in float32).
_MAX_EXACT_CHUNK = 1 << 24


@dataclass
class Detections:
    """Final detections of one image, in rank order.

    Attributes:
        masks: ``[F, H, W]`` bool full-resolution masks.
        boxes_xyxy: ``[F, 4]`` float32 inclusive extents of the masks (``[0, 0, 0, 0]`` if empty).
        scores: ``[F]`` decayed semantic scores.
        labels: ``[F]`` int64 class indices.
        proposal_index: ``[F]`` int64 proposal row (after the IoU filter) of each detection.
    """

    masks: Tensor
    boxes_xyxy: Tensor
    scores: Tensor
    labels: Tensor
    proposal_index: Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls, height: int, width: int, device: torch.device | str = "cpu") -> Detections:
        """No detections for an image of size ``(height, width)``.

        Args:
            height: image height.
            width: image width.
            device: device of the (empty) tensors.
        """
        return cls(
            masks=torch.zeros(0, height, width, dtype=torch.bool, device=device),
            boxes_xyxy=torch.zeros(0, 4, dtype=torch.float32, device=device),
            scores=torch.zeros(0, dtype=torch.float32, device=device),
            labels=torch.zeros(0, dtype=torch.int64, device=device),
            proposal_index=torch.zeros(0, dtype=torch.int64, device=device),
        )

    def to(self, device: torch.device | str) -> Detections:
        """Copy to ``device``.

        Args:
            device: target device.
        """
        return Detections(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def resize_masks_to_image(logits: Tensor, height: int, width: int, *, chunk_size: int = 32) -> Tensor:
    """Upsample low-res logits to the image size and binarise (bilinear, align_corners False, antialias, > 0).

    Each mask is interpolated independently, so chunking does not change a single bit.

    Args:
        logits: ``[m, h, w]`` low-res logits.
        height: output height ``H`` (the annotation's height, method.md §12b item 5).
        width: output width ``W``.
        chunk_size: masks interpolated at once (bounds the float ``[chunk, H, W]`` buffer).

    Returns:
        ``[m, H, W]`` bool masks.
    """
    m = logits.shape[0]
    out = torch.empty(m, height, width, dtype=torch.bool, device=logits.device)
    for s in range(0, m, chunk_size):
        out[s : s + chunk_size] = upsample_logits(logits[s : s + chunk_size], height, width) > 0
    return out


def upsample_logits(logits: Tensor, height: int, width: int) -> Tensor:
    """Low-res logits at the image size, as floats (method.md §5.6): the values :func:`resize_masks_to_image`
    thresholds at 0 (the parity tests read them to tell near-tie pixels from real differences).

    Args:
        logits: ``[m, h, w]`` low-res logits.
        height: output height ``H``.
        width: output width ``W``.

    Returns:
        ``[m, H, W]`` float32 (bilinear, align_corners False, antialias True).
    """
    up = F.interpolate(
        logits[:, None].float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )
    return up[:, 0]


def _intersections(masks: Tensor, max_elements: int = 1 << 26) -> tuple[Tensor, Tensor]:
    """Exact pairwise pixel-intersection counts and areas of ``[n, H, W]`` bool masks (float64)."""
    n = masks.shape[0]
    flat = masks.reshape(n, -1)
    npix = flat.shape[1]
    chunk = max(1, min(_MAX_EXACT_CHUNK, max_elements // max(n, 1), npix))
    inter = torch.zeros(n, n, dtype=torch.float64, device=masks.device)
    for s in range(0, npix, chunk):
        part = flat[:, s : s + chunk].float()
        # 0/1 products with partial sums < 2**24: every float32 partial result is an exact integer.
        inter += (part @ part.T).double()
    return inter, flat.sum(dim=1).double()


def _semantic_similarity(embeddings: Tensor) -> Tensor:
    """Clamped cosines ``max(0, e_i . e_j)`` of all ``[P, D]`` embeddings in one matmul.

    One product over all P rows (not one per class) is what the reference computes; the float32 matmul's
    blocking depends on the shape, and this way the result is bit-identical to the fixture on CPU.
    """
    return (embeddings @ embeddings.T).clamp(min=0)


def _class_ios(masks: Tensor, sem: Tensor) -> tuple[Tensor, Tensor]:
    """Semantic IoS of the masks of one class, given in ranking order (method.md §5.7).

    ``sem`` is the class's ``[n, n]`` block of :func:`_semantic_similarity`.
    Returns ``(ios [n] float32, areas [n] float64)``.
    """
    n = masks.shape[0]
    inter, area = _intersections(masks)
    # float64 division of exact counts rounded to float32 equals the reference's float32 division
    # (double rounding is harmless for p' >= 2p + 2), and stays exact beyond 2**24 pixels.
    ios_mat = (inter / area[:, None]).float()
    lower = torch.ones(n, n, dtype=torch.bool, device=masks.device).tril(diagonal=-1)
    vals = torch.where(lower, ios_mat * sem, torch.zeros((), dtype=torch.float32, device=masks.device))
    ios = vals.amax(dim=1) if n > 0 else vals.new_zeros(0)
    # Parity (method.md §12b item 3): an empty mask divides 0 by 0 in every entry of its row -> NaN.
    ios = torch.where(area == 0, torch.full_like(ios, float("nan")), ios)
    return ios, area


def semantic_soft_merge(
    masks: Tensor | Callable[[Tensor], Tensor], labels: Tensor, embeddings: Tensor, scores: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Semantic-aware soft merging (score decay) over masks given in ranking (NMS) order (method.md §5.7).

    ``ios_i = max(0, max_{j < i, label_j == label_i} |m_i & m_j| / |m_i| * max(0, e_i . e_j))`` and
    ``decayed_i = score_i * (1 - ios_i) ** 0.5``. Intersections are counted exactly per class (chunked over
    pixels), never between classes; the cosines come from one ``[P, P]`` product as in the reference (bit-exact
    on the fixture). An empty mask gets ``ios = NaN`` and so a NaN score (parity).

    Args:
        masks: ``[P, H, W]`` bool full-resolution masks, or a function that returns the ``[n_c, H, W]`` masks
            of the given entry indices (one class at a time: the caller never holds all ``P`` masks).
        labels: ``[P]`` class indices.
        embeddings: ``[P, D]`` mask embeddings.
        scores: ``[P]`` scores before decay.

    Returns:
        ``(ios [P] float32, decayed [P] float32, areas [P] float64 mask pixel counts)``.
    """
    masks_of = masks if callable(masks) else (lambda idx: masks[idx])
    device = labels.device
    ios = torch.zeros(labels.shape[0], dtype=torch.float32, device=device)
    areas = torch.zeros(labels.shape[0], dtype=torch.float64, device=device)
    sem = _semantic_similarity(embeddings.float())
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c, as_tuple=True)[0]
        masks_c = masks_of(idx)
        ios[idx], areas[idx] = _class_ios(masks_c, sem[idx][:, idx])
        del masks_c
    return ios, scores * (1 - ios) ** 0.5, areas


def rank_top_k(decayed: Tensor, num_out: int, *, valid: Tensor | None = None) -> Tensor:
    """Final ranking (method.md §5.8): indices of the ``num_out`` highest decayed scores, best first.

    torch's descending sort puts NaN first, as the reference's argsort does; ``stable=True`` fixes the order of
    exact ties (the reference's non-stable argsort leaves it unspecified; ties are practically absent).

    Args:
        decayed: ``[P]`` decayed scores.
        num_out: how many to keep.
        valid: optional ``[P]`` bool; only these entries are ranked (fix flag ``drop_empty_masks``).

    Returns:
        ``[min(num_out, P')]`` int64 indices into ``decayed``.
    """
    if valid is None:
        order = torch.sort(decayed, descending=True, stable=True).indices
    else:
        cand = torch.nonzero(valid, as_tuple=True)[0]
        order = cand[torch.sort(decayed[cand], descending=True, stable=True).indices]
    return order[:num_out]


def _trace_empty(device) -> dict[str, Tensor]:
    z = torch.zeros(0, dtype=torch.int64, device=device)
    zf = torch.zeros(0, dtype=torch.float32, device=device)
    return {
        "nms_keep_pos": z,
        "ios": zf,
        "scores_decayed": zf,
        "final_order": z,
        "final_proposal": z,
        "final_scores": zf,
        "final_labels": z,
        "final_boxes_xyxy": torch.zeros(0, 4, dtype=torch.float32, device=device),
    }


def postprocess_detections(
    logits: Tensor,
    pred_ious: Tensor,
    labels: Tensor,
    scores: Tensor,
    embeddings: Tensor,
    *,
    height: int,
    width: int,
    nms_thr: float = 0.5,
    num_out: int = 100,
    nms_cap_factor: int = 8,
    drop_empty_masks: bool = False,
    box_plus_one: bool = False,
    lowres_boxes: Tensor | None = None,
    chunk_size: int = 32,
    full_masks: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Detections, dict[str, Tensor]]:
    """Class-aware NMS, ``score > 0``, full-resolution masks, soft merging and top-``num_out``.

    Memory: full-resolution masks are built one class at a time (the soft merging never compares classes),
    and only the ``num_out`` winners are upsampled again for the output, so the peak is the largest class's
    ``[n_c, H, W]`` bool masks instead of all ``[P, H, W]`` (upsampling is per mask, hence bit-identical).

    Args:
        logits: ``[n, 256, 256]`` low-res logits of the proposals.
        pred_ious: ``[n]`` SAM predicted IoUs (NMS and merging order).
        labels: ``[n]`` class indices.
        scores: ``[n]`` semantic scores (NaN for empty low-res masks).
        embeddings: ``[n, D]`` mask embeddings.
        height: output height (annotation height).
        width: output width (annotation width).
        nms_thr: NMS IoU threshold (suppress when strictly greater); 1.0 disables suppression.
        num_out: final detections kept.
        nms_cap_factor: NMS output is cut to ``num_out * nms_cap_factor`` entries.
        drop_empty_masks: fix flag: drop masks empty at full resolution instead of ranking them first with a
            NaN score (parity: False).
        box_plus_one: fix flag: NMS boxes use exclusive extents (``x2 + 1``, ``y2 + 1``) (parity: False).
        lowres_boxes: precomputed inclusive ``[n, 4]`` boxes of ``logits > 0`` (computed when None).
        chunk_size: masks upsampled at once.
        full_masks: optional ``proposal indices -> [m, H, W] bool`` full-resolution masks of these rows of
            ``logits`` (e.g. a cache shared by the memory banks of a study pass, ``ntt.maskcache``); must equal
            :func:`resize_masks_to_image` of those rows (it is per mask, so a cache is bit-identical).

    Returns:
        ``(detections, trace)``; ``trace`` holds ``lowres_boxes_xyxy``, ``nms_keep``, ``nms_keep_pos``, ``ios``,
        ``scores_decayed``, ``final_order``, ``final_proposal``, ``final_scores``, ``final_labels``,
        ``final_boxes_xyxy`` (tensors on the input device).
    """
    device = logits.device
    if lowres_boxes is None:
        lowres_boxes = masks_to_boxes_inclusive(logits > 0)
    nms_boxes = lowres_boxes
    if box_plus_one:
        nonempty = (logits > 0).flatten(1).any(dim=1)
        nms_boxes = lowres_boxes + nonempty[:, None].float() * lowres_boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
    keep = batched_nms(nms_boxes, pred_ious, labels, nms_thr)[: num_out * nms_cap_factor]
    keep_pos = keep[scores[keep] > 0]  # NaN > 0 is False: empty low-res masks leave here
    trace: dict[str, Tensor] = {"lowres_boxes_xyxy": lowres_boxes, "nms_keep": keep}
    if keep_pos.numel() == 0:
        log.debug("no proposal survives NMS and score > 0")
        trace.update(_trace_empty(device))
        return Detections.empty(height, width, device), trace

    if full_masks is None:

        def full_masks(rows: Tensor) -> Tensor:
            return resize_masks_to_image(logits[rows], height, width, chunk_size=chunk_size)

    lab_pos = labels[keep_pos]
    ios, decayed, areas = semantic_soft_merge(
        lambda idx: full_masks(keep_pos[idx]),
        lab_pos,
        embeddings[keep_pos],
        scores[keep_pos],
    )

    final_order = rank_top_k(decayed, num_out, valid=areas > 0 if drop_empty_masks else None)
    final_proposal = keep_pos[final_order]
    final_masks = full_masks(final_proposal)
    final_boxes = masks_to_boxes_inclusive(final_masks)
    det = Detections(
        masks=final_masks,
        boxes_xyxy=final_boxes,
        scores=decayed[final_order],
        labels=lab_pos[final_order],
        proposal_index=final_proposal,
    )
    trace.update(
        {
            "nms_keep_pos": keep_pos,
            "ios": ios,
            "scores_decayed": decayed,
            "final_order": final_order,
            "final_proposal": final_proposal,
            "final_scores": det.scores,
            "final_labels": det.labels,
            "final_boxes_xyxy": final_boxes,
        }
    )
    return det, trace
