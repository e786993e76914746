"""`ntt prepare` on bad data roots: every crafted case meets the bar (issue 16, item 2).

The bar: exit status 2, exactly one error line that names the file (or folder / annotation) and says what
to do, no traceback (``-v`` shows it), and NOTHING written: the data root is byte for byte and mtime for
mtime what it was. Each case crafts a tiny tree under ``tmp_path`` (the data root, ``NTT_DATA``) and runs
the command in-process; where a mask model is needed a test double stands in for it (no weights).

List the cases: ``pytest tests/test_prepare_bad_inputs.py --collect-only -q``; the tally of cases that meet
the bar is the number of ``test_bad_input_meets_the_bar`` cases that pass (``-q -rf`` names the others).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from test_prepare_cdfsod import _coco, make_fish
from test_prepare_voc import SquareMasker, make_devkit

from ntt import cli
from ntt.prepare.errors import PrepareError

FAKE = ["--mask-model", "fake", "--device", "cpu"]  # the test double (see `fake_masker`)


class DecodingMasker(SquareMasker):
    """Like SAM ViT-H: decodes the image and makes masks at its decoded size (not the json's), so a missing,
    corrupt or wrongly sized image fails the way it does with the real model."""

    def __call__(self, image_path, boxes, height, width):
        with Image.open(image_path) as im:
            im.load()
            w, h = im.size
        return super().__call__(image_path, boxes, h, w)


# --------------------------------------------------------------------------------------------------
# Good trees (each case breaks one)


def coco_tree(root: Path) -> Path:
    d = root / "coco"
    (d / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (d / split).mkdir()
        Image.new("RGB", (20, 16)).save(d / split / "000000000001.jpg")
        data = _coco([(1, "000000000001.jpg")], [(1, 1, [1, 1, 4, 4])])
        (d / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return d


def voc_tree(root: Path) -> Path:
    return make_devkit(root / "voc")


def lvis_tree(root: Path) -> Path:
    orig = root / "lvis" / "original"
    orig.mkdir(parents=True)
    for sub in ("train2017", "val2017"):
        (root / "coco" / sub).mkdir(parents=True)
    img = {"id": 5, "coco_url": "http://images.cocodataset.org/val2017/5.jpg", "width": 9, "height": 9}
    seg = [[1, 1, 4, 1, 4, 4]]
    val = {"images": [img], "annotations": [{"id": 40, "segmentation": seg}], "categories": []}
    (orig / "lvis_v1_train.json").write_text(json.dumps({**val, "annotations": []}))
    (orig / "lvis_v1_val.json").write_text(json.dumps(val))
    (orig / "lvis_v1_minival.json").write_text(json.dumps({**val, "annotations": [{"id": 40}]}))
    return orig


def masks_tree(root: Path) -> tuple[Path, Path]:
    """A box json of two images (one without boxes) and their folder, under <root>/mine."""
    img = root / "mine" / "img"
    img.mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (20, 16)).save(img / name)
    data = _coco([(1, "a.jpg"), (2, "b.jpg")], [(1, 1, [2, 3, 6, 5])])
    (root / "mine" / "boxes.json").write_text(json.dumps(data))
    return root / "mine" / "boxes.json", img


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _xml(root: Path, year: str, name: str) -> Path:
    return root / "voc" / "VOCdevkit" / f"VOC{year}" / "Annotations" / f"{name}.xml"


def _jpeg(root: Path, year: str, name: str) -> Path:
    return root / "voc" / "VOCdevkit" / f"VOC{year}" / "JPEGImages" / f"{name}.jpg"


def _masks_args(root: Path) -> list[str]:
    box, img = root / "mine" / "boxes.json", root / "mine" / "img"
    return ["masks", str(box), str(img), *FAKE]


# --------------------------------------------------------------------------------------------------
# The cases: id -> (craft the tree, the command's arguments, what the one error line must match)


def _case_coco_empty_root(r):
    return ["coco"], r"coco.*(train2017|instances_).*images\.cocodataset\.org"


def _case_coco_root_is_a_file(r):
    (r / "coco").write_text("not a folder")
    return ["coco"], r"coco"


def _case_coco_image_folders_empty(r):
    d = coco_tree(r)
    for split in ("train2017", "val2017"):
        (d / split / "000000000001.jpg").unlink()
    return ["coco"], r"train2017.*(no image|empty).*zip"


def _case_coco_folder_is_a_file(r):
    d = coco_tree(r)
    (d / "val2017" / "000000000001.jpg").unlink()
    (d / "val2017").rmdir()
    (d / "val2017").write_text("")
    return ["coco"], r"val2017.*(not a folder|folder)"


def _case_coco_truncated_json(r):
    d = coco_tree(r)
    p = d / "annotations" / "instances_val2017.json"
    p.write_text(p.read_text()[:30])
    return ["coco"], r"instances_val2017\.json.*(truncated|not.*json).*annotations_trainval2017\.zip"


def _case_coco_deep_corrupt_json(r):
    d = coco_tree(r)
    (d / "annotations" / "instances_val2017.json").write_text("{garbage}")
    return ["coco", "--deep"], r"instances_val2017\.json.*not.*json"


def _case_coco_deep_wrong_kind_json(r):
    d = coco_tree(r)
    (d / "annotations" / "instances_val2017.json").write_text("[1, 2]")
    return ["coco", "--deep"], r"instances_val2017\.json.*(object|images)"


def _case_coco_deep_image_without_file_name(r):
    d = coco_tree(r)
    _edit_json(d / "annotations" / "instances_val2017.json", lambda j: j["images"][0].pop("file_name"))
    return ["coco", "--deep"], r"instances_val2017\.json.*file_name"


def _case_coco_deep_images_missing(r):
    d = coco_tree(r)
    (d / "val2017" / "000000000001.jpg").rename(d / "val2017" / "other.jpg")
    return ["coco", "--deep"], r"val2017.*000000000001\.jpg.*val2017\.zip"


def _case_voc_empty_root(r):
    return ["voc", "--boxes-only"], r"VOC2007.*host\.robots\.ox\.ac\.uk"


def _case_voc2007_lists_missing(r):
    voc_tree(r)
    for p in (r / "voc/VOCdevkit/VOC2007/ImageSets/Main").iterdir():
        p.unlink()
    return ["voc", "--boxes-only"], r"VOC2007/ImageSets/Main/.*\.txt.*VOCtrainval_06-Nov-2007\.tar"


def _case_voc2007_test_list_missing(r):
    voc_tree(r)
    (r / "voc/VOCdevkit/VOC2007/ImageSets/Main/test.txt").unlink()
    return ["voc", "--boxes-only"], r"VOC2007/ImageSets/Main/test\.txt.*VOCtest_06-Nov-2007\.tar"


def _case_voc2012_jpegs_missing(r):
    voc_tree(r)
    for p in (r / "voc/VOCdevkit/VOC2012/JPEGImages").iterdir():
        p.unlink()
    return ["voc", "--boxes-only"], r"VOC2012/JPEGImages.*2008_000002\.jpg.*VOCtrainval_11-May-2012\.tar"


def _case_voc_xml_missing(r):
    voc_tree(r)
    _xml(r, "2012", "2008_000002").unlink()
    return ["voc", "--boxes-only"], r"2008_000002\.xml.*VOCtrainval_11-May-2012\.tar"


def _case_voc_xml_corrupt(r):
    voc_tree(r)
    _xml(r, "2012", "2008_000002").write_text("<annotation><size>")
    return ["voc", "--boxes-only"], r"2008_000002\.xml.*(not|cannot).*(xml|parse)"


def _case_voc_xml_without_size(r):
    voc_tree(r)
    _xml(r, "2012", "2008_000002").write_text("<annotation><object/></annotation>")
    return ["voc", "--boxes-only"], r"2008_000002\.xml.*<size>"


def _case_voc_xml_width_not_a_number(r):
    voc_tree(r)
    p = _xml(r, "2012", "2008_000002")
    p.write_text(p.read_text().replace("<width>24</width>", "<width>abc</width>"))
    return ["voc", "--boxes-only"], r"2008_000002\.xml.*width.*'abc'"


def _case_voc_xml_object_without_bndbox(r):
    voc_tree(r)
    p = _xml(r, "2012", "2008_000002")
    text = p.read_text()
    p.write_text(text[: text.index("<bndbox>")] + "</object></annotation>")
    return ["voc", "--boxes-only"], r"2008_000002\.xml.*bndbox"


def _case_voc_xml_unknown_class(r):
    voc_tree(r)
    p = _xml(r, "2012", "2008_000002")
    p.write_text(p.read_text().replace("<name>bird</name>", "<name>dragon</name>"))
    return ["voc", "--boxes-only"], r"2008_000002\.xml.*'dragon'"


def _case_voc_duplicate_listing(r):
    voc_tree(r)
    p = r / "voc/VOCdevkit/VOC2012/ImageSets/Main/trainval.txt"
    p.write_text(p.read_text() * 2)
    return ["voc", "--boxes-only"], r"2008_000002.*twice.*VOC2012/ImageSets/Main/trainval\.txt"


def _case_voc_xml_size_disagrees_with_jpeg(r):
    voc_tree(r)
    p = _xml(r, "2012", "2008_000002")
    p.write_text(p.read_text().replace("<width>24</width>", "<width>25</width>"))
    return ["voc", *FAKE], r"2008_000002\.jpg.*24x24.*2008_000002\.xml.*width=25.*(fix|correct)"


def _case_voc_xml_size_disagrees_boxes_only(r):
    voc_tree(r)
    p = _xml(r, "2007", "000005")
    p.write_text(p.read_text().replace("<height>30</height>", "<height>31</height>"))
    return ["voc", "--boxes-only"], r"000005\.jpg.*40x30.*000005\.xml.*height=31"


def _case_voc_jpeg_corrupt(r):
    voc_tree(r)
    _jpeg(r, "2007", "000001").write_bytes(b"")
    return ["voc", *FAKE], r"000001\.jpg.*(cannot|not).*(read|image)"


def _case_voc_data_checked_before_the_model(r):
    voc_tree(r)
    _xml(r, "2012", "2008_000002").write_text("garbage")
    empty = r / "no_checkpoints"
    empty.mkdir()
    return [
        "voc",
        "--mask-model",
        "sam_vit_h",
        "--checkpoints",
        str(empty),
        "--device",
        "cpu",
    ], r"2008_000002\.xml"


def _case_voc_unknown_mask_model(r):
    voc_tree(r)
    return ["voc", "--mask-model", "bogus", "--device", "cpu"], r"bogus.*sam_vit_h"


def _case_voc_missing_sam2_checkpoint(r):
    voc_tree(r)
    empty = r / "no_checkpoints"
    empty.mkdir()
    args = ["voc", "--mask-model", "sam2:sam2_hiera_t", "--checkpoints", str(empty), "--device", "cpu"]
    return args, r"sam2.*not found.*ntt download"


def _case_cdfsod_empty_root(r):
    return ["cdfsod"], r"CD-FSOD.*ArTaxOr.*CDFSOD-benchmark"


def _case_cdfsod_corrupt_test_json_layout_check(r):
    make_fish(r / "cdfsod")
    (r / "cdfsod/FISH/annotations/test.json").write_text("{not json")
    return ["cdfsod", "--datasets", "FISH"], r"FISH/annotations/test\.json.*not.*json"


def _case_cdfsod_corrupt_shot_json_masks(r):
    make_fish(r / "cdfsod")
    (r / "cdfsod/FISH/annotations/5_shot.json").write_text('{"images": [')
    return ["cdfsod", "--datasets", "FISH", *FAKE], r"FISH/annotations/5_shot\.json.*not.*json"


def _case_cdfsod_wrong_kind_json_masks(r):
    make_fish(r / "cdfsod")
    (r / "cdfsod/FISH/annotations/1_shot.json").write_text('["a.jpg"]')
    return ["cdfsod", "--datasets", "FISH", *FAKE], r"FISH/annotations/1_shot\.json.*object"


def _case_cdfsod_json_without_images_masks(r):
    make_fish(r / "cdfsod")
    (r / "cdfsod/FISH/annotations/1_shot.json").write_text('{"annotations": []}')
    return ["cdfsod", "--datasets", "FISH", *FAKE], r"FISH/annotations/1_shot\.json.*images"


def _case_cdfsod_annotation_without_bbox_masks(r):
    make_fish(r / "cdfsod")
    _edit_json(r / "cdfsod/FISH/annotations/test.json", lambda j: j["annotations"][0].pop("bbox"))
    return ["cdfsod", "--datasets", "FISH", *FAKE], r"FISH/annotations/test\.json.*annotation.*8.*bbox"


def _case_cdfsod_image_missing_masks(r):
    make_fish(r / "cdfsod")
    (r / "cdfsod/FISH/train/b.jpg").unlink()
    return ["cdfsod", "--datasets", "FISH", *FAKE], r"FISH/train.*b\.jpg"


def _case_cdfsod_image_missing_layout_check(r):
    make_fish(r / "cdfsod")
    (r / "cdfsod/FISH/test/u.jpg").unlink()
    return ["cdfsod", "--datasets", "FISH"], r"FISH/test.*u\.jpg"


def _case_cdfsod_empty_train_folder_masks(r):
    make_fish(r / "cdfsod")
    for p in (r / "cdfsod/FISH/train").iterdir():
        p.unlink()
    return ["cdfsod", "--datasets", "FISH", *FAKE], r"FISH/train.*a\.jpg"


def _case_cdfsod_image_size_disagrees_masks(r):
    make_fish(r / "cdfsod")
    Image.new("RGB", (21, 16)).save(r / "cdfsod/FISH/test/u.jpg")
    return ["cdfsod", "--datasets", "FISH", *FAKE], r"FISH/test/u\.jpg.*21x16.*test\.json.*width=20"


def _case_cdfsod_unknown_dataset(r):
    make_fish(r / "cdfsod")
    return ["cdfsod", "--datasets", "fish"], r"'fish'.*FISH"


def _case_cdfsod_second_dataset_broken_masks(r):
    make_fish(r / "cdfsod")
    uodd = make_fish(r / "tmp")
    uodd.rename(r / "cdfsod" / "UODD")
    (r / "tmp").rmdir()
    (r / "cdfsod/UODD/annotations/test.json").write_text("")
    return ["cdfsod", "--datasets", "FISH,UODD", *FAKE], r"UODD/annotations/test\.json.*(empty|not.*json)"


def _case_lvis_empty_root(r):
    return ["lvis"], r"lvis_v1_train\.json.*lvisdataset\.org"


def _case_lvis_corrupt_val_json(r):
    orig = lvis_tree(r)
    (orig / "lvis_v1_val.json").write_text("{")
    return ["lvis"], r"lvis_v1_val\.json.*not.*json.*lvisdataset\.org"


def _case_lvis_wrong_kind_train_json(r):
    orig = lvis_tree(r)
    (orig / "lvis_v1_train.json").write_text("[]")
    return ["lvis"], r"lvis_v1_train\.json.*object"


def _case_lvis_image_without_coco_url(r):
    orig = lvis_tree(r)
    _edit_json(orig / "lvis_v1_val.json", lambda j: j["images"][0].pop("coco_url"))
    return ["lvis"], r"lvis_v1_val\.json.*image 5.*coco_url"


def _case_lvis_minival_annotation_unmatched(r):
    orig = lvis_tree(r)
    _edit_json(orig / "lvis_v1_minival.json", lambda j: j["annotations"].append({"id": 99}))
    return ["lvis"], r"lvis_v1_minival\.json.*99"


def _case_lvis_corrupt_minival(r):
    orig = lvis_tree(r)
    (orig / "lvis_v1_minival.json").write_bytes(b"\xff\xfe\x00garbage")
    return ["lvis"], r"lvis_v1_minival\.json.*not.*json"


def _case_masks_box_json_missing(r):
    masks_tree(r)
    (r / "mine/boxes.json").unlink()
    return _masks_args(r), r"not found.*boxes\.json|boxes\.json.*not found"


def _case_masks_image_dir_missing(r):
    masks_tree(r)
    args = _masks_args(r)
    args[2] = str(r / "mine" / "nowhere")
    return args, r"nowhere.*boxes\.json"


def _case_masks_corrupt_json(r):
    masks_tree(r)
    (r / "mine/boxes.json").write_text("{'single': 'quotes'}")
    return _masks_args(r), r"boxes\.json.*not.*json"


def _case_masks_json_without_images(r):
    masks_tree(r)
    (r / "mine/boxes.json").write_text(json.dumps({"categories": [], "annotations": []}))
    return _masks_args(r), r"boxes\.json.*images"


def _case_masks_image_missing(r):
    masks_tree(r)
    (r / "mine/img/a.jpg").unlink()
    return _masks_args(r), r"img.*a\.jpg.*boxes\.json"


def _case_masks_image_corrupt(r):
    masks_tree(r)
    (r / "mine/img/a.jpg").write_bytes(b"JFIF but not really")
    return _masks_args(r), r"a\.jpg.*(cannot|not).*(read|image)"


def _case_masks_image_size_disagrees(r):
    masks_tree(r)
    Image.new("RGB", (16, 20)).save(r / "mine/img/a.jpg")
    return _masks_args(r), r"a\.jpg.*16x20.*boxes\.json.*width=20 height=16"


def _case_masks_bbox_not_four_numbers(r):
    masks_tree(r)
    _edit_json(r / "mine/boxes.json", lambda j: j["annotations"][0].update(bbox=[1, 2, 3]))
    return _masks_args(r), r"boxes\.json.*annotation 1.*bbox"


def _case_masks_duplicate_image_id(r):
    masks_tree(r)
    _edit_json(r / "mine/boxes.json", lambda j: j["images"][1].update(id=1))
    return _masks_args(r), r"boxes\.json.*image id 1.*twice"


def _case_masks_data_checked_before_the_model(r):
    masks_tree(r)
    (r / "mine/img/a.jpg").unlink()
    empty = r / "no_checkpoints"
    empty.mkdir()
    args = [*_masks_args(r)[:3], "--mask-model", "sam_vit_h", "--checkpoints", str(empty), "--device", "cpu"]
    return args, r"a\.jpg"


def _case_coco_deep_image_of_another_size(r):
    d = coco_tree(r)
    Image.new("RGB", (20, 17)).save(d / "val2017" / "000000000001.jpg")
    return ["coco", "--deep"], r"val2017/000000000001\.jpg is 20x17.*instances_val2017\.json.*height=16"


def _case_voc2012_missing(r):
    voc_tree(r)
    shutil.rmtree(r / "voc/VOCdevkit/VOC2012")
    return ["voc", "--boxes-only"], r"VOC2012/Annotations.*VOCtrainval_11-May-2012\.tar"


def _case_voc_xml_empty_file(r):
    voc_tree(r)
    _xml(r, "2007", "000007").write_text("")
    return ["voc", "--boxes-only"], r"000007\.xml.*not readable xml"


def _case_cdfsod_test_json_missing(r):
    make_fish(r / "cdfsod")
    (r / "cdfsod/FISH/annotations/test.json").unlink()
    return ["cdfsod", "--datasets", "FISH", *FAKE], r"FISH: missing annotations/test\.json.*CDFSOD-benchmark"


def _case_lvis_val_json_is_a_folder(r):
    orig = lvis_tree(r)
    (orig / "lvis_v1_val.json").unlink()
    (orig / "lvis_v1_val.json").mkdir()
    return ["lvis"], r"lvis_v1_val\.json is not a file"


def _case_masks_images_not_objects(r):
    masks_tree(r)
    _edit_json(r / "mine/boxes.json", lambda j: j.update(images=[1, 2]))
    return _masks_args(r), r"boxes\.json: images\[0\] is not an object"


CASES = {name[len("_case_") :]: fn for name, fn in sorted(globals().items()) if name.startswith("_case_")}


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def fake_masker(monkeypatch):
    """`--mask-model fake` builds the test double `DecodingMasker`; counts how often it was built."""
    import ntt.prepare.mask_models as mask_models

    real = mask_models.build_masker
    state = {"built": 0}

    def build(model="sam_vit_h", **kw):
        if model != "fake":
            return real(model, **kw)
        state["built"] += 1
        return DecodingMasker()

    monkeypatch.setattr(mask_models, "build_masker", build)
    return state


def run_prepare(argv, caplog, capsys):
    """Run `ntt prepare ARGV` in-process: (exit status or the exception, error records, stdout + stderr)."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        try:
            rc = cli.main(["prepare", *argv])
        except BaseException as exc:  # noqa: BLE001 - a traceback is what the bar forbids: report it
            rc = exc
    captured = capsys.readouterr()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    return rc, errors, captured.out + captured.err


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_meets_the_bar(case, tmp_path, monkeypatch, caplog, capsys, fake_masker):
    monkeypatch.setenv("NTT_DATA", str(tmp_path))
    monkeypatch.setenv("NTT_TRACEBACK", "0")
    monkeypatch.chdir(tmp_path)
    argv, expected = CASES[case](tmp_path)
    before = _snapshot(tmp_path)
    rc, errors, output = run_prepare(argv, caplog, capsys)
    assert not isinstance(rc, BaseException), f"traceback: {type(rc).__name__}: {rc}"
    assert rc == 2, f"exit status {rc}; output: {output[-500:]}"
    assert len(errors) == 1, f"{len(errors)} error lines: {[r.getMessage() for r in errors]}"
    message = errors[0].getMessage()
    assert "\n" not in message, f"more than one line: {message!r}"
    assert errors[0].exc_info is None and "Traceback" not in output
    assert _snapshot(tmp_path) == before, "something was written or changed"

    assert re.search(expected, message), f"{message!r} does not match {expected!r}"


# --------------------------------------------------------------------------------------------------
# What the bar alone does not show


def test_verbose_shows_the_traceback(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("NTT_DATA", str(tmp_path))
    # -v sets NTT_TRACEBACK in this process: setenv (not delenv, which records nothing when the variable is
    # absent) makes monkeypatch remove it again after the test, so later tests see no traceback flag
    monkeypatch.setenv("NTT_TRACEBACK", "0")
    rc, errors, _ = run_prepare(["lvis", "-v"], caplog, capsys)
    assert rc == 2 and len(errors) == 1 and errors[0].exc_info is not None


def test_the_mask_model_is_built_only_after_the_data_passed(
    tmp_path, monkeypatch, caplog, capsys, fake_masker
):
    monkeypatch.setenv("NTT_DATA", str(tmp_path))
    voc_tree(tmp_path)
    _xml(tmp_path, "2007", "000005").write_text("<annotation/>")
    rc, errors, _ = run_prepare(["voc", *FAKE], caplog, capsys)
    assert rc == 2 and "000005.xml" in errors[0].getMessage() and fake_masker["built"] == 0
    voc_tree(tmp_path / "good")
    before = _snapshot(tmp_path)
    rc, errors, output = run_prepare(
        ["voc", "--root", str(tmp_path / "good/voc"), "--check-only", *FAKE], caplog, capsys
    )
    assert (rc, errors, fake_masker["built"]) == (0, [], 0) and "checked, ready" in output
    assert _snapshot(tmp_path) == before
    rc, _, _ = run_prepare(["voc", "--root", str(tmp_path / "good/voc"), *FAKE], caplog, capsys)
    assert rc == 0 and fake_masker["built"] == 1


def test_a_failure_in_the_mask_step_puts_no_output_in_place(tmp_path, monkeypatch):
    """VOC all-or-nothing: an image failing in the mask model (after every check passed) leaves no json and
    no allimages/ in place, only the resume files; the rerun makes everything and redoes only that image."""
    from ntt.prepare.voc import prepare_voc

    voc_tree(tmp_path)
    root = tmp_path / "voc"
    failing = SquareMasker(fail_on="000001.jpg")
    with pytest.raises(PrepareError, match=r"1 image\(s\) failed.*000001\.jpg.*rerun the same command"):
        prepare_voc(root, make_masker=lambda: failing, contour_backend="python")
    left = sorted(p.name for p in (root / "annotations").iterdir())
    assert left == [
        "voc0712_trainval_with_segm.json.partial.jsonl",
        "voc07_test_with_segm.json.partial.jsonl",
    ]
    assert not (root / "allimages").exists()
    again = SquareMasker()
    written = prepare_voc(root, make_masker=lambda: again, contour_backend="python")
    assert again.calls == ["000001.jpg"] and len(written) == 12
    assert sorted(p.name for p in (root / "annotations").iterdir()) == sorted(p.name for p in written)


def test_box_jsons_are_the_same_bytes_with_and_without_masks(tmp_path):
    from ntt.prepare.voc import prepare_voc

    voc_tree(tmp_path / "a")
    voc_tree(tmp_path / "b")
    boxes = prepare_voc(tmp_path / "a/voc")
    prepare_voc(tmp_path / "b/voc", make_masker=SquareMasker, contour_backend="python")
    for p in boxes:
        assert p.read_bytes() == (tmp_path / "b/voc/annotations" / p.name).read_bytes(), p.name


def test_a_with_segm_json_of_an_older_box_json_is_made_again(tmp_path, caplog):
    """Its recorded sha256 is not the box json's any more: kept, it would pair today's boxes with masks of
    other boxes, silently; so it is redone with a warning (an up-to-date one, or one without a record, is
    kept)."""
    from ntt.prepare.box_to_mask import add_masks

    box, img = masks_tree(tmp_path)
    out = add_masks(box, img, SquareMasker(), contour_backend="python", progress=False)
    first = json.loads(out.read_text())
    kept = SquareMasker()
    add_masks(box, img, kept, contour_backend="python", progress=False)
    assert kept.calls == []
    _edit_json(box, lambda j: j["annotations"][0].update(bbox=[0, 0, 4, 4]))
    redo = SquareMasker()
    with caplog.at_level(logging.WARNING):
        add_masks(box, img, redo, contour_backend="python", progress=False)
    assert redo.calls == ["a.jpg"]
    assert any("made from another version of boxes.json" in r.getMessage() for r in caplog.records)
    second = json.loads(out.read_text())
    assert second["ntt_masks"]["source_sha256"] != first["ntt_masks"]["source_sha256"]
    assert second["annotations"][0]["area"] == 16.0 and first["annotations"][0]["area"] == 30.0
    del second["ntt_masks"]  # as the authors' files: no record of the box json
    out.write_text(json.dumps(second))
    _edit_json(box, lambda j: j["annotations"][0].update(bbox=[1, 1, 4, 4]))
    unknown = SquareMasker()
    add_masks(box, img, unknown, contour_backend="python", progress=False)
    assert unknown.calls == []


def test_make_prepare_checks_the_data_before_downloading_sam(tmp_path):
    """`make prepare-voc` / `prepare-cdfsod`: the free data check, then the 2.5 GB download, then the work."""
    import subprocess

    from conftest import REPO

    if shutil.which("make") is None:
        pytest.skip("make not installed")
    for target in ("prepare-voc", "prepare-cdfsod"):
        lines = subprocess.run(
            ["make", "-n", "-o", ".venv/.ntt-installed", target], cwd=REPO, capture_output=True, text=True
        ).stdout.splitlines()
        order = [
            next(i for i, ln in enumerate(lines) if key in ln)
            for key in ("--check-only", "ntt download sam_vit_h", "--mask-model")
        ]
        assert order == sorted(order), lines
