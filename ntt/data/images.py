"""Image loading exactly as the reference code does it (ALGORITHM sections 2 and 12b items 4-5).

The reference reads every image with ``PIL.Image.open(path).convert("RGB")`` and resizes it with PIL's
default filter (BICUBIC, antialiased in Pillow >= 10), then divides the uint8 array by 255 in float64 and
casts to float32. No EXIF orientation is applied. Doing the same here is bit-exact with the reference.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = ["load_rgb", "pil_to_tensor", "load_test_image", "load_reference_image", "resize_pil"]


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, like the reference (no EXIF transpose).

    Non-RGB modes follow PIL's ``convert("RGB")`` (L replicated, RGBA alpha dropped, P via its palette).

    Args:
        path: image file.

    Returns:
        The decoded RGB ``PIL.Image`` (fully loaded; the file is closed).

    Raises:
        FileNotFoundError: the file does not exist.
        OSError: the file exists but PIL cannot decode it (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path} (check the dataset image root / file_name)")
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err
    return rgb


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert an RGB PIL image to a float32 ``[3, H, W]`` tensor in [0, 1].

    Computed as the reference does: ``uint8 / 255.0`` in float64, then cast to float32.

    Args:
        img: an RGB PIL image (mode "RGB", uint8).

    Returns:
        float32 tensor ``[3, H, W]``.
    """
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an 8-bit RGB image, got mode={img.mode!r} array {arr.dtype}{arr.shape}")
    arr64 = arr / 255.0
    return torch.from_numpy(arr64).permute(2, 0, 1).to(torch.float32).contiguous()


def resize_pil(img: Image.Image, width: int, height: int) -> Image.Image:
    """Resize with PIL's default filter, exactly as ``img.resize((width, height))`` (a no-op copy if equal).

    Args:
        img: PIL image.
        width: output width.
        height: output height.
    """
    return img.resize((int(width), int(height)))


def load_test_image(path: str | os.PathLike, size: int = 1024) -> torch.Tensor:
    """Load a target image stretched to ``size x size`` (aspect ratio not kept), as the reference test set.

    Args:
        path: image file.
        size: output side (1024 for SAM2).

    Returns:
        float32 ``[3, size, size]`` in [0, 1].
    """
    return pil_to_tensor(resize_pil(load_rgb(path), size, size))


def load_reference_image(path: str | os.PathLike, height: int, width: int) -> torch.Tensor:
    """Load a reference image in the frame of the annotation json (``height`` x ``width``).

    The reference resizes to the json size with PIL; when the decoded size already equals it this is an
    exact no-op. A different decoded size is resized (and logged), like the reference (12b item 5).

    Args:
        path: image file.
        height: the json image entry's ``height``.
        width: the json image entry's ``width``.

    Returns:
        float32 ``[3, height, width]`` in [0, 1].
    """
    img = load_rgb(path)
    if img.size != (int(width), int(height)):
        logger.warning(
            "image %s decodes to %dx%d (WxH) but the annotation json says %dx%d: resizing to the json size "
            "as the reference does",
            path,
            img.size[0],
            img.size[1],
            width,
            height,
        )
        img = resize_pil(img, width, height)
    return pil_to_tensor(img)
