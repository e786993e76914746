"""Outer contours of a binary mask as polygons, exactly as ``cv2.findContours(mask, RETR_EXTERNAL,
CHAIN_APPROX_SIMPLE)`` returns them (docs/method.md §1.5), with or without OpenCV.

The authors turned each SAM mask into COCO polygons with OpenCV. ntt does not depend on OpenCV, so this
module carries a pure-Python/numpy port of the same algorithm (Suzuki-Abe border following as OpenCV
implements it): the mask is padded with one zero pixel, scanned in raster order, each outer border whose
nearest marked border pixel to the left is not a "left" border is followed counter-clockwise from its
first pixel, pixels are marked (2 = visited, -126 = visited with a background pixel to the right), and
CHAIN_APPROX_SIMPLE keeps a point only where the chain direction changes. Contours are returned in
OpenCV's order (last found first). ``tests/test_prepare_contours.py`` checks it point for point against
OpenCV where OpenCV is installed, and on crafted masks with known answers everywhere.

`external_contours` uses OpenCV when it can be imported (faster) unless ``backend="python"``.
"""

from __future__ import annotations

import numpy as np

# chain code directions (x, y): 0 = right, then counter-clockwise on screen (y grows downwards)
_DX = (1, 1, 0, -1, -1, -1, 0, 1)
_DY = (0, -1, -1, -1, 0, 1, 1, 1)
_MARK = 2  # visited border pixel
_MARK_RIGHT = -126  # visited border pixel whose right neighbour is background (nbd | -128 in OpenCV)

BACKENDS = ("auto", "opencv", "python")


def opencv_available() -> bool:
    """True when ``cv2`` can be imported."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def external_contours(mask: np.ndarray, backend: str = "auto") -> list[np.ndarray]:
    """Outer contours of a binary mask: a list of [N, 2] int arrays of (x, y) points.

    Args:
        mask: [H, W] array; nonzero = foreground.
        backend: ``auto`` (OpenCV when importable, else the Python port), ``opencv`` or ``python``.

    Returns:
        The contours in ``cv2.findContours(..., RETR_EXTERNAL, CHAIN_APPROX_SIMPLE)`` order and point order.
    """
    if backend not in BACKENDS:
        raise ValueError(f"contour backend {backend!r} is not one of {BACKENDS}")
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if backend == "opencv" or (backend == "auto" and opencv_available()):
        import cv2

        found, _ = cv2.findContours((mask != 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        return [c.reshape(-1, 2).astype(np.int64) for c in found]
    return _external_contours_python(mask)


def _external_contours_python(mask: np.ndarray) -> list[np.ndarray]:
    h, w = mask.shape
    img = np.zeros((h + 2, w + 2), dtype=np.int8)
    img[1:-1, 1:-1] = mask != 0
    step = w + 2
    flat = memoryview(img).cast("B").cast("b")  # writable int8 view of the same buffer
    deltas = [1, -step + 1, -step, -step - 1, -1, step - 1, step, step + 1]
    deltas = deltas + deltas
    rows_with_pixels = np.flatnonzero(img.any(axis=1))
    found: list[np.ndarray] = []
    for y in rows_with_pixels.tolist():
        row = img[y]
        prev, lnbd_x, x = 0, 0, 1
        while x <= w:
            change = np.flatnonzero(row[x : w + 1] != prev)
            if change.size == 0:
                break
            x += int(change[0])
            p = int(row[x])
            if prev == 0 and p == 1:  # an outer border starts here
                if int(row[lnbd_x]) <= 0:  # not inside a traced component (RETR_EXTERNAL)
                    found.append(_follow_border(flat, y * step + x, x - 1, y - 1, deltas))
                    lnbd_x = x
                    prev = int(row[x])
                    x += 1
                    continue
            elif p == 0 and prev >= 1 and prev & -2:  # a hole border (not followed in RETR_EXTERNAL)
                lnbd_x = x - 1
            prev = p
            if prev & -2:
                lnbd_x = x
            x += 1
    found.reverse()  # OpenCV lists the last contour found first
    return found


def _follow_border(img, i0: int, x: int, y: int, deltas: list[int]) -> np.ndarray:
    """Follow the outer border starting at flat index i0 (point (x, y)); mark it; SIMPLE chain points."""
    s = s_end = 4
    while True:
        s = (s - 1) & 7
        i1 = i0 + deltas[s]
        if img[i1] != 0 or s == s_end:
            break
    if s == s_end:  # isolated pixel
        img[i0] = _MARK_RIGHT
        return np.array([[x, y]], dtype=np.int64)
    points = []
    i3 = i0
    prev_s = s ^ 4
    while True:
        s_end = s
        while True:
            s += 1
            i4 = i3 + deltas[s]
            if img[i4] != 0:
                break
        s &= 7
        if 1 <= s <= s_end:  # the search passed the right neighbour: it is background
            img[i3] = _MARK_RIGHT
        elif img[i3] == 1:
            img[i3] = _MARK
        if s != prev_s:
            points.append((x, y))
            prev_s = s
        x += _DX[s]
        y += _DY[s]
        if i4 == i0 and i3 == i1:
            break
        i3 = i4
        s = (s + 4) & 7
    return np.array(points, dtype=np.int64)
