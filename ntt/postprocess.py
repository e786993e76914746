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

from ntt.diffusion import diffusion_merge
from ntt.ops import batched_nms, masks_to_boxes_inclusive
from ntt.utils.config import DiffusionConfig

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
        masks: ``[F, H, W]`` bool full-resolution masks; None for a boxes-only output (``keep_masks=False``).
        boxes_xyxy: ``[F, 4]`` float32 inclusive extents of the masks (``[0, 0, 0, 0]`` if empty).
        scores: ``[F]`` decayed semantic scores.
        labels: ``[F]`` int64 class indices.
        proposal_index: ``[F]`` int64 proposal row (after the IoU filter) of each detection.
    """

    masks: Tensor | None
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
        return Detections(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                for f in fields(self)
            }
        )


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
    # Areas are the (exact) diagonal: a bool sum over dim 1 would materialise an int64 copy (8 bytes/pixel).
    return inter, inter.diagonal().clone()


def _semantic_similarity(embeddings: Tensor) -> Tensor:
    """Clamped cosines ``max(0, e_i . e_j)`` of all ``[P, D]`` embeddings in one matmul.

    One product over all P rows (not one per class) is what the reference computes; the float32 matmul's
    blocking depends on the shape, and this way the result is bit-identical to the fixture on CPU.
    """
    return (embeddings @ embeddings.T).clamp(min=0)


def _ios_from_counts(inter: Tensor, area: Tensor, sem: Tensor) -> Tensor:
    """Semantic IoS of one class from exact pairwise counts (only the strict lower triangle of ``inter`` is
    read) and areas, masks in ranking order (method.md §5.7). Returns ``[n]`` float32."""
    n = area.shape[0]
    # float64 division of exact counts rounded to float32 equals the reference's float32 division
    # (double rounding is harmless for p' >= 2p + 2), and stays exact beyond 2**24 pixels.
    ios_mat = (inter / area[:, None]).float()
    lower = torch.ones(n, n, dtype=torch.bool, device=area.device).tril(diagonal=-1)
    vals = torch.where(lower, ios_mat * sem, torch.zeros((), dtype=torch.float32, device=area.device))
    ios = vals.amax(dim=1) if n > 0 else vals.new_zeros(0)
    # Parity (method.md §12b item 3): an empty mask divides 0 by 0 in every entry of its row -> NaN.
    return torch.where(area == 0, torch.full_like(ios, float("nan")), ios)


def _class_ios(masks: Tensor, sem: Tensor, max_elements: int = 1 << 26) -> tuple[Tensor, Tensor]:
    """Semantic IoS of the ``[n, H, W]`` masks of one class, given in ranking order (method.md §5.7).

    ``sem`` is the class's ``[n, n]`` block of :func:`_semantic_similarity`.
    Returns ``(ios [n] float32, areas [n] float64)``.
    """
    inter, area = _intersections(masks, max_elements)
    return _ios_from_counts(inter, area, sem), area


# Default byte budget of the soft merging's full-resolution buffers (see semantic_soft_merge).
SOFT_MERGE_MAX_BYTES = 512 << 20


@dataclass
class _Crop:
    """A full-resolution mask cut to its tight box ``[y0, y1) x [x0, x1)`` (``bits`` None if not kept)."""

    y0: int
    y1: int
    x0: int
    x1: int
    bits: Tensor | None


def _crop(mask: Tensor, keep: bool) -> tuple[_Crop | None, int]:
    """Tight-box crop of one ``[H, W]`` bool mask and its area; ``None`` for an empty mask."""
    rows = torch.nonzero(mask.any(dim=1), as_tuple=True)[0]
    if rows.numel() == 0:
        return None, 0
    cols = torch.nonzero(mask.any(dim=0), as_tuple=True)[0]
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    bits = mask[y0:y1, x0:x1].clone()
    return _Crop(y0, y1, x0, x1, bits if keep else None), int(torch.count_nonzero(bits))


def _crop_intersection(a: _Crop, b: _Crop) -> int:
    """Exact pixel count of ``a & b`` over the intersection of their boxes (both with ``bits``)."""
    y0, y1, x0, x1 = max(a.y0, b.y0), min(a.y1, b.y1), max(a.x0, b.x0), min(a.x1, b.x1)
    if y0 >= y1 or x0 >= x1:
        return 0
    pa = a.bits[y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0]
    pb = b.bits[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]
    return int(torch.count_nonzero(pa & pb))


def _boxes_overlap(a: _Crop | None, b: _Crop | None) -> bool:
    return (
        a is not None
        and b is not None
        and max(a.y0, b.y0) < min(a.y1, b.y1)
        and max(a.x0, b.x0) < min(a.x1, b.x1)
    )


def _class_counts_cropped(
    produce: Callable[[Tensor], Tensor], n: int, hw: int, block: int, cache_bytes: int, device
) -> tuple[Tensor, Tensor]:
    """Exact counts ``(inter [n, n], area [n])`` (float64) of one class's masks, memory-bounded.

    Masks are produced ``block`` at a time and kept as tight-box crops while the crops total at most
    ``cache_bytes``; the others are produced again (same bits: upsampling is per mask) in blocks of ``block``
    when their pairs are counted, at most two blocks alive. Only pairs with overlapping boxes are counted.
    """
    crops: list[_Crop | None] = [None] * n
    area = torch.zeros(n, dtype=torch.float64, device=device)
    inter = torch.zeros(n, n, dtype=torch.float64, device=device)
    used = 0
    for s in range(0, n, block):
        full = produce(torch.arange(s, min(n, s + block), device=device))
        for k in range(full.shape[0]):
            crop, a = _crop(full[k], keep=True)
            if crop is not None and used + crop.bits.numel() > cache_bytes:
                crop.bits = None
            elif crop is not None:
                used += crop.bits.numel()
            crops[s + k], area[s + k] = crop, float(a)
        del full
    kept = [i for i in range(n) if crops[i] is not None and crops[i].bits is not None]
    lost = [i for i in range(n) if crops[i] is not None and crops[i].bits is None]

    def count(i: int, j: int, ci: _Crop, cj: _Crop) -> None:
        if _boxes_overlap(ci, cj):
            inter[i, j] = inter[j, i] = float(_crop_intersection(ci, cj))

    for a_pos, i in enumerate(kept):
        for j in kept[:a_pos]:
            count(i, j, crops[i], crops[j])

    def refetch(ids: list[int]) -> dict[int, _Crop]:
        full = produce(torch.tensor(ids, dtype=torch.int64, device=device))
        return {i: _crop(full[k], keep=True)[0] for k, i in enumerate(ids)}

    lost_blocks = [lost[s : s + block] for s in range(0, len(lost), block)]
    for b, ids in enumerate(lost_blocks):
        mine = refetch(ids)
        for a_pos, i in enumerate(ids):
            for j in kept:
                count(i, j, mine[i], crops[j])
            for j in ids[:a_pos]:
                count(i, j, mine[i], mine[j])
        for other in lost_blocks[b + 1 :]:
            needed = [j for j in other if any(_boxes_overlap(crops[i], crops[j]) for i in ids)]
            if not needed:
                continue
            theirs = refetch(needed)
            for i in ids:
                for j in needed:
                    count(i, j, mine[i], theirs[j])
            del theirs
        del mine
    return inter, area


def semantic_soft_merge(
    masks: Tensor | Callable[[Tensor], Tensor],
    labels: Tensor,
    embeddings: Tensor,
    scores: Tensor,
    *,
    max_bytes: int = SOFT_MERGE_MAX_BYTES,
) -> tuple[Tensor, Tensor, Tensor]:
    """Semantic-aware soft merging (score decay) over masks given in ranking (NMS) order (method.md §5.7).

    ``ios_i = max(0, max_{j < i, label_j == label_i} |m_i & m_j| / |m_i| * max(0, e_i . e_j))`` and
    ``decayed_i = score_i * (1 - ios_i) ** 0.5``. Intersections are counted exactly per class, never between
    classes; the cosines come from one ``[P, P]`` product as in the reference (bit-exact on the fixture). An
    empty mask gets ``ios = NaN`` and so a NaN score (parity).

    Memory bound (method.md §10 item 4): the full-resolution buffers this function holds stay below
    ``max_bytes`` (or about ``14 H W`` bytes if one mask alone needs more), whatever the class size ``n_c``:
    masks are asked from the producer at most ``block = max(1, max_bytes // (16 H W))`` at a time (its float
    upsampling buffer included: ~7 bytes per pixel per mask). A class with ``n_c H W <= max_bytes / 4`` is
    held whole and counted by chunked float32 matmuls (chunks of ``max_bytes / 4`` bytes); a larger class is
    kept as tight-box crops (at most ``max_bytes / 4`` bytes; masks beyond are produced again, two blocks at a
    time, when their pairs are counted: time traded for memory, up to ~n_c^2 / (2 block) extra upsamplings when
    many large masks overlap) and only pairs with overlapping boxes are counted. Plus ``O(n_c^2)``
    float64 count matrices (a caching producer's own cache, e.g. ``ntt.maskcache``, is its own). Every count
    is an exact integer, so all paths give bit-identical results.

    Args:
        masks: ``[P, H, W]`` bool full-resolution masks, or a function that returns the ``[m, H, W]`` masks
            of the given entry indices (asked per class, in blocks: the caller never holds all ``P`` masks).
        labels: ``[P]`` class indices.
        embeddings: ``[P, D]`` mask embeddings.
        scores: ``[P]`` scores before decay.
        max_bytes: byte budget of the full-resolution buffers (see above).

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
        n = idx.shape[0]
        first = masks_of(idx[:1])  # learns H, W
        height, width = first.shape[-2:]
        hw = max(1, height * width)
        block = max(1, max_bytes // (16 * hw))
        if n * hw <= max_bytes // 4:
            masks_c = torch.empty(n, height, width, dtype=torch.bool, device=first.device)
            masks_c[:1] = first
            del first
            for s in range(1, n, block):
                masks_c[s : s + block] = masks_of(idx[s : s + block])
            ios[idx], areas[idx] = _class_ios(masks_c, sem[idx][:, idx], max(1, max_bytes // 16))
            del masks_c
        else:
            del first

            def produce(rows: Tensor, idx=idx) -> Tensor:
                return masks_of(idx[rows])

            inter, area = _class_counts_cropped(produce, n, hw, block, max_bytes // 4, device)
            ios[idx], areas[idx] = _ios_from_counts(inter, area, sem[idx][:, idx]), area
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


def _other_merge(
    merge, full_masks, logits, keep_pos, labels, scores, diffusion, need_areas, *, height, width, dino_grid
) -> tuple[Tensor, Tensor, Tensor]:
    """``(ios, decayed, areas)`` of ``merge=diffusion`` (FSOD-VFM, §5.12) or ``merge=none`` (no re-scoring).

    ``areas`` (full-resolution pixel counts) are counted only when ``drop_empty_masks`` needs them (else 1).
    """
    if merge == "diffusion":
        ios, decayed = diffusion_merge(
            lambda rows: full_masks(keep_pos[rows]), lambda rows: logits[keep_pos[rows]] > 0, labels, scores,
            diffusion or DiffusionConfig(), height=height, width=width, dino_grid=dino_grid,
        )  # fmt: skip
    elif merge == "none":
        ios, decayed = torch.zeros_like(scores, dtype=torch.float32), scores.float()
    else:
        raise ValueError(f"matcher.merge={merge}: choose one of soft, diffusion, none")
    areas = torch.ones(keep_pos.shape[0], dtype=torch.float64, device=scores.device)
    if need_areas:
        for s in range(0, keep_pos.shape[0], 32):
            block = full_masks(keep_pos[s : s + 32])
            areas[s : s + 32] = block.flatten(1).sum(dim=1).to(areas)
    return ios, decayed, areas


class _BoxRecorder:
    """A full-resolution mask producer that also records the inclusive box of every mask it produces (by
    proposal row), so that a boxes-only output needs no second upsampling of the winners."""

    def __init__(self, produce: Callable[[Tensor], Tensor]):
        self._produce = produce
        self._boxes: dict[int, Tensor] = {}

    def __call__(self, rows: Tensor) -> Tensor:
        masks = self._produce(rows)
        todo = [k for k, r in enumerate(rows.tolist()) if r not in self._boxes]
        if todo:
            found = masks_to_boxes_inclusive(masks[todo] if len(todo) < len(rows) else masks)
            for k, box in zip(todo, found):
                self._boxes[int(rows[k])] = box
        return masks

    def boxes(self, rows: Tensor, chunk_size: int) -> Tensor:
        """``[len(rows), 4]`` inclusive boxes; masks never produced are upsampled now, a chunk at a time."""
        missing = [r for r in rows.tolist() if r not in self._boxes]
        for s in range(0, len(missing), chunk_size):
            self(torch.tensor(missing[s : s + chunk_size], dtype=torch.int64, device=rows.device))
        if rows.numel() == 0:
            return torch.zeros(0, 4, dtype=torch.float32, device=rows.device)
        return torch.stack([self._boxes[r] for r in rows.tolist()])


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
    nms_thr: float | None = 0.5,
    num_out: int = 100,
    nms_cap_factor: int = 8,
    drop_empty_masks: bool = False,
    box_plus_one: bool = False,
    lowres_boxes: Tensor | None = None,
    chunk_size: int = 32,
    full_masks: Callable[[Tensor], Tensor] | None = None,
    merge: str = "soft",
    diffusion: DiffusionConfig | None = None,
    dino_grid: tuple[int, int] | None = None,
    score_filter: str = "positive",
    keep_masks: bool = True,
) -> tuple[Detections, dict[str, Tensor]]:
    """Class-aware NMS, ``score > 0``, full-resolution masks, re-scoring (soft merging) and top-``num_out``.

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
        nms_thr: NMS IoU threshold (suppress when strictly greater); 1.0 suppresses nothing but still orders
            by ``pred_ious``; None skips the NMS: every proposal in the given order (FSOD-VFM, method.md §5.14).
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
        merge: ``soft`` = semantic soft merging (§5.7, parity); ``diffusion`` = FSOD-VFM's graph diffusion
            (§5.12, ``ntt.diffusion``; its ``pi`` goes to the trace's ``ios``); ``none`` = scores unchanged.
        diffusion: FSOD-VFM's settings (defaults when None).
        dino_grid: ``(rows, cols)`` of the image's DINOv2 grid (``diffusion.grid=dino``).
        score_filter: ``positive`` keeps ``score > 0`` after the NMS (NTT §5.5 item 4, parity); ``none`` keeps
            every proposal (FSOD-VFM, method.md §5.14).
        keep_masks: False = boxes only: the detections' ``masks`` are None and their boxes (the same
            full-resolution mask extents, bit for bit) are taken from the masks as the re-scoring produces
            them, so the winners are not upsampled a second time (only those the re-scoring never produced,
            e.g. with ``merge=none``, are upsampled, one chunk at a time, and not kept).

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
    if nms_thr is None:  # FSOD-VFM has no NMS: the proposer's order is the ranking order (method.md §5.14)
        keep = torch.arange(labels.shape[0], device=device)[: num_out * nms_cap_factor]
    else:
        keep = batched_nms(nms_boxes, pred_ious, labels, nms_thr)[: num_out * nms_cap_factor]
    if score_filter == "positive":
        keep_pos = keep[scores[keep] > 0]  # NaN > 0 is False: empty low-res masks leave here
    elif score_filter == "none":  # FSOD-VFM keeps every proposal, negative cosines too (method.md §5.14)
        keep_pos = keep
    else:
        raise ValueError(f"matcher.score_filter={score_filter}: choose one of positive, none")
    trace: dict[str, Tensor] = {"lowres_boxes_xyxy": lowres_boxes, "nms_keep": keep}
    if keep_pos.numel() == 0:
        log.debug("no proposal survives the NMS and the score filter")
        trace.update(_trace_empty(device))
        empty = Detections.empty(height, width, device)
        if not keep_masks:
            empty.masks = None
        return empty, trace

    if full_masks is None:

        def full_masks(rows: Tensor) -> Tensor:
            return resize_masks_to_image(logits[rows], height, width, chunk_size=chunk_size)

    if not keep_masks:
        full_masks = _BoxRecorder(full_masks)

    lab_pos = labels[keep_pos]
    if merge == "soft":
        ios, decayed, areas = semantic_soft_merge(
            lambda idx: full_masks(keep_pos[idx]),
            lab_pos,
            embeddings[keep_pos],
            scores[keep_pos],
        )
    else:
        ios, decayed, areas = _other_merge(
            merge, full_masks, logits, keep_pos, lab_pos, scores[keep_pos], diffusion, drop_empty_masks,
            height=height, width=width, dino_grid=dino_grid,
        )  # fmt: skip

    final_order = rank_top_k(decayed, num_out, valid=areas > 0 if drop_empty_masks else None)
    final_proposal = keep_pos[final_order]
    if keep_masks:
        final_masks = full_masks(final_proposal)
        final_boxes = masks_to_boxes_inclusive(final_masks)
    else:
        final_masks, final_boxes = None, full_masks.boxes(final_proposal, chunk_size)
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
