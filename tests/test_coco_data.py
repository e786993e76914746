"""CocoDataset: loading real COCO-format jsons, class selection, paths, masks, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DATA
from pycocotools import mask as mask_utils

from ntt.data.coco import BOXES_ONLY_MESSAGE, CocoDataset, ann_to_mask, filter_coco_gt

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FRUITS = DATA / "fruits_nuts/data"
COCO128 = DATA / "coco128-seg"
CLARIFAI = DATA / "coco_val2017_clarifai10/datasets/upload/image_segmentation/coco"
NEU = DATA / "neu-det/NEU-DET"


def need(path):
    if not path.exists():
        pytest.skip(f"shared dataset not found at {path} (set NTT_SHARED to the team's shared folder)")
    return path


def tiny_coco() -> dict:
    """Two images, three categories; no iscrowd/area keys on purpose."""
    return {
        "images": [
            {"id": 7, "file_name": "a.png", "height": 40, "width": 50},
            {"id": 3, "file_name": "b.png", "height": 40, "width": 50},
        ],
        "categories": [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 9, "name": "bird"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [10, 10, 20, 10],
             "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]]},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [0, 0, 5, 5], "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]]},
            {"id": 3, "image_id": 3, "category_id": 5, "bbox": [1, 1, 3, 3]},  # no segmentation
        ],
    }  # fmt: skip


def test_tiny_selection_and_defaults(tmp_path):
    ds = CocoDataset(tiny_coco(), tmp_path, class_names=["cat", "dog"])
    assert ds.category_ids == [2, 5] and ds.category_names == ["dog", "cat"]
    assert ds.image_ids == [7, 3]  # json order
    a1 = ds.annotations(7)[0]
    assert a1["iscrowd"] == 0
    mask = ann_to_mask(a1, 40, 50)
    assert a1["area"] == float(mask.sum()) > 0  # area computed from the polygon
    assert ds.annotations(3)[0]["area"] == 9.0  # no segmentation: box area
    assert [a["id"] for a in ds.annotations(7)] == [1, 2]
    assert not ds.has_masks and not ds.boxes_only  # annotation 3 lacks a mask
    assert np.array_equal(ds.mask(1), mask)
    all_cats = CocoDataset(tiny_coco(), tmp_path)
    assert all_cats.category_ids == [2, 5, 9]


def test_tiny_filtered_gt():
    data = tiny_coco()
    before = json.dumps(data, sort_keys=True)
    ds = CocoDataset(data, None, class_names="cat")
    gt = filter_coco_gt(data, ds.category_ids)
    assert [im["id"] for im in gt["images"]] == [7, 3]  # all images kept
    assert [c["id"] for c in gt["categories"]] == [5, 2, 9]  # all categories still listed
    assert [a["id"] for a in gt["annotations"]] == [1, 3]
    assert all("area" in a and a["iscrowd"] == 0 for a in gt["annotations"])
    assert [im["id"] for im in filter_coco_gt(data, ds.category_ids, [3])["images"]] == [3]
    assert json.dumps(data, sort_keys=True) == before  # input untouched
    with pytest.raises(ValueError, match="image ids not in the json: \\[99\\]"):
        filter_coco_gt(data, [5], [99])


def test_image_path_errors(tmp_path):
    ds = CocoDataset(tiny_coco(), tmp_path, class_names=["cat"])
    with pytest.raises(FileNotFoundError, match="a.png.*dataset.image_root"):
        ds.image_path(7)
    (tmp_path / "a.png").write_bytes(b"x")
    assert ds.image_path(7) == tmp_path / "a.png"
    assert ds.image_info(7) == {"id": 7, "file_name": "a.png", "height": 40, "width": 50}
    with pytest.raises(KeyError, match="image id 1 "):
        ds.image_info(1)
    with pytest.raises(ValueError, match="dataset.image_root"):
        CocoDataset(tiny_coco(), None).image_path(7)


def test_load_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDataset(missing, tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid json"):
        CocoDataset(bad, tmp_path)
    nocats = tmp_path / "nocats.json"
    nocats.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="nocats.json: missing or invalid 'categories'"):
        CocoDataset(nocats, tmp_path)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(tiny_coco()))
    with pytest.raises(ValueError, match="\\['zebra'\\].*available names: 'cat', 'dog', 'bird'") as e:
        CocoDataset(good, tmp_path, class_names=["cat", "zebra"])
    assert "good.json" in str(e.value)
    with pytest.raises(KeyError, match="known splits"):
        CocoDataset(good, tmp_path, class_split="nope")
    with pytest.raises(ValueError, match="from dataset.class_split 'voc_split1'"):
        CocoDataset(good, tmp_path, class_split="voc_split1")
    dup = tiny_coco()
    dup["annotations"].append(dict(dup["annotations"][0]))
    with pytest.raises(ValueError, match="duplicate annotation id 1"):
        CocoDataset(dup, tmp_path)
    orphan = tiny_coco()
    orphan["annotations"][0]["image_id"] = 1234
    with pytest.raises(ValueError, match="annotation ids \\[1\\]"):
        CocoDataset(orphan, tmp_path)


def test_fruits_nuts():
    root = need(FRUITS)
    ds = CocoDataset(root / "trainval.json", root / "images", class_names=["fig", "date"])
    assert len(ds) == 18 and ds.category_ids == [1, 2] and ds.category_names == ["date", "fig"]
    assert ds.has_masks and not ds.boxes_only
    img = ds.image_ids[0]
    assert ds.image_path(img).is_file()
    info = ds.image_info(img)
    assert (info["height"], info["width"]) == (600, 800)
    anns = ds.annotations(img)
    assert anns and all(a["category_id"] in (1, 2) for a in anns)
    m = ds.mask(anns[0]["id"])
    assert m.shape == (600, 800) and abs(m.sum() - anns[0]["area"]) / anns[0]["area"] < 0.05
    gt = filter_coco_gt(ds.raw, ds.category_ids)
    assert len(gt["images"]) == 18 and len(gt["categories"]) == 3
    assert {a["category_id"] for a in gt["annotations"]} == {1, 2}
    assert len(gt["annotations"]) == 71 + 41


def test_coco128_split():
    root = need(COCO128)
    ds = CocoDataset(
        root / "instances_coco128_seg.json", root / "images/train2017", class_split="few_shot_classes"
    )
    assert ds.category_ids == [1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63, 64, 67, 72]
    assert ds.category_names[3] == "motorcycle" and ds.category_ids.index(72) == 19
    assert len(ds) == 128 and ds.has_masks
    for img in ds.image_ids[:3]:
        assert ds.image_path(img).is_file()


def test_clarifai_crowd():
    root = need(CLARIFAI)
    ds = CocoDataset(
        root / "annotations/instances_val2017_subset.json", root / "images", class_names=["person"]
    )
    crowd = [a for a in ds.all_annotations() if a["iscrowd"]]
    assert len(crowd) == 1
    c = crowd[0]
    assert isinstance(c["segmentation"]["counts"], list)  # uncompressed RLE
    m = ds.mask(c["id"])
    info = ds.image_info(c["image_id"])
    assert m.shape == (info["height"], info["width"])
    # the json's own area is kept (COCO's crowd area 743 is not the decoded pixel count, 710)
    assert c["area"] == 743 and int(m.sum()) == 710
    box = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))
    assert np.abs(box - np.array(c["bbox"])).max() <= 2  # decoded in the right frame (COCO box is loose)


def test_neu_det_boxes_only():
    root = need(NEU)
    ds = CocoDataset(root / "instances_neu_det_bbox.json", root / "IMAGES", class_split="cdfsod_neu_det")
    assert len(ds.category_ids) == 6 and ds.boxes_only and not ds.has_masks
    ann = ds.all_annotations()[0]
    assert ds.image_path(ann["image_id"]).is_file()
    with pytest.raises(ValueError, match="boxes only") as e:
        ds.mask(ann["id"])
    assert BOXES_ONLY_MESSAGE in str(e.value) and str(ann["id"]) in str(e.value)
    assert len(filter_coco_gt(ds.raw, ds.category_ids)["annotations"]) == 4189
