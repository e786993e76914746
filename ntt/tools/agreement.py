"""Agreement of a fast path's outputs with parity mode's on the same images (benchmarks/README.md,
"Fast paths"). This measures how far a fast path moves the numbers, never accuracy: it is meaningful
with random weights too.

Three levels, each comparing a fast mode with the parity-mode run of the same image:

* proposals (:func:`compare_proposals`): per grid prompt, whether the same multimask output was chosen
  and the absolute difference of the predicted IoU scores; per prompt kept in both runs with the same
  chosen output, the IoU of the two binary 256x256 masks (``logits > 0``; two empty masks count as IoU 1);
* detections (:func:`compare_detections`): detections are matched by the grid prompt they come from (the
  same proposal in both runs); per matched pair the final score difference, the IoU of the full-resolution
  masks and whether the label is the same; plus the detection counts and the unmatched ones;
* AP against parity (:func:`ap_against_reference`): COCOeval (``ntt.eval.coco``, pycocotools) with the
  parity-mode detections whose score is above a threshold as the ground truth and the fast mode's
  detections as the results. 1.0 = the fast mode finds every such parity detection (same class, mask/box
  IoU >= 0.5 ... 0.95) ranked above any extra detection; parity against itself gives 1.0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "DetectionSnapshot",
    "ProposalSnapshot",
    "AgreementAccumulator",
    "ap_against_reference",
    "compare_detections",
    "compare_proposals",
    "mask_iou",
    "stats",
]


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of the binary masks ``a[i]`` and ``b[i]``, pair by pair.

    Args:
        a: ``[n, H, W]`` bool masks.
        b: ``[n, H, W]`` bool masks, same shape.

    Returns:
        ``[n]`` float64 IoUs; 1.0 where both masks are empty (they agree).
    """
    if a.shape != b.shape:
        raise ValueError(f"mask_iou: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    a, b = a.flatten(1).bool(), b.flatten(1).bool()
    inter = (a & b).sum(1).double()
    union = (a | b).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).cpu()


def stats(values: Iterable[float] | Tensor) -> dict[str, float | int | None]:
    """``{"n", "mean", "min", "max"}`` of some values (None entries when there are none)."""
    v = torch.as_tensor(values if isinstance(values, Tensor) else list(values), dtype=torch.float64).flatten()
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return {"n": 0, "mean": None, "min": None, "max": None}
    return {"n": int(v.numel()), "mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


@dataclass
class ProposalSnapshot:
    """What the proposal comparison needs of one image's run (CPU tensors).

    Attributes:
        grid_ious_all: ``[G, 4]`` predicted IoUs of all decoder outputs per prompt.
        grid_best_index: ``[G]`` chosen output (1..3) per prompt.
        grid_index: ``[n]`` prompt of each kept proposal.
        masks256: ``[n, 256, 256]`` bool low-res masks of the kept proposals.
    """

    grid_ious_all: Tensor
    grid_best_index: Tensor
    grid_index: Tensor
    masks256: Tensor

    @classmethod
    def of(cls, shared) -> ProposalSnapshot:
        """From an ``ntt.inference.ImageProposals``."""
        p = shared.props
        return cls(
            p.grid_ious_all.detach().float().cpu(),
            p.grid_best_index.detach().cpu(),
            p.grid_index.detach().cpu(),
            shared.masks256.detach().cpu(),
        )


@dataclass
class DetectionSnapshot:
    """What the detection comparison needs of one image's detections (CPU tensors).

    Attributes:
        prompt: ``[F]`` grid prompt each detection comes from.
        scores: ``[F]`` final scores.
        labels: ``[F]`` class indices.
        masks: ``[F, H, W]`` bool full-resolution masks.
    """

    prompt: Tensor
    scores: Tensor
    labels: Tensor
    masks: Tensor

    @classmethod
    def of(cls, det, shared) -> DetectionSnapshot:
        """From ``ntt.postprocess.Detections`` and the image's ``ImageProposals``."""
        grid_index = shared.props.grid_index.to(det.proposal_index.device)
        return cls(
            grid_index[det.proposal_index].cpu(),
            det.scores.detach().float().cpu(),
            det.labels.detach().cpu(),
            det.masks.detach().cpu(),
        )


def compare_proposals(ref: ProposalSnapshot, fast: ProposalSnapshot) -> dict[str, Tensor | int]:
    """Proposal-level agreement of one image (see the module docstring).

    Args:
        ref: the parity-mode run.
        fast: the fast mode's run of the same image with the same prompt grid.

    Returns:
        ``{"same_choice" [G] bool, "score_diff" [G'] (chosen-output IoU score, prompts with the same choice),
        "score_diff_all4" [G*4], "mask_iou" [m] (prompts kept in both with the same choice),
        "kept_ref", "kept_fast", "kept_both"}``.
    """
    if ref.grid_best_index.shape != fast.grid_best_index.shape:
        raise ValueError("compare_proposals: the two runs used different prompt grids")
    same = ref.grid_best_index == fast.grid_best_index
    rows = torch.arange(same.shape[0])
    chosen_ref = ref.grid_ious_all[rows, ref.grid_best_index]
    chosen_fast = fast.grid_ious_all[rows, ref.grid_best_index]
    pos_ref = {int(g): i for i, g in enumerate(ref.grid_index.tolist())}
    pairs = [(pos_ref[int(g)], j) for j, g in enumerate(fast.grid_index.tolist()) if int(g) in pos_ref]
    both = [(i, j) for i, j in pairs if bool(same[int(ref.grid_index[i])])]
    if both:
        ir, jf = (torch.tensor(x, dtype=torch.int64) for x in zip(*both))
        ious = mask_iou(ref.masks256[ir], fast.masks256[jf])
    else:
        ious = torch.zeros(0, dtype=torch.float64)
    return {
        "same_choice": same,
        "score_diff": (chosen_fast - chosen_ref).abs()[same],
        "score_diff_all4": (fast.grid_ious_all - ref.grid_ious_all).abs().flatten(),
        "mask_iou": ious,
        "kept_ref": int(ref.grid_index.numel()),
        "kept_fast": int(fast.grid_index.numel()),
        "kept_both": len(pairs),
    }


def compare_detections(ref: DetectionSnapshot, fast: DetectionSnapshot) -> dict[str, Tensor | int]:
    """Detection-level agreement of one image: detections matched by their source prompt.

    Args:
        ref: the parity-mode detections.
        fast: the fast mode's detections of the same image.

    Returns:
        ``{"score_diff" [m], "mask_iou" [m], "same_label" [m] bool, "n_ref", "n_fast", "matched",
        "ref_only", "fast_only"}``.
    """
    pos_ref = {int(g): i for i, g in enumerate(ref.prompt.tolist())}
    pairs = [(pos_ref[int(g)], j) for j, g in enumerate(fast.prompt.tolist()) if int(g) in pos_ref]
    if pairs:
        ir, jf = (torch.tensor(x, dtype=torch.int64) for x in zip(*pairs))
        score_diff = (fast.scores[jf].double() - ref.scores[ir].double()).abs()
        ious = mask_iou(ref.masks[ir], fast.masks[jf])
        same_label = ref.labels[ir] == fast.labels[jf]
    else:
        score_diff = ious = torch.zeros(0, dtype=torch.float64)
        same_label = torch.zeros(0, dtype=torch.bool)
    n_ref, n_fast = int(ref.prompt.numel()), int(fast.prompt.numel())
    return {
        "score_diff": score_diff,
        "mask_iou": ious,
        "same_label": same_label,
        "n_ref": n_ref,
        "n_fast": n_fast,
        "matched": len(pairs),
        "ref_only": n_ref - len(pairs),
        "fast_only": n_fast - len(pairs),
    }


@dataclass
class AgreementAccumulator:
    """Per-image comparisons of one fast mode, summarised over all images by :meth:`summary`."""

    proposals: list[dict] = field(default_factory=list)
    detections: list[dict] = field(default_factory=list)

    def add(self, proposals: dict, detections: dict) -> None:
        """Add one image's :func:`compare_proposals` and :func:`compare_detections` results."""
        self.proposals.append(proposals)
        self.detections.append(detections)

    def summary(self) -> dict:
        """Proposal and detection agreement over all images added (JSON-ready)."""
        p, d = self.proposals, self.detections

        def cat(rows: list[dict], key: str) -> Tensor:
            return torch.cat([r[key].double().flatten() for r in rows]) if rows else torch.zeros(0)

        same = cat(p, "same_choice")
        miou = cat(p, "mask_iou")
        det_iou = cat(d, "mask_iou")
        return {
            "images": len(p),
            "proposals": {
                "prompts": int(same.numel()),
                "same_chosen_output": float(same.mean()) if same.numel() else None,
                "iou_score_abs_diff": stats(cat(p, "score_diff")),
                "iou_score_abs_diff_all4": stats(cat(p, "score_diff_all4")),
                "mask_iou": stats(miou),
                "mask_iou_exactly_1": float((miou == 1).double().mean()) if miou.numel() else None,
                "kept_parity": sum(r["kept_ref"] for r in p),
                "kept_fast": sum(r["kept_fast"] for r in p),
                "kept_both": sum(r["kept_both"] for r in p),
            },
            "detections": {
                "parity": sum(r["n_ref"] for r in d),
                "fast": sum(r["n_fast"] for r in d),
                "count_abs_diff_sum": sum(abs(r["n_fast"] - r["n_ref"]) for r in d),
                "matched": sum(r["matched"] for r in d),
                "parity_only": sum(r["ref_only"] for r in d),
                "fast_only": sum(r["fast_only"] for r in d),
                "score_abs_diff": stats(cat(d, "score_diff")),
                "mask_iou": stats(det_iou),
                "same_label": float(cat(d, "same_label").mean()) if det_iou.numel() else None,
            },
        }


def ap_against_reference(
    ref_results: Sequence[dict],
    fast_results: Sequence[dict],
    *,
    images: Sequence[dict],
    categories: Sequence[dict],
    score_thr: float = 0.0,
) -> dict:
    """AP of ``fast_results`` with the reference (parity) detections above ``score_thr`` as ground truth.

    Ground truth: one annotation per reference result with ``score > score_thr`` (its RLE mask, its
    result bbox, ``area`` = mask area, ``iscrowd`` 0, its category). Results: every fast-mode result with a
    finite score. Evaluated by ``ntt.eval.coco.evaluate_coco`` (pycocotools COCOeval, default
    parameters: IoU 0.50:0.05:0.95, 101-point interpolation, maxDets 100) for ``segm`` and ``bbox``, over
    the categories that have ground truth.

    Args:
        ref_results: COCO result dicts of the parity run (``ntt.results.detections_to_coco``).
        fast_results: COCO result dicts of the fast mode on the same images.
        images: the images' COCO records (``id``, ``height``, ``width``).
        categories: COCO categories (``id``, ``name``).
        score_thr: reference detections with a score strictly above this are the ground truth.

    Returns:
        ``{"segm_AP", "segm_AP50", "bbox_AP", "bbox_AP50", "num_gt", "num_results", "score_thr"}``;
        the APs are None when no reference detection passes the threshold.
    """
    from pycocotools import mask as mask_utils

    from ntt.eval.coco import evaluate_coco

    anns = []
    for r in ref_results:
        if not (math.isfinite(r["score"]) and r["score"] > score_thr):
            continue
        rle = dict(r["segmentation"])
        rle_bytes = {"size": rle["size"], "counts": rle["counts"].encode("utf-8")}
        anns.append(
            {
                "id": len(anns) + 1,
                "image_id": int(r["image_id"]),
                "category_id": int(r["category_id"]),
                "segmentation": rle,
                "area": float(mask_utils.area(rle_bytes)),
                "bbox": [float(v) for v in r["bbox"]],  # the result's own box: self-AP exactly 1
                "iscrowd": 0,
            }
        )
    results = [dict(r) for r in fast_results if math.isfinite(r["score"])]
    out = {"num_gt": len(anns), "num_results": len(results), "score_thr": score_thr}
    if not anns:
        return {**out, "segm_AP": None, "segm_AP50": None, "bbox_AP": None, "bbox_AP50": None}
    gt = {
        "images": [
            {"id": int(im["id"]), "height": int(im["height"]), "width": int(im["width"])} for im in images
        ],
        "annotations": anns,
        "categories": [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in categories],
    }
    cat_ids = sorted({a["category_id"] for a in anns})
    metrics = evaluate_coco(gt, results, category_ids=cat_ids, image_ids=[int(im["id"]) for im in images])
    for t in ("segm", "bbox"):
        out[f"{t}_AP"] = metrics[t]["AP"]
        out[f"{t}_AP50"] = metrics[t]["AP50"]
    return out
