"""ntt.postprocess: resize, semantic soft merging, NMS -> score filter -> decay -> top-k (known answers)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from ntt.ops import masks_to_boxes_inclusive
from ntt.postprocess import Detections, postprocess_detections, resize_masks_to_image, semantic_soft_merge

NAN = float("nan")
# pycocotools' decode trips numpy 2's copy-keyword deprecation; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
S75 = math.sqrt(0.75)


def rect_logits(*rects, res: int = 256) -> torch.Tensor:
    """[len(rects), res, res] logits: +10 inside rows [r0, r1) x cols [c0, c1), -10 elsewhere; None = empty."""
    out = torch.full((len(rects), res, res), -10.0)
    for k, r in enumerate(rects):
        if r is not None:
            r0, r1, c0, c1 = r
            out[k, r0:r1, c0:c1] = 10.0
    return out


def test_resize_masks_to_image_exact_rectangles_and_chunking():
    logits = rect_logits((10, 50, 30, 31), (0, 256, 0, 256), None)
    m = resize_masks_to_image(logits, 512, 512)
    assert m.dtype == torch.bool and m.shape == (3, 512, 512)
    # 2x upsampling of a +-10 step: output row p samples source row p / 2 - 0.25 -> the step lands exactly on
    # [2 r0, 2 r1) (values +-5 at the edges)
    want = torch.zeros(512, 512, dtype=torch.bool)
    want[20:100, 60:62] = True
    assert torch.equal(m[0], want)
    assert m[1].all() and not m[2].any()
    assert torch.equal(resize_masks_to_image(logits, 512, 512, chunk_size=1), m)
    assert resize_masks_to_image(logits[:0], 5, 7).shape == (0, 5, 7)


def _masks_4x4(*col_ranges):
    out = torch.zeros(len(col_ranges), 4, 4, dtype=torch.bool)
    for k, cr in enumerate(col_ranges):
        if cr is not None:
            out[k, :, cr[0] : cr[1]] = True
    return out


def test_semantic_soft_merge_hand_computed():
    masks = _masks_4x4((0, 2), (1, 3), (0, 2), (0, 2), (3, 4), None, (2, 4))
    labels = torch.tensor([0, 0, 1, 0, 0, 0, 0])
    emb = torch.tensor([[1, 0], [0.5, S75], [1, 0], [1, 0], [-1, 0], [1, 0], [0, 1]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    ios, decayed, _ = semantic_soft_merge(masks, labels, emb, scores)
    want_ios = [
        0.0,  # first of class 0
        0.25,  # half covered by A, cosine 0.5
        0.0,  # class 1: never compared with class 0
        1.0,  # duplicate of A with cosine 1 (max over A: 1, B: 0.5 * 0.5)
        0.0,  # covered by nothing earlier with positive cosine (A: cosine -1 clamped; B: no overlap)
        NAN,  # empty mask: 0 / 0 (parity)
        0.5 * S75,  # half covered by B (cosine S75); E covers half too but cosine 0
    ]
    np.testing.assert_allclose(ios.numpy(), want_ios, atol=1e-6)
    want = [0.9, 0.8 * S75, 0.7, 0.0, 0.5, NAN, 0.3 * math.sqrt(1 - 0.5 * S75)]
    np.testing.assert_allclose(decayed.numpy(), want, atol=1e-6)


def _scenario():
    # (rect in the 256 frame, pred_iou, label, score, embedding)
    rows = [
        ((10, 50, 10, 50), 0.90, 0, 0.8, [1, 0]),  # p0
        ((10, 48, 10, 50), 0.85, 0, 0.9, [1, 0]),  # p1: IoU > 0.5 with p0, same class -> suppressed
        ((10, 50, 10, 50), 0.80, 1, 0.7, [0, 1]),  # p2: same box, other class -> kept
        ((30, 50, 10, 50), 0.70, 0, 0.6, [0.5, S75]),  # p3: lower half of p0, box IoU 741/1521 < 0.5
        (None, 0.95, 0, NAN, [NAN, NAN]),  # p4: empty 256 mask -> NaN score, zero-area box
        ((200, 220, 200, 220), 0.60, 0, 0.0, [1, 0]),  # p5: score 0 -> removed after NMS
        ((100, 120, 100, 140), 0.50, 2, 0.3, [0, 1]),  # p6
    ]
    logits = rect_logits(*[r[0] for r in rows])
    piou = torch.tensor([r[1] for r in rows])
    labels = torch.tensor([r[2] for r in rows])
    scores = torch.tensor([r[3] for r in rows])
    emb = torch.tensor([r[4] for r in rows], dtype=torch.float32)
    return logits, piou, labels, scores, emb


def test_postprocess_detections_hand_scenario():
    logits, piou, labels, scores, emb = _scenario()
    det, tr = postprocess_detections(logits, piou, labels, scores, emb, height=512, width=512)
    assert tr["nms_keep"].tolist() == [4, 0, 2, 3, 5, 6]
    assert tr["nms_keep_pos"].tolist() == [0, 2, 3, 6]
    # p3 lies inside p0 at full resolution: IoS 1 x cosine 0.5
    np.testing.assert_allclose(tr["ios"].numpy(), [0, 0, 0.5, 0], atol=1e-7)
    np.testing.assert_allclose(tr["scores_decayed"].numpy(), [0.8, 0.7, 0.6 * math.sqrt(0.5), 0.3], atol=1e-6)
    assert tr["final_order"].tolist() == [0, 1, 2, 3]
    assert tr["final_proposal"].tolist() == [0, 2, 3, 6]
    assert det.proposal_index.tolist() == [0, 2, 3, 6]
    assert det.labels.tolist() == [0, 1, 0, 2]
    assert det.boxes_xyxy.tolist() == [
        [20, 20, 99, 99],
        [20, 20, 99, 99],
        [20, 60, 99, 99],
        [200, 200, 279, 239],
    ]
    assert tr["final_boxes_xyxy"].tolist() == det.boxes_xyxy.tolist()
    assert det.masks.shape == (4, 512, 512) and det.masks.dtype == torch.bool
    assert int(det.masks[3].sum()) == 40 * 80
    assert torch.equal(masks_to_boxes_inclusive(det.masks), det.boxes_xyxy)
    assert tr["lowres_boxes_xyxy"][4].tolist() == [0, 0, 0, 0]


def test_postprocess_top_k_and_nms_cap():
    logits, piou, labels, scores, emb = _scenario()
    det, tr = postprocess_detections(logits, piou, labels, scores, emb, height=512, width=512, num_out=2)
    assert tr["final_proposal"].tolist() == [0, 2]
    assert len(det) == 2
    # cap = num_out * nms_cap_factor = 2 NMS entries: [4, 0] -> only p0 has a positive score
    det, tr = postprocess_detections(
        logits, piou, labels, scores, emb, height=512, width=512, num_out=2, nms_cap_factor=1
    )
    assert tr["nms_keep"].tolist() == [4, 0]
    assert tr["nms_keep_pos"].tolist() == [0]
    assert det.proposal_index.tolist() == [0]
    # nms_thr 1.0: nothing suppressed, p1 now decays against p0 (same class, IoS 1 x cosine 1 -> 0 score)
    det, tr = postprocess_detections(logits, piou, labels, scores, emb, height=512, width=512, nms_thr=1.0)
    assert tr["nms_keep"].tolist() == [4, 0, 1, 2, 3, 5, 6]
    assert tr["nms_keep_pos"].tolist() == [0, 1, 2, 3, 6]
    np.testing.assert_allclose(tr["ios"].numpy(), [0, 1, 0, 0.5, 0], atol=1e-6)


def test_final_order_is_by_decayed_score():
    logits = rect_logits((0, 20, 0, 20), (100, 120, 100, 120), (200, 220, 200, 220))
    det, tr = postprocess_detections(
        logits,
        torch.tensor([0.9, 0.8, 0.7]),
        torch.tensor([0, 1, 0]),
        torch.tensor([0.2, 0.5, 0.4]),
        torch.eye(3),
        height=256,
        width=256,
    )
    assert tr["nms_keep_pos"].tolist() == [0, 1, 2]
    assert tr["final_order"].tolist() == [1, 2, 0]
    assert det.scores.tolist() == pytest.approx([0.5, 0.4, 0.2])
    assert det.boxes_xyxy[0].tolist() == [100, 100, 119, 119]  # 256 -> 256 is the identity


def test_empty_results_do_not_crash():
    logits, piou, labels, scores, emb = _scenario()
    det, tr = postprocess_detections(logits, piou, labels, torch.zeros(7), emb, height=30, width=40)
    assert isinstance(det, Detections) and len(det) == 0
    assert det.masks.shape == (0, 30, 40) and det.boxes_xyxy.shape == (0, 4)
    assert tr["nms_keep"].tolist() == [4, 0, 2, 3, 5, 6] and tr["nms_keep_pos"].numel() == 0
    det, tr = postprocess_detections(
        torch.zeros(0, 256, 256), torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0),
        torch.zeros(0, 2), height=30, width=40,
    )  # fmt: skip
    assert len(det) == 0 and tr["final_order"].numel() == 0


def test_mask_empty_at_full_resolution_parity_and_fix():
    # one positive 256-res pixel vanishes when downsampled (antialias) to 64x64: parity ranks its NaN first
    logits = rect_logits((0, 128, 0, 128), (200, 201, 200, 201))
    args = (logits, torch.tensor([0.9, 0.8]), torch.tensor([0, 0]), torch.tensor([0.7, 0.5]), torch.eye(2))
    assert resize_masks_to_image(logits[1:], 64, 64).sum() == 0
    det, tr = postprocess_detections(*args, height=64, width=64)
    assert tr["ios"][1].isnan() and tr["scores_decayed"][1].isnan()
    assert tr["final_proposal"].tolist() == [1, 0]  # NaN sorts first, as the reference's argsort
    assert det.scores[0].isnan() and det.boxes_xyxy[0].tolist() == [0, 0, 0, 0]
    det, tr = postprocess_detections(*args, height=64, width=64, drop_empty_masks=True)
    assert tr["final_proposal"].tolist() == [0]
    assert det.scores.tolist() == pytest.approx([0.7])


def test_box_plus_one_changes_nms_boxes_only_when_asked():
    # inclusive boxes [10,10,13,12] (area 6) and [10,10,13,11] (area 3): IoU exactly 0.5 -> kept;
    # exclusive (+1) boxes: 8 / 12 = 0.67 -> suppressed
    logits = rect_logits((10, 13, 10, 14), (10, 12, 10, 14))
    args = (logits, torch.tensor([0.9, 0.8]), torch.tensor([0, 0]), torch.tensor([0.5, 0.5]), torch.eye(2))
    _, tr = postprocess_detections(*args, height=256, width=256)
    assert tr["nms_keep"].tolist() == [0, 1]
    _, tr = postprocess_detections(*args, height=256, width=256, box_plus_one=True)
    assert tr["nms_keep"].tolist() == [0]


def _unpack(packed: np.ndarray) -> torch.Tensor:
    n = packed.shape[0]
    return torch.from_numpy(np.unpackbits(packed, axis=1)[:, :65536].reshape(n, 256, 256).astype(bool))


@pytest.mark.parity
def test_fixture_full_resolution_masks_boxes_and_rle(parity_dir):
    """Image 14 stores the complete logits of its top-3 paper detections (16, 48, 15) and of proposal 37."""
    d = np.load(parity_dir / "common" / "img14_proposals.npz")
    post = np.load(parity_dir / "paper" / "img14_post.npz")
    results = [
        r for r in json.loads((parity_dir / "paper" / "coco_results.json").read_text()) if r["image_id"] == 14
    ]
    idx = d["lowres_logits_full_index"].tolist()
    masks = resize_masks_to_image(torch.from_numpy(d["lowres_logits_full"]), 600, 800)
    boxes = masks_to_boxes_inclusive(masks)
    assert masks[idx.index(37)].sum() == 0  # the empty 256 mask stays empty
    for rank in range(3):
        prop = int(post["final_proposal"][rank])
        k = idx.index(prop)
        assert boxes[k].tolist() == post["final_boxes_xyxy"][rank].tolist()
        rle = dict(results[rank]["segmentation"], counts=results[rank]["segmentation"]["counts"].encode())
        assert np.array_equal(mask_utils.decode(rle).astype(bool), masks[k].numpy())


@pytest.mark.parity
@pytest.mark.parametrize("img", [14, 15, 16])
def test_fixture_nms_keep_and_score_filter(parity_dir, img):
    """NMS and the score filter only need the 256-res masks: +-1 logits built from them suffice."""
    d = np.load(parity_dir / "common" / f"img{img}_proposals.npz")
    logits = _unpack(d["masks256_packed"]).float() * 2 - 1
    for setting, thr in (("paper", 0.5), ("nms_off", 1.0)):
        post = np.load(parity_dir / setting / f"img{img}_post.npz")
        _, tr = postprocess_detections(
            logits, torch.from_numpy(d["pred_ious"]), torch.from_numpy(d["labels"]),
            torch.from_numpy(d["scores"]), torch.from_numpy(d["embeddings"]),
            height=60, width=80, nms_thr=thr,
        )  # fmt: skip
        assert tr["nms_keep"].tolist() == post["nms_keep"].tolist()
        assert tr["nms_keep_pos"].tolist() == post["nms_keep_pos"].tolist()
        assert np.array_equal(tr["lowres_boxes_xyxy"].numpy(), d["lowres_boxes_xyxy"])
