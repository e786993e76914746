"""Tests of ntt.data.images (PIL loading as the reference) and ntt.data.masks (annToMask)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ntt.data.images import load_reference_image, load_rgb, load_test_image, pil_to_tensor
from ntt.data.masks import ann_to_mask

FRUITS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fruits_nuts" / "data"


def _rgb_array(h=30, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_pil_to_tensor_is_float64_division_then_float32():
    arr = _rgb_array()
    t = pil_to_tensor(Image.fromarray(arr))
    assert t.dtype == torch.float32 and t.shape == (3, 30, 40)
    expected = torch.from_numpy(arr / 255.0).permute(2, 0, 1).to(torch.float32)
    assert torch.equal(t, expected)
    assert t[:, 0, 0].tolist() == pytest.approx((arr[0, 0] / 255.0).tolist(), abs=1e-7)
    # every uint8 value maps to float32(v / 255.0 computed in float64)
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    vals = pil_to_tensor(Image.fromarray(ramp))[0, 0]
    assert torch.equal(vals, torch.tensor([v / 255.0 for v in range(256)], dtype=torch.float64).float())


def test_load_rgb_missing_and_unreadable(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_rgb(tmp_path / "missing.jpg")
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    with pytest.raises(OSError, match="broken.jpg"):
        load_rgb(bad)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_load_rgb_converts_modes_like_pil(tmp_path, mode):
    img = Image.fromarray(_rgb_array()).convert(mode)
    path = tmp_path / f"im_{mode}.png"
    img.save(path)
    got = load_rgb(path)
    assert got.mode == "RGB"
    assert np.array_equal(np.asarray(got), np.asarray(Image.open(path).convert("RGB")))


def test_load_rgb_ignores_exif_orientation(tmp_path):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" orientation tag
    Image.fromarray(_rgb_array(30, 40)).save(path, exif=exif.tobytes())
    assert Image.open(path).getexif()[0x0112] == 6
    assert load_rgb(path).size == (40, 30)  # not transposed


def test_load_test_image_is_pil_bicubic_stretch(tmp_path):
    path = tmp_path / "t.png"
    Image.fromarray(_rgb_array(30, 50)).save(path)
    got = load_test_image(path, size=64)
    assert got.shape == (3, 64, 64)
    ref = Image.open(path).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)
    assert torch.equal(got, pil_to_tensor(ref))


def test_load_reference_image_same_and_other_size(tmp_path, caplog):
    arr = _rgb_array(30, 40)
    path = tmp_path / "r.png"
    Image.fromarray(arr).save(path)
    same = load_reference_image(path, 30, 40)
    assert torch.equal(same, pil_to_tensor(Image.fromarray(arr)))
    with caplog.at_level(logging.WARNING):
        other = load_reference_image(path, 20, 50)
    assert other.shape == (3, 20, 50)
    assert torch.equal(other, pil_to_tensor(Image.fromarray(arr).resize((50, 20))))
    assert "r.png" in caplog.text


# ------------------------------------------------------------------------------------------------ masks


def _coco_dataset():
    poly = [[10.5, 5.0, 30.2, 6.1, 28.0, 25.9, 12.3, 22.0], [35.0, 2.0, 39.0, 2.0, 37.0, 9.0]]
    dense = np.zeros((30, 40), np.uint8)
    dense[3:17, 21:33] = 1
    dense[20:28, 2:9] = 1
    flat = dense.flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    from pycocotools import mask as mask_utils

    compressed = mask_utils.encode(np.asfortranarray(dense))
    compressed["counts"] = compressed["counts"].decode("ascii")
    return {
        "images": [{"id": 1, "height": 30, "width": 40, "file_name": "x.png"}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": poly,
                "bbox": [10, 2, 29, 24],
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "segmentation": {"size": [30, 40], "counts": counts},
                "bbox": [2, 3, 31, 25],
                "iscrowd": 1,
            },
            {
                "id": 3,
                "image_id": 1,
                "category_id": 1,
                "segmentation": compressed,
                "bbox": [2, 3, 31, 25],
                "iscrowd": 0,
            },
        ],
    }


def test_ann_to_mask_equals_coco_anntomask():
    from pycocotools.coco import COCO

    data = _coco_dataset()
    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    for ann in data["annotations"]:
        got = ann_to_mask(ann, 30, 40)
        assert got.dtype == np.uint8 and got.shape == (30, 40)
        assert np.array_equal(got, coco.annToMask(coco.anns[ann["id"]])), ann["id"]
    assert ann_to_mask(data["annotations"][1], 30, 40).sum() == 14 * 12 + 8 * 7


def test_ann_to_mask_without_segmentation_names_annotation():
    with pytest.raises(ValueError, match="annotation 9"):
        ann_to_mask({"id": 9, "image_id": 1, "segmentation": []}, 10, 10)


@pytest.mark.data
def test_fruits_nuts_images_match_json_size():
    if not (FRUITS / "trainval.json").is_file():
        pytest.skip("fruits_nuts data absent")
    import json

    coco = json.loads((FRUITS / "trainval.json").read_text())
    info = coco["images"][0]
    img = load_reference_image(FRUITS / "images" / info["file_name"], info["height"], info["width"])
    assert img.shape == (3, info["height"], info["width"])
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
