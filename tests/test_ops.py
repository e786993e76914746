"""ntt.ops: NMS with torchvision semantics, box IoU, inclusive mask boxes (known answers + parity fixture)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ntt.ops import batched_nms, box_area, box_iou, masks_to_boxes_inclusive, nms


def T(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def test_box_area_and_iou_known_values():
    a = T([[0, 0, 2, 2], [1, 1, 3, 3], [5, 5, 5, 9]])
    assert box_area(a).tolist() == [4.0, 4.0, 0.0]
    iou = box_iou(a, a)
    # overlap of the first two: 1x1 = 1, union 4 + 4 - 1 = 7
    assert iou[0, 1].item() == pytest.approx(1 / 7)
    assert iou[0, 0].item() == 1.0
    assert iou[0, 2].item() == 0.0
    assert torch.isnan(iou[2, 2])  # 0 / 0 of a zero-area box with itself, as torchvision


def test_nms_orders_by_descending_score():
    boxes = T([[0, 0, 1, 1], [10, 10, 11, 11], [20, 20, 21, 21]])
    keep = nms(boxes, T([0.2, 0.9, 0.5]), 0.5)
    assert keep.tolist() == [1, 2, 0]
    assert keep.dtype == torch.int64


def test_nms_ties_keep_lower_index_first():
    boxes = T([[0, 0, 1, 1], [10, 10, 11, 11], [20, 20, 21, 21], [30, 30, 31, 31]])
    assert nms(boxes, T([0.5, 0.7, 0.5, 0.5]), 0.5).tolist() == [1, 0, 2, 3]
    # identical boxes with equal scores: the lower index wins
    same = T([[0, 0, 4, 4]] * 3)
    assert nms(same, T([0.3, 0.3, 0.3]), 0.5).tolist() == [0]


def test_nms_suppresses_only_strictly_above_threshold():
    # A = [0,0,2,2] (area 4), B = [0,0,2,1] (area 2): inter 2, union 4 -> IoU exactly 0.5
    boxes = T([[0, 0, 2, 2], [0, 0, 2, 1]])
    scores = T([0.9, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.49).tolist() == [0]
    assert nms(boxes, scores, 1.0).tolist() == [0, 1]


def test_zero_area_boxes_never_suppress_nor_get_suppressed():
    # empty-mask boxes [0,0,0,0] and one-pixel-wide boxes have zero area with the no-+1 convention
    boxes = T([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 5, 5], [2, 0, 2, 5], [0, 0, 5, 5]])
    scores = T([0.9, 0.8, 0.7, 0.95, 0.6])
    keep = nms(boxes, scores, 0.5)
    # box 4 duplicates box 2 (IoU 1) and is the only suppression
    assert keep.tolist() == [3, 0, 1, 2]


def test_greedy_is_sequential_not_pairwise():
    # B overlaps A and C; A suppresses B, so C (overlapping only B) survives
    boxes = T([[0, 0, 10, 10], [0, 0, 10, 14], [0, 4, 10, 18]])
    iou = box_iou(boxes, boxes)
    assert iou[0, 1] > 0.5 and iou[1, 2] > 0.5 and iou[0, 2] < 0.5
    assert nms(boxes, T([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]


def test_batched_nms_is_class_aware():
    boxes = T([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10]])
    scores = T([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 1, 0, 1])
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 2, 3]), 0.5).tolist() == [0, 1, 2, 3]


def test_nms_empty_and_integer_boxes():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []
    keep = batched_nms(torch.tensor([[0, 0, 4, 4], [0, 0, 4, 4]]), T([0.1, 0.2]), torch.tensor([0, 0]), 0.5)
    assert keep.tolist() == [1]


def _reference_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, thr: float) -> list[int]:
    """Literal transcription of torchvision's CPU kernel loop, class by class on the same sorted order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    x1, y1, x2, y2 = (boxes[:, k].astype(np.float32) for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    suppressed = [False] * len(order)
    keep = []
    for _i, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        for j in order[_i + 1 :]:
            if suppressed[j] or labels[j] != labels[i]:
                continue
            xx1, yy1 = max(x1[i], x1[j]), max(y1[i], y1[j])
            xx2, yy2 = min(x2[i], x2[j]), min(y2[i], y2[j])
            inter = np.float32(max(np.float32(0), xx2 - xx1) * max(np.float32(0), yy2 - yy1))
            with np.errstate(invalid="ignore", divide="ignore"):
                ovr = inter / (areas[i] + areas[j] - inter)
            if ovr > np.float32(thr):
                suppressed[j] = True
    return keep


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_nms_matches_reference_loop_on_random_integer_boxes(seed):
    g = np.random.default_rng(seed)
    n = 300
    xy = g.integers(0, 60, size=(n, 2))
    wh = g.integers(0, 30, size=(n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    boxes[g.random(n) < 0.05] = 0  # some empty-mask boxes
    scores = np.round(g.random(n), 2).astype(np.float32)  # many exact ties
    labels = g.integers(0, 3, size=n)
    want = _reference_nms(boxes, scores, labels, 0.5)
    got = batched_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), 0.5, block=37
    )
    assert got.tolist() == want
    got_big = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), 0.5)
    assert got_big.tolist() == want


def test_masks_to_boxes_inclusive_known_values():
    m = torch.zeros(4, 6, 8, dtype=torch.bool)
    m[0, 1:4, 2:7] = True  # rows 1..3, cols 2..6
    m[1, 5, 0] = True  # single pixel -> zero-area box
    m[3, 0, 7] = True
    m[3, 5, 0] = True  # two corners: full extent
    boxes = masks_to_boxes_inclusive(m)
    assert boxes.dtype == torch.float32
    assert boxes.tolist() == [[2, 1, 6, 3], [0, 5, 0, 5], [0, 0, 0, 0], [0, 0, 7, 5]]
    assert masks_to_boxes_inclusive(torch.zeros(0, 5, 5, dtype=torch.bool)).shape == (0, 4)


IMAGES = (14, 15, 16)


def _unpack(packed: np.ndarray) -> torch.Tensor:
    n = packed.shape[0]
    return torch.from_numpy(np.unpackbits(packed, axis=1)[:, :65536].reshape(n, 256, 256).astype(bool))


@pytest.mark.parity
@pytest.mark.parametrize("img", IMAGES)
def test_fixture_boxes_and_nms(parity_dir, img):
    d = np.load(parity_dir / "common" / f"img{img}_proposals.npz")
    boxes = masks_to_boxes_inclusive(_unpack(d["masks256_packed"]))
    assert np.array_equal(boxes.numpy(), d["lowres_boxes_xyxy"])
    for setting, thr in (("paper", 0.5), ("nms_off", 1.0)):
        post = np.load(parity_dir / setting / f"img{img}_post.npz")
        keep = batched_nms(boxes, torch.from_numpy(d["pred_ious"]), torch.from_numpy(d["labels"]), thr)[:800]
        assert keep.tolist() == post["nms_keep"].tolist(), setting
