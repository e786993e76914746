"""Python API for practitioners: segment your own images from a few reference examples.

    from ntt import Segmenter
    seg = Segmenter.from_config(sam2="sam2.1_hiera_t", dinov2="vits14", proposer="cpu_fast")
    seg.add_reference("refs/cat1.jpg", "cat", masks="refs/cat1.png")      # a mask (PNG, array or tensor)
    seg.add_reference("refs/dog1.jpg", "dog", boxes=[[10, 20, 200, 240]])  # boxes -> masks through SAM2
    seg.add_reference("refs/dog2.jpg", "dog", points=[[120, 80]])          # one click -> a mask through SAM2
    seg.build()                                                            # the memory bank (prototypes)
    seg.save("pets.ntt")                                                   # kilobytes, no model weights
    for inst in seg.predict("photos/"):                                    # an image, a list or a folder
        print(inst.path, inst.class_names, inst.scores)
        inst.overlay().save(f"out/{Path(inst.path).stem}.png")            # not into photos/

Any number of references per class: the prototype of a class is the L2-normalised mean of its own
references' features only (docs/method.md §4). The references are encoded by the benchmark's own functions
(``ntt.memory``: ``FillPlan`` -> ``encode_references`` -> ``assemble_bank``), in the same order and batches,
so equal references give bit-identical prototypes (tests/test_api.py checks it); the bank is the benchmark's
``ntt.bank.MemoryBank``.

Images given as paths are read upright (EXIF orientation applied); the benchmark pipeline keeps the stored
frame for parity. Masks and boxes are in the pixels of the upright image.

One class, the practitioner's whole surface (references in, the bank, predictions out): a little over the
usual few hundred lines, most of them its documented arguments.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ntt.app.instances import Instances
from ntt.app.outputs import skip_own_outputs
from ntt.app.settings import check_segmenter_params, compose_config, params_from_config, saved_config
from ntt.backbones import build_backbone
from ntt.bank import MemoryBank
from ntt.bank_edit import merge, subset
from ntt.data.images import image_digest, list_images, read_image
from ntt.data.masks import mask_bbox_xywh, mask_digest, read_masks
from ntt.inference import InferenceParams
from ntt.utils.dist import resolve_device
from ntt.utils.identity import drop_inert_keys
from ntt.utils.speed import format_seconds

__all__ = ["Segmenter"]

log = logging.getLogger(__name__)


@dataclass
class _Reference:
    """One reference instance waiting to be encoded."""

    image: torch.Tensor  # [3, H, W] float32 in [0, 1]
    mask: torch.Tensor  # [H, W] bool
    bbox_xywh: list[float]
    provenance: dict

    def load(self) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """``(image, mask, crop box)``: a ``ntt.memory.ReferenceJob.load``."""
        return self.image, self.mask, self.bbox_xywh


# ----------------------------------------------------------------------------------------------------------
# The segmenter


class Segmenter:
    """Reference-based instance segmentation of your own images (SAM2 proposals + DINOv2 prototypes).

    Build it with :meth:`from_config` (config names) or from a composed config; add references with
    :meth:`add_reference`; :meth:`build` the bank; :meth:`predict`. Models are built on first use.

    Args:
        cfg: a config in ``conf/main.yaml``'s layout (``backbone.sam2``, ``backbone.dinov2``, ``proposer``,
            ``matcher``, ``device``), e.g. from :func:`compose_config`; a plain dict is accepted.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``; default: ``cfg.device``.
        sam2: an already built SAM2 backbone to use instead of building ``cfg.backbone.sam2``.
        dinov2: an already built DINOv2 encoder to use instead of building ``cfg.backbone.dinov2``.

    Attributes:
        params: the :class:`ntt.inference.InferenceParams` used by :meth:`predict` (every proposer and
            matcher knob: ``points_per_side``, ``iou_thr``, ``nms_thr``, ``num_out``, ``pooling``, ...);
            change a field to change later predictions, or pass it to ``predict(...)`` for one call.
    """

    def __init__(self, cfg, *, device: str | None = None, sam2=None, dinov2=None):
        from omegaconf import DictConfig, OmegaConf

        from ntt.utils.config import MatcherConfig, build_node

        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(cfg)
        for key in ("backbone", "proposer", "matcher"):
            if key not in cfg:
                raise ValueError(f"Segmenter: the config has no '{key}' node (use Segmenter.from_config)")
        self.cfg = cfg
        self.device = resolve_device(str(device or cfg.get("device", "auto")))
        self.params = params_from_config(cfg)
        self.memory = build_node(cfg.matcher, MatcherConfig).memory
        self._sam2 = sam2
        self._dinov2 = dinov2
        self._refs: dict[str, list[_Reference]] = {}  # added in this session (images kept): encoded by build
        self._loaded: MemoryBank | None = None  # a loaded bank (features only): build appends to it
        self._category_ids: dict[str, int] = {}
        self.bank: MemoryBank | None = None
        if self.device == "cpu" and self.params.points_per_side > 16:
            log.warning(
                "%dx%d prompt grid on the CPU: expect minutes per image (about %s). For a quick look use "
                "proposer=cpu_fast (12x12 grid: Segmenter.from_config(..., proposer='cpu_fast') or "
                "`ntt segment ... proposer=cpu_fast`)",
                self.params.points_per_side,
                self.params.points_per_side,
                format_seconds(self.estimate_seconds_per_image()),
            )

    # -------------------------------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        sam2: str = "sam2.1_hiera_t",
        dinov2: str = "vits14",
        *,
        proposer: str | None = None,
        matcher: str | None = None,
        device: str = "auto",
        overrides: Sequence[str] = (),
    ) -> Segmenter:
        """A segmenter from config option names (the groups of ``conf/``, as on the ``ntt run`` line).

        Args:
            sam2: ``conf/backbone/sam2`` option (``sam2.1_hiera_t``, ``sam2_hiera_l``, ``tiny_random``...).
            dinov2: ``conf/backbone/dinov2`` option (``vits14``, ``vitl14``, ``tiny_random``...).
            proposer: ``conf/proposer`` option (default ``paper``: 32x32 grid; ``cpu_fast``: 12x12).
            matcher: ``conf/matcher`` option (default ``paper``; ``fixed`` = every fix flag on).
            device: ``auto``, ``cpu``, ``cuda``...
            overrides: Hydra overrides, e.g. ``["matcher.nms_thr=0.6", "paths.checkpoints=/models"]``.
        """
        cfg = compose_config(
            sam2=sam2, dinov2=dinov2, proposer=proposer, matcher=matcher, overrides=overrides
        )
        return cls(cfg, device=device)

    @property
    def sam2(self):
        """The SAM2 backbone (built from ``cfg.backbone.sam2`` on first use)."""
        if self._sam2 is None:
            self._sam2 = build_backbone(self.cfg.backbone.sam2, device=self.device)
        return self._sam2

    @property
    def dinov2(self):
        """The DINOv2 encoder (built from ``cfg.backbone.dinov2`` on first use)."""
        if self._dinov2 is None:
            self._dinov2 = build_backbone(self.cfg.backbone.dinov2, device=self.device)
        return self._dinov2

    @property
    def class_names(self) -> list[str]:
        """Class names ordered by category id (= label order of the predictions)."""
        if self.bank is not None and not self._refs:
            return list(self.bank.category_names)
        return sorted(self._category_ids, key=self._category_ids.__getitem__)

    # -------------------------------------------------------------------------------------------------
    def add_reference(
        self,
        image,
        cls: str,
        *,
        masks=None,
        boxes=None,
        points=None,
        point_labels=None,
        category_id: int | None = None,
        bboxes_xywh: Sequence[Sequence[float]] | None = None,
        name: str | None = None,
    ) -> int:
        """Add reference instances of class ``cls`` on one image; give exactly one of masks, boxes, points.

        A segmenter with a loaded bank (:meth:`load`) takes new references too: :meth:`build` encodes only
        them and appends them to the loaded bank's (``ntt.bank_edit`` gives the order and id rules).
        Each reference records its source in the bank: the image's sha256 (of the file, or of the RGB
        pixels for an in-memory image), the prompt kind and its geometry (box, clicks, or the mask's sha256).

        Boxes and clicks become masks through SAM2 prompts (``ntt.prompts``): a box uses SAM2's
        single-mask output (as the reference's box -> mask preparation) and keeps the box as the crop
        box; one click uses the best of the three multimask outputs (as the proposer); several clicks on
        one instance use the single-mask output.

        Args:
            image: path (EXIF orientation applied), ``PIL.Image``, ``[H, W, 3]`` uint8 array or
                ``[3, H, W]`` float tensor in [0, 1].
            cls: class name. Classes get category ids 1, 2, ... in order of first appearance.
            masks: one mask or several (``[H, W]`` / ``[N, H, W]`` array or tensor, a PNG path, or a list).
            boxes: ``[x1, y1, x2, y2]`` or a list of them, in image pixels.
            points: clicks: ``[x, y]`` (one instance), ``[N, 2]`` (N instances, one click each), or a list of
                instances each a list of ``[x, y]`` (see ``ntt.prompts.normalize_points``).
            point_labels: 1 positive (default) / 0 negative per click, nested like ``points``.
            category_id: the class's category id (e.g. from a COCO json); fixed at its first reference.
            bboxes_xywh: with ``masks``: the COCO box of each instance used for the context crop (as the
                benchmark uses the annotation's ``bbox``); default: the mask's extent.
            name: how to name the image in messages and in the bank's provenance (default: its file name).

        Returns:
            The number of reference instances added.
        """
        from ntt.data.images import pil_to_tensor

        if sum(x is not None for x in (masks, boxes, points)) != 1:
            raise ValueError("add_reference: give exactly one of masks=, boxes=, points=")
        if not isinstance(cls, str) or not cls:
            raise ValueError(f"add_reference: the class must be a non-empty name, got {cls!r}")
        pil, path = read_image(image)
        width, height = pil.size
        source = name or (Path(path).name if path else "<in-memory image>")
        tensor = pil_to_tensor(pil)
        image_sha = image_digest(pil, path)
        geometry: list[dict] | None = None
        if masks is not None:
            kind = "mask"
            mask_list = read_masks(masks, height, width, source)
            if bboxes_xywh is not None and len(bboxes_xywh) != len(mask_list):
                raise ValueError(f"add_reference: {len(bboxes_xywh)} boxes for {len(mask_list)} masks")
            crop_boxes = [list(map(float, b)) for b in bboxes_xywh] if bboxes_xywh is not None else None
        else:
            from ntt.prompts import masks_from_boxes, masks_from_points, normalize_boxes, normalize_points

            image_sam = self._sam_input(pil)
            if boxes is not None:
                kind = "box"
                arr = normalize_boxes(boxes)
                mask_list = list(masks_from_boxes(self.sam2, image_sam, arr, height, width))
                crop_boxes = [[b[0], b[1], b[2] - b[0], b[3] - b[1]] for b in arr.tolist()]
                geometry = [{"box": [float(v) for v in b]} for b in arr.tolist()]
            else:
                kind = "points"
                clicks = normalize_points(points, point_labels)
                mask_list = list(masks_from_points(self.sam2, image_sam, clicks, height, width))
                crop_boxes = None
                geometry = [
                    {"points": xy.astype(float).tolist(), "point_labels": lab.astype(int).tolist()}
                    for xy, lab in clicks
                ]
        if category_id is not None:
            known = self._category_ids.get(cls)
            if known is not None and known != int(category_id):
                raise ValueError(
                    f"add_reference: class {cls!r} already has category id {known}, not {category_id}"
                )
            if int(category_id) in {v for k, v in self._category_ids.items() if k != cls}:
                raise ValueError(f"add_reference: category id {category_id} is already used by another class")
            self._category_ids[cls] = int(category_id)
        elif cls not in self._category_ids:
            self._category_ids[cls] = max(self._category_ids.values(), default=0) + 1
        for i, mask in enumerate(mask_list):
            if not bool(mask.any()):
                raise ValueError(f"add_reference: {source}: mask {i} of class {cls!r} is empty")
            bbox = crop_boxes[i] if crop_boxes is not None else mask_bbox_xywh(mask)
            prov = {"source": source, "prompt": kind, "bbox": [round(float(v), 2) for v in bbox]}
            prov["image_sha256"] = image_sha
            prov.update(geometry[i] if geometry is not None else {"mask_sha256": mask_digest(mask)})
            if category_id is not None:  # a given id is kept through bank edits (ntt.bank_edit)
                prov["category_id"] = int(category_id)
            self._refs.setdefault(cls, []).append(_Reference(tensor, mask, bbox, prov))
        self.bank = None
        return len(mask_list)

    def _sam_input(self, pil) -> torch.Tensor:
        """The image stretched to the SAM input frame, exactly as the test stage loads it."""
        from ntt.data.images import sam2_input

        size = int(getattr(self.sam2, "image_size", 1024))
        return sam2_input(pil, size, getattr(self.sam2, "input_resize", "pil_bicubic")).to(self.device)

    # -------------------------------------------------------------------------------------------------
    def build(self, *, progress: bool = True) -> MemoryBank:
        """Encode every reference with DINOv2 into the bank (instance means; prototypes on demand).

        References are encoded by ``ntt.memory.encode_references``, as the benchmark's ``fill_memory``
        encodes its own (same crop, resize, mask pooling, batches of ``matcher.memory.batch_size`` in class
        order then reference order). With a loaded bank, only the references added since are encoded; their
        features are appended to the loaded bank's stored ones (``ntt.bank_edit.merge``): the bank a new
        segmenter would build from all of them, class by class in the loaded bank's order.

        Args:
            progress: show a tqdm bar.

        Returns:
            The :class:`ntt.bank.MemoryBank` (also kept as ``self.bank``).

        Raises:
            ntt.memory.BadReferenceError: a reference whose crop is empty or whose mask is all zero on the
                patch grid.
        """
        from omegaconf import OmegaConf

        from ntt.memory import FillPlan, ReferenceJob, assemble_bank, encode_references

        if not self._refs:
            if self._loaded is not None:
                self.bank = self._loaded
                return self.bank
            raise ValueError("Segmenter.build: no references: call add_reference first")
        names = [n for n in self.class_names if n in self._refs]
        jobs = [
            ReferenceJob(
                cls=ci,
                slot=k,
                description=f"class {name!r} reference {k} ({ref.provenance['source']})",
                provenance=ref.provenance,
                load=ref.load,
            )
            for ci, name in enumerate(names)
            for k, ref in enumerate(self._refs[name])
        ]
        mem = self.memory
        plan = FillPlan.create(
            jobs,
            category_ids=[self._category_ids[n] for n in names],
            category_names=names,
            encoder=self.dinov2,
            context_ratio=mem.context_ratio,
            mask_pooling=str(mem.mask_pooling),
            batch_size=int(mem.batch_size),
            stage="Segmenter.build",
        )
        new = assemble_bank(
            plan,
            [encode_references(plan, self.dinov2, progress=progress)],
            encoder_name=str(self.cfg.backbone.dinov2.name),
            config=drop_inert_keys(
                {
                    k: OmegaConf.to_container(self.cfg[k], resolve=False)
                    for k in ("backbone", "proposer", "matcher")
                }
            ),  # keys added later are recorded only when not at their default: the same bank bytes as before
        )
        if self._loaded is not None:  # the loaded references first, then the new ones; this config
            new = dataclasses.replace(merge(self._loaded, new), config=new.config)
        self.bank = new
        names, counts = self.bank.category_names, self.bank.counts.tolist()
        log.info(
            "reference bank: %d classes, %s references (%s)",
            len(names),
            sum(counts),
            ", ".join(f"{n}: {c}" for n, c in zip(names, counts)),
        )
        return self.bank

    # -------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Save the bank and the segmenter's config to a small file (builds the bank first if needed).

        Args:
            path: output file (any extension; ``.ntt`` by convention).
        """
        if self.bank is None:
            self.build()
        out = self.bank.save(path)
        log.info("reference bank -> %s (%.1f kB)", out, out.stat().st_size / 1e3)
        return out

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        config=None,
        device: str = "auto",
        overrides: Sequence[str] = (),
        sam2=None,
        dinov2=None,
    ) -> Segmenter:
        """A segmenter from a saved bank, with the backbones and settings it was saved with.

        Args:
            path: a file written by :meth:`save` (or by an older ntt's ``Segmenter.save``), or a benchmark
                run's ``memory_postprocessed.pt`` (then pass ``config``).
            config: the config to segment with instead of the one saved in the bank; needed for a benchmark
                run's bank, which records none: ``OmegaConf.load("<run_dir>/config.yaml")``.
            device: ``auto``, ``cpu``, ``cuda``...
            overrides: Hydra overrides applied on top of the saved config (``proposer=cpu_fast``,
                ``proposer.points_per_side=12``, ``backbone/sam2=sam2_hiera_l``, ``paths.checkpoints=/models``);
                the DINOv2 encoder cannot change (the bank holds its features). Not with ``config``.
            sam2: an already built SAM2 backbone (e.g. ``other_segmenter.sam2``) instead of building one.
            dinov2: an already built DINOv2 encoder of the bank's kind instead of building one.
        """
        from omegaconf import DictConfig, OmegaConf

        bank = MemoryBank.load(path)
        if config is not None and overrides:
            raise ValueError("Segmenter.load: give config or overrides, not both (edit the config instead)")
        if config is None:
            if not bank.config:
                raise ValueError(
                    f"{path} records no segmenter config (a benchmark run's memory bank): pass "
                    "config=OmegaConf.load('<run_dir>/config.yaml')"
                )
            config = saved_config(bank.config, overrides)
        elif not isinstance(config, DictConfig):
            config = OmegaConf.create(config)
        if str(config.backbone.dinov2.name) != bank.encoder:
            raise ValueError(
                f"{path} holds {bank.encoder} features but the config's DINOv2 is {config.backbone.dinov2.name}: "
                "rebuild the bank with that encoder"
            )
        seg = cls(config, device=device, sam2=sam2, dinov2=dinov2)
        seg.use_bank(bank)
        return seg

    def use_bank(self, bank: MemoryBank) -> None:
        """Segment with ``bank`` (e.g. ``MemoryBank.load(path)``) instead of references added so far.

        Args:
            bank: a bank of this segmenter's DINOv2 encoder. References added afterwards are appended to
                it by :meth:`build`.
        """
        if bank.encoder != str(self.cfg.backbone.dinov2.name):
            raise ValueError(
                f"the bank holds {bank.encoder} features but the DINOv2 encoder is "
                f"{self.cfg.backbone.dinov2.name}: rebuild the bank"
            )
        self._refs = {}
        self._loaded = bank
        self.bank = bank
        self._category_ids = dict(zip(bank.category_names, bank.category_ids))

    # -------------------------------------------------------------------------------------------------
    def estimate_seconds_per_image(self, params: InferenceParams | None = None) -> float | None:
        """A rough a-priori time per image on this device (``ntt.utils.speed``); None when unknown (GPU).

        Args:
            params: settings to estimate for (default: ``self.params``).
        """
        from ntt.utils.speed import estimate_seconds_per_image

        return estimate_seconds_per_image(
            sam2=str(self.cfg.backbone.sam2.name),
            dinov2=str(self.cfg.backbone.dinov2.name),
            points_per_side=(params or self.params).points_per_side,
            device=self.device,
        )

    def predict(
        self,
        images,
        *,
        classes: Sequence[str] | None = None,
        progress: bool = True,
        keep_image: bool = True,
        outputs: str = "masks",
        **params,
    ):
        """Segment one image, a list of images, or every image of a folder.

        Args:
            images: an image (path, ``PIL.Image``, array, tensor), a list of them, or a folder path (its
                ``*.overlay.png`` files, overlays written by an earlier run, are skipped).
            classes: look for these classes only (names of the bank; default: all): the results are those
                of a bank holding only these classes (their category ids kept).
            progress: tqdm bar for lists and folders.
            keep_image: keep the RGB image on each result (for :meth:`Instances.overlay`).
            outputs: ``masks`` (default) or ``boxes``: boxes, labels and scores only (``Instances.masks`` is
                None; no full-resolution mask is kept or upsampled for the output; the boxes, labels and
                scores equal those of ``masks``).
            **params: any :class:`ntt.inference.InferenceParams` field for this call only
                (``points_per_side``, ``points_batch_size``, ``iou_thr``, ``nms_thr``, ``num_out``,
                ``nms_cap_factor``, ``pooling``, ``drop_empty_masks``, ``box_plus_one``).

        Returns:
            :class:`Instances` for one image; a list of them for a list or a folder (in input order). Each
            holds full-resolution masks: for many large images prefer :meth:`iter_predict`, which yields
            them one at a time.
        """
        single = not isinstance(images, (list, tuple)) and not (
            isinstance(images, (str, os.PathLike)) and Path(images).is_dir()
        )
        _check_outputs(outputs)
        p = self._call_params(params)  # before the bank: a refused setting costs no encoding
        if single:
            bank = self._call_bank(classes)
            return self._predict_one(images, p, bank, keep_image=keep_image, outputs=outputs)
        if isinstance(images, (str, os.PathLike)):
            items = skip_own_outputs(list_images(images), None, images)
            if not items:
                raise ValueError(f"no image files in {images} besides the overlays ntt wrote (*.overlay.png)")
        else:
            items = list(images)
        return list(
            self.iter_predict(
                items, params=p, classes=classes, progress=progress, keep_image=keep_image, outputs=outputs
            )
        )

    def iter_predict(
        self,
        items: Iterable,
        *,
        params: InferenceParams | None = None,
        classes: Sequence[str] | None = None,
        progress: bool = True,
        keep_image: bool = True,
        errors: str = "raise",
        outputs: str = "masks",
    ):
        """Yield :class:`Instances` image by image, logging the expected time first (see :meth:`predict`).

        Args:
            items: images (paths, PIL images, arrays, tensors).
            params: settings (default: ``self.params``).
            classes: look for these classes only (see :meth:`predict`).
            progress: tqdm bar.
            keep_image: keep the RGB image on each result.
            errors: ``raise`` stops at the first failing image; ``yield`` yields its exception instead of
                a result and goes on with the next image.
            outputs: ``masks`` or ``boxes`` (see :meth:`predict`).
        """
        from tqdm import tqdm

        _check_outputs(outputs)
        if errors not in ("raise", "yield"):
            raise ValueError(f"iter_predict: errors must be 'raise' or 'yield', got {errors!r}")
        items = list(items)
        p = params or self.params
        bank = self._call_bank(classes)
        est = self.estimate_seconds_per_image(p)
        log.info(
            "segmenting %d image(s) on %s with a %dx%d prompt grid: %s",
            len(items),
            self.device,
            p.points_per_side,
            p.points_per_side,
            f"expect about {format_seconds(est)} per image (rough estimate; the measured time follows the first "
            "image)"
            if est is not None
            else "the time per image is logged after the first one",
        )
        # the bar counts finished images (a bar over the items counts started ones: it stopped one short)
        with tqdm(total=len(items), desc="segment", unit="img", disable=not progress) as bar:
            for i, item in enumerate(items):
                t0 = time.perf_counter()
                try:
                    result = self._predict_one(item, p, bank, keep_image=keep_image, outputs=outputs)
                except Exception as err:
                    if errors == "raise":
                        raise
                    result = err
                bar.update(1)
                if i == 0:
                    dt = time.perf_counter() - t0
                    log.info(
                        "first image took %s%s",
                        format_seconds(dt),
                        f"; the remaining {len(items) - 1} should take about "
                        f"{format_seconds(dt * (len(items) - 1))}"
                        if len(items) > 1
                        else "",
                    )
                yield result

    def _prototypes(self, bank: MemoryBank) -> torch.Tensor:
        """The bank's prototypes on the device, computed once per bank state, not once per image: a ragged
        bank's are a loop over its C classes (docs/performance.md, "Scale"). Recomputed when the bank object,
        its tensors or their in-place versions change, so an edited bank is never served stale values."""
        tensors = (bank.instance_means, bank.weight_sums, bank.counts)
        # the objects themselves are held (not their ids, which a freed object's successor may reuse)
        state = (tuple(int(getattr(t, "_version", 0)) for t in tensors), list(bank.category_ids))
        state += (repr(bank.fill_settings),)
        cached = getattr(self, "_protos_cache", None)
        if (
            cached is None
            or cached[0] is not bank
            or any(a is not b for a, b in zip(cached[1], tensors))
            or cached[2] != state
        ):
            self._protos_cache = (bank, tensors, state, bank.prototypes().to(self.device))
        return self._protos_cache[3]

    def _call_params(self, params: Mapping[str, Any]) -> InferenceParams:
        known = {f.name for f in dataclasses.fields(InferenceParams)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise TypeError(f"predict: unknown setting(s) {unknown}; known: {sorted(known)}")
        return check_segmenter_params(dataclasses.replace(self.params, **params))

    def _call_bank(self, classes: Sequence[str] | None) -> MemoryBank:
        """The bank of one predict call: built if needed, then the subset of ``classes`` (when given)."""
        if self.bank is None:
            if not self._refs:
                raise ValueError(
                    "Segmenter.predict: no references: add_reference (or load a saved bank) first"
                )
            self.build()
        if self.bank.encoder != str(self.cfg.backbone.dinov2.name):
            raise ValueError(
                f"the bank holds {self.bank.encoder} features but the DINOv2 encoder is "
                f"{self.cfg.backbone.dinov2.name}: rebuild the bank"
            )
        return self.bank if classes is None else subset(self.bank, classes, what="predict(classes=...)")

    def _predict_one(
        self,
        image,
        params: InferenceParams,
        bank: MemoryBank,
        *,
        keep_image: bool = True,
        outputs: str = "masks",
    ) -> Instances:
        from ntt.inference import infer_image

        check_segmenter_params(params)  # also `self.params` changed by hand, or iter_predict's params

        pil, path = read_image(image)
        width, height = pil.size
        image_sam = self._sam_input(pil)
        protos = self._prototypes(bank)
        det, _ = infer_image(
            image_sam, height, width, sam2=self.sam2, dino=self.dinov2, prototypes=protos, params=params,
            keep_masks=outputs == "masks",
        )  # fmt: skip
        return Instances(
            masks=None if det.masks is None else det.masks.cpu(),
            boxes=det.boxes_xyxy.cpu(),
            scores=det.scores.cpu(),
            labels=det.labels.cpu(),
            names=list(bank.category_names),
            category_ids=list(bank.category_ids),
            height=height,
            width=width,
            path=path,
            image=pil if keep_image else None,
            box_plus_one=params.box_plus_one,
        )


OUTPUT_KINDS = ("masks", "boxes")


def _check_outputs(outputs: str) -> None:
    if outputs not in OUTPUT_KINDS:
        raise ValueError(f"predict: outputs must be one of {OUTPUT_KINDS}, got {outputs!r}")
