"""`ntt segment` with tiny RANDOM models on real images: inputs, outputs, failures, clear errors.

Plumbing, not accuracy: with random weights the masks and scores are meaningless. What is checked: a folder
of images without any json is segmented; references from a mask folder and from a prompt json; the COCO
results and dataset jsons; overlays sized like their images; a broken image is recorded and the others
kept; a saved bank reproduces the predictions; bad input fails with a message naming the problem.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import DATA, require_path
from PIL import Image

from ntt.app.references import load_reference_specs
from ntt.app.segment import main

FSS = DATA / "geti-instant-learn-samples" / "library" / "examples" / "assets" / "fss-1000"
MODELS = ["--sam2", "tiny_random", "--dinov2", "tiny_random", "--device", "cpu"]
GRID = ["proposer.points_per_side=4", "proposer.points_batch_size=16", "proposer.iou_thr=0.0"]


@pytest.fixture()
def fss(tmp_path):
    """refs/<class>/<name>.jpg + mask PNGs, and a folder of 2 target images plus a broken file."""
    require_path(FSS, "FSS-1000 sample (geti-instant-learn-samples)")
    refs, images = tmp_path / "refs", tmp_path / "images"
    (refs / "apple").mkdir(parents=True)
    (refs / "basketball").mkdir(parents=True)
    images.mkdir()
    shutil.copy(FSS / "images/apple/1.jpg", refs / "apple/a1.jpg")
    shutil.copy(FSS / "masks/apple/1.png", refs / "apple/a1.png")  # <name>.png beside <name>.jpg
    shutil.copy(FSS / "images/basketball/1.jpg", refs / "basketball/b1.jpg")
    shutil.copy(FSS / "masks/basketball/1.png", refs / "basketball/b1.mask.png")
    shutil.copy(FSS / "images/apple/5.jpg", images / "apple5.jpg")
    Image.open(FSS / "images/basketball/6.jpg").resize((200, 150)).save(images / "ball6.png")
    (images / "notes.txt").write_text("not an image, ignored")
    return tmp_path


def test_folder_of_images_without_json_gives_results_overlays_and_a_reusable_bank(fss, caplog):
    caplog.set_level("INFO")
    (fss / "images" / "zz_broken.jpg").write_bytes(b"not a jpeg")
    out = fss / "out"
    rc = main(
        ["--refs", str(fss / "refs"), "--images", str(fss / "images"), "--out", str(out), *MODELS, *GRID]
    )
    assert rc == 1  # one image failed; the others are kept
    assert "segmenting 2 image(s) on cpu with a 4x4 prompt grid: expect about" in caplog.text
    assert "first image took" in caplog.text
    failed = json.loads((out / "failed.json").read_text())
    assert [f["file_name"] for f in failed] == ["zz_broken.jpg"] and "zz_broken.jpg" in failed[0]["error"]
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["categories"] == [{"id": 1, "name": "apple"}, {"id": 2, "name": "basketball"}]
    sizes = {im["file_name"]: (im["width"], im["height"]) for im in dataset["images"]}
    assert sizes == {"apple5.jpg": (224, 224), "ball6.png": (200, 150)}  # read from the files
    ids = {im["id"] for im in dataset["images"]}
    preds = json.loads((out / "predictions.json").read_text())
    assert preds and {p["image_id"] for p in preds} <= ids
    for p in preds:
        assert set(p) == {"image_id", "category_id", "bbox", "score", "segmentation"} and p[
            "category_id"
        ] in (1, 2)
    for name, size in (("apple5", (224, 224)), ("ball6", (200, 150))):
        assert Image.open(out / "overlays" / f"{name}.png").size == size
    # the saved bank reproduces the predictions without the references
    again = fss / "again"
    rc = main(
        ["--bank", str(out / "bank.ntt"), "--images", str(fss / "images/apple5.jpg"), "--out", str(again)]
    )
    assert rc == 0
    first = [p for p in preds if p["image_id"] == 1]
    assert json.loads((again / "predictions.json").read_text()) == first


def test_prompt_json_references_with_boxes_and_points(fss, tmp_path):
    shutil.copy(FSS / "images/apple/2.jpg", fss / "a2.jpg")
    shutil.copy(FSS / "images/basketball/2.jpg", fss / "b2.jpg")
    spec = {
        "references": [
            {"image": "a2.jpg", "class": "apple", "points": [[110, 120]]},
            {"image": "b2.jpg", "class": "basketball", "boxes": [[20, 20, 200, 200]]},
            {"image": "refs/apple/a1.jpg", "class": "apple", "mask": "refs/apple/a1.png"},
        ]
    }
    (fss / "prompts.json").write_text(json.dumps(spec))
    specs = load_reference_specs(fss / "prompts.json")
    assert [s.cls for s in specs] == ["apple", "basketball", "apple"]
    out = fss / "out"
    rc = main(
        ["--refs", str(fss / "prompts.json"), "--images", str(fss / "images/ball6.png"), "--out", str(out)]
        + ["--no-overlays", *MODELS, *GRID]
    )
    assert rc == 0 and not (out / "overlays").exists()
    from ntt.bank import MemoryBank

    bank = MemoryBank.load(out / "bank.ntt")
    assert bank.category_names == ["apple", "basketball"] and bank.counts.tolist() == [2, 1]
    assert [r["prompt"] for r in bank.refs[0]] == ["points", "mask"]


def test_folder_references_fss_layout_are_read():
    require_path(FSS, "FSS-1000 sample (geti-instant-learn-samples)")
    specs = load_reference_specs(FSS)  # images/<class>/<n>.jpg + masks/<class>/<n>.png
    assert {s.cls for s in specs} == {"apple", "basketball"} and len(specs) == 20
    assert all(s.masks[0].parent.parent.name == "masks" for s in specs)


def test_bad_inputs_fail_clearly(fss, caplog):
    (fss / "refs" / "apple" / "a1.png").unlink()
    from ntt import cli

    argv = ["--refs", str(fss / "refs"), "--images", str(fss / "images"), "--out", str(fss / "o"), *MODELS]
    rc = cli.main(["segment", *argv])  # `ntt segment`: a user error is one line and exit status 2
    assert rc == 2 and "a1.jpg has no mask" in caplog.text
    (fss / "bad.json").write_text(json.dumps([{"image": "x.jpg", "class": "c", "box": [1, 2, 3, 4]}]))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['box'\]"):
        load_reference_specs(fss / "bad.json")
    (fss / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        load_reference_specs(fss / "empty")
    with pytest.raises(SystemExit):
        main(["--images", str(fss / "images"), "--out", str(fss / "o")])  # neither --refs nor --bank
