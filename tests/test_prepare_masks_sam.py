"""Box -> mask through SAM v1 (`segment-anything`, the paper's mask model) with a TINY random Sam.

The tiny Sam is built from segment_anything's own modules and stands in for the ViT-H builder in
``segment_anything.sam_model_registry["vit_h"]``, so everything else is the path a user runs: the
checkpoint file (a plain state dict named like the official one) is found by ``build_masker`` / ``ntt
prepare masks --mask-model sam_vit_h``, loaded with ``torch.load`` + strict ``load_state_dict`` as
segment_anything's builder does, and the masks come from ntt's ``SamViTHMasker``. The expected answers are
recomputed here the authors' way (``ResizeLongestSide`` + ``Sam.forward`` per chunk of boxes, outer
contours, <= 2-point contours dropped, box rectangle when nothing survives, area = mask pixels).

Random weights: the masks mean nothing; this checks the procedure, formats, fallback and resume only.
segment-anything imports torchvision, which ntt does not install (no torchvision imports beside the CPU
torch of `make setup`): these tests skip there, and run in an environment that has both.
The last test (resume across contour tracers) uses a fake mask model and runs everywhere.
"""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from conftest import DATA, require_path
from PIL import Image

from ntt.prepare import main as prepare_main
from ntt.prepare.box_to_mask import add_masks
from ntt.prepare.contours import external_contours
from ntt.prepare.errors import PrepareError
from ntt.prepare.mask_models import build_masker

CKPT_NAME = "sam_vit_h_4b8939.pth"  # the official file name build_masker looks for


def _segment_anything_or_skip():
    """Import segment_anything, or skip naming what is missing."""
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # ImportError, or PyPI's torchvision beside another torch build (RuntimeError)
        pytest.skip(
            f"torchvision cannot be imported here ({type(exc).__name__}: {exc}); segment-anything needs it"
        )
    try:
        import segment_anything
    except ImportError as exc:
        pytest.skip(f"segment-anything not installed ({exc}): `pip install segment-anything torchvision`")
    return segment_anything


def _tiny_sam(checkpoint=None):
    """A small Sam with segment_anything's modules (image size 256, 2 ViT blocks), loaded like `_build_sam`."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    dim, img, patch = 32, 256, 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=2,
            embed_dim=64,
            img_size=img,
            mlp_ratio=2,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=[1],
            window_size=7,
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(img // patch, img // patch),
            input_image_size=(img, img),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    if checkpoint is not None:
        with open(checkpoint, "rb") as f:
            sam.load_state_dict(torch.load(f))
    return sam


@pytest.fixture
def tiny_sam_vit_h(tmp_path, monkeypatch):
    """A checkpoint folder holding a tiny random Sam under the official ViT-H file name; the registry's
    vit_h builder builds the tiny architecture. Returns (checkpoint dir, the model as saved)."""
    sa = _segment_anything_or_skip()
    torch.manual_seed(0)
    model = _tiny_sam()
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    torch.save(model.state_dict(), ckpt_dir / CKPT_NAME)  # a plain state dict, like the official file
    monkeypatch.setitem(sa.sam_model_registry, "vit_h", _tiny_sam)
    return ckpt_dir, model


def _write_images(folder, sizes):
    """Random RGB PNGs (no EXIF) of the given (h, w) sizes; returns their COCO image records."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate(sizes, start=1):
        name = f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
        images.append({"id": i, "file_name": name, "height": h, "width": w})
    return images


def _box_json(path, images, boxes_per_image):
    anns, next_id = [], 100
    for im, boxes in zip(images, boxes_per_image):
        for box in boxes:
            anns.append(
                {"id": next_id, "image_id": im["id"], "category_id": 1, "bbox": box, "area": 0, "iscrowd": 0}
            )
            next_id += 1
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    path.write_text(json.dumps(data))
    return data


def _authors_recipe(sam, image_path, boxes_xywh, chunk=50):
    """Masks the authors' way: ResizeLongestSide, then Sam.forward (which encodes the image) per chunk."""
    from segment_anything.utils.transforms import ResizeLongestSide

    with Image.open(image_path) as im:
        image = np.asarray(im.convert("RGB"))
    resize = ResizeLongestSide(sam.image_encoder.img_size)
    tensor = torch.as_tensor(resize.apply_image(image)).permute(2, 0, 1).contiguous()
    out = []
    for s in range(0, len(boxes_xywh), chunk):
        xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes_xywh[s : s + chunk]])
        boxes = resize.apply_boxes_torch(xyxy, image.shape[:2])
        with torch.no_grad():
            res = sam(
                [{"image": tensor, "boxes": boxes, "original_size": image.shape[:2]}], multimask_output=False
            )
        out.append(res[0]["masks"][:, 0].numpy())
    return np.concatenate(out)


def _expected_record(mask, bbox):
    polygons = [c.reshape(-1).tolist() for c in external_contours(mask)]
    x, y, w, h = bbox
    polygons = [p for p in polygons if len(p) > 4] or [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return {"segmentation": polygons, "area": float(mask.sum())}


def _check_against_recipe(out_json, box_data, image_dir, model):
    data = json.loads(out_json.read_text())
    got = {a["id"]: a for a in data["annotations"]}
    nonempty = 0
    for im in box_data["images"]:
        anns = [a for a in box_data["annotations"] if a["image_id"] == im["id"]]
        if not anns:
            continue
        masks = _authors_recipe(model, image_dir / im["file_name"], [a["bbox"] for a in anns])
        assert masks.shape == (len(anns), im["height"], im["width"])
        for a, m in zip(anns, masks):
            exp = _expected_record(m, a["bbox"])
            assert got[a["id"]]["segmentation"] == exp["segmentation"], a["id"]
            assert got[a["id"]]["area"] == exp["area"], a["id"]
            assert got[a["id"]]["bbox"] == a["bbox"]
            nonempty += exp["area"] > 0
    return data, nonempty


def test_sam_vit_h_cli_equals_the_authors_recipe(tiny_sam_vit_h, tmp_path):
    ckpt_dir, model = tiny_sam_vit_h
    images = _write_images(tmp_path / "img", [(200, 300), (260, 150), (64, 64)])
    box_data = _box_json(
        tmp_path / "boxes.json",
        images,
        [
            [[10, 20, 100, 80], [150.5, 30.25, 120, 150]],
            [[0, 0, 150, 260], [40, 100, 30, 30], [5, 5, 2, 3]],
            [],
        ],
    )
    rc = prepare_main(
        ["masks", str(tmp_path / "boxes.json"), str(tmp_path / "img"), "--mask-model", "sam_vit_h",
         "--checkpoints", str(ckpt_dir), "--device", "cpu"]
    )  # fmt: skip
    assert rc == 0
    out = tmp_path / "boxes_with_segm.json"
    data, nonempty = _check_against_recipe(out, box_data, tmp_path / "img", model)
    assert nonempty > 0  # the check above compared real masks, not only fallbacks
    assert [im["id"] for im in data["images"]] == [1, 2, 3]  # the image without boxes is kept, last
    meta = data["ntt_masks"]
    assert meta["model"] == "sam_vit_h" and meta["package"] == "segment-anything"
    assert meta["checkpoint"] == CKPT_NAME and meta["source_json"] == "boxes.json"
    for a in data["annotations"]:
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])
    assert not (tmp_path / "boxes_with_segm.json.partial.jsonl").exists()


def test_chunks_of_boxes_give_the_same_masks(tiny_sam_vit_h, tmp_path):
    """ntt encodes the image once per image; the authors re-encoded it per chunk of 50 boxes: same masks."""
    from ntt.prepare.mask_models import SamViTHMasker

    ckpt_dir, model = tiny_sam_vit_h
    (im,) = _write_images(tmp_path / "img", [(120, 180)])
    boxes = [[float(x), float(y), 40.0, 30.0] for x in range(0, 140, 20) for y in range(0, 90, 30)]
    expected = _authors_recipe(model, tmp_path / "img" / im["file_name"], boxes, chunk=4)
    masker = SamViTHMasker(ckpt_dir / CKPT_NAME, max_boxes=4)
    got = masker(tmp_path / "img" / im["file_name"], boxes, im["height"], im["width"])
    assert got.dtype == bool and got.shape == (len(boxes), 120, 180)
    np.testing.assert_array_equal(got, expected)


def test_empty_masks_fall_back_to_the_box_rectangle(tiny_sam_vit_h, tmp_path):
    """Zero mask-token hypernetworks: every logit is exactly 0, so no pixel is > 0 and every annotation gets
    its box rectangle as polygon and area 0 (the mask's pixel count, not the box's)."""
    ckpt_dir, model = tiny_sam_vit_h
    for mlp in model.mask_decoder.output_hypernetworks_mlps:
        torch.nn.init.zeros_(mlp.layers[-1].weight)
        torch.nn.init.zeros_(mlp.layers[-1].bias)
    torch.save(model.state_dict(), ckpt_dir / CKPT_NAME)
    images = _write_images(tmp_path / "img", [(100, 120)])
    _box_json(tmp_path / "b.json", images, [[[10.5, 20.25, 30, 40], [0, 0, 1, 1]]])
    out = add_masks(
        tmp_path / "b.json",
        tmp_path / "img",
        build_masker("sam_vit_h", checkpoint_dir=ckpt_dir),
        progress=False,
    )
    anns = json.loads(out.read_text())["annotations"]
    assert anns[0]["segmentation"] == [[10.5, 20.25, 40.5, 20.25, 40.5, 60.25, 10.5, 60.25]]
    assert anns[1]["segmentation"] == [[0, 0, 1, 0, 1, 1, 0, 1]]
    assert [a["area"] for a in anns] == [0.0, 0.0]


def test_resume_redoes_only_the_failed_image(tiny_sam_vit_h, tmp_path):
    ckpt_dir, _ = tiny_sam_vit_h
    images = _write_images(tmp_path / "img", [(90, 110), (70, 130)])
    _box_json(tmp_path / "b.json", images, [[[5, 5, 50, 40]], [[10, 10, 60, 30], [0, 30, 40, 40]]])
    masker = build_masker("sam_vit_h", checkpoint_dir=ckpt_dir)
    reference = add_masks(
        tmp_path / "b.json", tmp_path / "img", masker, output_json=tmp_path / "ref.json", progress=False
    )

    calls = []

    def flaky(image_path, boxes, h, w):
        calls.append(image_path.name)
        if image_path.name == "im2.png" and calls.count("im2.png") == 1:
            raise RuntimeError("simulated crash")
        return masker(image_path, boxes, h, w)

    flaky.info = masker.info
    with pytest.raises(PrepareError, match="rerun the same command"):
        add_masks(tmp_path / "b.json", tmp_path / "img", flaky, progress=False)
    assert calls == ["im1.png", "im2.png"]
    out = add_masks(tmp_path / "b.json", tmp_path / "img", flaky, progress=False)
    assert calls == ["im1.png", "im2.png", "im2.png"]  # im1 came from the partial file
    got, ref = json.loads(out.read_text()), json.loads(reference.read_text())
    assert got["annotations"] == ref["annotations"] and got["images"] == ref["images"]


def test_neu_det_with_tiny_sam_vit_h(tiny_sam_vit_h, tmp_path):
    """Real boxes-only data (shared NEU-DET, 416x416 JPEGs): the CLI result equals the authors' recipe."""
    ckpt_dir, model = tiny_sam_vit_h
    root = require_path(DATA / "neu-det" / "NEU-DET", "shared NEU-DET")
    full = json.loads((root / "instances_neu_det_bbox.json").read_text())
    ids = {im["id"] for im in full["images"][:2]}
    sub = {
        **full,
        "images": full["images"][:2],
        "annotations": [a for a in full["annotations"] if a["image_id"] in ids],
    }
    (tmp_path / "neu2.json").write_text(json.dumps(sub))
    rc = prepare_main(
        ["masks", str(tmp_path / "neu2.json"), str(root / "IMAGES"), "--mask-model", "sam_vit_h",
         "--checkpoints", str(ckpt_dir), "--device", "cpu"]
    )  # fmt: skip
    assert rc == 0
    _check_against_recipe(tmp_path / "neu2_with_segm.json", sub, root / "IMAGES", model)


def test_sam_vit_h_without_segment_anything_is_a_clear_error(tmp_path):
    """Where segment-anything / torchvision cannot be imported, the error says what to install."""
    try:
        import segment_anything  # noqa: F401
        import torchvision  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("segment-anything and torchvision import here: the missing-package error cannot happen")
    with pytest.raises(PrepareError, match="segment-anything"):
        build_masker("sam_vit_h", checkpoint_dir=tmp_path)


def test_missing_sam_vit_h_checkpoint_names_the_download(tiny_sam_vit_h, tmp_path):
    with pytest.raises(FileNotFoundError, match="ntt download sam_vit_h"):
        build_masker("sam_vit_h", checkpoint_dir=tmp_path / "nowhere")


def test_a_checkpoint_of_another_model_is_a_clear_error(tiny_sam_vit_h):
    ckpt_dir, model = tiny_sam_vit_h
    state = model.state_dict()
    state.pop("mask_decoder.iou_token.weight")
    torch.save(state, ckpt_dir / CKPT_NAME)
    with pytest.raises(PrepareError, match="not a SAM vit_h checkpoint"):
        build_masker("sam_vit_h", checkpoint_dir=ckpt_dir)


def test_resume_with_another_contour_tracer_starts_afresh(tmp_path):
    """The partial file records the tracer, so polygons of two tracers never share one record: crash with
    the Python tracer, rerun with ``auto`` (OpenCV where installed, else the Python tracer again)."""
    from ntt.prepare.contours import opencv_available

    images = _write_images(tmp_path / "img", [(20, 30), (20, 30)])
    _box_json(tmp_path / "b.json", images, [[[2, 2, 10, 8]], [[5, 5, 10, 10]]])
    calls = []

    def rectangle_masks(image_path, boxes, h, w):
        calls.append(image_path.name)
        if calls == ["im1.png", "im2.png"]:
            raise RuntimeError("simulated crash")
        m = np.zeros((len(boxes), h, w), dtype=bool)
        m[:, 4:9, 3:7] = True
        return m

    rectangle_masks.info = {"model": "fake"}
    with pytest.raises(PrepareError):
        add_masks(
            tmp_path / "b.json", tmp_path / "img", rectangle_masks, contour_backend="python", progress=False
        )
    out = add_masks(
        tmp_path / "b.json", tmp_path / "img", rectangle_masks, contour_backend="auto", progress=False
    )
    data = json.loads(out.read_text())
    if opencv_available():
        assert calls == ["im1.png", "im2.png", "im1.png", "im2.png"]  # started afresh
        assert data["ntt_masks"]["contours"] == "opencv"
    else:
        assert calls == ["im1.png", "im2.png", "im2.png"]  # same tracer: im1 kept
        assert data["ntt_masks"]["contours"] == "python"
    for a in data["annotations"]:
        assert a["segmentation"] == [[3, 4, 3, 8, 6, 8, 6, 4]] and a["area"] == 20.0


# (Pillow's CMYK value of a pixel of a CMYK JPEG, the RGB cv2.imread + BGR->RGB gave for it, Pillow's own
# convert("RGB")), read off a random CMYK JPEG with OpenCV 5.1.0 and Pillow 13.0.0: Pillow rounds c * k / 255,
# OpenCV shifts by 8 bits, so Pillow was 1 off in most pixels
CMYK_PIXELS = [
    ((96, 130, 194, 220), (22, 18, 9), (22, 17, 8)),
    ((124, 199, 219, 109), (76, 33, 22), (75, 32, 21)),
    ((255, 84, 162, 22), (1, 157, 86), (0, 156, 85)),
    ((205, 156, 156, 232), (5, 9, 9), (5, 9, 9)),
    ((229, 174, 4, 123), (14, 43, 130), (13, 42, 130)),
    ((12, 142, 217, 148), (102, 48, 17), (102, 47, 16)),
]


def test_cmyk_pixels_convert_as_opencv_does():
    from ntt.prepare.mask_models import cmyk_jpeg_to_rgb

    cmyk = np.array([[p for p, _, _ in CMYK_PIXELS]], dtype=np.uint8)
    opencv = np.array([[rgb for _, rgb, _ in CMYK_PIXELS]], dtype=np.uint8)
    pillow = np.array([[rgb for _, _, rgb in CMYK_PIXELS]], dtype=np.uint8)
    np.testing.assert_array_equal(cmyk_jpeg_to_rgb(cmyk), opencv)  # exact: integer arithmetic both ways
    np.testing.assert_array_equal(np.asarray(Image.fromarray(cmyk, "CMYK").convert("RGB")), pillow)


def test_without_opencv_a_cmyk_jpeg_reads_as_opencv_and_other_modes_are_refused(tmp_path, monkeypatch):
    """The SAM ViT-H reader without OpenCV: a CMYK JPEG through OpenCV's formula (not Pillow's, 1 off); a
    16-bit PNG, which the two libraries decode differently, refused with a line naming the file."""
    from ntt.prepare import mask_models

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 16, 4), dtype=np.uint8), "CMYK").save(tmp_path / "c.jpg")
    Image.fromarray(rng.integers(0, 65535, (6, 5), dtype=np.uint16)).save(tmp_path / "deep.png")
    monkeypatch.setattr(mask_models, "opencv_available", lambda: False)
    got = mask_models._read_rgb_uint8(tmp_path / "c.jpg")
    with Image.open(tmp_path / "c.jpg") as im:
        expected = mask_models.cmyk_jpeg_to_rgb(np.asarray(im))
        pillow = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(got, expected)
    assert (got != pillow).any()  # the conversion the fallback used before
    with pytest.raises(PrepareError, match=r"deep\.png is PNG mode I;16.*opencv-python-headless"):
        mask_models._read_rgb_uint8(tmp_path / "deep.png")
    try:
        import cv2
    except ImportError:
        return
    np.testing.assert_array_equal(got, cv2.cvtColor(cv2.imread(str(tmp_path / "c.jpg")), cv2.COLOR_BGR2RGB))
