"""Per-image composition (method.md §5): 1024x1024 image -> detections, with an optional trace.

The trace holds every intermediate the parity fixture stores (``common/img<ID>_proposals.npz`` and
``<setting>/img<ID>_post.npz`` key names), as CPU tensors.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ntt.boxproposals import generate_box_proposals
from ntt.gridmatching import cosine_top1, query_embeddings, resize_masks_linear, sam_iou_decay
from ntt.matching import classify, mask_embeddings
from ntt.ops import masks_to_boxes_inclusive
from ntt.postprocess import Detections, postprocess_detections, resize_masks_to_image
from ntt.proposals import generate_proposals
from ntt.utils.config import DiffusionConfig, SemanticsConfig
from ntt.utils.timing import section

__all__ = [
    "ImageProposals",
    "InferenceParams",
    "classify_and_postprocess",
    "dino_features",
    "infer_image",
    "propose_image",
    "proposal_embeddings",
]

log = logging.getLogger(__name__)


@dataclass
class InferenceParams:
    """Test-time settings; defaults are the paper's (parity) values.

    Attributes:
        points_per_side: prompt grid side (``P * P`` prompts).
        points_batch_size: prompts per decoder call (ceil-division batches).
        iou_thr: keep proposals with predicted IoU strictly greater than this.
        nms_thr: class-aware NMS IoU threshold; None = no NMS (FSOD-VFM, method.md §5.14).
        num_out: final detections per image.
        nms_cap_factor: NMS output cut to ``num_out * nms_cap_factor``.
        pooling: ``"dense"`` (parity) or ``"adjoint"`` (exact, faster) mask pooling.
        drop_empty_masks: fix flag: drop masks that vanish at full resolution (parity keeps them with NaN).
        box_plus_one: fix flag: exclusive box extents for NMS and COCO boxes.
        prompts: ``grid`` (the point grid, §5.2) or ``boxes`` (box prompts given per image, §5.11).
        stability_fallback: box prompts: SAM2's single-mask stability fallback (FSOD-VFM: true).
        encoder_input: ``square`` (NTT) or ``long_side`` (FSOD-VFM, method.md §5.13): the target's DINOv2 input.
        long_side: FSOD-VFM's first resize (630).
        input_size: FSOD-VFM's square resize after it (630).
        final_norm: DINOv2 tokens after the final LayerNorm (NTT) or before it (FSOD-VFM).
        proposal_pooling: ``upsampled`` (NTT, ``pooling``) or ``grid_mask`` (FSOD-VFM).
        scoring: ``clamped_cosine`` (NTT) or ``cosine`` (FSOD-VFM).
        sam_iou_decay: score times ``sigmoid(20 * (predicted IoU - 0.45))``.
        merge: re-scoring before the top-k: ``soft`` (NTT §5.7, parity), ``diffusion`` (FSOD-VFM §5.12),
            ``none``.
        diffusion: FSOD-VFM's settings (read when ``merge == "diffusion"``).
        score_filter: ``positive`` (NTT: keep ``score > 0`` after the NMS, parity) or ``none`` (FSOD-VFM: keep
            every proposal; method.md §5.14).
    """

    points_per_side: int = 32
    points_batch_size: int = 256
    iou_thr: float | None = 0.4
    nms_thr: float | None = 0.5
    num_out: int = 100
    nms_cap_factor: int = 8
    pooling: str = "dense"
    drop_empty_masks: bool = False
    box_plus_one: bool = False
    prompts: str = "grid"
    stability_fallback: bool = True
    # the test-time fields of matcher.semantics (method.md §5.13), NTT's values from SemanticsConfig
    encoder_input: str = SemanticsConfig.encoder_input
    long_side: int = SemanticsConfig.long_side
    input_size: int = SemanticsConfig.input_size
    final_norm: bool = SemanticsConfig.final_norm
    proposal_pooling: str = SemanticsConfig.proposal_pooling
    scoring: str = SemanticsConfig.scoring
    sam_iou_decay: bool = SemanticsConfig.sam_iou_decay
    merge: str = "soft"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    score_filter: str = "positive"

    def __post_init__(self) -> None:
        if isinstance(self.diffusion, dict):  # from to_dict()
            self.diffusion = DiffusionConfig(**self.diffusion)

    @classmethod
    def from_settings(cls, proposer, matcher) -> InferenceParams:
        """The test-time settings of a run's ``proposer`` and ``matcher`` config nodes.

        Args:
            proposer: ``ntt.utils.config.ProposerConfig`` (or any object with its fields).
            matcher: ``ntt.utils.config.MatcherConfig`` (or any object with its fields).
        """
        return cls(
            points_per_side=proposer.points_per_side,
            points_batch_size=proposer.points_batch_size,
            iou_thr=proposer.iou_thr,
            nms_thr=matcher.nms_thr,
            num_out=matcher.num_out,
            nms_cap_factor=matcher.nms_cap_factor,
            pooling=matcher.pooling,
            drop_empty_masks=matcher.drop_empty_masks,
            box_plus_one=matcher.box_plus_one,
            prompts=getattr(proposer, "prompts", "grid"),
            stability_fallback=getattr(proposer, "stability_fallback", True),
            **_semantic_settings(getattr(matcher, "semantics", None)),
            merge=getattr(matcher, "merge", "soft"),
            diffusion=getattr(matcher, "diffusion", None) or DiffusionConfig(),
            score_filter=getattr(matcher, "score_filter", "positive"),
        )

    def to_dict(self) -> dict:
        """Plain dict of the fields (for configs / manifests and the keys made of them).

        Fields added later are left out at the value that reproduces the settings of before (as
        ``ntt.utils.identity.INERT_DEFAULTS``): ``merge`` at ``soft``, ``score_filter`` at ``positive``, ``diffusion`` unless
        ``merge == "diffusion"``, ``prompts`` at ``grid`` and ``stability_fallback`` (read only by box prompts)
        unless ``prompts == "boxes"``, and each FSOD-VFM semantics field (``_SEMANTIC_KEYS``) at NTT's value;
        the dict, and so every key made of it (``ntt segment``'s settings key), stays the same for those
        settings.
        """
        data = asdict(self)
        ntt_semantics = {f.name: f.default for f in fields(self) if f.name in _SEMANTIC_KEYS}
        for key, value in ntt_semantics.items():
            if data[key] == value:
                data.pop(key)
        if self.merge != "diffusion":
            data.pop("diffusion")
        if self.merge == "soft":
            data.pop("merge")
        if self.score_filter == "positive":
            data.pop("score_filter")
        if self.prompts != "boxes":
            data.pop("stability_fallback")
        if self.prompts == "grid":
            data.pop("prompts")
        return data


_SEMANTIC_KEYS = (
    "encoder_input",
    "long_side",
    "input_size",
    "final_norm",
    "proposal_pooling",
    "scoring",
    "sam_iou_decay",
)


def _semantic_settings(semantics) -> dict[str, Any]:
    """The test-time fields of a ``matcher.semantics`` node (none: NTT's defaults)."""
    if semantics is None:
        return {}
    return {k: getattr(semantics, k) for k in _SEMANTIC_KEYS}


def encode_grid(dino, x: Tensor, *, final_norm: bool = True) -> Tensor:
    """``dino(x)``, asking for the pre-norm tokens only when wanted (NTT's encoders need not take the flag)."""
    return dino(x) if final_norm else dino(x, final_norm=False)


def dino_features(dino, image1024: Tensor, *, final_norm: bool = True) -> Tensor:
    """DINOv2 patch grid of the target: bicubic resize (no antialias) to ``dino.img_size``, then the encoder.

    Args:
        dino: callable ``[B, 3, S, S] -> [B, h, w, D]`` with attribute ``img_size``.
        image1024: ``[3, 1024, 1024]`` image in [0, 1].
        final_norm: tokens after the final LayerNorm (NTT) or before it (FSOD-VFM).

    Returns:
        ``[h, w, D]`` features.
    """
    size = int(dino.img_size)
    x = F.interpolate(image1024[None], size=(size, size), mode="bicubic", align_corners=False)
    return encode_grid(dino, x, final_norm=final_norm)[0]


def _cpu(x: Tensor) -> Tensor:
    return x.detach().cpu()


@torch.inference_mode()
def infer_image(
    image1024: Tensor,
    height: int,
    width: int,
    *,
    sam2,
    dino,
    prototypes: Tensor,
    params: InferenceParams | None = None,
    trace: bool = False,
    semantic_image: Tensor | None = None,
    keep_masks: bool = True,
) -> tuple[Detections, dict[str, Tensor] | None]:
    """Run the whole test path on one image.

    Args:
        image1024: ``[3, 1024, 1024]`` stretched image in [0, 1] on the models' device.
        height: original (annotation) height ``H``.
        width: original (annotation) width ``W``.
        sam2: backbone with ``encode_image`` and ``decode`` (``ntt.backbones.sam2.SAM2Backbone``).
        dino: patch-grid encoder (``ntt.backbones.dinov2.DINOv2Encoder``).
        prototypes: ``[C, D]`` L2-normalised class prototypes.
        params: settings (paper defaults when None).
        trace: also return every intermediate (CPU tensors) under the parity fixture's key names.
        semantic_image: FSOD-VFM's DINOv2 input of the original image (``params.encoder_input == "long_side"``).
        keep_masks: False = boxes only (``postprocess_detections``): no full-resolution masks are kept or
            upsampled again for the output; the boxes, labels and scores are the same.

    Returns:
        ``(detections, trace_dict or None)``.
    """
    p = params or InferenceParams()
    shared = propose_image(
        image1024, sam2=sam2, dino=dino, params=p, semantic_image=semantic_image, image_hw=(height, width)
    )
    det, tr = classify_and_postprocess(
        shared, prototypes, height=height, width=width, params=p, keep_masks=keep_masks
    )
    log.debug("image %dx%d: %d proposals -> %d detections", height, width, len(shared.props), len(det))
    return det, (shared.trace(tr) if trace else None)


@dataclass
class ImageProposals:
    """The memory-independent part of one image's test path (method.md §5.1-5.3): everything up to the
    pooled mask embeddings. Computed once per image and reused by every memory bank of a study pass.

    Attributes:
        props: SAM2 proposals after the IoU filter (``ntt.proposals.Proposals``).
        feats_dino: ``[h, w, D]`` DINOv2 grid of the target.
        masks256: ``[n, 256, 256]`` bool low-res masks (``logits > 0``).
        embeddings: ``[n, D]`` L2-normalised pooled mask embeddings.
        boxes256: ``[n, 4]`` inclusive low-res boxes of ``masks256``.
    """

    props: Any
    feats_dino: Tensor
    masks256: Tensor
    embeddings: Tensor
    boxes256: Tensor

    @cached_property
    def n_pos256(self) -> Tensor:
        """``[n]`` positive pixels of each low-res mask (a trace entry; computed once for all banks)."""
        return self.masks256.flatten(1).sum(dim=1)

    def trace(self, bank_trace: dict[str, Tensor]) -> dict[str, Tensor]:
        """The full per-image trace (CPU tensors, parity fixture key names) given one bank's part.

        Args:
            bank_trace: the trace returned by :func:`classify_and_postprocess`.
        """
        props = self.props
        tr = dict(bank_trace)
        tr.update(
            {
                "dino_feats": self.feats_dino,
                "grid_points": props.grid_points,
                "grid_pred_ious_all4": props.grid_ious_all,
                "grid_best_index": props.grid_best_index,
                "grid_pred_ious": props.grid_pred_ious,
                "points": props.points,
                "grid_index": props.grid_index,
            }
        )
        return {k: _cpu(v) for k, v in tr.items()}


@torch.inference_mode()
def propose_image(
    image1024: Tensor,
    *,
    sam2,
    dino,
    params: InferenceParams | None = None,
    boxes: Tensor | None = None,
    semantic_image: Tensor | None = None,
    image_hw: tuple[int, int] | None = None,
) -> ImageProposals:
    """DINOv2 features, SAM2 encoding + prompt decoding + IoU filter, masks and their pooled embeddings.

    Args:
        image1024: ``[3, 1024, 1024]`` stretched image in [0, 1] on the models' device.
        sam2: backbone with ``encode_image`` and ``decode``.
        dino: patch-grid encoder.
        params: settings (paper defaults when None); the proposer fields and the semantic ones are read.
        boxes: with ``params.prompts == "boxes"``: the image's ``[G, 4]`` box prompts in the 1024 frame
            (``ntt.boxproposals.boxes_to_frame`` of the selected boxes), in proposal order; may be empty.
        semantic_image: with ``params.encoder_input == "long_side"``: the DINOv2 input made from the original
            image (``ntt.gridmatching.long_side_input``), ``[3, S, S]`` in [0, 1].
        image_hw: with ``params.proposal_pooling == "grid_mask"``: the image's ``(H, W)`` (the masks are
            pooled from full resolution, as FSOD-VFM's predictor returns them).
    """
    p = params or InferenceParams()
    if p.prompts == "boxes" and boxes is None:
        raise ValueError("prompts='boxes' needs the image's boxes (propose_image(..., boxes=[G, 4]))")
    if p.encoder_input == "long_side" and semantic_image is None:
        raise ValueError("encoder_input='long_side' needs the original image's input (semantic_image=...)")
    if p.proposal_pooling == "grid_mask" and image_hw is None:
        raise ValueError("proposal_pooling='grid_mask' needs the image size (image_hw=(H, W))")
    # sections: the models' share of a test loop's time (ntt/utils/timing.py; no-op outside a timed loop)
    with section("dinov2"):
        if p.encoder_input == "long_side":
            x = semantic_image[None].to(image1024.device)
            feats_dino = encode_grid(dino, x, final_norm=p.final_norm)[0]
        else:
            feats_dino = dino_features(dino, image1024, final_norm=p.final_norm)
    with section("sam2_encoder"):
        sam_feats = sam2.encode_image(image1024[None])
    with section("sam2_decoder"):  # prompt decoding, best-of-3 selection, IoU filter
        if p.prompts == "boxes":
            props = generate_box_proposals(
                sam2,
                sam_feats,
                boxes,
                batch_size=p.points_batch_size,
                stability_fallback=p.stability_fallback,
                iou_thr=p.iou_thr,
            )
        else:
            props = generate_proposals(
                sam2,
                sam_feats,
                points_per_side=p.points_per_side,
                points_batch_size=p.points_batch_size,
                iou_thr=p.iou_thr,
                image_size=image1024.shape[-1],
            )
    del sam_feats
    masks256, embeddings, boxes256 = proposal_embeddings(props.logits, feats_dino, pooling=p.pooling)
    if p.proposal_pooling == "grid_mask":  # FSOD-VFM's vectors replace NTT's (method.md §5.13)
        embeddings = grid_mask_embeddings(props.logits, feats_dino, image_hw)
    return ImageProposals(props, feats_dino, masks256, embeddings, boxes256)


def grid_mask_embeddings(logits: Tensor, feats_dino: Tensor, image_hw: tuple[int, int], chunk_size: int = 32):
    """FSOD-VFM's proposal vectors: each full-resolution mask (the one ntt outputs) resized to the DINOv2 grid
    as cv2 INTER_LINEAR > 0.5, then ``normalize(masked sum / (count + 1e-7), eps=1e-2)`` (method.md §5.13).

    Args:
        logits: ``[n, 256, 256]`` low-res logits.
        feats_dino: ``[h, w, D]`` DINOv2 grid.
        image_hw: ``(H, W)`` of the image.
        chunk_size: masks upsampled at once (bounds the ``[chunk, H, W]`` buffer).

    Returns:
        ``[n, D]`` float32 unit (or zero) vectors.
    """
    grid_hw = tuple(feats_dino.shape[:2])
    grids = [
        resize_masks_linear(resize_masks_to_image(logits[s : s + chunk_size], *image_hw), grid_hw)
        for s in range(0, logits.shape[0], chunk_size)
    ]
    grid = torch.cat(grids) if grids else torch.zeros(0, *grid_hw, dtype=torch.bool, device=logits.device)
    return query_embeddings(feats_dino, grid)


def proposal_embeddings(logits: Tensor, feats_dino: Tensor, *, pooling: str = "dense") -> tuple[Tensor, ...]:
    """Low-res masks, their pooled DINOv2 embeddings and inclusive boxes (method.md §5.3).

    Args:
        logits: ``[n, 256, 256]`` low-res logits.
        feats_dino: ``[h, w, D]`` DINOv2 grid.
        pooling: ``dense`` (parity) or ``adjoint``.

    Returns:
        ``(masks256 [n, 256, 256] bool, embeddings [n, D], boxes256 [n, 4])``.
    """
    masks256 = logits > 0
    embeddings = mask_embeddings(masks256, feats_dino, method=pooling)
    return masks256, embeddings, masks_to_boxes_inclusive(masks256)


def classify_and_postprocess(
    shared: ImageProposals,
    prototypes: Tensor,
    *,
    height: int,
    width: int,
    params: InferenceParams | None = None,
    full_masks=None,
    keep_masks: bool = True,
) -> tuple[Detections, dict[str, Tensor]]:
    """The memory-dependent part (method.md §5.4-5.8) on an image's shared proposals: classification, NMS,
    soft merging, top-k. Called once per memory bank.

    Args:
        shared: the image's :class:`ImageProposals`.
        prototypes: ``[C, D]`` L2-normalised class prototypes.
        height: original (annotation) height ``H``.
        width: original (annotation) width ``W``.
        params: settings (paper defaults when None).
        full_masks: optional cache of the proposals' full-resolution masks shared by the banks
            (``ntt.maskcache.ProposalMasks``; bit-identical to computing them here).
        keep_masks: False = boxes only (see :func:`ntt.postprocess.postprocess_detections`).

    Returns:
        ``(detections, trace)``; the trace holds the intermediates from ``pred_ious`` on (tensors on the input
        device), under the parity fixture's key names.
    """
    return _detect(
        shared.props.logits,
        shared.props.pred_ious,
        shared.masks256,
        shared.embeddings,
        shared.boxes256,
        prototypes,
        height=height,
        width=width,
        params=params or InferenceParams(),
        full_masks=full_masks,
        n_pos256=shared.n_pos256,
        dino_grid=tuple(shared.feats_dino.shape[:2]),
        keep_masks=keep_masks,
    )


def _detect(
    logits: Tensor,
    pred_ious: Tensor,
    masks256: Tensor,
    embeddings: Tensor,
    boxes256: Tensor,
    prototypes: Tensor,
    *,
    height: int,
    width: int,
    params: InferenceParams,
    full_masks=None,
    n_pos256: Tensor | None = None,
    dino_grid: tuple[int, int] | None = None,
    keep_masks: bool = True,
) -> tuple[Detections, dict[str, Tensor]]:
    p = params
    prototypes = prototypes.to(embeddings.device, embeddings.dtype)
    if p.scoring == "cosine":  # FSOD-VFM: unclamped cosine, torch.max (method.md §5.13)
        sim, labels, scores = cosine_top1(embeddings, prototypes)
    else:
        sim, labels, scores = classify(embeddings, prototypes)
    if p.sam_iou_decay:
        scores = sam_iou_decay(scores, pred_ious)
    det, post = postprocess_detections(
        logits,
        pred_ious,
        labels,
        scores,
        embeddings,
        height=height,
        width=width,
        nms_thr=p.nms_thr,
        num_out=p.num_out,
        nms_cap_factor=p.nms_cap_factor,
        drop_empty_masks=p.drop_empty_masks,
        box_plus_one=p.box_plus_one,
        lowres_boxes=boxes256,
        full_masks=full_masks,
        merge=p.merge,
        diffusion=p.diffusion,
        dino_grid=dino_grid,
        score_filter=p.score_filter,
        keep_masks=keep_masks,
    )
    tr = {
        "pred_ious": pred_ious,
        "logits": logits,
        "n_pos_256": masks256.flatten(1).sum(dim=1) if n_pos256 is None else n_pos256,
        "lowres_boxes_xyxy": boxes256,
        "sim": sim,
        "embeddings": embeddings,
        "labels": labels,
        "scores": scores,
    }
    tr.update(post)
    return det, tr
