"""ntt.results: COCO result encoding (RLE, xywh boxes) and result shards."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from ntt.ops import masks_to_boxes_inclusive
from ntt.postprocess import Detections, resize_masks_to_image
from ntt.results import detections_to_coco, encode_masks_rle

# pycocotools' decode trips numpy 2's copy-keyword deprecation; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _decode(seg: dict) -> np.ndarray:
    return mask_utils.decode(dict(seg, counts=seg["counts"].encode()))


def _det(masks: torch.Tensor, scores, labels) -> Detections:
    return Detections(
        masks=masks,
        boxes_xyxy=masks_to_boxes_inclusive(masks),
        scores=torch.tensor(scores, dtype=torch.float32),
        labels=torch.tensor(labels),
        proposal_index=torch.arange(len(scores)),
    )


def test_rle_round_trip_and_non_square_masks():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 37, 53, generator=g) > 0.6
    masks[2] = False
    rles = encode_masks_rle(masks)
    assert len(rles) == 5
    for k, r in enumerate(rles):
        assert isinstance(r["counts"], str) and r["size"] == [37, 53]
        assert np.array_equal(_decode(r).astype(bool), masks[k].numpy())
    assert encode_masks_rle(torch.zeros(0, 4, 4, dtype=torch.bool)) == []


def test_detections_to_coco_fields_and_bbox_convention():
    masks = torch.zeros(3, 20, 30, dtype=torch.bool)
    masks[0, 2:6, 3:10] = True  # inclusive box [3, 2, 9, 5] -> xywh [3, 2, 6, 3]
    masks[1, 7, 8] = True  # one pixel -> [8, 7, 0, 0]
    det = _det(masks, [0.9, 0.5, 0.25], [2, 0, 1])
    res = detections_to_coco(det, image_id=np.int64(42), category_ids=[1, 5, 9])
    assert [r["category_id"] for r in res] == [9, 1, 5]
    assert [r["bbox"] for r in res] == [[3, 2, 6, 3], [8, 7, 0, 0], [0, 0, 0, 0]]
    assert all(isinstance(v, int) for r in res for v in r["bbox"])
    assert [r["score"] for r in res] == [pytest.approx(0.9), 0.5, 0.25]
    assert all(type(r["image_id"]) is int and r["image_id"] == 42 for r in res)
    assert all(type(r["score"]) is float for r in res)
    for k, r in enumerate(res):
        assert np.array_equal(_decode(r["segmentation"]).astype(bool), masks[k].numpy())
    json.dumps(res)  # JSON-ready
    fixed = detections_to_coco(det, 42, [1, 5, 9], box_plus_one=True)
    assert [r["bbox"] for r in fixed] == [[3, 2, 7, 4], [8, 7, 1, 1], [0, 0, 0, 0]]
    assert detections_to_coco(Detections.empty(4, 4), 1, [1]) == []


def _fake_results(image_ids, seed=0):
    rng = random.Random(seed)
    out = []
    for img in image_ids:
        for rank in range(rng.randint(0, 3)):
            out.append({"image_id": img, "category_id": 1, "bbox": [rank, 0, 1, 1], "score": 1.0 - rank / 10})
    return out


def test_fixture_coco_results_top3_of_image14(parity_dir):
    """The complete logits of image 14's top-3 paper detections are stored: re-encode them exactly."""
    d = np.load(parity_dir / "common" / "img14_proposals.npz")
    post = np.load(parity_dir / "paper" / "img14_post.npz")
    want = json.loads((parity_dir / "paper" / "coco_results.json").read_text())[:3]
    idx = d["lowres_logits_full_index"].tolist()
    props = [int(p) for p in post["final_proposal"][:3]]
    logits = torch.from_numpy(d["lowres_logits_full"][[idx.index(p) for p in props]])
    masks = resize_masks_to_image(logits, 600, 800)
    det = Detections(
        masks=masks,
        boxes_xyxy=masks_to_boxes_inclusive(masks),
        scores=torch.from_numpy(post["final_scores"][:3]),
        labels=torch.from_numpy(post["final_labels"][:3]),
        proposal_index=torch.tensor(props),
    )
    got = detections_to_coco(det, 14, [1, 2, 3])
    assert got == want
