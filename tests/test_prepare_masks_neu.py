"""Box -> mask on real boxes-only data (shared NEU-DET) with a tiny RANDOM SAM2: format and shapes only
(random weights: the masks themselves mean nothing)."""

from __future__ import annotations

import json

from conftest import DATA, require_path

from ntt.data.coco import CocoDataset
from ntt.prepare.box_to_mask import add_masks
from ntt.prepare.mask_models import build_masker


def test_neu_det_boxes_to_masks_with_tiny_random_sam2(tmp_path):
    root = require_path(DATA / "neu-det" / "NEU-DET", "shared NEU-DET")
    full = json.loads((root / "instances_neu_det_bbox.json").read_text())
    images = full["images"][:2]
    ids = {im["id"] for im in images}
    sub = {**full, "images": images, "annotations": [a for a in full["annotations"] if a["image_id"] in ids]}
    box_json = tmp_path / "neu2.json"
    box_json.write_text(json.dumps(sub))
    out = add_masks(box_json, root / "IMAGES", build_masker("sam2:tiny_random"), progress=False)
    assert out.name == "neu2_with_segm.json"
    data = json.loads(out.read_text())
    assert data["ntt_masks"]["model"] == "sam2:sam2_tiny_random"
    assert len(data["annotations"]) == len(sub["annotations"])
    for ann in data["annotations"]:
        assert ann["segmentation"] and all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
        assert isinstance(ann["area"], float) and 0 <= ann["area"] <= 416 * 416
        assert ann["bbox"] == next(a["bbox"] for a in sub["annotations"] if a["id"] == ann["id"])
    ds = CocoDataset(out, root / "IMAGES", class_names=None)
    assert not ds.boxes_only and ds.mask(data["annotations"][0]["id"]).shape == (416, 416)
