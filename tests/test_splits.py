"""Class-split tables (method.md §1.4) and class-name resolution."""

from __future__ import annotations

import json

import pytest
from conftest import DATA

from ntt.data.splits import CLASS_SPLITS, COCO_CLASSES, VOC_CLASSES, resolve_class_names

CLARIFAI_JSON = (
    DATA
    / "coco_val2017_clarifai10/datasets/upload/image_segmentation/coco/annotations/instances_val2017_subset.json"
)


def test_table_sizes_and_names():
    assert len(CLASS_SPLITS["default_classes"]) == 80 == len(set(COCO_CLASSES))
    assert len(CLASS_SPLITS["few_shot_classes"]) == 20
    assert set(CLASS_SPLITS["few_shot_classes"]) <= set(COCO_CLASSES)
    for name in ("motorcycle", "airplane", "couch", "potted plant", "dining table", "tv"):
        assert name in CLASS_SPLITS["few_shot_classes"]
    assert VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor"
    assert list(VOC_CLASSES) == sorted(VOC_CLASSES)
    assert CLASS_SPLITS["voc_split1"] == ["bird", "bus", "cow", "motorbike", "sofa"]
    assert CLASS_SPLITS["voc_split2"] == ["aeroplane", "bottle", "cow", "horse", "sofa"]
    assert CLASS_SPLITS["voc_split3"] == ["boat", "cat", "motorbike", "sheep", "sofa"]
    sizes = {"artaxor": 7, "clipart1k": 20, "dior": 20, "fish": 1, "neu_det": 6, "uodd": 3}
    for ds, n in sizes.items():
        assert len(CLASS_SPLITS[f"cdfsod_{ds}"]) == n


def test_coco_semantic_folds():
    fold1 = ["person", "airplane", "boat", "parking meter", "dog", "elephant", "backpack", "suitcase",
             "sports ball", "skateboard", "wine glass", "spoon", "sandwich", "hot dog", "chair",
             "dining table", "mouse", "microwave", "refrigerator", "scissors"]  # fmt: skip
    assert CLASS_SPLITS["coco_semantic_split_1"] == fold1
    folds = [CLASS_SPLITS[f"coco_semantic_split_{f}"] for f in range(1, 5)]
    assert all(len(f) == 20 for f in folds)
    assert sorted(sum(folds, [])) == sorted(COCO_CLASSES)


def test_few_shot_classes_coco_ids():
    """The 20 novel names map to the COCO ids of method.md §1.4 in the real COCO category list."""
    if not CLARIFAI_JSON.exists():
        pytest.skip(f"shared dataset not found at {CLARIFAI_JSON}")
    cats = json.loads(CLARIFAI_JSON.read_text())["categories"]
    assert [c["name"] for c in sorted(cats, key=lambda c: c["id"])] == list(COCO_CLASSES)
    by_name = {c["name"]: c["id"] for c in cats}
    ids = sorted(by_name[n] for n in CLASS_SPLITS["few_shot_classes"])
    assert ids == [1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63, 64, 67, 72]


def test_resolve_class_names():
    assert resolve_class_names("voc_split1", ["x"]) == CLASS_SPLITS["voc_split1"]  # split wins
    assert resolve_class_names(None, ["b", "a", "b"]) == ["b", "a"]
    assert resolve_class_names(None, "bird, boat") == ["bird", "boat"]
    got = resolve_class_names("few_shot_classes", None)
    got.append("mutated")
    assert "mutated" not in CLASS_SPLITS["few_shot_classes"]


def test_resolve_errors():
    with pytest.raises(KeyError, match="known splits: .*few_shot_classes"):
        resolve_class_names("fewshot", None)
    with pytest.raises(ValueError, match="class_split or dataset.class_names"):
        resolve_class_names(None, None)
    with pytest.raises(ValueError, match="empty"):
        resolve_class_names(None, [])
