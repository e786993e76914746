"""Image loading: exactly as the reference code for 8-bit images, correct or clearly rejected otherwise.

The reference reads every image with ``PIL.Image.open(path).convert("RGB")`` and resizes it with PIL's
default filter (BICUBIC, antialiased in Pillow >= 10), then divides the uint8 array by 255 in float64 and
casts to float32 (docs/method.md §2, §12b items 4-5). For 8-bit images (RGB, L, 1, P, PA, RGBA, LA,
CMYK, ...) we do the same, byte for byte. Where that would be silently wrong we deviate (no benchmark
dataset holds such images, so parity is unaffected):

* 16-bit grayscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) and 32-bit integer (``I``): PIL's
  ``convert("RGB")`` clips every value above 255 (a 16-bit photo comes out all white). We map the full
  16-bit range linearly to 8 bits: ``round(v / 257)`` (0 -> 0, 65535 -> 255); ``I`` values outside
  [0, 65535] are clipped, with a warning naming the file.
* 32-bit float (``F``): taken as intensities in [0, 1] (the float-image convention): ``round(v * 255)``;
  values outside [0, 1] are clipped, with a warning naming the file and the range found.
* Alpha (``RGBA``, ``LA``, ``PA``, ``P`` with transparency) is dropped, not composited: a transparent
  pixel keeps the colour stored under it (what ``convert("RGB")`` does, so parity holds).
* EXIF orientation: off for the benchmark datasets (``dataset.exif_orientation: false``; the reference
  ignores it and their annotations are in the stored frame). A file whose tag asks for a rotation that the
  run ignores is logged once as a warning. On (``apply_exif=True``, the practitioner path), the image is
  transposed to the upright frame first.
* A decoded size that disagrees with the annotation json's ``width``/``height`` is an error naming the
  file and both sizes (the reference silently stretches masks or crops into the wrong frame).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ntt.utils.errors import ImageError, ImageNotFoundError, ImageSizeError

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "read_image",
    "image_digest",
    "list_images",
    "read_image_rgb",
    "exif_orientation",
    "check_image_size",
    "load_rgb",
    "pil_to_tensor",
    "load_test_image",
    "sam2_input",
    "SAM2_RESIZES",
    "load_long_side_input",
    "load_reference_image",
    "resize_pil",
]

EXIF_ORIENTATION_TAG = 0x0112
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
FLOAT_MODES = {"F"}
_warned_exif: set[str] = set()
# How an image is stretched to SAM2's square input (``backbone.sam2.input_resize``, method.md §5.11):
# NTT's code resizes the uint8 image with PIL (bicubic); SAM2's own ``SAM2ImagePredictor`` (FSOD-VFM) divides
# by 255 first and resizes the float tensor with torchvision's ``Resize`` (bilinear, antialiased).
SAM2_RESIZES = ("pil_bicubic", "bilinear_antialias")


def exif_orientation(img: Image.Image) -> int:
    """The EXIF Orientation tag of an opened image (1 = upright, also when absent or unreadable).

    Args:
        img: an opened PIL image.
    """
    try:
        value = img.getexif().get(EXIF_ORIENTATION_TAG, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:  # noqa: BLE001 - a broken EXIF block means no usable orientation
        return 1


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (see the module docstring for the choices)."""
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES or mode in FLOAT_MODES:
        arr = np.asarray(img)
        if mode in FLOAT_MODES:
            lo, hi, scale = 0.0, 1.0, 255.0
        else:
            lo, hi, scale = 0, 65535, 1.0 / 257.0
        finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
        if finite.size and (finite.min() < lo or finite.max() > hi):
            logger.warning(
                "image %s (mode %s) has values in [%s, %s], outside the expected [%s, %s]: clipped. "
                "Convert it to 8-bit to control how it is scaled.",
                path,
                mode,
                finite.min(),
                finite.max(),
                lo,
                hi,
            )
        scaled = np.clip(np.nan_to_num(arr.astype(np.float64), nan=0.0) * scale, 0, 255)
        gray = Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    with warnings.catch_warnings():
        # "Palette images with Transparency expressed in bytes should be converted to RGBA images":
        # the alpha is dropped on purpose (documented above)
        warnings.simplefilter("ignore", UserWarning)
        try:
            return img.convert("RGB")
        except ValueError as err:
            raise ImageError(f"cannot convert image {path} (mode {mode}) to RGB: {err}") from err


def read_image_rgb(path: str | os.PathLike, *, apply_exif: bool) -> Image.Image:
    """Read an image file as 8-bit RGB, correctly for every common mode.

    8-bit images decode exactly as the reference's ``Image.open(path).convert("RGB")``; 16/32-bit
    grayscale and float images are scaled to 8 bits instead of clipped (module docstring).

    Args:
        path: image file.
        apply_exif: transpose to the EXIF orientation (practitioner data). When false (benchmark datasets,
            parity) the stored frame is kept and a file asking for a rotation is logged once.

    Returns:
        The decoded RGB ``PIL.Image`` (fully loaded; the file is closed).

    Raises:
        ImageError: the file is missing, or PIL cannot decode it (corrupt, truncated, not an image); the
            message names the file. (An ``OSError``, so callers catching that keep working.)
    """
    path = Path(path)
    if not path.is_file():
        raise ImageNotFoundError(f"image file not found: {path} (check the dataset image root / file_name)")
    try:
        with Image.open(path) as img:
            orientation = exif_orientation(img)
            if apply_exif and orientation != 1:
                img = ImageOps.exif_transpose(img)
            elif orientation != 1 and str(path) not in _warned_exif:
                _warned_exif.add(str(path))
                logger.warning(
                    "image %s carries EXIF orientation %d (a rotation/flip) that this run ignores "
                    "(dataset.exif_orientation=false): it is read in its stored frame, as its annotations "
                    "are assumed to be. Set dataset.exif_orientation=true if they are in the upright frame.",
                    path,
                    orientation,
                )
            img.load()
            rgb = _to_rgb(img, path)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    return rgb


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB in its stored frame, like the reference (no EXIF transpose).

    Args:
        path: image file.
    """
    return read_image_rgb(path, apply_exif=False)


def check_image_size(
    img: Image.Image, path: str | os.PathLike, height: int, width: int, *, apply_exif: bool
) -> None:
    """Raise when the decoded size disagrees with the annotation json's ``height`` / ``width``.

    Args:
        img: the decoded image (in the frame the run uses).
        path: its file (for the message).
        height: the json image record's ``height``.
        width: the json image record's ``width``.
        apply_exif: whether ``img`` was EXIF-transposed (the message then says which frame matches).

    Raises:
        ImageSizeError: naming the file, the json size and the real size, and what to do.
    """
    real_w, real_h = img.size
    if (real_w, real_h) == (int(width), int(height)):
        return
    hint = "fix the json's width/height (or the file)"
    if (real_h, real_w) == (int(width), int(height)):
        hint = (
            "the json's size is the rotated frame: "
            + (
                "set dataset.exif_orientation=false if the annotations are in the stored frame, or "
                if apply_exif
                else "if the file has an EXIF rotation, set dataset.exif_orientation=true; otherwise "
            )
            + "fix the json's width/height"
        )
    raise ImageSizeError(
        f"image {path} is {real_w}x{real_h} (width x height"
        f"{', after EXIF rotation' if apply_exif else ', stored frame'}) but the annotation json says "
        f"width={int(width)} height={int(height)}: {hint}"
    )


def _rgb_array(img: Image.Image) -> np.ndarray:
    """The ``[H, W, 3]`` uint8 array of an RGB PIL image (anything else is refused)."""
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an 8-bit RGB image, got mode={img.mode!r} array {arr.dtype}{arr.shape}")
    return arr


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert an RGB PIL image to a float32 ``[3, H, W]`` tensor in [0, 1].

    Computed as the reference does: ``uint8 / 255.0`` in float64, then cast to float32.

    Args:
        img: an RGB PIL image (mode "RGB", uint8).

    Returns:
        float32 tensor ``[3, H, W]``.
    """
    arr64 = _rgb_array(img) / 255.0
    return torch.from_numpy(arr64).permute(2, 0, 1).to(torch.float32).contiguous()


def resize_pil(img: Image.Image, width: int, height: int) -> Image.Image:
    """Resize with PIL's default filter, exactly as ``img.resize((width, height))`` (a no-op copy if equal).

    Args:
        img: PIL image.
        width: output width.
        height: output height.
    """
    return img.resize((int(width), int(height)))


def load_in_annotation_frame(
    path: str | os.PathLike, width: int, height: int, *, apply_exif: bool
) -> Image.Image:
    """An image as RGB at its json ``width x height``, the frame its annotations and results are in (drawing).

    Args:
        path: image file.
        width: the json's width.
        height: the json's height.
        apply_exif: transpose to the EXIF orientation (the run's ``dataset.exif_orientation``).
    """
    pil = read_image_rgb(path, apply_exif=apply_exif)
    return pil if pil.size == (width, height) else resize_pil(pil, width, height)


def load_test_image(
    path: str | os.PathLike,
    size: int = 1024,
    *,
    height: int | None = None,
    width: int | None = None,
    apply_exif: bool = False,
    resize: str = "pil_bicubic",
) -> torch.Tensor:
    """Load a target image stretched to ``size x size`` (aspect ratio not kept), as the reference test set.

    Args:
        path: image file.
        size: output side (1024 for SAM2).
        height: the json's height; with ``width``, the decoded size must match (masks are produced in the
            json frame, so a mismatch would stretch them).
        width: the json's width.
        apply_exif: EXIF-transpose first (see :func:`read_image_rgb`).
        resize: how the image is stretched (``backbone.sam2.input_resize``, see :func:`sam2_input`).

    Returns:
        float32 ``[3, size, size]`` in [0, 1].
    """
    img = read_image_rgb(path, apply_exif=apply_exif)
    if height is not None and width is not None:
        check_image_size(img, path, height, width, apply_exif=apply_exif)
    return sam2_input(img, size, resize)


def sam2_input(img: Image.Image, size: int = 1024, resize: str = "pil_bicubic") -> torch.Tensor:
    """An RGB image stretched to SAM2's ``size x size`` input (aspect ratio not kept), in [0, 1].

    Args:
        img: an RGB PIL image (uint8).
        size: output side (1024 for SAM2).
        resize: ``pil_bicubic`` = NTT's code: PIL's default (bicubic) resize of the uint8 image, then
            :func:`pil_to_tensor`; ``bilinear_antialias`` = ``SAM2ImagePredictor.set_image`` (FSOD-VFM):
            torchvision's ``ToTensor`` (``uint8 -> float32 / 255``) then ``Resize((size, size))`` on the
            tensor, which is ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)``.

    Returns:
        float32 ``[3, size, size]``.
    """
    if resize == "pil_bicubic":
        return pil_to_tensor(resize_pil(img, size, size))
    if resize != "bilinear_antialias":
        raise ValueError(f"backbone.sam2.input_resize={resize}: choose one of {', '.join(SAM2_RESIZES)}")
    arr = _rgb_array(img)
    # ToTensor: a contiguous [3, H, W] copy, then to float32 and / 255 (in float32)
    x = torch.from_numpy(arr.transpose(2, 0, 1).copy()).to(torch.float32).div(255)
    if tuple(x.shape[-2:]) == (size, size):
        return x
    out = torch.nn.functional.interpolate(
        x[None], size=(int(size), int(size)), mode="bilinear", align_corners=False, antialias=True
    )
    return out[0].contiguous()


def load_long_side_input(
    path: str | os.PathLike, long_side: int, input_size: int, *, apply_exif: bool = False
) -> torch.Tensor:
    """FSOD-VFM's DINOv2 input of an image file (method.md §5.13; ``ntt.gridmatching.long_side_input``).

    Args:
        path: image file.
        long_side: first resize, long side (630).
        input_size: the square resize after it (630).
        apply_exif: EXIF-transpose first (see :func:`read_image_rgb`).

    Returns:
        float32 ``[3, input_size, input_size]`` in [0, 1].
    """
    from ntt.gridmatching import long_side_input

    img = read_image_rgb(path, apply_exif=apply_exif)
    return long_side_input(img, long_side=long_side, size=input_size)


def load_reference_image(
    path: str | os.PathLike, height: int, width: int, *, apply_exif: bool = False
) -> torch.Tensor:
    """Load a reference image in the frame of the annotation json (``height`` x ``width``).

    Args:
        path: image file.
        height: the json image entry's ``height``.
        width: the json image entry's ``width``.
        apply_exif: EXIF-transpose first (see :func:`read_image_rgb`).

    Returns:
        float32 ``[3, height, width]`` in [0, 1].

    Raises:
        ImageSizeError: the decoded size is not the json's (the reference would resize, putting the
            annotation's mask and box in the wrong place).
    """
    img = read_image_rgb(path, apply_exif=apply_exif)
    check_image_size(img, path, height, width, apply_exif=apply_exif)
    return pil_to_tensor(img)


# ----------------------------------------------------------------------------------------------------------
# Any image input of the practitioner path (files are read upright: EXIF orientation applied)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_image(image) -> tuple[Any, str | None]:
    """Any supported image input as an 8-bit RGB ``PIL.Image`` (upright) and its path, if any.

    Args:
        image: a file path (EXIF orientation applied), a ``PIL.Image``, an ``[H, W, 3]`` uint8 array, or a
            ``[3, H, W]`` float tensor in [0, 1] (rounded to 8 bits, like a saved image).

    Raises:
        FileNotFoundError / OSError: unreadable file (named). TypeError / ValueError: unsupported input.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        return read_image_rgb(Path(image), apply_exif=True), str(image)
    if isinstance(image, Image.Image):
        return image.convert("RGB"), None
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be [3, H, W] in [0, 1], got {tuple(image.shape)}")
        arr = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0)
        return Image.fromarray(arr.cpu().numpy(), mode="RGB"), None
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(f"an image array must be [H, W, 3] uint8, got {image.dtype}{image.shape}")
        return Image.fromarray(np.ascontiguousarray(image[..., :3]), mode="RGB"), None
    raise TypeError(f"unsupported image type {type(image).__name__}: give a path, PIL image, array or tensor")


def image_digest(pil: Image.Image, path: str | os.PathLike | None) -> str:
    """sha256 of an image: of its file's bytes (``sha256sum`` agrees) when it came from a file, else of
    its 8-bit RGB pixels (``[H, W, 3]`` row-major), as ``read_image`` returned them.

    Args:
        pil: the decoded image (``read_image``'s first value).
        path: its file, or None for an in-memory image.
    """
    import hashlib

    from ntt.utils.files import sha256_file

    if path is not None:
        return sha256_file(path)
    return hashlib.sha256(np.ascontiguousarray(np.asarray(pil.convert("RGB"))).tobytes()).hexdigest()


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files of a folder (not recursive), sorted by name; extensions in ``IMAGE_EXTENSIONS``.

    Raises:
        FileNotFoundError / ValueError: no such folder, or no image in it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return files
