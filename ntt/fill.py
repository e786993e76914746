"""The benchmark's memory stages on a COCO reference set: ``fill_memory`` (method.md §3), ``postprocess_memory`` (§4).

``plan_fill`` turns a reference set (``ntt.refs``: K annotations per class of a COCO json) into the jobs of
``ntt.memory``'s one encoding path, loading each image at its json size and decoding its annotation's mask;
``fill_memory`` encodes them all in one process (``ntt.runner.memory_shard`` shares the same batches out
over several and gives the same bank).
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ntt.bank import MemoryBank
from ntt.memory import FillPlan, ReferenceJob, assemble_bank, encode_references

__all__ = ["plan_fill", "encoder_name_of", "fill_memory", "postprocess_memory"]


class _CocoReferences:
    """Loads the benchmark's references: images at their json size (the last 4 kept: references of one
    class often share images), masks decoded from the annotations."""

    def __init__(self, dataset_json: Mapping, image_root: Path, apply_exif: bool):
        self.images = {im["id"]: im for im in dataset_json.get("images", [])}
        self.annotations = {a["id"]: a for a in dataset_json.get("annotations", [])}
        self.image_root = image_root
        self.apply_exif = apply_exif
        self._cache: OrderedDict[Any, torch.Tensor] = OrderedDict()

    def _image(self, img_id: Any) -> torch.Tensor:
        from ntt.data.images import load_reference_image

        if img_id in self._cache:
            self._cache.move_to_end(img_id)
            return self._cache[img_id]
        info = self.images[img_id]
        img = load_reference_image(
            self.image_root / info["file_name"], info["height"], info["width"], apply_exif=self.apply_exif
        )
        self._cache[img_id] = img
        if len(self._cache) > 4:
            self._cache.popitem(last=False)
        return img

    def load(self, image_id: Any, ann_id: Any) -> tuple[torch.Tensor, torch.Tensor, Sequence[float]]:
        """``(image, mask, bbox)`` of annotation ``ann_id`` on image ``image_id`` (a ``ReferenceJob.load``)."""
        from ntt.data.masks import ann_to_mask

        info, ann = self.images[image_id], self.annotations[ann_id]
        image = self._image(image_id)
        mask = torch.from_numpy(ann_to_mask(ann, info["height"], info["width"])).to(torch.float32)
        return image, mask, ann["bbox"]


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
    semantics: Any = None,
    mask_model: Any = None,
) -> FillPlan:
    """Validate ``fill_memory``'s inputs and fix its jobs and batches (arguments as ``fill_memory``)."""
    from ntt.refs import validate_refs

    class_ids = sorted(int(c) for c in class_ids)
    if not class_ids:
        raise ValueError("fill_memory: no classes selected")
    if shots is None:
        lengths = {len(refs[c]) for c in class_ids if c in refs}
        shots = max(lengths) if lengths else 0
    validate_refs(refs, dataset_json, class_ids, shots)
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in dataset_json.get("categories", [])}
    source = _CocoReferences(dataset_json, Path(image_root), bool(apply_exif))
    jobs = [
        ReferenceJob(
            cls=ci,
            slot=k,
            description=(
                f"class {cat_id} ({names.get(cat_id, '?')}), shot {k}: annotation {entry.ann_ids[0]} "
                f"on image {entry.image_id}"
            ),
            provenance={"image_id": int(entry.image_id), "ann_id": int(entry.ann_ids[0])},
            load=partial(source.load, entry.image_id, entry.ann_ids[0]),
        )
        for ci, cat_id in enumerate(class_ids)
        for k, entry in enumerate(refs[cat_id][:shots])
    ]
    return FillPlan.create(
        jobs,
        category_ids=class_ids,
        category_names=[names.get(c, str(c)) for c in class_ids],
        encoder=encoder,
        context_ratio=context_ratio,
        mask_pooling=mask_pooling,
        batch_size=batch_size,
        keep_patch_features=keep_patch_features,
        shots=shots,
        semantics=semantics,
        mask_model=mask_model,
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
    semantics: Any = None,
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
            the parity trace / analysis; large for big C*K).
        shots: K (default: the length of the reference lists).
        seed: the sampling seed to record.
        encoder_name: name to record (default: ``encoder.name`` or its class name).
        config_hash: config hash to record.
        apply_exif: EXIF-transpose the images (``dataset.exif_orientation``; off for parity).
        semantics: ``matcher.semantics`` (None: NTT's crops); ``references="whole_image"`` encodes FSOD-VFM's
            whole-image references instead (method.md §3.4).

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
        semantics=semantics,
    )
    part = encode_references(plan, encoder, progress=progress)
    return assemble_bank(
        plan, [part], encoder_name=encoder_name_of(encoder, encoder_name), seed=seed, config_hash=config_hash
    )


# ----------------------------------------------------------------------------------------------------------
# postprocess_memory


def postprocess_memory(bank: MemoryBank) -> MemoryBank:
    """Check that every instance mean is finite and mark the bank ready for the test stage.

    Idempotent. Prototypes are never stored; ``MemoryBank.prototypes()`` computes them from the instance
    means.

    Args:
        bank: a filled bank.

    Returns:
        A new ``MemoryBank`` with ``postprocessed=True``.

    Raises:
        ValueError: non-finite instance means (the message names their classes).
    """
    means = bank.instance_means
    if not torch.isfinite(means).all():
        bad = sorted({int(c) for c in torch.nonzero(~torch.isfinite(means).all(dim=-1))[:, 0]})
        raise ValueError(
            "postprocess_memory: non-finite instance means for classes "
            f"{[bank.category_ids[c] for c in bad]}: rerun stage fill_memory"
        )
    return dataclasses.replace(bank, postprocessed=True)
