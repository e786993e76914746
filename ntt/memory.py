"""Memory bank: reference crops (method.md §3.1), patch-grid mask weights, instance means, prototypes (§4).

Stage ``fill_memory`` turns each reference instance into one mask-weighted mean DINOv2 feature
(``instance_means[C, K, D]``); the prototype of a class is the L2-normalised mean over its K shots. Stage
``postprocess_memory`` marks the bank ready and can compute optional statistics (never used at test).

Parity defaults: square context crop with ``int()`` truncation in float64, bicubic image / bilinear mask
resize to 518 (no antialias), soft mask sampled at the top-left pixel of each patch
(``F.interpolate(mode="nearest")``); ``mask_pooling="area"`` is the fix of method.md §9.1 item 2
(adaptive average pooling).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ntt.bank import MemoryBank, compute_prototypes
from ntt.utils.errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "MASK_POOLING",
    "context_crop_box",
    "crop_reference",
    "mask_patch_weights",
    "instance_mean",
    "compute_prototypes",
    "BadReferenceError",
    "FillPlan",
    "EncodedReferences",
    "reference_batches",
    "plan_fill",
    "encode_references",
    "assemble_bank",
    "fill_memory",
    "postprocess_memory",
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
# fill_memory: plan -> encode (all batches, or one process's share) -> assemble


class BadReferenceError(UserError, ValueError):
    """A reference that cannot fill its memory slot (unreadable image, empty crop, all-zero mask); the
    message names its class, shot, annotation and image."""


def _encoder_device(encoder: Any) -> torch.device:
    if isinstance(encoder, torch.nn.Module):
        for t in encoder.parameters():
            return t.device
        for t in encoder.buffers():
            return t.device
    return torch.device(getattr(encoder, "device", "cpu"))


def reference_batches(n_jobs: int, batch_size: int) -> list[range]:
    """The encoder batches of ``fill_memory``: consecutive runs of ``batch_size`` jobs (the last may be short).

    They depend on the job count and ``batch_size`` only, never on how many processes share them: a
    batched forward's bits can depend on the batch's composition, so equal batches give equal banks.

    Args:
        n_jobs: number of reference jobs (C * K).
        batch_size: crops per encoder call.
    """
    if batch_size < 1:
        raise ValueError(f"fill_memory: batch_size must be >= 1, got {batch_size}")
    return [range(s, min(s + batch_size, n_jobs)) for s in range(0, n_jobs, batch_size)]


@dataclass
class FillPlan:
    """What ``fill_memory`` derives from its inputs before encoding (validated; identical on every process).

    Args:
        class_ids: selected category ids, ascending (class index = position).
        shots: K.
        jobs: ``(class index, shot, RefEntry)`` in the canonical order (class ascending, then shot).
        batches: ``reference_batches(len(jobs), batch_size)``.
        images: image id -> json record.
        annotations: annotation id -> json record.
        category_names: category id -> name.
        image_root: folder of the images.
        size: encoder input side.
        grid: encoder patch grid side.
        dim: feature dimension D.
        context_ratio: crop context.
        mask_pooling: ``"nearest"`` or ``"area"``.
        keep_patch_features: also keep raw patch features and weights.
        apply_exif: EXIF-transpose the images.
    """

    class_ids: list[int]
    shots: int
    jobs: list[tuple[int, int, Any]]
    batches: list[range]
    images: dict
    annotations: dict
    category_names: dict[int, str]
    image_root: Path
    size: int
    grid: int
    dim: int
    context_ratio: float
    mask_pooling: str
    keep_patch_features: bool
    apply_exif: bool

    def describe(self, job: int) -> str:
        """``class <id> (<name>), shot <k>: annotation <a> on image <i>`` of job index ``job``."""
        ci, k, entry = self.jobs[job]
        cat_id = self.class_ids[ci]
        return (
            f"class {cat_id} ({self.category_names.get(cat_id, '?')}), shot {k}: annotation {entry.ann_ids[0]} "
            f"on image {entry.image_id}"
        )


def plan_fill(
    refs: Mapping[int, list],
    *,
    dataset_json: Mapping,
    image_root: str | os.PathLike,
    encoder: Any,
    class_ids: Iterable[int],
    context_ratio: float = 0.2,
    mask_pooling: str = "nearest",
    batch_size: int = 8,
    keep_patch_features: bool = False,
    shots: int | None = None,
    apply_exif: bool = False,
) -> FillPlan:
    """Validate ``fill_memory``'s inputs and fix its jobs and batches (arguments as ``fill_memory``)."""
    from ntt.refs import validate_refs

    if mask_pooling not in MASK_POOLING:
        raise ValueError(f"fill_memory: mask_pooling must be one of {MASK_POOLING}, got {mask_pooling!r}")
    if batch_size < 1:
        raise ValueError(f"fill_memory: batch_size must be >= 1, got {batch_size}")
    class_ids = sorted(int(c) for c in class_ids)
    if not class_ids:
        raise ValueError("fill_memory: no classes selected")
    if shots is None:
        lengths = {len(refs[c]) for c in class_ids if c in refs}
        shots = max(lengths) if lengths else 0
    validate_refs(refs, dataset_json, class_ids, shots)
    jobs = [(ci, k, refs[cat_id][k]) for ci, cat_id in enumerate(class_ids) for k in range(shots)]
    return FillPlan(
        class_ids=class_ids,
        shots=int(shots),
        jobs=jobs,
        batches=reference_batches(len(jobs), batch_size),
        images={im["id"]: im for im in dataset_json.get("images", [])},
        annotations={a["id"]: a for a in dataset_json.get("annotations", [])},
        category_names={
            int(c["id"]): str(c.get("name", c["id"])) for c in dataset_json.get("categories", [])
        },
        image_root=Path(image_root),
        size=int(encoder.img_size),
        grid=int(encoder.grid_size),
        dim=int(encoder.embed_dim),
        context_ratio=float(context_ratio),
        mask_pooling=mask_pooling,
        keep_patch_features=bool(keep_patch_features),
        apply_exif=bool(apply_exif),
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


def _zero_mask_message(plan: FillPlan, job: int) -> str:
    grid, pooling = plan.grid, plan.mask_pooling
    return (
        f"fill_memory: {plan.describe(job)} has an all-zero mask on the {grid}x{grid} "
        f"patch grid (mask_pooling={pooling!r}"
        + (", which samples the top-left pixel of each patch" if pooling == "nearest" else "")
        + "). Its instance mean would be NaN, and so would the class prototype (the reference "
        "code fails on this too). Use mask_pooling='area' or choose another reference for this "
        "class."
    )


def encode_references(
    plan: FillPlan, encoder: Any, batches: Iterable[int] | None = None, *, progress: bool = True
) -> EncodedReferences:
    """Load, crop, encode and pool the jobs of the given batches of ``plan`` (default: every batch).

    Each batch is encoded exactly as in a one-process run (same crops in the same order), so its rows are
    bit-identical whichever process encodes it.

    Args:
        plan: from ``plan_fill``.
        encoder: the ``fill_memory`` encoder.
        batches: indices into ``plan.batches``.
        progress: show a tqdm bar.

    Raises:
        BadReferenceError: a reference's image cannot be loaded, its crop is empty or its mask is all zero
            on the patch grid (the message names class, shot, annotation and image).
    """
    from tqdm import tqdm

    from ntt.data.images import load_reference_image
    from ntt.data.masks import ann_to_mask

    chosen = list(range(len(plan.batches))) if batches is None else list(batches)
    jobs = [j for b in chosen for j in plan.batches[b]]
    n, grid, dim, size = len(jobs), plan.grid, plan.dim, plan.size
    n_patches = grid * grid
    device = _encoder_device(encoder)
    keep = plan.keep_patch_features
    means = torch.zeros((n, dim), dtype=torch.float32)
    sums = torch.zeros((n,), dtype=torch.float32)
    patch_features = torch.zeros((n, n_patches, dim), dtype=torch.float32) if keep else None
    patch_weights = torch.zeros((n, n_patches), dtype=torch.float32) if keep else None
    cache: OrderedDict[Any, torch.Tensor] = OrderedDict()

    def _image(img_id):
        if img_id in cache:
            cache.move_to_end(img_id)
            return cache[img_id]
        info = plan.images[img_id]
        img = load_reference_image(
            plan.image_root / info["file_name"], info["height"], info["width"], apply_exif=plan.apply_exif
        )
        cache[img_id] = img
        if len(cache) > 4:
            cache.popitem(last=False)
        return img

    row = 0
    bar = tqdm(total=n, desc="fill_memory", unit="ref", disable=not progress)
    with torch.inference_mode():
        for b in chosen:
            batch = plan.batches[b]
            crops, masks = [], []
            for j in batch:
                _ci, _k, entry = plan.jobs[j]
                info = plan.images[entry.image_id]
                ann = plan.annotations[entry.ann_ids[0]]
                try:
                    image = _image(entry.image_id)
                    mask = torch.from_numpy(ann_to_mask(ann, info["height"], info["width"])).to(torch.float32)
                    crop, soft = crop_reference(
                        image, mask, ann["bbox"], context_ratio=plan.context_ratio, size=size
                    )
                except (OSError, ValueError) as err:  # unreadable / missing image, empty crop
                    raise BadReferenceError(f"fill_memory: {plan.describe(j)}: {err}") from err
                w = mask_patch_weights(soft, grid, mask_pooling=plan.mask_pooling)
                if not bool((w != 0).any()):
                    raise BadReferenceError(_zero_mask_message(plan, j))
                crops.append(crop)
                masks.append(w)
            x = torch.stack(crops).to(device)
            feats = encoder(x)
            if feats.dim() != 4 or tuple(feats.shape[1:]) != (grid, grid, dim):
                raise ValueError(
                    f"fill_memory: encoder returned {tuple(feats.shape)}, expected [B, {grid}, {grid}, {dim}]"
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


def _assemble(plan: FillPlan, parts: list[EncodedReferences], name: str) -> torch.Tensor | None:
    """``[C, K, ...]`` from the parts' rows of tensor ``name``, placed by job index (copies only)."""
    tensors = [getattr(p, name) for p in parts]
    if any(t is None for t in tensors):
        return None
    n_jobs = len(plan.jobs)
    if len(parts) == 1 and parts[0].jobs == list(range(n_jobs)):
        flat = tensors[0]  # one process encoded everything in job order: no copy
    else:
        flat = torch.empty((n_jobs, *tensors[0].shape[1:]), dtype=tensors[0].dtype)
        for part, t in zip(parts, tensors):
            flat[torch.as_tensor(part.jobs, dtype=torch.long)] = t
    return flat.reshape(len(plan.class_ids), plan.shots, *flat.shape[1:])


def assemble_bank(
    plan: FillPlan,
    parts: Iterable[EncodedReferences],
    *,
    encoder_name: str,
    seed: int | None = None,
    config_hash: str = "",
) -> MemoryBank:
    """The ``MemoryBank`` of ``plan`` from encoded parts that together cover every job exactly once.

    Rows are placed by job index, so the bank's bytes do not depend on how the jobs were split.

    Args:
        plan: from ``plan_fill``.
        parts: ``EncodedReferences`` in any order.
        encoder_name: encoder name to record.
        seed: the sampling seed to record.
        config_hash: config hash to record.

    Raises:
        ValueError: a job is missing or encoded twice.
    """
    parts = [p for p in parts if p.jobs]
    covered = sorted(j for p in parts for j in p.jobs)
    if covered != list(range(len(plan.jobs))):
        missing = sorted(set(range(len(plan.jobs))) - set(covered))
        raise ValueError(
            f"fill_memory: the encoded parts cover {len(covered)} jobs for {len(plan.jobs)} references "
            f"(missing {missing[:10]}, duplicates {len(covered) - len(set(covered))})"
        )
    if not parts:  # no references at all (shots=0): empty tensors of the right shape
        parts = [EncodedReferences([], torch.zeros((0, plan.dim)), torch.zeros((0,)))]
    ref_list = [
        [
            {"image_id": int(entry.image_id), "ann_id": int(entry.ann_ids[0])}
            for ci_, _k, entry in plan.jobs
            if ci_ == ci
        ]
        for ci in range(len(plan.class_ids))
    ]
    return MemoryBank(
        instance_means=_assemble(plan, parts, "instance_means"),
        weight_sums=_assemble(plan, parts, "weight_sums"),
        category_ids=list(plan.class_ids),
        category_names=[plan.category_names.get(c, str(c)) for c in plan.class_ids],
        shots=plan.shots,
        seed=seed,
        encoder=encoder_name,
        feature_dim=plan.dim,
        config_hash=config_hash,
        refs=ref_list,
        postprocessed=False,
        fill_settings={
            "context_ratio": float(plan.context_ratio),
            "mask_pooling": plan.mask_pooling,
            "img_size": plan.size,
            "grid_size": plan.grid,
        },
        patch_features=_assemble(plan, parts, "patch_features") if plan.keep_patch_features else None,
        patch_weights=_assemble(plan, parts, "patch_weights") if plan.keep_patch_features else None,
    )


def encoder_name_of(encoder: Any, encoder_name: str | None = None) -> str:
    """The encoder name a bank records: ``encoder_name``, else ``encoder.name``, else its class name."""
    if encoder_name is not None:
        return encoder_name
    return str(getattr(encoder, "name", type(encoder).__name__))


def fill_memory(
    refs: Mapping[int, list],
    *,
    dataset_json: Mapping,
    image_root: str | os.PathLike,
    encoder: Any,
    class_ids: Iterable[int],
    context_ratio: float = 0.2,
    mask_pooling: str = "nearest",
    batch_size: int = 8,
    progress: bool = True,
    keep_patch_features: bool = False,
    shots: int | None = None,
    seed: int | None = None,
    encoder_name: str | None = None,
    config_hash: str = "",
    apply_exif: bool = False,
) -> MemoryBank:
    """Encode every reference crop and store its mask-weighted mean feature (stage ``fill_memory``).

    For each class in ascending id order and each slot k in refs order: load the image at the json
    height/width, decode ``ann_ids[0]``, crop with context, resize to the encoder size, encode (batched),
    pool with the patch-grid soft mask. ``ntt.runner.memory_shard.fill_memory_sharded`` splits the same batches
    over processes and gives the same bank.

    Args:
        refs: ``{category_id: [RefEntry]}`` (``ntt.refs``); validated against ``dataset_json`` first.
        dataset_json: the COCO json the references come from.
        image_root: folder of the images (``file_name`` is relative to it).
        encoder: callable ``images [B, 3, S, S] in [0, 1] -> [B, h, w, D]`` with ``img_size``,
            ``grid_size`` and ``embed_dim`` attributes (``DINOv2Encoder``).
        class_ids: selected category ids (sorted here; class index = position).
        context_ratio: crop context (0.2).
        mask_pooling: ``"nearest"`` (parity) or ``"area"`` (fix of method.md §9.1 item 2).
        batch_size: crops per encoder call.
        progress: show a tqdm bar.
        keep_patch_features: also keep the raw ``[C, K, N, D]`` features and ``[C, K, N]`` weights (for
            statistics / analysis; large for big C*K).
        shots: K (default: the length of the reference lists).
        seed: the sampling seed to record.
        encoder_name: name to record (default: ``encoder.name`` or its class name).
        config_hash: config hash to record.
        apply_exif: EXIF-transpose the images (``dataset.exif_orientation``; off for parity).

    Returns:
        A ``MemoryBank`` (``postprocessed=False``).

    Raises:
        ValueError: invalid references.
        BadReferenceError: a reference whose image cannot be read, whose crop is empty or whose mask is all
            zero on the patch grid (the message names the class, shot, annotation and image).
    """
    plan = plan_fill(
        refs,
        dataset_json=dataset_json,
        image_root=image_root,
        encoder=encoder,
        class_ids=class_ids,
        context_ratio=context_ratio,
        mask_pooling=mask_pooling,
        batch_size=batch_size,
        keep_patch_features=keep_patch_features,
        shots=shots,
        apply_exif=apply_exif,
    )
    part = encode_references(plan, encoder, progress=progress)
    return assemble_bank(
        plan, [part], encoder_name=encoder_name_of(encoder, encoder_name), seed=seed, config_hash=config_hash
    )


# ----------------------------------------------------------------------------------------------------------
# postprocess_memory


def _kmeans_cosine(feats: torch.Tensor, k: int, n_iter: int, generator: torch.Generator) -> torch.Tensor:
    """The reference's k-means: randperm init, cosine assignment, plain-mean update, normalised centres.

    Empty clusters give NaN centres (as the reference); fewer points than ``k`` leaves NaN rows.
    """
    n, d = feats.shape
    init = torch.randperm(n, generator=generator)[:k].to(feats.device)
    centers = torch.full((k, d), float("nan"), dtype=feats.dtype, device=feats.device)
    centers[: init.numel()] = feats[init]
    fn = F.normalize(feats, p=2, dim=-1)
    for _ in range(n_iter):
        assign = torch.argmax(fn @ F.normalize(centers, p=2, dim=-1).t(), dim=1)
        centers = torch.stack([feats[assign == j].mean(dim=0) for j in range(k)])
    return F.normalize(centers, dim=-1)


def _pca(feats: torch.Tensor, n_components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA by SVD of the centred data; component signs fixed so each row's largest-|.| entry is positive."""
    mean = feats.mean(dim=0)
    _, _, vh = torch.linalg.svd(feats - mean, full_matrices=False)
    comps = vh[:n_components]
    idx = comps.abs().argmax(dim=1)
    signs = torch.sign(comps[torch.arange(comps.shape[0]), idx])
    signs[signs == 0] = 1
    comps = comps * signs[:, None]
    if comps.shape[0] < n_components:
        pad = torch.full((n_components - comps.shape[0], feats.shape[1]), float("nan"), dtype=feats.dtype)
        comps = torch.cat([comps, pad.to(feats.device)])
    return mean, comps


def postprocess_memory(
    bank: MemoryBank,
    *,
    compute_stats: bool = False,
    kmeans_k: int = 4,
    n_pca: int = 3,
    seed: int = 42,
    kmeans_iters: int = 100,
) -> MemoryBank:
    """Mark the bank ready for testing; optionally compute the reference's (unused) statistics.

    Idempotent: the result depends only on the filled data and the arguments (nothing accumulates).
    Prototypes are never stored; ``MemoryBank.prototypes()`` computes them from the instance means.

    Args:
        bank: a filled bank.
        compute_stats: compute ``stats``: ``class_pixel_weighted_mean [C, D]`` (from instance means and
            weight sums), ``covariances [C, D, D]`` (biased over shots of the instance means; zero for K=1);
            with patch features kept at fill time also ``ins_sim_avg [C]`` (leave-one-out, only for K>1),
            ``kmeans_centers [C, kmeans_k, D]``, ``pca_mean [C, D]``, ``pca_components [C, n_pca, D]``.
        kmeans_k: k-means clusters per class (4).
        n_pca: PCA components (3).
        seed: seed of the k-means initialisation (``torch.randperm``), 42 as the reference.
        kmeans_iters: k-means iterations (100).

    Returns:
        A new ``MemoryBank`` with ``postprocessed=True`` and ``stats`` (``None`` without ``compute_stats``).
    """
    means = bank.instance_means
    if not torch.isfinite(means).all():
        bad = sorted({int(c) for c in torch.nonzero(~torch.isfinite(means).all(dim=-1))[:, 0]})
        raise ValueError(
            "postprocess_memory: non-finite instance means for classes "
            f"{[bank.category_ids[c] for c in bad]}: rerun stage fill_memory"
        )
    stats = None
    if compute_stats:
        stats = {}
        ws = bank.weight_sums.to(means.dtype)
        stats["class_pixel_weighted_mean"] = (means * ws[..., None]).sum(dim=1) / ws.sum(dim=1, keepdim=True)
        centered = means - means.mean(dim=1, keepdim=True)
        stats["covariances"] = centered.transpose(1, 2) @ centered / float(means.shape[1])
        if bank.patch_features is None or bank.patch_weights is None:
            logger.info(
                "postprocess_memory: no patch features in the bank (fill_memory keep_patch_features=False): "
                "k-means, PCA and leave-one-out similarity are skipped"
            )
        else:
            pf, pw = bank.patch_features, bank.patch_weights
            n_cls, k_shots = pw.shape[:2]
            gen = torch.Generator().manual_seed(int(seed))
            centers, pca_mean, pca_comp, ins_sim = [], [], [], []
            for c in range(n_cls):
                fg = pf[c].reshape(-1, pf.shape[-1])[pw[c].reshape(-1) > 0]
                if k_shots > 1:
                    sims = []
                    for j in range(k_shots):
                        own = pf[c, j][pw[c, j] > 0].mean(dim=0, keepdim=True)
                        rest_f = torch.cat((pf[c, :j], pf[c, j + 1 :])).reshape(-1, pf.shape[-1])
                        rest_w = torch.cat((pw[c, :j], pw[c, j + 1 :])).reshape(-1)
                        rest = rest_f[rest_w > 0].mean(dim=0, keepdim=True)
                        s = F.normalize(own, dim=1) @ F.normalize(rest, dim=-1).t()
                        sims.append((s + 1.0) * 0.5)
                    ins_sim.append(torch.stack(sims).mean())
                centers.append(_kmeans_cosine(fg, kmeans_k, kmeans_iters, gen))
                m, comp = _pca(fg, n_pca)
                pca_mean.append(m)
                pca_comp.append(comp)
            if ins_sim:
                stats["ins_sim_avg"] = torch.stack(ins_sim)
            stats["kmeans_centers"] = torch.stack(centers)
            stats["pca_mean"] = torch.stack(pca_mean)
            stats["pca_components"] = torch.stack(pca_comp)
    return dataclasses.replace(bank, postprocessed=True, stats=stats)
