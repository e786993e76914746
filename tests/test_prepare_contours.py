"""Outer contours -> COCO polygons (ntt.prepare.contours / box_to_mask): OpenCV's exact answers."""

from __future__ import annotations

import numpy as np
import pytest

from ntt.prepare.box_to_mask import mask_to_polygons
from ntt.prepare.contours import external_contours, opencv_available


def _flat(contours):
    return [c.reshape(-1).tolist() for c in contours]


def _scene():
    m = np.zeros((12, 12), np.uint8)
    m[1:8, 1:8] = 1  # a square ring ...
    m[3:6, 3:6] = 0
    m[4, 4] = 1  # ... with an island in its hole (not an external contour)
    m[9, 9] = 1  # one pixel
    m[10, 2:4] = 1  # two pixels
    m[2:5, 9:11] = 1  # a small rectangle
    return m


# answers recorded from cv2.findContours(m, RETR_EXTERNAL, CHAIN_APPROX_SIMPLE) with opencv 4.10.0.84
# (the authors' version) and 5.0.0: last contour found first, corners only, holes and islands ignored.
KNOWN = [
    ("rectangle", lambda: np.pad(np.ones((3, 4), np.uint8), ((1, 2), (2, 1))), [[2, 1, 2, 3, 5, 3, 5, 1]]),
    ("scene", _scene, [[2, 10, 3, 10], [9, 9], [9, 2, 9, 4, 10, 4, 10, 2], [1, 1, 1, 7, 7, 7, 7, 1]]),
    ("diagonal", lambda: np.eye(5, dtype=np.uint8), [[0, 0, 4, 4]]),
    ("empty", lambda: np.zeros((4, 4), np.uint8), []),
]


@pytest.mark.parametrize("name,make,expected", KNOWN, ids=[k[0] for k in KNOWN])
def test_python_tracer_gives_opencvs_known_answers(name, make, expected):
    assert _flat(external_contours(make(), backend="python")) == expected


@pytest.mark.skipif(
    not opencv_available(), reason="OpenCV (cv2) not installed: point-for-point comparison skipped"
)
def test_python_tracer_equals_opencv_on_random_masks():
    rng = np.random.default_rng(0)
    for trial in range(300):
        h, w = rng.integers(1, 50, size=2)
        if trial % 2:
            m = rng.random((h, w)) < rng.uniform(0.1, 0.9)
        else:
            yy, xx = np.ogrid[:h, :w]
            m = np.zeros((h, w), bool)
            for _ in range(4):
                cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(1, 12)
                m ^= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        a, b = external_contours(m, "opencv"), external_contours(m, "python")
        assert _flat(a) == _flat(b), f"trial {trial}"


def test_polygons_drop_short_contours_and_fall_back_to_the_box():
    m = _scene()
    polys = mask_to_polygons(m, [0, 0, 5, 5], "python")
    assert polys == [[9, 2, 9, 4, 10, 4, 10, 2], [1, 1, 1, 7, 7, 7, 7, 1]]  # 1- and 2-point contours dropped
    tiny = np.zeros((8, 8), np.uint8)
    tiny[3, 3:5] = 1  # only a 2-point contour: the box rectangle is used
    assert mask_to_polygons(tiny, [3, 3, 2.5, 1], "python") == [[3, 3, 5.5, 3, 5.5, 4, 3, 4]]
    assert mask_to_polygons(np.zeros((4, 4)), [1, 1, 2, 2], "python") == [[1, 1, 3, 1, 3, 3, 1, 3]]
