"""CD-FSOD layout check and masks for the shot files and test.json; COCO / LVIS preparation; `ntt prepare`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from test_prepare_voc import SquareMasker

from ntt.prepare import main as prepare_main
from ntt.prepare.cdfsod import check_layout, prepare_cdfsod
from ntt.prepare.coco import check_coco
from ntt.prepare.errors import PrepareError
from ntt.prepare.lvis import fix_lvis_json, prepare_lvis


def _coco(images, anns, cats=(("fish", 1),)):
    return {
        "images": [{"id": i, "file_name": f, "width": 20, "height": 16} for i, f in images],
        "annotations": [
            {"id": k, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (i, c, b) in enumerate(anns, start=1)
        ],
        "categories": [{"id": i, "name": n} for n, i in cats],
    }


def make_fish(root: Path) -> Path:
    d = root / "FISH"
    for sub in ("train", "test", "annotations"):
        (d / sub).mkdir(parents=True)
    for split, names in (("train", ["a.jpg", "b.jpg"]), ("test", ["t.jpg", "u.jpg"])):
        for n in names:
            Image.new("RGB", (20, 16)).save(d / split / n)
    for k in (1, 5, 10):
        shot = _coco([(1, "a.jpg"), (2, "b.jpg")], [(1, 1, [2.5, 3.0, 6.0, 5.0]), (2, 1, [0, 0, 4, 4])])
        (d / "annotations" / f"{k}_shot.json").write_text(json.dumps(shot))
    test = _coco([(7, "t.jpg"), (8, "u.jpg")], [(8, 1, [10, 2, 5, 9])])
    (d / "annotations" / "test.json").write_text(json.dumps(test))
    return d


def test_cdfsod_layout_report_names_missing_files(tmp_path):
    make_fish(tmp_path)
    report = check_layout(tmp_path, ["FISH", "UODD"])
    assert report["FISH"] == []
    assert any(p.endswith("UODD/annotations/1_shot.json") for p in report["UODD"])
    with pytest.raises(PrepareError, match="UODD: missing"):
        prepare_cdfsod(tmp_path, names=["FISH", "UODD"])
    with pytest.raises(PrepareError, match="unknown CD-FSOD"):
        prepare_cdfsod(tmp_path, names=["fish"])


def test_cdfsod_masks_for_shot_files_and_test(tmp_path):
    d = make_fish(tmp_path)
    written = prepare_cdfsod(tmp_path, names=["FISH"], make_masker=SquareMasker, contour_backend="python")
    assert sorted(p.name for p in written) == [
        "10_shot_with_segm.json", "1_shot_with_segm.json", "5_shot_with_segm.json", "test_with_segm.json",
    ]  # fmt: skip
    shot = json.loads((d / "annotations/1_shot_with_segm.json").read_text())
    a = shot["annotations"][0]
    assert a["bbox"] == [2.5, 3.0, 6.0, 5.0] and a["area"] == 30.0  # rows 3..7, columns 2..7 -> 5 x 6
    assert a["segmentation"] == [[2, 3, 2, 7, 7, 7, 7, 3]]
    test = json.loads((d / "annotations/test_with_segm.json").read_text())
    assert [im["id"] for im in test["images"]] == [8, 7]  # the image without boxes moves to the end
    assert test["ntt_masks"]["source_json"] == "test.json"


def test_coco_layout_check(tmp_path):
    with pytest.raises(PrepareError, match="train2017.zip"):
        check_coco(tmp_path)
    (tmp_path / "annotations").mkdir()
    for rel in ("train2017", "val2017"):
        (tmp_path / rel).mkdir()
        Image.new("RGB", (20, 16)).save(tmp_path / rel / "other.jpg")  # an empty image folder is refused
    for rel in ("instances_train2017.json", "instances_val2017.json"):
        (tmp_path / "annotations" / rel).write_text(json.dumps(_coco([(1, "x.jpg")], [])))
    assert len(check_coco(tmp_path)) == 4
    with pytest.raises(PrepareError, match="1 val2017 images"):
        check_coco(tmp_path, deep=True)


def test_lvis_fixups_and_minival_masks_by_id(tmp_path):
    img = {
        "id": 5,
        "coco_url": "http://images.cocodataset.org/val2017/000000000005.jpg",
        "width": 9,
        "height": 9,
    }
    fixed = fix_lvis_json({"images": [dict(img)], "annotations": [{"id": 3}], "categories": []})
    assert (
        fixed["images"][0]["file_name"] == "val2017/000000000005.jpg"
        and fixed["annotations"][0]["iscrowd"] == 0
    )
    orig = tmp_path / "lvis" / "original"
    orig.mkdir(parents=True)
    for sub in ("train2017", "val2017"):
        (tmp_path / "coco" / sub).mkdir(parents=True)
    seg = [[1, 1, 4, 1, 4, 4]]
    val = {
        "images": [img],
        "annotations": [{"id": 40, "segmentation": seg}, {"id": 7, "segmentation": [[0, 0, 1, 0, 1, 1]]}],
        "categories": [],
    }
    (orig / "lvis_v1_train.json").write_text(json.dumps({**val, "annotations": []}))
    (orig / "lvis_v1_val.json").write_text(json.dumps(val))
    (orig / "lvis_v1_minival.json").write_text(json.dumps({**val, "annotations": [{"id": 40}]}))
    prepare_lvis(tmp_path / "lvis", tmp_path / "coco")
    minival = json.loads((tmp_path / "lvis/lvis_v1_minival.json").read_text())
    assert minival["annotations"][0]["segmentation"] == seg  # by id, not by list position


def test_ntt_prepare_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NTT_DATA", str(tmp_path))
    from ntt import cli

    assert cli.main(["prepare", "coco"]) == 2  # missing COCO: an error naming what to download (user error)
    make_fish(tmp_path / "cdfsod")
    assert prepare_main(["cdfsod", "--datasets", "FISH"]) == 0
    assert "layout complete" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        prepare_main(["bogus"])
