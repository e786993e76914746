"""Synthetic COCO-format instance-segmentation dataset (``dataset=synthetic``).

Textured shapes on cluttered backgrounds, with exact instance masks. Each class has a distinct shape
*and* a distinct texture/colour (striped red circles, dotted blue squares, checkered green triangles,
solid yellow stars, ringed purple hexagons, grid-lined orange crosses), so a reference-based segmenter
with real weights should separate them; with random weights it checks the plumbing end to end.

Layout written under ``out_dir``::

    images/000001.png ...     lossless PNG (so masks are pixel-exact); json file_name "images/000001.png",
                              so the image root (``dataset.image_root``) is ``out_dir`` itself
    annotations.json          every image
    train.json                reference pool: images whose index i (0-based) has i % 3 != 2 (about 2/3)
    test.json                 evaluation set: the other third

All three are valid COCO jsons with the same categories (ids 1..C in ``classes`` order). Annotations:
``segmentation`` = compressed RLE (``counts`` as str) of the *visible* pixels (later instances occlude
earlier ones), ``area`` = visible pixel count, ``bbox`` = tight box of the visible mask
(``[x, y, w, h]``, ``w = x_max - x_min + 1``, same as ``pycocotools.mask.toBbox``), ``iscrowd`` 0.

Determinism: the same arguments give byte-identical PNGs and jsons (image i is drawn from its own
generator seeded with ``[seed, i]``, so it does not depend on ``num_images`` either).

Reference validity (method.md §1.2: box >= 32 px each side, >= 10 px from every border): most instances
are placed at least 12 px inside the image; about 15 % are deliberately truncated by a border. The
first instances of each image cycle through the classes, so every class appears in many images.

CLI: ``python -m ntt.data.synthetic OUT_DIR [--num-images N] [--seed S] [--height H] [--width W]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ntt.utils.files import write_text_atomic

logger = logging.getLogger(__name__)

DEFAULT_CLASSES = ("circle", "square", "triangle", "star")

# shape name -> (texture, colour A, colour B)
STYLES: dict[str, tuple[str, tuple[int, int, int], tuple[int, int, int]]] = {
    "circle": ("stripes", (214, 38, 38), (120, 14, 20)),
    "square": ("dots", (36, 64, 206), (175, 205, 255)),
    "triangle": ("checker", (40, 160, 52), (10, 78, 22)),
    "star": ("solid", (246, 212, 28), (246, 212, 28)),
    "hexagon": ("rings", (140, 50, 180), (228, 190, 245)),
    "cross": ("grid", (245, 130, 20), (70, 35, 5)),
}

MARGIN = 12  # px kept between a non-truncated instance and the image border
TRUNCATED_FRACTION = 0.15
MIN_VISIBLE_PIXELS = 120
MIN_VISIBLE_FRACTION = 0.6  # an occluded instance keeps at least this fraction of its pixels
MAX_TRIES = 25


@dataclass(frozen=True)
class SyntheticDataset:
    """Paths of a generated synthetic dataset.

    Attributes:
        root: ``out_dir``.
        image_root: the ``dataset.image_root``: ``out_dir`` (``file_name`` is ``images/NNNNNN.png``).
        annotations: json with every image.
        train: reference-pool json (about 2/3 of the images).
        test: evaluation json (the other third).
        class_names: category names, ids 1..C in this order.
    """

    root: Path
    image_root: Path
    annotations: Path
    train: Path
    test: Path
    class_names: tuple[str, ...]


def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices [N, 2] (x, y) of a shape in unit coordinates (extent about [-0.5, 0.5])."""
    if shape == "circle":
        a = np.linspace(0.0, 2.0 * math.pi, 72, endpoint=False)
        return 0.5 * np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "square":
        return np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if shape == "triangle":
        return np.array([[0.0, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if shape == "star":
        a = -math.pi / 2 + np.arange(10) * math.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 0.5, 0.21)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if shape == "hexagon":
        a = np.arange(6) * math.pi / 3
        return 0.5 * np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "cross":
        t, e = 0.17, 0.5
        return np.array(
            [
                [-t, -e],
                [t, -e],
                [t, -t],
                [e, -t],
                [e, t],
                [t, t],
                [t, e],
                [-t, e],
                [-t, t],
                [-e, t],
                [-e, -t],
                [-t, -t],
            ]
        )
    raise KeyError(shape)


def _rasterize(points: np.ndarray, height: int, width: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in points], fill=1)
    return np.asarray(canvas, dtype=bool)


def _texture(
    style: str, u: np.ndarray, v: np.ndarray, size: float, ca: np.ndarray, cb: np.ndarray
) -> np.ndarray:
    """Colours [N, 3] (float) of pixels with instance-local rotated coordinates (u, v)."""
    p = max(7.0, size / 6.0)
    if style == "stripes":
        sel = (np.floor(u / (p / 2.0)) % 2).astype(bool)
    elif style == "dots":
        du, dv = np.mod(u, p) - p / 2.0, np.mod(v, p) - p / 2.0
        sel = du * du + dv * dv < (0.3 * p) ** 2
    elif style == "checker":
        sel = ((np.floor(u / p) + np.floor(v / p)) % 2).astype(bool)
    elif style == "rings":
        sel = (np.floor(np.hypot(u, v) / (p / 2.0)) % 2).astype(bool)
    elif style == "grid":
        sel = (np.mod(u, p) < 2.5) | (np.mod(v, p) < 2.5)
    elif style == "solid":
        shade = 1.0 - 0.3 * np.clip(np.hypot(u, v) / (size / 2.0), 0.0, 1.0)
        return ca[None, :] * shade[:, None]
    else:
        raise KeyError(style)
    return np.where(sel[:, None], cb[None, :], ca[None, :])


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth muted gradient + low-frequency blobs + clutter, float [H, W, 3] in 0..255."""
    c = [rng.uniform(50, 200) + rng.normal(0, 18, 3) for _ in range(2)]
    phi = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    t = xx * math.cos(phi) + yy * math.sin(phi)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    img = c[0][None, None, :] * (1 - t[..., None]) + c[1][None, None, :] * t[..., None]
    coarse = rng.normal(0, 16, (6, 8, 3)).astype(np.float32)
    for ch in range(3):
        blob = Image.fromarray(coarse[..., ch], mode="F").resize((width, height), Image.BILINEAR)
        img[..., ch] += np.asarray(blob, dtype=np.float64)
    # clutter: thin lines and small blobs in muted colours
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(8, 21))):
        col = tuple(int(x) for x in np.clip(rng.uniform(40, 210) + rng.normal(0, 25, 3), 0, 255))
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        if rng.random() < 0.5:
            length, ang = rng.uniform(20, 120), rng.uniform(0, 2 * math.pi)
            end = (x + length * math.cos(ang), y + length * math.sin(ang))
            draw.line([(x, y), end], fill=col, width=int(rng.integers(1, 4)))
        else:
            rx, ry = rng.uniform(3, 12), rng.uniform(3, 12)
            draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=col)
    return np.asarray(canvas, dtype=np.float64)


def _is_valid_reference(bbox: Sequence[float], width: int, height: int) -> bool:
    x, y, w, h = bbox
    return w >= 32 and h >= 32 and x >= 10 and y >= 10 and width - (x + w) >= 10 and height - (y + h) >= 10


def _render_image(
    rng: np.random.Generator,
    index: int,
    classes: Sequence[str],
    height: int,
    width: int,
    instances_per_image: tuple[int, int],
    min_size: int,
    max_size: int,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image: uint8 [H, W, 3] and [(class index, visible mask)] in drawing order."""
    img = _background(rng, height, width)
    n = int(rng.integers(instances_per_image[0], instances_per_image[1] + 1))
    num_classes = len(classes)
    placed: list[dict] = []  # {"cls", "full", "visible", "center", "size", "angle"}
    for j in range(n):
        cls = (index + j) % num_classes if j < num_classes else int(rng.integers(num_classes))
        unit = _unit_polygon(classes[cls])
        for _ in range(MAX_TRIES):
            size = float(rng.uniform(min_size, max_size))
            angle = float(rng.uniform(0, 2 * math.pi))
            reach = 0.72 * size + 1.0  # bound on the half-extent of any rotated shape (<= 0.71 size)
            if rng.random() < TRUNCATED_FRACTION:
                cx, cy = float(rng.uniform(0, width)), float(rng.uniform(0, height))
            else:
                lo_x, hi_x = MARGIN + reach, width - MARGIN - reach
                lo_y, hi_y = MARGIN + reach, height - MARGIN - reach
                cx = float(rng.uniform(lo_x, hi_x)) if hi_x > lo_x else width / 2.0
                cy = float(rng.uniform(lo_y, hi_y)) if hi_y > lo_y else height / 2.0
            rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
            pts = unit * size @ rot.T + np.array([cx, cy])
            full = _rasterize(pts, height, width)
            if full.sum() < MIN_VISIBLE_PIXELS:
                continue
            ok = True
            for other in placed:
                remaining = int(np.count_nonzero(other["visible"] & ~full))
                if remaining < MIN_VISIBLE_PIXELS or remaining < MIN_VISIBLE_FRACTION * other["full_area"]:
                    ok = False
                    break
            if not ok:
                continue
            for other in placed:
                other["visible"] &= ~full
            placed.append(
                {
                    "cls": cls,
                    "visible": full.copy(),
                    "full_area": int(full.sum()),
                    "center": (cx, cy),
                    "size": size,
                    "angle": angle,
                    "full": full,
                }
            )
            break
    # paint in drawing order (later ones on top); visible masks are exactly the pixels that keep each colour
    for inst in placed:
        style, ca, cb = STYLES[classes[inst["cls"]]]
        jitter = rng.uniform(0.85, 1.1)
        ca_j = np.clip(np.array(ca, dtype=np.float64) * jitter, 0, 255)
        cb_j = np.clip(np.array(cb, dtype=np.float64) * jitter, 0, 255)
        ys, xs = np.nonzero(inst["full"])
        cx, cy = inst["center"]
        ang = inst["angle"]
        dx, dy = xs - cx, ys - cy
        u = dx * math.cos(ang) + dy * math.sin(ang)
        v = -dx * math.sin(ang) + dy * math.cos(ang)
        img[ys, xs] = _texture(style, u, v, inst["size"], ca_j, cb_j)
    img += rng.normal(0, 4.0, img.shape)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out, [(inst["cls"], inst["visible"]) for inst in placed]


def _mask_annotation(mask: np.ndarray) -> tuple[dict, list[float], int]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    bbox = [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]
    return rle, bbox, int(mask.sum())


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, separators=(",", ":")) + "\n")


def generate_synthetic_dataset(
    out_dir: str | Path,
    *,
    num_images: int = 24,
    image_size: tuple[int, int] = (480, 640),
    classes: Sequence[str] = DEFAULT_CLASSES,
    instances_per_image: tuple[int, int] = (1, 5),
    seed: int = 0,
    min_size: int = 40,
    max_size: int = 140,
) -> SyntheticDataset:
    """Generate the synthetic dataset under ``out_dir`` (see the module docstring for the layout).

    Args:
        out_dir: Output folder (created; PNGs of an earlier, larger run with our naming are removed).
        num_images: Number of images (>= 3 so that train and test are both non-empty).
        image_size: ``(height, width)``.
        classes: Shape names, a subset of :data:`STYLES` keys; category ids 1..C in this order.
        instances_per_image: Inclusive ``(min, max)`` number of instances drawn per image.
        seed: Random seed; same seed and arguments -> byte-identical files.
        min_size: Smallest shape extent in pixels.
        max_size: Largest shape extent in pixels.

    Returns:
        A :class:`SyntheticDataset` with the paths of the jsons and images.

    Raises:
        ValueError: invalid arguments (unknown class name, sizes, counts).
    """
    classes = tuple(classes)
    unknown = [c for c in classes if c not in STYLES]
    if unknown or not classes:
        raise ValueError(f"unknown synthetic classes {unknown}; known: {sorted(STYLES)}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"duplicate synthetic classes in {classes}")
    if num_images < 3:
        raise ValueError(f"num_images must be >= 3 (train and test both non-empty), got {num_images}")
    height, width = (int(image_size[0]), int(image_size[1]))
    lo, hi = (int(instances_per_image[0]), int(instances_per_image[1]))
    if not 1 <= lo <= hi:
        raise ValueError(f"instances_per_image must satisfy 1 <= min <= max, got {instances_per_image}")
    if not 8 <= min_size <= max_size or max_size > min(height, width):
        raise ValueError(
            f"need 8 <= min_size <= max_size <= min(image_size); got {min_size}, {max_size}, {image_size}"
        )

    root = Path(out_dir)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{i + 1:06d}.png" for i in range(num_images)]
    keep = set(names)
    for stale in image_dir.glob("*.png"):
        if re.fullmatch(r"\d{6}\.png", stale.name) and stale.name not in keep:
            stale.unlink()

    categories = [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(classes)]
    images, annotations = [], []
    ann_id = 1
    for i in range(num_images):
        rng = np.random.default_rng([int(seed), i])
        pixels, instances = _render_image(rng, i, classes, height, width, (lo, hi), min_size, max_size)
        Image.fromarray(pixels, "RGB").save(image_dir / names[i], format="PNG")
        images.append({"id": i + 1, "file_name": f"images/{names[i]}", "height": height, "width": width})
        for cls, mask in instances:
            rle, bbox, area = _mask_annotation(mask)
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": i + 1,
                    "category_id": cls + 1,
                    "segmentation": rle,
                    "area": area,
                    "bbox": bbox,
                    "iscrowd": 0,
                }
            )
            ann_id += 1

    info = {
        "description": "ntt synthetic shapes",
        "seed": int(seed),
        "num_images": int(num_images),
        "image_size": [height, width],
        "generator": "ntt.data.synthetic",
    }
    test_ids = {im["id"] for k, im in enumerate(images) if k % 3 == 2}

    def subset(ids: set[int] | None, split: str) -> dict:
        return {
            "info": dict(info, split=split),
            "images": [im for im in images if ids is None or im["id"] in ids],
            "annotations": [a for a in annotations if ids is None or a["image_id"] in ids],
            "categories": categories,
        }

    train_ids = {im["id"] for im in images} - test_ids
    paths = SyntheticDataset(
        root=root,
        image_root=root,
        annotations=root / "annotations.json",
        train=root / "train.json",
        test=root / "test.json",
        class_names=classes,
    )
    _write_json(paths.annotations, subset(None, "all"))
    _write_json(paths.train, subset(train_ids, "train"))
    _write_json(paths.test, subset(test_ids, "test"))

    # how many distinct reference-pool images hold a valid reference per class
    valid_images: dict[int, set[int]] = {k + 1: set() for k in range(len(classes))}
    for a in annotations:
        if a["image_id"] in train_ids and _is_valid_reference(a["bbox"], width, height):
            valid_images[a["category_id"]].add(a["image_id"])
    counts = {classes[c - 1]: len(v) for c, v in valid_images.items()}
    logger.info(
        "synthetic dataset: %d images (%d train / %d test), %d instances, classes %s in %s",
        num_images,
        len(train_ids),
        len(test_ids),
        len(annotations),
        list(classes),
        root,
    )
    logger.info("train images with a valid reference per class: %s", counts)
    few = {c: n for c, n in counts.items() if n < 5}
    if few:
        logger.warning(
            "classes with fewer than 5 valid reference images in train.json (limits n_shot): %s", few
        )
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: ``python -m ntt.data.synthetic OUT_DIR [--num-images N] [--seed S] ...``.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        0 on success (argument errors exit with status 2 through argparse).
    """
    parser = argparse.ArgumentParser(
        prog="python -m ntt.data.synthetic", description="Generate the ntt synthetic COCO-format dataset."
    )
    parser.add_argument(
        "out_dir", type=Path, help="output folder (images/, annotations.json, train.json, test.json)"
    )
    parser.add_argument("--num-images", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument(
        "--classes", default=",".join(DEFAULT_CLASSES), help=f"comma-separated, from {sorted(STYLES)}"
    )
    args = parser.parse_args(argv)
    from ntt.utils.console import setup_logging

    setup_logging()
    try:
        paths = generate_synthetic_dataset(
            args.out_dir,
            num_images=args.num_images,
            seed=args.seed,
            image_size=(args.height, args.width),
            classes=[c.strip() for c in args.classes.split(",") if c.strip()],
        )
    except ValueError as e:
        parser.error(str(e))
    logger.info(
        "wrote %s, %s, %s (images in %s)", paths.annotations, paths.train, paths.test, paths.root / "images"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
