"""Drawing instances on pictures: class colours, filled masks, contours, ``name score`` labels; side-by-side
pages.

The one drawing code of ntt, shared by the practitioner's overlays (``Instances.overlay``, ``ntt segment``),
``ntt visualize RUN_DIR`` (ntt/app/visualize.py) and the HTML report (``ntt report``, ntt/report/). Every
overlay is exactly the size of its image; a side-by-side page is two image-sized panels next to each other.
Colours come from a fixed palette indexed by class (the same class has the same colour in every picture);
text uses PIL's bundled default font (nothing is downloaded).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["PALETTE", "class_color", "draw_instances", "draw_results", "side_by_side", "xyxy"]

# 20 well separated colours (Tableau 10 + their light variants, reordered so neighbours differ)
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)  # fmt: skip


def class_color(index: int) -> tuple[int, int, int]:
    """The colour of class ``index`` (deterministic; cycles after 20 classes)."""
    return PALETTE[int(index) % len(PALETTE)]


def _font(height: int, width: int):
    from PIL import ImageFont

    size = max(10, round(min(height, width) / 40))
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: bundled scalable font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _boundary(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of ``mask`` within ``thickness`` of its outside (4-neighbourhood erosion)."""
    inner = mask.copy()
    for _ in range(thickness):
        e = inner.copy()
        e[1:, :] &= inner[:-1, :]
        e[:-1, :] &= inner[1:, :]
        e[:, 1:] &= inner[:, :-1]
        e[:, :-1] &= inner[:, 1:]
        e[0, :] = e[-1, :] = False  # outside the array counts as outside the mask
        e[:, 0] = e[:, -1] = False
        inner = e
    return mask & ~inner


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def draw_instances(
    image,
    masks,
    boxes,
    labels,
    scores,
    names: Sequence[str],
    *,
    score_thr: float = 0.0,
    max_instances: int | None = 50,
    alpha: float = 0.45,
    color_index: Sequence[int] | None = None,
):
    """Draw instances on an image: filled masks, contours and ``name score`` labels in class colours.

    Args:
        image: RGB ``PIL.Image`` (not modified).
        masks: ``[N, H, W]`` bool masks in the image's pixels (None or empty: boxes only).
        boxes: ``[N, 4]`` xyxy boxes (label anchors; drawn as rectangles when there is no mask).
        labels: ``[N]`` class indices into ``names``.
        scores: ``[N]`` scores, or None (ground truth: no score shown).
        names: class names by index.
        score_thr: draw instances scoring at least this.
        max_instances: draw at most this many, best first (None: all).
        alpha: mask fill opacity.
        color_index: palette index per class index (default: the class index itself).

    Returns:
        A new RGB ``PIL.Image`` of the image's size.
    """
    from PIL import Image, ImageDraw

    img = image.convert("RGB")
    width, height = img.size
    labels = _as_numpy(labels).astype(np.int64).reshape(-1)
    n = labels.shape[0]
    boxes = _as_numpy(boxes).reshape(-1, 4).astype(np.float64) if n else np.zeros((0, 4))
    score_arr = None if scores is None else _as_numpy(scores).astype(np.float64).reshape(-1)
    mask_arr = None if masks is None or n == 0 else np.asarray(_as_numpy(masks), dtype=bool)
    if mask_arr is not None and mask_arr.shape[1:] != (height, width):
        raise ValueError(f"draw_instances: masks are {mask_arr.shape[1:]} but the image is {height}x{width}")
    order = np.arange(n)
    if score_arr is not None:
        order = order[~(score_arr < score_thr)]  # NaN scores are kept (they rank first, as in the results)
    if max_instances is not None:
        order = order[: int(max_instances)]
    colour_of = (lambda c: class_color(color_index[c])) if color_index is not None else class_color

    out = np.asarray(img, dtype=np.float32).copy()
    thickness = max(1, round(max(height, width) / 400))
    # worst first, so the best instances end up on top
    for k in order[::-1]:
        if mask_arr is None:
            continue
        rows, cols = np.flatnonzero(mask_arr[k].any(axis=1)), np.flatnonzero(mask_arr[k].any(axis=0))
        if rows.size == 0:
            continue
        # work in the mask's tight box: the same pixels, far less work on large photos
        win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        m, sub = mask_arr[k][win], out[win]
        colour = np.asarray(colour_of(labels[k]), dtype=np.float32)
        sub[m] = sub[m] * (1.0 - alpha) + colour * alpha
        sub[_boundary(m, thickness)] = colour
    canvas = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(canvas)
    font = _font(height, width)
    for k in order[::-1]:
        colour = colour_of(labels[k])
        x1, y1, x2, y2 = boxes[k]
        if mask_arr is None:
            draw.rectangle([x1, y1, x2, y2], outline=colour, width=thickness + 1)
        name = names[labels[k]] if 0 <= labels[k] < len(names) else str(labels[k])
        text = name if score_arr is None else f"{name} {score_arr[k]:.2f}"
        tx, ty = max(0.0, x1), max(0.0, y1)
        x0, t, r, b = draw.textbbox((tx, ty), text, font=font)
        if b > height:  # keep the label inside the image
            ty -= b - height
            x0, t, r, b = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle([x0 - 1, t - 1, r + 1, b + 1], fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((tx, ty), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)
    return canvas


def draw_results(
    image,
    results: Sequence[dict],
    names: Sequence[str],
    category_ids: Sequence[int],
    *,
    score_thr: float = 0.0,
    max_instances: int | None = 50,
):
    """:func:`draw_instances` of COCO result dicts (RLE masks, xywh boxes), in their order.

    Drawn from the results of ``Instances.to_coco`` it gives the same picture as ``Instances.overlay``.

    Args:
        image: RGB ``PIL.Image``.
        results: ``{"category_id", "bbox", "score", "segmentation"}`` dicts (without segmentation: boxes).
        names: class names by index.
        category_ids: category id by index (an unknown id is drawn as index 0).
        score_thr: draw results scoring at least this.
        max_instances: draw at most this many (in the given order).
    """
    from pycocotools import mask as mask_utils

    index = {int(c): i for i, c in enumerate(category_ids)}
    has_seg = bool(results) and all("segmentation" in r for r in results)
    return draw_instances(
        image,
        np.stack([mask_utils.decode(r["segmentation"]).astype(bool) for r in results]) if has_seg else None,
        [xyxy(r["bbox"]) for r in results],
        [index.get(int(r["category_id"]), 0) for r in results],
        [float(r["score"]) for r in results],
        names,
        score_thr=score_thr,
        max_instances=max_instances,
    )


def side_by_side(left, right, titles: Sequence[str] = ("ground truth", "prediction")):
    """Two image-sized panels next to each other (``2W x H``), each titled in its bottom-left corner."""
    from PIL import Image, ImageDraw

    width, height = left.size
    page = Image.new("RGB", (2 * width, height))
    page.paste(left, (0, 0))
    page.paste(right.resize((width, height)) if right.size != left.size else right, (width, 0))
    draw = ImageDraw.Draw(page)
    font = _font(height, width)
    for i, title in enumerate(titles):  # bottom-left: instance labels sit at the top of their boxes
        x0, t, r, b = draw.textbbox((0, 0), title, font=font)
        pos = (i * width + 4, height - 4 - (b - t) - t)
        x0, t, r, b = draw.textbbox(pos, title, font=font)
        draw.rectangle([x0 - 2, t - 2, r + 2, b + 2], fill=(0, 0, 0))
        draw.text(pos, title, fill=(255, 255, 255), font=font)
    return page


def xyxy(bbox) -> list[float]:
    """A COCO ``[x, y, w, h]`` box as ``[x1, y1, x2, y2]``."""
    x, y, w, h = (float(v) for v in bbox[:4])
    return [x, y, x + w, y + h]


def ground_truth_and_prediction(
    pil, ds, image_id: int, results: Sequence[dict], *, score_thr: float, max_draw: int | None,
    titles: Sequence[str] = ("ground truth", "prediction"),
):  # fmt: skip
    """One test image drawn as ground truth | prediction (``2W x H``), at its json size.

    Args:
        pil: the image, already at the annotations' size.
        ds: its ``ntt.data.coco.CocoDataset`` (annotations, masks, category ids and names).
        image_id: the image.
        results: its COCO results (any order; drawn best first).
        score_thr: draw predictions scoring at least this.
        max_draw: draw at most this many predictions (None: all).
        titles: the two panels' titles.
    """
    index = {c: i for i, c in enumerate(ds.category_ids)}
    names = list(ds.category_names)
    anns = ds.annotations(image_id)
    gt_masks = np.stack([ds.mask(a["id"]) for a in anns]) if anns and ds.has_masks else None
    left = draw_instances(
        pil,
        gt_masks,
        [xyxy(a["bbox"]) for a in anns],
        [index[int(a["category_id"])] for a in anns],
        None,
        names,
        max_instances=None,
    )
    best = sorted(results, key=lambda r: -float(r["score"]))
    right = draw_results(pil, best, names, ds.category_ids, score_thr=score_thr, max_instances=max_draw)
    return side_by_side(left, right, titles=titles)
