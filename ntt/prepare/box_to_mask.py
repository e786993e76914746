"""Box annotations -> instance masks (docs/method.md §1.5): the step that makes `*_with_segm.json`.

Benchmarks with boxes only (PASCAL VOC, the CD-FSOD sets) get pseudo instance masks from a promptable
segmenter, exactly as the authors made them:

* per image, every annotation's box (``iscrowd`` ones included) is a box prompt, in one batched call;
* one mask per box (``multimask_output=False``), binarised (logit > 0) at the image's full resolution;
* each mask becomes COCO polygons through its *outer* contours (``cv2.findContours`` RETR_EXTERNAL +
  CHAIN_APPROX_SIMPLE, or the exact port in :mod:`ntt.prepare.contours`): holes are lost, contours of
  <= 2 points are dropped, and when nothing survives the box rectangle is the polygon;
* ``area`` becomes the mask's pixel count (even when the rectangle was used);
* images without annotations are kept, moved to the end of the image list; all other keys are kept.

Two mask models (:func:`build_masker`):

* ``sam_vit_h`` (the authors' choice): SAM v1 ViT-H through the ``segment-anything`` package, called as
  the authors call it (``ResizeLongestSide(1024)`` + ``Sam.forward``). That package imports torchvision,
  which ntt does not install: ``pip install segment-anything torchvision`` (a torchvision matching your
  torch) on the machine that makes the masks; it is imported only when this model is asked for.
  Weights: ``ntt download sam_vit_h``.
* ``sam2:<backbone>`` (``sam2:sam2_hiera_l``, ``sam2:tiny_random`` ...): one of ntt's SAM2 backbone
  configs (``conf/backbone/sam2/``), image stretched to 1024x1024 like ntt's test images, the box
  prompt decoded with the single-mask output (SAM2's stability fallback applied as SAM2ImagePredictor
  does), logits upsampled bilinearly to full resolution. Not what the paper used: its masks differ.

The step is resumable: each finished image is a line in ``<output>.partial.jsonl``; a rerun skips them
(if the input json, the mask model and the contour tracer are unchanged) and an image that fails is
recorded and retried on the next run, never losing the others. The output json records what made the masks under
``"ntt_masks"`` (model, checkpoint, contour backend, source json and its sha256).
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ntt.prepare.contours import BACKENDS, external_contours, opencv_available
from ntt.utils.errors import UserError
from ntt.utils.files import sha256_file

log = logging.getLogger(__name__)

MASK_MODELS_HELP = "sam_vit_h (the paper's) or sam2:<conf/backbone/sam2 option>, e.g. sam2:sam2_hiera_l"


class PrepareError(UserError, RuntimeError):
    """Data preparation cannot go on: the message names the file and what to do."""


# --------------------------------------------------------------------------------------------------
# Masks -> COCO polygons


def mask_to_polygons(mask: np.ndarray, bbox: Sequence[float], contour_backend: str = "auto") -> list[list]:
    """COCO polygons of a binary mask from its outer contours, the authors' way.

    Args:
        mask: [H, W] binary mask at the image's resolution.
        bbox: the annotation's COCO box [x, y, w, h] (the fallback polygon when no contour survives).
        contour_backend: ``auto``, ``opencv`` or ``python`` (see :mod:`ntt.prepare.contours`).

    Returns:
        A list of flat [x0, y0, x1, y1, ...] integer polygons; contours with <= 2 points are dropped and
        the box rectangle [x, y, x+w, y, x+w, y+h, x, y+h] is returned when none is left.
    """
    polygons = []
    for contour in external_contours(mask, contour_backend):
        flat = contour.reshape(-1).tolist()
        if len(flat) > 4:  # more than two points
            polygons.append(flat)
    if not polygons:
        x, y, w, h = bbox
        polygons = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return polygons


# --------------------------------------------------------------------------------------------------
# Mask models


class SamViTHMasker:
    """SAM v1 (``segment-anything``) box prompts, as the authors ran it.

    Args:
        checkpoint: ``sam_vit_h_4b8939.pth`` (``ntt download sam_vit_h``).
        model_type: ``vit_h`` (paper), ``vit_l`` or ``vit_b``.
        device: torch device.
        max_boxes: boxes per mask-decoder call (the authors' 50; the image is encoded once per image).
    """

    def __init__(
        self, checkpoint: str | Path, *, model_type: str = "vit_h", device: str = "cpu", max_boxes: int = 50
    ):
        if max_boxes < 1:
            raise PrepareError(f"max_boxes must be >= 1, got {max_boxes}")
        try:
            from segment_anything import sam_model_registry
            from segment_anything.utils.transforms import ResizeLongestSide
        except Exception as exc:  # ImportError, or RuntimeError from a torchvision built for another torch
            raise PrepareError(
                "mask model sam_vit_h needs the `segment-anything` package and torchvision (which ntt does "
                "not install): `pip install segment-anything torchvision` with a torchvision that matches "
                f"your torch ({type(exc).__name__}: {exc}). Or use an ntt SAM2 backbone: "
                "--mask-model sam2:sam2_hiera_l"
            ) from exc
        from ntt.backbones.checkpoints import resolve_checkpoint

        path = resolve_checkpoint(checkpoint, name=f"sam_{model_type}")
        try:  # segment-anything's builder: torch.load + strict load_state_dict
            sam = sam_model_registry[model_type](checkpoint=str(path))
        except Exception as exc:
            raise PrepareError(
                f"{path} is not a SAM {model_type} checkpoint that segment-anything can load "
                f"({type(exc).__name__}: {str(exc)[:300]}); the official file is sam_{model_type}_*.pth "
                "(`ntt download sam_vit_h` for ViT-H)"
            ) from exc
        self._sam = sam.to(device).eval()
        self._resize = ResizeLongestSide(self._sam.image_encoder.img_size)
        self.device = device
        self.max_boxes = int(max_boxes)
        self.info = {
            "model": f"sam_{model_type}",
            "package": "segment-anything",
            "checkpoint": path.name,
            "image_reader": "cv2" if opencv_available() else "PIL",
        }

    def __call__(
        self, image_path: Path, boxes_xywh: list[list[float]], height: int, width: int
    ) -> np.ndarray:
        import torch

        sam = self._sam
        image = _read_rgb_uint8(image_path)
        size = image.shape[:2]
        tensor = torch.as_tensor(self._resize.apply_image(image), device=self.device)
        tensor = tensor.permute(2, 0, 1).contiguous()
        masks = []
        with torch.no_grad():
            # The body of `Sam.forward` for one image, with the image encoded ONCE: the authors called
            # `sam([...], multimask_output=False)` per chunk of `max_boxes` boxes, which re-encodes the
            # same image for every chunk (same embedding, so the same masks; checked against Sam.forward
            # in tests/test_prepare_masks_sam.py).
            embedding = sam.image_encoder(torch.stack([sam.preprocess(tensor)], dim=0))[0]
            for start in range(0, len(boxes_xywh), self.max_boxes):
                xyxy = [[x, y, x + w, y + h] for x, y, w, h in boxes_xywh[start : start + self.max_boxes]]
                boxes = self._resize.apply_boxes_torch(torch.tensor(xyxy, device=self.device), size)
                sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
                low_res, _ = sam.mask_decoder(
                    image_embeddings=embedding.unsqueeze(0),
                    image_pe=sam.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )
                full = sam.postprocess_masks(low_res, input_size=tensor.shape[-2:], original_size=size)
                masks.append((full > sam.mask_threshold)[:, 0].cpu().numpy())
        return np.concatenate(masks, axis=0)


class Sam2BoxMasker:
    """Box prompts through one of ntt's SAM2 backbones (the alternative to SAM ViT-H).

    Args:
        backbone: a built :class:`ntt.backbones.sam2.SAM2Backbone`.
        max_boxes: boxes per decoder call.
    """

    def __init__(self, backbone, *, max_boxes: int = 64):
        self.backbone = backbone
        self.max_boxes = int(max_boxes)
        self.info = {"model": f"sam2:{backbone.name}", "package": "ntt", "image_reader": "PIL"}

    def __call__(
        self, image_path: Path, boxes_xywh: list[list[float]], height: int, width: int
    ) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        from ntt.data.images import load_test_image

        size = self.backbone.image_size
        image = load_test_image(image_path, size).to(self.backbone.device)
        decoder = self.backbone.model.sam_mask_decoder
        out = []
        with torch.inference_mode():
            feats = self.backbone.encode_image(image[None])
            scale = torch.tensor([size / width, size / height] * 2, dtype=torch.float32)
            for start in range(0, len(boxes_xywh), self.max_boxes):
                chunk = boxes_xywh[start : start + self.max_boxes]
                xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in chunk], dtype=torch.float32)
                logits, ious = self.backbone.decode(feats, boxes=(xyxy * scale).to(self.backbone.device))
                if getattr(decoder, "dynamic_multimask_via_stability", False):
                    logits, _ = decoder._dynamic_multimask_via_stability(logits, ious)
                low = logits[:, :1]
                full = F.interpolate(low, (height, width), mode="bilinear", align_corners=False)
                out.append((full[:, 0] > 0).cpu().numpy())
        return np.concatenate(out, axis=0)


def build_masker(
    model: str = "sam_vit_h",
    *,
    checkpoint_dir: str | Path | None = None,
    device: str = "cpu",
):
    """The mask model named on the command line.

    Args:
        model: ``sam_vit_h`` (the paper's; also ``sam_vit_l`` / ``sam_vit_b``) or ``sam2:<option>`` with an
            option of ``conf/backbone/sam2`` (e.g. ``sam2:sam2_hiera_l``, ``sam2:tiny_random`` for tests).
        checkpoint_dir: where the weight files are (default ``$NTT_CHECKPOINTS`` or ``./checkpoints``).
        device: torch device (``cuda`` on a GPU machine; SAM ViT-H on a CPU takes ~minutes per image).
    """
    from ntt.backbones.checkpoints import default_checkpoint_dir

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else default_checkpoint_dir()
    if model in ("sam_vit_h", "sam_vit_l", "sam_vit_b"):
        files = {
            "sam_vit_h": "sam_vit_h_4b8939.pth",
            "sam_vit_l": "sam_vit_l_0b3195.pth",
            "sam_vit_b": "sam_vit_b_01ec64.pth",
        }
        return SamViTHMasker(ckpt_dir / files[model], model_type=model[4:], device=device)
    if model.startswith("sam2:"):
        from omegaconf import OmegaConf

        from ntt.backbones.sam2 import build_sam2
        from ntt.utils.config import conf_path

        option = model.split(":", 1)[1]
        yaml = Path(str(conf_path())) / "backbone" / "sam2" / f"{option}.yaml"
        if not yaml.is_file():
            raise PrepareError(
                f"--mask-model {model}: no conf/backbone/sam2/{option}.yaml ({MASK_MODELS_HELP})"
            )
        node = OmegaConf.load(yaml)
        node = OmegaConf.merge({"paths": {"checkpoints": str(ckpt_dir)}}, {"b": node})
        cfg = OmegaConf.to_container(node, resolve=True)["b"]
        cfg.pop("_target_", None)
        return Sam2BoxMasker(build_sam2(**cfg, device=device))
    raise PrepareError(f"unknown mask model {model!r}: use {MASK_MODELS_HELP}")


def _read_rgb_uint8(path: Path) -> np.ndarray:
    """[H, W, 3] uint8 RGB: OpenCV's decoder as the authors used it when available, else Pillow."""
    if opencv_available():
        import cv2

        image = cv2.imread(str(path))
        if image is None:
            raise PrepareError(f"cannot read image {path}")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    from PIL import Image, ImageOps

    # cv2.imread applies the EXIF orientation: so does this fallback (same pixels on JPEGs we compared)
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


# --------------------------------------------------------------------------------------------------
# A whole json


def with_segm_path(input_json: str | Path) -> Path:
    """``x.json`` -> ``x_with_segm.json`` (the authors' naming)."""
    p = Path(input_json)
    return p.with_name(p.stem + "_with_segm.json")


def add_masks(
    input_json: str | Path,
    image_dir: str | Path,
    masker,
    *,
    output_json: str | Path | None = None,
    contour_backend: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Give every annotation of a box json a mask from `masker`; write ``*_with_segm.json``.

    Args:
        input_json: COCO json with boxes.
        image_dir: folder the json's ``file_name`` values are relative to.
        masker: a callable ``(image_path, boxes_xywh, height, width) -> [N, H, W] bool`` with an ``info``
            dict (see :func:`build_masker`).
        output_json: default: ``<input stem>_with_segm.json`` beside the input.
        contour_backend: ``auto`` / ``opencv`` / ``python`` (identical polygons).
        progress: tqdm bar over images.
        overwrite: redo an output that already exists (default: keep it, as the authors' script does).

    Returns:
        The output path.

    Raises:
        PrepareError: missing input, or some images failed (they are listed; the others are kept in the
            partial file and a rerun retries only the failed ones).
    """
    from tqdm import tqdm

    input_json, image_dir = Path(input_json), Path(image_dir)
    out = Path(output_json) if output_json is not None else with_segm_path(input_json)
    if out.exists() and not overwrite:
        log.info("%s exists: kept (pass --overwrite to redo it)", out)
        return out
    if not input_json.is_file():
        raise PrepareError(f"box annotations not found: {input_json}")
    if not image_dir.is_dir():
        raise PrepareError(f"image folder not found: {image_dir} (the images of {input_json.name})")
    if contour_backend not in BACKENDS:
        raise PrepareError(f"contour backend {contour_backend!r} is not one of {BACKENDS}")
    data = json.loads(input_json.read_text())
    source_sha = sha256_file(input_json)
    contours = (
        "opencv"
        if contour_backend == "opencv" or (contour_backend == "auto" and opencv_available())
        else "python"
    )
    # the tracer is part of what made the stored polygons: a resume with another one starts afresh, so the
    # recorded "contours" is true of every polygon
    header = {"source_sha256": source_sha, "model": masker.info, "contours": contours}
    by_image: dict[int, list[dict]] = {}
    for ann in data.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann)
    image_ids = {im["id"] for im in data["images"]}
    orphans = [a["id"] for a in data.get("annotations", []) if a["image_id"] not in image_ids]
    if orphans:
        log.warning(
            "%s: %d annotations refer to no image (left as they are): %s",
            input_json,
            len(orphans),
            orphans[:5],
        )
    done = _read_partial(out, header)
    todo = [im for im in data["images"] if im["id"] in by_image and im["id"] not in done]
    log.info(
        "masks for %s with %s: %d images with boxes, %d done, %d to do",
        input_json.name, masker.info["model"], sum(1 for im in data["images"] if im["id"] in by_image), len(done), len(todo),
    )  # fmt: skip
    partial = _partial_path(out)
    failed: dict[int, str] = {}
    with open(partial, "a") as sink:
        if partial.stat().st_size == 0:
            sink.write(json.dumps({"header": header}) + "\n")
        for im in tqdm(todo, desc=f"masks {input_json.name}", unit="img", disable=not progress):
            anns = by_image[im["id"]]
            try:
                masks = masker(
                    image_dir / im["file_name"],
                    [a["bbox"] for a in anns],
                    int(im["height"]),
                    int(im["width"]),
                )
                if masks.shape != (len(anns), int(im["height"]), int(im["width"])):
                    raise PrepareError(
                        f"mask model returned {masks.shape} for {len(anns)} boxes on a {im['height']}x{im['width']} image"
                    )
                record = {
                    str(a["id"]): {
                        "segmentation": mask_to_polygons(m, a["bbox"], contour_backend),
                        "area": float(m.sum()),
                    }
                    for a, m in zip(anns, masks)
                }
                line = {"image_id": im["id"], "ok": True, "anns": record}
            except Exception as exc:  # one bad image must not lose the others
                log.error("image %s (%s) failed: %s", im["id"], im["file_name"], exc)
                failed[im["id"]] = f"{type(exc).__name__}: {exc}"
                line = {
                    "image_id": im["id"],
                    "ok": False,
                    "error": failed[im["id"]],
                    "traceback": traceback.format_exc(),
                }
            sink.write(json.dumps(line) + "\n")
            sink.flush()
    if failed:
        raise PrepareError(
            f"{len(failed)} image(s) of {input_json} failed (first: {list(failed.items())[:3]}); the others are kept "
            f"in {partial}: rerun the same command to retry only these"
        )
    done = _read_partial(out, header)
    for ann in data.get("annotations", []):
        rec = done.get(ann["image_id"], {}).get(str(ann["id"]))
        if rec is not None:
            ann["segmentation"] = rec["segmentation"]
            ann["area"] = rec["area"]
    with_anns = [im for im in data["images"] if im["id"] in by_image]
    data["images"] = with_anns + [im for im in data["images"] if im["id"] not in by_image]
    data["ntt_masks"] = {
        **masker.info,
        "contours": contours,
        "source_json": input_json.name,
        "source_sha256": source_sha,
        "created": time.strftime("%Y-%m-%d"),
    }
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, out)
    partial.unlink()
    log.info("wrote %s (%d annotations with masks)", out, sum(len(v) for v in done.values()))
    return out


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.jsonl")


def _read_partial(out: Path, header: dict[str, Any]) -> dict[int, dict]:
    """Finished images of an interrupted run (image id -> ann id -> record); stale files are set aside."""
    partial = _partial_path(out)
    if not partial.exists():
        return {}
    done: dict[int, dict] = {}
    with open(partial) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    try:
        first = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        first = {}
    if first.get("header") != json.loads(json.dumps(header)):
        stale = partial.with_name(partial.name + f".stale-{int(time.time())}")
        log.warning("%s was made from another input or model: moved to %s", partial, stale)
        partial.rename(stale)
        return {}
    for raw in lines[1:]:
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:  # a line cut by a kill: that image is simply redone
            continue
        if rec.get("ok"):
            done[rec["image_id"]] = rec["anns"]
        else:
            done.pop(rec["image_id"], None)
    return done
