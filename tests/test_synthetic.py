"""Synthetic dataset generator: determinism, exact masks, COCO validity, enough valid references."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from ntt.data.coco import CocoDataset
from ntt.data.synthetic import _render_image, generate_synthetic_dataset, main

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL = dict(num_images=5, image_size=(160, 200), min_size=24, max_size=70, seed=3)


def is_valid(ann: dict, width: int, height: int) -> bool:
    """The reference validity filter (method.md §1.2)."""
    x, y, w, h = ann["bbox"]
    return (
        ann.get("iscrowd", 0) != 1
        and w >= 32
        and h >= 32
        and x >= 10
        and y >= 10
        and width - (x + w) >= 10
        and height - (y + h) >= 10
    )


def sample(coco: dict, cat_ids: list[int], shots: int, seed: int) -> dict[int, list[int]]:
    """Minimal copy of the reference sampler (method.md §1.2 steps 1-4) for this test."""
    random.seed(seed)
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    per_cat: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        if a["category_id"] in cat_ids:
            per_cat.setdefault(a["category_id"], []).append(a)
    out = {}
    for cat, anns in per_cat.items():
        random.shuffle(anns)
        taken, imgs = [], set()
        for a in anns:
            if is_valid(a, *sizes[a["image_id"]]) and a["image_id"] not in imgs:
                taken.append(a["id"])
                imgs.add(a["image_id"])
            if len(taken) == shots:
                break
        if len(taken) < shots:
            raise AssertionError(f"category {cat}: only {len(taken)} valid references for {shots} shots")
        out[cat] = taken
    return out


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synthetic_default"))


def test_deterministic_bytes(tmp_path):
    a = generate_synthetic_dataset(tmp_path / "a", **SMALL)
    b = generate_synthetic_dataset(tmp_path / "b", **SMALL)
    files_a = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.root) for p in b.root.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == SMALL["num_images"] + 3
    for rel in files_a:
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel
    c = generate_synthetic_dataset(tmp_path / "c", **dict(SMALL, seed=4))
    assert (c.root / files_a[-1]).read_bytes() != (a.root / files_a[-1]).read_bytes()


def test_masks_exact_and_coco_valid(tmp_path):
    paths = generate_synthetic_dataset(tmp_path, **SMALL)
    coco = json.loads(paths.annotations.read_text())
    h, w = SMALL["image_size"]
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4]
    classes = tuple(c["name"] for c in coco["categories"])
    for i, im in enumerate(coco["images"]):
        assert (im["height"], im["width"]) == (h, w)
        pixels = np.asarray(Image.open(paths.image_root / im["file_name"]))
        # re-render the image with the generator's own stream: same pixels, same visible masks
        rng = np.random.default_rng([SMALL["seed"], i])
        ref_pixels, instances = _render_image(
            rng, i, classes, h, w, (1, 5), SMALL["min_size"], SMALL["max_size"]
        )
        assert np.array_equal(pixels, ref_pixels)
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        assert len(anns) == len(instances) >= 1
        union = np.zeros((h, w), dtype=int)
        for ann, (cls, visible) in zip(anns, instances):
            decoded = mask_utils.decode(ann["segmentation"]).astype(bool)
            assert np.array_equal(decoded, visible)
            assert ann["category_id"] == cls + 1 and ann["iscrowd"] == 0
            assert ann["area"] == int(visible.sum())
            ys, xs = np.nonzero(visible)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["bbox"] == mask_utils.toBbox(ann["segmentation"]).tolist()
            union += decoded
        assert union.max() == 1  # visible masks are disjoint (occlusion resolved)
    # train/test split: disjoint, covering, both valid COCO loadable by CocoDataset
    train = CocoDataset(paths.train, paths.image_root)
    test = CocoDataset(paths.test, paths.image_root)
    assert sorted(train.image_ids + test.image_ids) == [im["id"] for im in coco["images"]]
    assert test.image_ids == [3]  # index 2 of 5 -> id 3
    assert train.category_names == list(classes) and train.has_masks
    for img in test.image_ids:
        assert test.image_path(img).is_file()


def test_enough_valid_references(default_set):
    """Default set: every class has >= 5 distinct train images with a valid reference; 3/5-shot sampling works."""
    train = json.loads(default_set.train.read_text())
    test = json.loads(default_set.test.read_text())
    assert len(train["images"]) == 16 and len(test["images"]) == 8
    for cat in train["categories"]:
        imgs = {
            a["image_id"]
            for a in train["annotations"]
            if a["category_id"] == cat["id"] and is_valid(a, 640, 480)
        }
        assert len(imgs) >= 5, cat["name"]
    valid = [is_valid(a, 640, 480) for a in train["annotations"] + test["annotations"]]
    assert 0.3 < np.mean(valid) < 1.0  # a fraction, not all (truncated / small / occluded ones exist)
    cat_ids = [c["id"] for c in train["categories"]]
    for seed in range(5):
        for shots in (3, 5):
            refs = sample(train, cat_ids, shots, seed)
            assert sorted(refs) == cat_ids and all(len(v) == shots for v in refs.values())
    assert all(len([a for a in test["annotations"] if a["category_id"] == c]) >= 2 for c in cat_ids)


def test_other_classes_and_errors(tmp_path):
    paths = generate_synthetic_dataset(
        tmp_path,
        num_images=3,
        image_size=(150, 150),
        classes=("hexagon", "cross", "circle"),
        min_size=30,
        max_size=60,
    )
    coco = json.loads(paths.annotations.read_text())
    assert [c["name"] for c in coco["categories"]] == ["hexagon", "cross", "circle"]
    with pytest.raises(ValueError, match="unknown synthetic classes \\['blob'\\]"):
        generate_synthetic_dataset(tmp_path, classes=("circle", "blob"))
    with pytest.raises(ValueError, match="num_images"):
        generate_synthetic_dataset(tmp_path, num_images=2)
    with pytest.raises(ValueError, match="max_size"):
        generate_synthetic_dataset(tmp_path, image_size=(100, 100), max_size=140)


def test_cli(tmp_path):
    out = tmp_path / "cli"
    assert main([str(out), "--num-images", "3", "--seed", "1", "--height", "200", "--width", "240"]) == 0
    coco = json.loads((out / "train.json").read_text())
    assert len(coco["images"]) == 2 and (out / coco["images"][0]["file_name"]).is_file()
    with pytest.raises(SystemExit):
        main([str(out), "--classes", "nope"])
