"""PASCAL VOC xml -> COCO json (mmdet-style, the authors' conversion) and the box -> mask step, on a
crafted VOCdevkit with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ntt.prepare.box_to_mask import add_masks
from ntt.prepare.errors import PrepareError
from ntt.prepare.voc import convert_split, prepare_voc

XML = """<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>"""
OBJ = """<object><name>{name}</name><difficult>{d}</difficult>
<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"""

# year -> split -> [(image name, width, height, [(class, difficult, x1, y1, x2, y2)])]
VOC = {
    "2007": {
        "trainval": [
            (
                "000005",
                40,
                30,
                [("chair", 0, 11, 6, 20, 16), ("sofa", 1, 2, 2, 9, 9), ("aeroplane", 0, 1, 1, 40, 30)],
            ),
            ("000007", 20, 10, []),
        ],
        "test": [("000001", 30, 20, [("tvmonitor", 0, 5, 5, 15, 12)])],
    },
    "2012": {"trainval": [("2008_000002", 24, 24, [("bird", 1, 3, 4, 13, 14)])]},
}


class SquareMasker:
    """A fake mask model: the box's inner square, so areas and polygons are known."""

    info = {"model": "fake_square"}

    def __init__(self, fail_on: str | None = None):
        self.fail_on = fail_on
        self.calls = []

    def __call__(self, image_path, boxes, height, width):
        self.calls.append(Path(image_path).name)
        if self.fail_on and Path(image_path).name == self.fail_on:
            raise OSError("unreadable image")
        masks = np.zeros((len(boxes), height, width), bool)
        for m, (x, y, w, h) in zip(masks, boxes):
            m[int(y) : int(y + h), int(x) : int(x + w)] = True
        return masks


def make_devkit(root: Path) -> Path:
    for year, splits in VOC.items():
        base = root / "VOCdevkit" / f"VOC{year}"
        for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        for split, images in splits.items():
            (base / "ImageSets/Main" / f"{split}.txt").write_text("".join(f"{n}\n" for n, *_ in images))
            for name, w, h, objs in images:
                body = "".join(
                    OBJ.format(name=c, d=d, x1=a, y1=b, x2=c2, y2=d2) for c, d, a, b, c2, d2 in objs
                )
                (base / "Annotations" / f"{name}.xml").write_text(XML.format(w=w, h=h, objs=body))
                Image.new("RGB", (w, h), (120, 60, 30)).save(base / "JPEGImages" / f"{name}.jpg")
        # the official tarballs also hold the train and val halves of trainval
        names = [n for n, *_ in splits["trainval"]]
        half = (len(names) + 1) // 2
        (base / "ImageSets/Main/train.txt").write_text("".join(f"{n}\n" for n in names[:half]))
        (base / "ImageSets/Main/val.txt").write_text("".join(f"{n}\n" for n in names[half:]))
    return root / "VOCdevkit"


def test_voc_xml_to_coco_known_answers(tmp_path):
    devkit = make_devkit(tmp_path)
    coco = convert_split(devkit, ["2007"], "trainval")
    assert [c["id"] for c in coco["categories"]] == list(range(20))
    assert coco["categories"][0]["name"] == "aeroplane" and coco["categories"][19]["name"] == "tvmonitor"
    assert coco["images"] == [
        {"id": 0, "file_name": "000005.jpg", "height": 30, "width": 40},
        {"id": 1, "file_name": "000007.jpg", "height": 10, "width": 20},
    ]
    anns = coco["annotations"]
    # non-difficult objects first (xml order), then the difficult ones; ids from 0; boxes 0-based
    assert [(a["id"], a["category_id"], a["iscrowd"]) for a in anns] == [(0, 8, 0), (1, 0, 0), (2, 17, 1)]
    chair = anns[0]
    assert chair["bbox"] == [10, 5, 9, 10] and chair["area"] == 90 and chair["ignore"] == 0
    assert chair["segmentation"] == [[10, 5, 10, 15, 19, 15, 19, 5]]
    assert anns[2]["bbox"] == [1, 1, 7, 7]
    assert list(chair) == [
        "segmentation",
        "area",
        "ignore",
        "iscrowd",
        "image_id",
        "bbox",
        "category_id",
        "id",
    ]


def test_voc0712_concatenates_2007_then_2012_and_flattens_images(tmp_path):
    make_devkit(tmp_path)
    written = prepare_voc(tmp_path)
    names = sorted(p.name for p in written)
    assert "voc0712_trainval.json" in names and "voc07_test.json" in names and "voc12_trainval.json" in names
    both = json.loads((tmp_path / "annotations/voc0712_trainval.json").read_text())
    assert [im["file_name"] for im in both["images"]] == ["000005.jpg", "000007.jpg", "2008_000002.jpg"]
    assert [im["id"] for im in both["images"]] == [0, 1, 2]
    assert [a["id"] for a in both["annotations"]] == [0, 1, 2, 3] and both["annotations"][3]["image_id"] == 2
    test = json.loads((tmp_path / "annotations/voc07_test.json").read_text())
    assert test["annotations"][0]["bbox"] == [4, 4, 10, 7]
    flat = sorted(p.name for p in (tmp_path / "allimages").iterdir())
    assert flat == ["000001.jpg", "000005.jpg", "000007.jpg", "2008_000002.jpg"]
    assert Image.open(tmp_path / "allimages/2008_000002.jpg").size == (24, 24)


def test_prepare_voc_with_masks_writes_the_configs_files(tmp_path):
    make_devkit(tmp_path)
    prepare_voc(tmp_path, make_masker=SquareMasker, contour_backend="python")
    out = json.loads((tmp_path / "annotations/voc0712_trainval_with_segm.json").read_text())
    assert out["ntt_masks"]["model"] == "fake_square" and out["ntt_masks"]["contours"] == "python"
    assert out["ntt_masks"]["source_json"] == "voc0712_trainval.json"
    # images without boxes move to the end; annotations keep their order
    assert [im["file_name"] for im in out["images"]] == ["000005.jpg", "2008_000002.jpg", "000007.jpg"]
    chair = out["annotations"][0]
    assert chair["area"] == 90.0  # mask pixels (9 x 10)
    assert chair["segmentation"] == [[10, 5, 10, 14, 18, 14, 18, 5]]  # outer contour of the mask's pixels
    assert out["annotations"][2]["iscrowd"] == 1 and out["annotations"][2]["area"] == 49.0
    assert (tmp_path / "annotations/voc07_test_with_segm.json").is_file()
    from ntt.data.coco import CocoDataset

    ds = CocoDataset(
        tmp_path / "annotations/voc07_test_with_segm.json", tmp_path / "allimages", class_split="voc_all"
    )
    assert ds.mask(0).sum() > 0  # the dataset code reads the polygons


def test_missing_devkit_names_what_to_download(tmp_path):
    with pytest.raises(PrepareError, match="VOC2007.*host.robots.ox.ac.uk"):
        prepare_voc(tmp_path)


def test_add_masks_resumes_and_keeps_work_when_an_image_fails(tmp_path):
    make_devkit(tmp_path)
    prepare_voc(tmp_path)
    box_json = tmp_path / "annotations/voc0712_trainval.json"
    bad = SquareMasker(fail_on="2008_000002.jpg")
    with pytest.raises(PrepareError, match="1 image"):
        add_masks(box_json, tmp_path / "allimages", bad)
    assert not (tmp_path / "annotations/voc0712_trainval_with_segm.json").exists()
    good = SquareMasker()
    out = add_masks(box_json, tmp_path / "allimages", good)
    assert good.calls == ["2008_000002.jpg"]  # only the failed image is redone
    assert json.loads(out.read_text())["annotations"][3]["area"] == 100.0
    assert not list((tmp_path / "annotations").glob("*.partial.jsonl"))
    again = SquareMasker()
    add_masks(box_json, tmp_path / "allimages", again)  # an existing output is kept
    assert again.calls == []
