"""The box -> mask models of ``ntt prepare`` (:func:`build_masker`): one mask per box prompt, full resolution.

* ``sam_vit_h`` (the authors' choice): SAM v1 ViT-H through the ``segment-anything`` package, called as
  the authors call it (``ResizeLongestSide(1024)`` + ``Sam.forward``). That package imports torchvision,
  which ntt does not install: ``pip install segment-anything torchvision`` (a torchvision matching your
  torch) on the machine that makes the masks; it is imported only when this model is asked for.
  Weights: ``ntt download sam_vit_h``.
* ``sam2:<backbone>`` (``sam2:sam2_hiera_l``, ``sam2:tiny_random`` ...): one of ntt's SAM2 backbone
  configs (``conf/backbone/sam2/``), image stretched to 1024x1024 like ntt's test images, the box
  prompt decoded with the single-mask output (SAM2's stability fallback applied as SAM2ImagePredictor
  does), logits upsampled bilinearly to full resolution. Not what the paper used: its masks differ.

A masker is a callable ``(image_path, boxes_xywh, height, width) -> [N, H, W] bool`` with an ``info`` dict
(what made the masks); :func:`ntt.prepare.box_to_mask.add_masks` runs one over a json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ntt.prepare.contours import opencv_available
from ntt.prepare.errors import PrepareError

MASK_MODELS_HELP = "sam_vit_h (the paper's) or sam2:<conf/backbone/sam2 option>, e.g. sam2:sam2_hiera_l"


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
        if backbone.input_resize != "pil_bicubic":  # recorded only then: earlier outputs keep their bytes
            self.info["input_resize"] = backbone.input_resize

    def __call__(
        self, image_path: Path, boxes_xywh: list[list[float]], height: int, width: int
    ) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        from ntt.data.images import load_test_image

        size = self.backbone.image_size
        image = load_test_image(image_path, size, resize=self.backbone.input_resize).to(self.backbone.device)
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
        from ntt.utils.compose import conf_path

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


# Pillow's convert("RGB") equals cv2.imread + BGR->RGB on these modes (alpha dropped by both)
PILLOW_AS_OPENCV = ("RGB", "L", "P", "1", "RGBA", "LA")


def _read_rgb_uint8(path: Path) -> np.ndarray:
    """[H, W, 3] uint8 RGB exactly as the authors' ``cv2.imread`` + BGR->RGB: OpenCV when installed, else Pillow.

    Pillow gives OpenCV's pixels (compared with OpenCV 5.1 / Pillow 13; tests/test_prepare_masks_sam.py) for
    the 8-bit modes in `PILLOW_AS_OPENCV` and, through :func:`cmyk_jpeg_to_rgb`, for CMYK JPEGs (Pillow's
    own CMYK -> RGB rounds differently: 1 off in most pixels). Other modes (16-bit, CMYK TIFF, ...) decode
    differently in the two libraries and are refused rather than made into other masks.
    """
    if opencv_available():
        import cv2

        image = cv2.imread(str(path))
        if image is None:
            raise PrepareError(f"cannot read image {path}")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        fmt, mode = im.format, im.mode
        # cv2.imread applies the EXIF orientation: so does this fallback
        upright = ImageOps.exif_transpose(im)
        if mode == "CMYK" and fmt == "JPEG":
            return cmyk_jpeg_to_rgb(np.asarray(upright))
        if mode not in PILLOW_AS_OPENCV:
            raise PrepareError(
                f"image {path} is {fmt} mode {mode}, which Pillow does not decode as OpenCV does (the authors' "
                "reader): install OpenCV (pip install opencv-python-headless), or save the image as 8-bit RGB"
            )
        return np.asarray(upright.convert("RGB"))


def cmyk_jpeg_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """RGB of a CMYK JPEG's pixels as OpenCV computes it (``icvCvt_CMYK2BGR_8u_C4C3R`` in grfmt_jpeg).

    Args:
        cmyk: [H, W, 4] uint8 as Pillow decodes a CMYK JPEG (Adobe convention: Pillow inverts the stored
            values, so the stored, libjpeg ones are ``255 - cmyk``).

    Returns:
        [H, W, 3] uint8: per channel ``k - ((255 - c) * k >> 8)`` on the stored values, OpenCV's integer
        formula (Pillow rounds ``c * k / 255`` instead).
    """
    stored = 255 - cmyk.astype(np.int32)
    k = stored[..., 3:]
    return (k - (((255 - stored[..., :3]) * k) >> 8)).astype(np.uint8)
