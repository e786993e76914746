"""Encoding references (method.md §3): crops, patch-grid mask weights, instance means, batches, the bank.

Each reference instance becomes one mask-weighted mean DINOv2 feature (``instance_means[C, K, D]`` of a
``ntt.bank.MemoryBank``; a class's prototype is the L2-normalised mean of its own references). One path for
every caller: jobs (a reference each, with the function that loads its image, mask and box) -> a
``FillPlan`` (validated, batched) -> ``encode_references`` (all batches, or one process's share) ->
``assemble_bank``. The benchmark's stage ``fill_memory`` (``ntt.fill``, references from a COCO json) and the
practitioner's ``Segmenter.build`` (references held in memory) only make the jobs.

Parity defaults: square context crop with ``int()`` truncation in float64, bicubic image / bilinear mask
resize to 518 (no antialias), soft mask sampled at the top-left pixel of each patch
(``F.interpolate(mode="nearest")``); ``mask_pooling="area"`` is the fix of method.md §9.1 item 2
(adaptive average pooling).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ntt.bank import MemoryBank
from ntt.gridmatching import long_side_input, reference_vectors, resize_masks_linear
from ntt.prompts import sam2_box_mask
from ntt.utils.errors import UserError

__all__ = [
    "MASK_POOLING",
    "context_crop_box",
    "crop_reference",
    "mask_patch_weights",
    "instance_mean",
    "BadReferenceError",
    "ReferenceJob",
    "FillPlan",
    "EncodedReferences",
    "reference_batches",
    "encode_references",
    "assemble_bank",
]

MASK_POOLING = ("nearest", "area")


# ----------------------------------------------------------------------------------------------------------
# Pure per-reference functions


def context_crop_box(
    bbox_xywh: Iterable[float], img_w: int, img_h: int, context_ratio: float = 0.2
) -> tuple[int, int, int, int]:
    """Square context crop around a COCO box, with the reference's exact float64 / ``int()`` arithmetic.

    ``x1=int(x), y1=int(y), x2=int(x+w), y2=int(y+h)``; side ``max(bw, bh) * (1 + context_ratio)`` around
    the integer box centre; each edge ``int()``-truncated then clipped to the image (so the crop can be
    non-square at borders).

    Args:
        bbox_xywh: COCO box (x, y, w, h) in pixels.
        img_w: image width (json).
        img_h: image height (json).
        context_ratio: extra context (0.2 in the paper config).

    Returns:
        ``(x1, y1, x2, y2)``: the crop is ``[y1:y2, x1:x2]``.
    """
    x, y, w, h = (float(v) for v in list(bbox_xywh)[:4])
    x1, y1, x2, y2 = int(x), int(y), int(x + w), int(y + h)
    box_w = x2 - x1
    box_h = y2 - y1
    mid_x = (x1 + x2) * 0.5
    mid_y = (y1 + y2) * 0.5
    side = max(box_w, box_h) * (1.0 + float(context_ratio))
    cx1 = max(0, int(mid_x - side * 0.5))
    cy1 = max(0, int(mid_y - side * 0.5))
    cx2 = min(int(img_w), int(mid_x + side * 0.5))
    cy2 = min(int(img_h), int(mid_y + side * 0.5))
    return cx1, cy1, cx2, cy2


def crop_reference(
    image: torch.Tensor,
    mask: torch.Tensor,
    bbox_xywh: Iterable[float],
    *,
    context_ratio: float = 0.2,
    size: int = 518,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop a reference instance with context and resize it to the encoder input size (method.md §3.1).

    Args:
        image: ``[3, H, W]`` float32 in [0, 1] (original json size).
        mask: ``[H, W]`` instance mask (binary, any dtype; used as float32).
        bbox_xywh: the annotation's COCO box.
        context_ratio: extra context around the box.
        size: output side (the encoder's ``img_size``).

    Returns:
        ``(crop [3, size, size], soft_mask [size, size])``: bicubic image (no antialias, no clamp) and
        bilinear soft mask, both ``align_corners=False``.

    Raises:
        ValueError: the crop is empty (degenerate box).
    """
    if image.dim() != 3 or mask.dim() != 2 or image.shape[-2:] != mask.shape:
        raise ValueError(
            f"crop_reference: image {tuple(image.shape)} and mask {tuple(mask.shape)} do not match"
        )
    img_h, img_w = image.shape[-2:]
    x1, y1, x2, y2 = context_crop_box(bbox_xywh, img_w, img_h, context_ratio)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(
            f"crop_reference: empty context crop x[{x1}, {x2}) y[{y1}, {y2}) for box {list(bbox_xywh)} "
            f"in a {img_w}x{img_h} image"
        )
    img_crop = image[:, y1:y2, x1:x2]
    mask_crop = mask[y1:y2, x1:x2].to(torch.float32)
    crop = F.interpolate(img_crop.unsqueeze(0), size=(size, size), mode="bicubic")[0]
    soft = F.interpolate(mask_crop[None, None], size=(size, size), mode="bilinear")[0, 0]
    return crop, soft


def mask_patch_weights(soft_mask: torch.Tensor, grid: int, *, mask_pooling: str = "nearest") -> torch.Tensor:
    """Soft mask on the encoder patch grid, flattened row-major: the pooling weights of one reference.

    Args:
        soft_mask: ``[S, S]`` soft mask in [0, 1].
        grid: patch grid side (37 for 518 / 14).
        mask_pooling: ``"nearest"`` (parity: ``F.interpolate(mode="nearest")``, i.e. the value at the
            top-left pixel ``floor(i * S / grid)`` of each patch) or ``"area"`` (fix of §9.1 item 2:
            adaptive average pooling, the mean over each patch).

    Returns:
        ``[grid * grid]`` float32 weights.
    """
    m = soft_mask.reshape(1, 1, *soft_mask.shape[-2:]).to(torch.float32)
    if mask_pooling == "nearest":
        w = F.interpolate(m, size=(grid, grid), mode="nearest")
    elif mask_pooling == "area":
        w = F.adaptive_avg_pool2d(m, (grid, grid))
    else:
        raise ValueError(f"mask_pooling must be one of {MASK_POOLING}, got {mask_pooling!r}")
    return w.reshape(-1)


def instance_mean(feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean feature of one reference: ``sum_q w_q f_q / sum_q w_q`` (not normalised).

    Args:
        feats: ``[N, D]`` patch features.
        weights: ``[N]`` soft mask weights.

    Returns:
        ``[D]``; NaN if all weights are zero (``fill_memory`` refuses that case).
    """
    return (feats * weights[:, None]).sum(0) / weights.sum()


# ----------------------------------------------------------------------------------------------------------
# Encoding references: plan -> encode (all batches, or one process's share) -> assemble. Shared by the
# benchmark's fill_memory (references from a COCO json) and the practitioner's Segmenter.build (tensors).


class BadReferenceError(UserError, ValueError):
    """A reference that cannot fill its memory slot (unreadable image, empty crop, all-zero mask); the
    message names it (class, shot or reference, annotation, image)."""


@dataclass
class ReferenceJob:
    """One reference instance to encode.

    Args:
        cls: class index (row of the bank).
        slot: its position among the references of its class.
        description: how error messages name it (class, shot or reference, annotation, image).
        provenance: what the bank records about it (``MemoryBank.refs``).
        load: ``() -> (image [3, H, W] float32 in [0, 1], mask [H, W], COCO box xywh of the crop)``;
            raises OSError / ValueError for a reference that cannot be read.
    """

    cls: int
    slot: int
    description: str
    provenance: dict
    load: Callable[[], tuple[torch.Tensor, torch.Tensor, Sequence[float]]]


def _encoder_device(encoder: Any) -> torch.device:
    if isinstance(encoder, torch.nn.Module):
        for t in encoder.parameters():
            return t.device
        for t in encoder.buffers():
            return t.device
    return torch.device(getattr(encoder, "device", "cpu"))


def reference_batches(n_jobs: int, batch_size: int) -> list[range]:
    """The encoder batches: consecutive runs of ``batch_size`` jobs (the last may be short).

    They depend on the job count and ``batch_size`` only, never on how many processes share them: a
    batched forward's bits can depend on the batch's composition, so equal batches give equal banks.

    Args:
        n_jobs: number of reference jobs (C * K for the benchmark).
        batch_size: crops per encoder call.
    """
    if batch_size < 1:
        raise ValueError(f"fill_memory: batch_size must be >= 1, got {batch_size}")
    return [range(s, min(s + batch_size, n_jobs)) for s in range(0, n_jobs, batch_size)]


@dataclass
class FillPlan:
    """What to encode and how (validated; identical on every process). Build it with :meth:`create`.

    Args:
        jobs: the references in encoding order (class ascending, then slot).
        batches: ``reference_batches(len(jobs), batch_size)``.
        category_ids: C ascending category ids (class index = position).
        category_names: C names.
        shots: K of a benchmark plan (every class has K jobs); None for a practitioner's.
        size: encoder input side.
        grid: encoder patch grid side.
        dim: feature dimension D.
        context_ratio: crop context.
        mask_pooling: ``"nearest"`` or ``"area"``.
        keep_patch_features: also keep raw patch features and weights.
        stage: names the step in messages and on the progress bar (``fill_memory``, ``Segmenter.build``).
        mask_model: the SAM2 of ``semantics.reference_masks == "sam2_box"`` (the reference masks come from
            its box decoding instead of the annotations); None otherwise.
        semantics: ``matcher.semantics`` (``ntt.utils.config.SemanticsConfig``); None or
            ``references="context_crop"``: NTT's crops; ``whole_image``: FSOD-VFM's references (§3.4).
    """

    jobs: list[ReferenceJob]
    batches: list[range]
    category_ids: list[int]
    category_names: list[str]
    shots: int | None
    size: int
    grid: int
    dim: int
    context_ratio: float
    mask_pooling: str
    keep_patch_features: bool
    stage: str
    semantics: Any = None
    mask_model: Any = None

    @property
    def whole_image(self) -> bool:
        """Whether the references are encoded as FSOD-VFM's whole images (method.md §3.4)."""
        return self.semantics is not None and self.semantics.references == "whole_image"

    @classmethod
    def create(
        cls,
        jobs: list[ReferenceJob],
        *,
        category_ids: Sequence[int],
        category_names: Sequence[str],
        encoder: Any,
        context_ratio: float = 0.2,
        mask_pooling: str = "nearest",
        batch_size: int = 8,
        keep_patch_features: bool = False,
        shots: int | None = None,
        stage: str = "fill_memory",
        semantics: Any = None,
        mask_model: Any = None,
    ) -> FillPlan:
        """Validate the settings and fix the batches (arguments as the fields; ``encoder`` as ``fill_memory``)."""
        size, grid = int(encoder.img_size), int(encoder.grid_size)
        if (
            semantics is not None
            and semantics.references == "whole_image"
            and semantics.encoder_input == "long_side"
        ):
            size = int(semantics.input_size)  # FSOD-VFM's square resize after the long-side one
            grid = size // int(encoder.patch_size)
        if (semantics is not None and semantics.reference_masks == "sam2_box") != (mask_model is not None):
            raise ValueError(f"{stage}: reference_masks=sam2_box and a mask_model go together")
        if mask_pooling not in MASK_POOLING:
            raise ValueError(f"{stage}: mask_pooling must be one of {MASK_POOLING}, got {mask_pooling!r}")
        if batch_size < 1:
            raise ValueError(f"{stage}: batch_size must be >= 1, got {batch_size}")
        return cls(
            jobs=jobs,
            batches=reference_batches(len(jobs), batch_size),
            category_ids=[int(c) for c in category_ids],
            category_names=[str(n) for n in category_names],
            shots=None if shots is None else int(shots),
            size=size,
            grid=grid,
            dim=int(encoder.embed_dim),
            context_ratio=float(context_ratio),
            mask_pooling=mask_pooling,
            keep_patch_features=bool(keep_patch_features),
            stage=stage,
            semantics=semantics,
            mask_model=mask_model,
        )


@dataclass
class EncodedReferences:
    """The encoded results of some jobs of a ``FillPlan`` (all of them, or one process's batches).

    Args:
        jobs: job indices; row i of every tensor is job ``jobs[i]``.
        instance_means: ``[n, D]`` float32.
        weight_sums: ``[n]`` float32.
        patch_features: ``[n, N, D]`` (``keep_patch_features``) or None.
        patch_weights: ``[n, N]`` (``keep_patch_features``) or None.
    """

    jobs: list[int]
    instance_means: torch.Tensor
    weight_sums: torch.Tensor
    patch_features: torch.Tensor | None = None
    patch_weights: torch.Tensor | None = None


def _zero_mask_message(plan: FillPlan, job: ReferenceJob) -> str:
    grid, pooling = plan.grid, plan.mask_pooling
    return (
        f"{plan.stage}: {job.description} has an all-zero mask on the {grid}x{grid} "
        f"patch grid (mask_pooling={pooling!r}"
        + (", which samples the top-left pixel of each patch" if pooling == "nearest" else "")
        + "). Its instance mean would be NaN, and so would the class prototype (the reference "
        "code fails on this too). Use mask_pooling='area' (matcher.memory.mask_pooling=area, one of the "
        "fixes of matcher=fixed) or choose another reference for this class."
    )


def encode_references(
    plan: FillPlan, encoder: Any, batches: Iterable[int] | None = None, *, progress: bool = True
) -> EncodedReferences:
    """Load, crop, encode and pool the jobs of the given batches of ``plan`` (default: every batch).

    Each batch is encoded exactly as in a one-process run (same crops in the same order), so its rows are
    bit-identical whichever process encodes it.

    Args:
        plan: a ``FillPlan``.
        encoder: callable ``images [B, 3, S, S] in [0, 1] -> [B, h, w, D]`` (``fill_memory``'s).
        batches: indices into ``plan.batches``.
        progress: show a tqdm bar.

    Raises:
        BadReferenceError: a reference cannot be loaded, its crop is empty or its mask is all zero on the
            patch grid (the message names it).
    """
    from tqdm import tqdm

    chosen = list(range(len(plan.batches))) if batches is None else list(batches)
    if plan.whole_image:
        return _encode_whole_images(plan, encoder, chosen, progress=progress)
    jobs = [j for b in chosen for j in plan.batches[b]]
    n, grid, dim, size = len(jobs), plan.grid, plan.dim, plan.size
    n_patches = grid * grid
    device = _encoder_device(encoder)
    keep = plan.keep_patch_features
    means = torch.zeros((n, dim), dtype=torch.float32)
    sums = torch.zeros((n,), dtype=torch.float32)
    patch_features = torch.zeros((n, n_patches, dim), dtype=torch.float32) if keep else None
    patch_weights = torch.zeros((n, n_patches), dtype=torch.float32) if keep else None

    row = 0
    bar = tqdm(total=n, desc=plan.stage, unit="ref", disable=not progress)
    with torch.inference_mode():
        for b in chosen:
            batch = plan.batches[b]
            crops, masks = [], []
            for j in batch:
                job = plan.jobs[j]
                try:
                    image, mask, bbox_xywh = job.load()
                    crop, soft = crop_reference(
                        image, mask, bbox_xywh, context_ratio=plan.context_ratio, size=size
                    )
                except (OSError, ValueError) as err:  # unreadable / missing image, empty crop
                    raise BadReferenceError(f"{plan.stage}: {job.description}: {err}") from err
                w = mask_patch_weights(soft, grid, mask_pooling=plan.mask_pooling)
                if not bool((w != 0).any()):
                    raise BadReferenceError(_zero_mask_message(plan, job))
                crops.append(crop)
                masks.append(w)
            x = torch.stack(crops).to(device)
            feats = encoder(x)
            if feats.dim() != 4 or tuple(feats.shape[1:]) != (grid, grid, dim):
                raise ValueError(
                    f"{plan.stage}: encoder returned {tuple(feats.shape)}, expected [B, {grid}, {grid}, {dim}]"
                )
            feats = feats.reshape(len(batch), n_patches, dim)
            for i in range(len(batch)):
                f_b = feats[i].to(torch.float32)
                w_b = masks[i].to(f_b.device)
                means[row] = instance_mean(f_b, w_b).cpu()
                sums[row] = w_b.sum().cpu()
                if keep:
                    patch_features[row] = f_b.cpu()
                    patch_weights[row] = w_b.cpu()
                row += 1
            bar.update(len(batch))
    bar.close()
    return EncodedReferences(jobs, means, sums, patch_features, patch_weights)


def _whole_image_input(image: torch.Tensor, semantics: Any, size: int) -> torch.Tensor:
    """A reference image as the encoder sees it in FSOD-VFM's mode (``[3, size, size]`` in [0, 1])."""
    if semantics.encoder_input == "long_side":
        from PIL import Image

        # the loaders' floats are uint8 / 255: rounding back recovers the decoded bytes exactly
        arr = torch.round(image.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return long_side_input(Image.fromarray(arr, mode="RGB"), long_side=semantics.long_side, size=size)
    return F.interpolate(image[None], size=(size, size), mode="bicubic", align_corners=False)[0]


def _encode_whole_images(
    plan: FillPlan, encoder: Any, chosen: list[int], *, progress: bool = True
) -> EncodedReferences:
    """FSOD-VFM's references (method.md §3.4): the whole image encoded, the mask resized to the grid as cv2
    INTER_LINEAR > 0.5, the masked mean. A mask empty on the grid leaves a zero row with weight sum 0: the
    prototypes skip it, as FSOD-VFM drops that reference (``assemble_bank`` refuses a class left empty)."""
    from tqdm import tqdm

    jobs = [j for b in chosen for j in plan.batches[b]]
    n, grid, dim = len(jobs), plan.grid, plan.dim
    device = _encoder_device(encoder)
    keep = plan.keep_patch_features
    means = torch.zeros((n, dim), dtype=torch.float32)
    sums = torch.zeros((n,), dtype=torch.float32)
    patch_features = torch.zeros((n, grid * grid, dim), dtype=torch.float32) if keep else None
    patch_weights = torch.zeros((n, grid * grid), dtype=torch.float32) if keep else None
    row = 0
    bar = tqdm(total=n, desc=plan.stage, unit="ref", disable=not progress)
    with torch.inference_mode():
        for b in chosen:
            batch = plan.batches[b]
            inputs, masks = [], []
            for j in batch:
                job = plan.jobs[j]
                try:
                    image, mask, bbox_xywh = job.load()
                except (OSError, ValueError) as err:
                    raise BadReferenceError(f"{plan.stage}: {job.description}: {err}") from err
                if plan.mask_model is not None:  # FSOD-VFM: SAM2's mask for the reference's box
                    mask = sam2_box_mask(
                        plan.mask_model, image, bbox_xywh, precision=plan.semantics.reference_mask_precision
                    )
                inputs.append(_whole_image_input(image, plan.semantics, plan.size))
                masks.append(mask.to(torch.bool))
            x = torch.stack(inputs).to(device)
            feats = encoder(x) if plan.semantics.final_norm else encoder(x, final_norm=False)
            if feats.dim() != 4 or tuple(feats.shape[1:]) != (grid, grid, dim):
                raise ValueError(
                    f"{plan.stage}: encoder returned {tuple(feats.shape)}, expected [B, {grid}, {grid}, {dim}]"
                )
            for i in range(len(batch)):
                f_b = feats[i].to(torch.float32)
                g = resize_masks_linear(masks[i][None].to(f_b.device), (grid, grid))
                vec, valid = reference_vectors(f_b, g)
                means[row] = vec[0].cpu()
                sums[row] = float(g.sum()) if bool(valid[0]) else 0.0
                if keep:
                    patch_features[row] = f_b.reshape(-1, dim).cpu()
                    patch_weights[row] = g[0].reshape(-1).to(torch.float32).cpu()
                row += 1
            bar.update(len(batch))
    bar.close()
    return EncodedReferences(jobs, means, sums, patch_features, patch_weights)


def _place(plan: FillPlan, parts: list[EncodedReferences], name: str, width: int) -> torch.Tensor:
    """``[C, width, ...]`` from the parts' rows of tensor ``name``, each at its job's (class, slot); the
    slots no job fills stay zero (the padding of a ragged bank)."""
    row_shape = {
        "instance_means": (plan.dim,),
        "weight_sums": (),
        "patch_features": (plan.grid * plan.grid, plan.dim),
        "patch_weights": (plan.grid * plan.grid,),
    }[name]
    out = torch.zeros((len(plan.category_ids), width, *row_shape), dtype=torch.float32)
    for part in parts:
        cls = torch.as_tensor([plan.jobs[j].cls for j in part.jobs], dtype=torch.long)
        slot = torch.as_tensor([plan.jobs[j].slot for j in part.jobs], dtype=torch.long)
        out[cls, slot] = getattr(part, name)
    return out


def assemble_bank(
    plan: FillPlan,
    parts: Iterable[EncodedReferences],
    *,
    encoder_name: str,
    seed: int | None = None,
    config_hash: str = "",
    config: dict | None = None,
) -> MemoryBank:
    """The ``MemoryBank`` of ``plan`` from encoded parts that together cover every job exactly once.

    Rows are placed by job, so the bank's bytes do not depend on how the jobs were split.

    Args:
        plan: a ``FillPlan``.
        parts: ``EncodedReferences`` in any order.
        encoder_name: encoder name to record.
        seed: the sampling seed to record.
        config_hash: config hash to record.
        config: the segmenter's config nodes to record (``Segmenter.build``).

    Raises:
        ValueError: a job is missing or encoded twice.
    """
    parts = [p for p in parts if p.jobs]
    covered = sorted(j for p in parts for j in p.jobs)
    if covered != list(range(len(plan.jobs))):
        missing = sorted(set(range(len(plan.jobs))) - set(covered))
        raise ValueError(
            f"{plan.stage}: the encoded parts cover {len(covered)} jobs for {len(plan.jobs)} references "
            f"(missing {missing[:10]}, duplicates {len(covered) - len(set(covered))})"
        )
    counts = [0] * len(plan.category_ids)
    refs: list[list[dict]] = [[] for _ in plan.category_ids]
    for job in plan.jobs:
        counts[job.cls] += 1
        refs[job.cls].append(job.provenance)
    width = max(counts, default=0)
    patches = plan.keep_patch_features and bool(parts)
    weight_sums = _place(plan, parts, "weight_sums", width)
    fill_settings = {
        "context_ratio": float(plan.context_ratio),
        "mask_pooling": plan.mask_pooling,
        "img_size": plan.size,
        "grid_size": plan.grid,
    }
    if plan.whole_image:  # recorded only then: NTT's banks keep their bytes
        _check_whole_image_classes(plan, weight_sums, counts)
        fill_settings["semantics"] = {
            k: getattr(plan.semantics, k)
            for k in ("references", "reference_masks", "encoder_input", "long_side", "final_norm")
        }
        if plan.mask_model is not None:  # how SAM2 made the masks, when not as before these keys existed
            if plan.semantics.reference_mask_precision != "float32":
                fill_settings["semantics"]["reference_mask_precision"] = (
                    plan.semantics.reference_mask_precision
                )
            resize = getattr(plan.mask_model, "input_resize", "pil_bicubic")
            if resize != "pil_bicubic":
                fill_settings["semantics"]["sam2_input_resize"] = resize
    return MemoryBank(
        instance_means=_place(plan, parts, "instance_means", width),
        weight_sums=weight_sums,
        category_ids=list(plan.category_ids),
        category_names=list(plan.category_names),
        shots=plan.shots,
        counts=torch.tensor(counts, dtype=torch.int64),
        seed=seed,
        encoder=encoder_name,
        feature_dim=plan.dim,
        config_hash=config_hash,
        refs=refs,
        postprocessed=False,
        fill_settings=fill_settings,
        config=dict(config or {}),
        patch_features=_place(plan, parts, "patch_features", width) if patches else None,
        patch_weights=_place(plan, parts, "patch_weights", width) if patches else None,
    )


def _check_whole_image_classes(plan: FillPlan, weight_sums: torch.Tensor, counts: list[int]) -> None:
    """FSOD-VFM leaves out a class whose every reference mask is empty on the grid; ntt refuses it instead
    (the class would silently never be detected)."""
    for c, n in enumerate(counts):
        if n and not bool((weight_sums[c, :n] > 0).any()):
            raise BadReferenceError(
                f"{plan.stage}: class {plan.category_ids[c]} ({plan.category_names[c]}): every reference mask "
                f"is empty on the {plan.grid}x{plan.grid} DINOv2 grid (matcher.semantics.references="
                "whole_image drops such references; FSOD-VFM would drop the class). Choose larger references "
                "for this class or use references=context_crop."
            )
