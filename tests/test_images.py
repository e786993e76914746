"""Tests of ntt.data.images (PIL loading as the reference) and ntt.data.masks (annToMask)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ntt.data import images
from ntt.data.images import load_reference_image, load_rgb, load_test_image, pil_to_tensor, read_image_rgb
from ntt.data.masks import ann_to_mask
from ntt.utils.errors import ImageError, ImageSizeError

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


def test_sam2_input_bilinear_antialias_is_torchvision_resize_on_the_float_tensor(tmp_path):
    """``backbone.sam2.input_resize=bilinear_antialias`` (SAM2ImagePredictor's ToTensor + Resize): known values.

    Downsampling 4 -> 2 with antialias is a triangle filter of half-width 2: output 0 = (0.75 v0 + 0.75 v1 +
    0.25 v2) / 1.75 (without antialias it would be (v0 + v1) / 2); upsampling 2 -> 4 is plain bilinear:
    v0, 0.75 v0 + 0.25 v1, 0.25 v0 + 0.75 v1, v1. Tolerance 1e-6: float32 rounding of sums of 3 terms."""
    from ntt.data.images import sam2_input

    row = np.array([0, 255, 0, 255], np.uint8)
    img = Image.fromarray(np.repeat(np.tile(row, (4, 1))[..., None], 3, axis=2))
    down = sam2_input(img, 2, "bilinear_antialias")
    assert down.shape == (3, 2, 2) and down.dtype == torch.float32
    want = torch.tensor([(0.75 * 0 + 0.75 * 1 + 0.25 * 0) / 1.75, (0.25 * 1 + 0.75 * 0 + 0.75 * 1) / 1.75])
    torch.testing.assert_close(down[0, 0], want, rtol=0, atol=1e-6)
    two = np.zeros((2, 2, 3), np.uint8)
    two[:, 1] = 200  # column 1
    up = sam2_input(Image.fromarray(two), 4, "bilinear_antialias")
    a, b = 0.0, 200 / 255
    want = torch.tensor([a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b])
    torch.testing.assert_close(up[1, 0], want, rtol=0, atol=1e-6)
    # the same size: ToTensor alone (uint8 / 255 in float32)
    same = sam2_input(img, 4, "bilinear_antialias")
    assert torch.equal(same[0, 0], torch.tensor(row, dtype=torch.float32) / 255)
    # the default is NTT's PIL bicubic, what load_test_image gave before the option existed
    path = tmp_path / "t.png"
    Image.fromarray(_rgb_array(30, 50)).save(path)
    assert torch.equal(load_test_image(path, 64), sam2_input(Image.open(path).convert("RGB"), 64))
    assert not torch.equal(load_test_image(path, 64), load_test_image(path, 64, resize="bilinear_antialias"))
    with pytest.raises(ValueError, match=r"backbone.sam2.input_resize=area: choose one of pil_bicubic"):
        sam2_input(img, 4, "area")


def test_load_reference_image_same_size_is_exact_and_other_size_is_an_error(tmp_path):
    arr = _rgb_array(30, 40)
    path = tmp_path / "r.png"
    Image.fromarray(arr).save(path)
    same = load_reference_image(path, 30, 40)
    assert torch.equal(same, pil_to_tensor(Image.fromarray(arr)))
    with pytest.raises(ImageSizeError, match=r"r\.png is 40x30 .* says width=50 height=20"):
        load_reference_image(path, 20, 50)
    # swapped width/height: the message points at the EXIF option
    with pytest.raises(ImageSizeError, match="rotated frame.*exif_orientation=true"):
        load_test_image(path, 64, height=40, width=30)


# ------------------------------------------------------------------------------------------------ modes


def _roundtrip(tmp_path, img: Image.Image, name: str) -> Path:
    path = tmp_path / name
    img.save(path)
    return path


def test_8bit_modes_are_byte_identical_to_pil_convert_rgb(tmp_path):
    """RGB, L, 1, P (with transparency), PA, RGBA, LA, CMYK: exactly `convert("RGB")` (parity)."""
    base = Image.fromarray(_rgb_array(20, 24))
    pal = base.convert("P")
    pal.info["transparency"] = 0
    cases = {
        "rgb.png": base,
        "l.png": base.convert("L"),
        "one.png": base.convert("1"),
        "p_trans.png": pal,
        "rgba.png": base.convert("RGBA"),
        "la.png": base.convert("LA"),
        "cmyk.jpg": base.convert("CMYK"),
        "rgb.jpg": base,
    }
    for name, img in cases.items():
        path = _roundtrip(tmp_path, img, name)
        got = read_image_rgb(path, apply_exif=False)
        assert got.mode == "RGB" and got.size == (24, 20), name
        assert np.array_equal(np.asarray(got), np.asarray(Image.open(path).convert("RGB"))), name
    pa = Image.new("PA", (5, 4))
    pa.putpalette([0, 0, 0, 200, 10, 20] * 128)
    pa.putpixel((1, 1), (1, 0))
    got = np.asarray(images._to_rgb(pa, Path("pa")))  # PA cannot be saved as PNG: in memory
    assert got[1, 1].tolist() == [200, 10, 20]  # alpha dropped, not composited on black


def test_alpha_is_dropped_not_composited(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red under a fully transparent alpha
    got = read_image_rgb(_roundtrip(tmp_path, Image.fromarray(rgba, "RGBA"), "a.png"), apply_exif=False)
    assert np.asarray(got)[0, 0].tolist() == [200, 0, 0]


def test_16bit_grayscale_maps_the_full_range_not_all_white(tmp_path):
    ramp = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = _roundtrip(tmp_path, Image.fromarray(ramp), "g16.png")
    assert Image.open(path).mode == "I;16"
    assert np.asarray(Image.open(path).convert("RGB"))[0, 1:].min() == 255  # what PIL alone gives
    got = np.asarray(read_image_rgb(path, apply_exif=False))
    assert got[0, :, 0].tolist() == [0, 1, 128, 255] and (got[..., 0] == got[..., 2]).all()
    big = Image.frombytes("I;16B", (4, 1), ramp.astype(">u2").tobytes())
    assert np.asarray(read_image_rgb(_roundtrip(tmp_path, big, "g16b.png"), apply_exif=False))[
        0, :, 0
    ].tolist() == [0, 1, 128, 255]


def test_32bit_int_and_float_images(tmp_path, caplog):
    i32 = Image.fromarray(np.array([[0, 65535, 70000]], dtype=np.int32), mode="I")
    with caplog.at_level(logging.WARNING):
        got = np.asarray(read_image_rgb(_roundtrip(tmp_path, i32, "i32.tif"), apply_exif=False))
    assert got[0, :, 0].tolist() == [0, 255, 255] and "i32.tif" in caplog.text and "clipped" in caplog.text
    f32 = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    got = np.asarray(read_image_rgb(_roundtrip(tmp_path, f32, "f.tif"), apply_exif=False))
    assert got[0, :, 0].tolist() == [0, 128, 255]


def _exif_rotated_jpeg(path: Path, h: int = 30, w: int = 40) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" orientation tag
    Image.fromarray(_rgb_array(h, w)).save(path, exif=exif.tobytes())
    return path


def test_exif_orientation_option_and_warning_once(tmp_path, caplog):
    path = _exif_rotated_jpeg(tmp_path / "rot.jpg")
    with caplog.at_level(logging.WARNING):
        assert read_image_rgb(path, apply_exif=False).size == (40, 30)
        read_image_rgb(path, apply_exif=False)
    assert sum("rot.jpg" in r.message and "EXIF orientation 6" in r.message for r in caplog.records) == 1
    assert read_image_rgb(path, apply_exif=True).size == (30, 40)
    # json in the stored frame: fine with the option off, an error naming the option when on
    load_test_image(path, 32, height=30, width=40, apply_exif=False)
    with pytest.raises(ImageSizeError, match="after EXIF rotation.*exif_orientation=false"):
        load_test_image(path, 32, height=30, width=40, apply_exif=True)


def test_truncated_and_corrupt_files_name_the_path(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(_rgb_array(64, 64)).save(good)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ImageError, match="cut.jpg"):
        read_image_rgb(cut, apply_exif=False)
    with pytest.raises(OSError, match="cut.jpg"):  # still an OSError for callers that catch those
        load_test_image(cut, 32)


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
