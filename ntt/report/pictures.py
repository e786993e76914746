"""Pictures inside the page: downscaled JPEG / PNG data URIs (the page needs no other file).

A benchmark image is drawn as ground truth | prediction side by side (``ntt.utils.draw``, the drawing of
``ntt visualize``) at its json size, then scaled down so that each panel's long side is at most
``long_side`` pixels; an ``ntt segment`` overlay PNG is scaled the same way. JPEG keeps the page small
(photos); plots stay PNG.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from ntt.utils.draw import ground_truth_and_prediction

__all__ = ["data_uri", "downscale", "load_picture", "run_image_page"]


def data_uri(image, fmt: str = "JPEG", quality: int = 85) -> str:
    """``data:image/...;base64,...`` of a PIL image (JPEG: RGB, ``quality``; PNG: lossless)."""
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def downscale(image, long_side: int):
    """``image`` with its long side at most ``long_side`` pixels (aspect kept; never enlarged)."""
    from PIL import Image

    width, height = image.size
    scale = long_side / max(width, height)
    if scale >= 1.0:
        return image
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)


def load_picture(path: Path, long_side: int) -> str:
    """A picture file (e.g. an ``ntt segment`` overlay) as a downscaled JPEG data URI."""
    from PIL import Image

    with Image.open(path) as img:
        return data_uri(downscale(img.convert("RGB"), long_side))


def run_image_page(
    ds, image_id: int, results: list[dict], *, exif: bool, score_thr: float, max_draw: int, long_side: int
) -> str:
    """Ground truth | prediction of one test image of a run, as a JPEG data URI.

    Args:
        ds: the run's ``ntt.data.coco.CocoDataset`` (selected classes).
        image_id: the image.
        results: its COCO results (any order; drawn best first).
        exif: apply the EXIF orientation (the run's ``dataset.exif_orientation``).
        score_thr: draw predictions scoring at least this.
        max_draw: draw at most this many predictions.
        long_side: each panel's long side in the page, pixels.
    """
    from ntt.data.images import load_in_annotation_frame

    info = ds.image_info(image_id)
    pil = load_in_annotation_frame(ds.image_path(image_id), info["width"], info["height"], apply_exif=exif)
    page = ground_truth_and_prediction(
        pil, ds, image_id, results, score_thr=score_thr, max_draw=max_draw,
        titles=("ground truth", f"prediction (score >= {score_thr:g})"),
    )  # fmt: skip
    return data_uri(downscale(page, 2 * long_side))
