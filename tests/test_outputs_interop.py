"""Lighter outputs and interop (issue 18 items 4 and 6): ``outputs="boxes"``, per-class counts,
``Instances.to_supervision()`` and the COCO dataset export, with tiny RANDOM models (plumbing, not accuracy).

What is checked: boxes-only post-processing gives the very boxes, labels and scores of the masks output (bit
for bit); bbox-only COCO results; counts.csv agrees with predictions.json; the exported dataset loads in
pycocotools (``annToMask`` = the predicted masks, ``bbox`` = the results' boxes) and, when installed, in
supervision (``DetectionDataset.from_coco``) with the same masks.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import DATA, require_path
from test_api import tiny_segmenter

from ntt.app.cocodataset import ANNOTATIONS_FILE, export_instances
from ntt.app.segment import main
from ntt.postprocess import postprocess_detections

FSS = DATA / "geti-instant-learn-samples" / "library" / "examples" / "assets" / "fss-1000"
MODELS = ["--sam2", "tiny_random", "--dinov2", "tiny_random", "--device", "cpu"]
# a 5x5 grid, no IoU filter and no NMS suppression: enough detections to compare on random weights
GRID = [
    "proposer.points_per_side=5",
    "proposer.points_batch_size=25",
    "proposer.iou_thr=0.0",
    "matcher.nms_thr=1.0",
]


def _synthetic(n: int = 40, classes: int = 3, seed: int = 0):
    """Overlapping blob logits at 32x32 and classified proposals (labels over ``classes``)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    c = torch.rand(n, 2, generator=g) * 32
    r = 3 + torch.rand(n, 2, generator=g) * 10
    logits = 4 * (
        1
        - ((yy - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2
        - ((xx - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2
    )
    emb = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)
    labels = torch.randint(classes, (n,), generator=g)
    scores = torch.rand(n, generator=g)
    ious = torch.rand(n, generator=g)
    return logits, ious, labels, scores, emb


@pytest.mark.parametrize("merge", ["soft", "none"])
def test_boxes_only_postprocessing_gives_the_boxes_labels_and_scores_of_the_masks_output(merge):
    logits, ious, labels, scores, emb = _synthetic()
    kw = dict(height=90, width=120, num_out=15, merge=merge)
    full, _ = postprocess_detections(logits, ious, labels, scores, emb, **kw)
    light, _ = postprocess_detections(logits, ious, labels, scores, emb, keep_masks=False, **kw)
    assert len(full) == 15 and light.masks is None
    for key in ("boxes_xyxy", "scores", "labels", "proposal_index"):
        assert torch.equal(getattr(full, key), getattr(light, key)), key
    # the boxes are the full-resolution mask extents (not the low-res ones scaled)
    assert full.boxes_xyxy[:, 2].max() > 31


@pytest.fixture(scope="module")
def seg():
    require_path(FSS, "FSS-1000 sample (geti-instant-learn-samples)")
    s = tiny_segmenter(*GRID[:3], GRID[3])
    s.add_reference(FSS / "images/apple/1.jpg", "apple", masks=FSS / "masks/apple/1.png")
    s.add_reference(FSS / "images/basketball/1.jpg", "basketball", masks=FSS / "masks/basketball/1.png")
    s.build(progress=False)
    return s


def test_predict_outputs_boxes_equals_the_masks_output_less_the_masks(seg):
    image = FSS / "images/apple/5.jpg"
    full = seg.predict(image)
    light = seg.predict(image, outputs="boxes")
    assert len(full) >= 5 and light.masks is None
    assert torch.equal(full.boxes, light.boxes) and torch.equal(full.scores, light.scores)
    assert torch.equal(full.labels, light.labels)
    coco_full, coco_light = full.to_coco(3), light.to_coco(3)
    assert [{k: v for k, v in r.items() if k != "segmentation"} for r in coco_full] == coco_light
    assert light.overlay().size == (224, 224)  # boxes drawn
    with pytest.raises(ValueError, match=r"outputs must be one of \('masks', 'boxes'\), got 'polygons'"):
        seg.predict(image, outputs="polygons")


def test_counts_per_class_with_a_threshold(seg):
    inst = seg.predict(FSS / "images/apple/5.jpg", outputs="boxes")
    assert sum(inst.counts().values()) == len(inst)
    thr = float(inst.scores.median())
    counts = inst.counts(score_thr=thr)
    assert list(counts) == ["apple", "basketball"]
    assert sum(counts.values()) == int((inst.scores >= thr).sum())
    assert counts["apple"] == int(((inst.scores >= thr) & (inst.labels == 0)).sum())


def test_to_supervision_keeps_masks_boxes_scores_and_names(seg):
    sv = pytest.importorskip("supervision")
    inst = seg.predict(FSS / "images/apple/5.jpg")
    det = inst.to_supervision()
    assert isinstance(det, sv.Detections) and len(det) == len(inst)
    assert np.array_equal(det.mask, inst.masks.numpy())
    assert np.array_equal(det.xyxy, inst.boxes.numpy()) and np.array_equal(det.class_id, inst.labels.numpy())
    assert np.array_equal(det.confidence, inst.scores.numpy())
    assert list(det.data["class_name"]) == inst.class_names
    assert seg.predict(FSS / "images/apple/5.jpg", outputs="boxes").to_supervision().mask is None


def _check_dataset(root, instances) -> None:
    """pycocotools loads it; annToMask equals the masks; bbox equals the results; supervision loads it too."""
    from pycocotools.coco import COCO

    coco = COCO(str(root / ANNOTATIONS_FILE))
    assert sorted(coco.getCatIds()) == [1, 2]
    for img_id, inst in enumerate(instances, start=1):
        info = coco.loadImgs(img_id)[0]
        assert (info["height"], info["width"]) == (inst.height, inst.width)
        assert (root / "images" / info["file_name"]).is_file()
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert len(anns) == len(inst)
        for ann, mask, res in zip(anns, inst.masks, inst.to_coco(img_id)):
            assert np.array_equal(coco.annToMask(ann).astype(bool), mask.numpy())
            assert ann["bbox"] == res["bbox"] and ann["iscrowd"] == 0 and ann["area"] == int(mask.sum())
    try:
        import supervision as sv
    except ImportError:
        return
    ds = sv.DetectionDataset.from_coco(
        images_directory_path=str(root / "images"),
        annotations_path=str(root / ANNOTATIONS_FILE),
        force_masks=True,
    )
    assert ds.classes == ["apple", "basketball"] and len(ds) == len(instances)
    by_name = {p.rsplit("/", 1)[-1]: d for p, _, d in ds}
    for inst in instances:
        det = by_name[inst.path.rsplit("/", 1)[-1]]
        assert np.array_equal(det.mask, inst.masks.numpy())


def test_export_instances_is_a_coco_dataset_pycocotools_and_supervision_read(seg, tmp_path):
    images = [FSS / "images/apple/5.jpg", FSS / "images/basketball/6.jpg"]
    instances = seg.predict(images, progress=False)
    export_instances(instances, tmp_path / "ds")
    _check_dataset(tmp_path / "ds", instances)


def test_segment_outputs_boxes_counts_csv_and_export_coco(seg, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(FSS / "images/apple/5.jpg", images / "a5.jpg")
    shutil.copy(FSS / "images/basketball/6.jpg", images / "b6.jpg")
    bank = seg.save(tmp_path / "bank.ntt")
    out = tmp_path / "out"
    argv = [
        "--bank",
        str(bank),
        "--images",
        str(images),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-overlays",
    ]
    assert main([*argv, "--export-coco", str(tmp_path / "ds"), "--score-thr", "0.5"]) == 0
    preds = json.loads((out / "predictions.json").read_text())
    assert preds and all("segmentation" in r for r in preds)
    rows = list(csv.reader((out / "counts.csv").open()))
    assert rows[0] == ["image", "apple", "basketball", "total"]
    assert [r[0] for r in rows[1:]] == ["a5.jpg", "b6.jpg"]
    for img_id, row in enumerate(rows[1:], start=1):
        mine = [r for r in preds if r["image_id"] == img_id and r["score"] >= 0.5]
        assert [int(v) for v in row[1:]] == [
            sum(r["category_id"] == 1 for r in mine),
            sum(r["category_id"] == 2 for r in mine),
            len(mine),
        ]
    instances = seg.predict([images / "a5.jpg", images / "b6.jpg"], progress=False)
    _check_dataset(tmp_path / "ds", instances)
    # boxes: bbox-only results, equal to the masks run's less the masks; not taken from the masks run's lines
    assert main([*argv, "--outputs", "boxes"]) == 0
    light = json.loads((out / "predictions.json").read_text())
    assert light == [{k: v for k, v in r.items() if k != "segmentation"} for r in preds]
    zero = list(csv.reader((out / "counts.csv").open()))
    assert [int(r[-1]) for r in zero[1:]] == [sum(r["image_id"] == i for r in light) for i in (1, 2)]


def test_bad_exports_and_a_missing_supervision_are_one_clear_line(seg, tmp_path, monkeypatch):
    inst = seg.predict(FSS / "images/apple/5.jpg", outputs="boxes")
    with pytest.raises(ValueError, match="two images share a file_name"):
        export_instances([inst, inst], tmp_path / "ds")
    monkeypatch.setitem(__import__("sys").modules, "supervision", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'ntt\[supervision\]'"):
        inst.to_supervision()


def test_prototypes_are_computed_once_per_bank_state_not_per_image(seg, monkeypatch):
    calls = []
    original = seg.bank.prototypes
    monkeypatch.setattr(seg.bank, "prototypes", lambda: calls.append(1) or original())
    seg._protos_cache = None
    first = seg._prototypes(seg.bank)
    assert seg._prototypes(seg.bank) is first and len(calls) == 1
    with torch.inference_mode():
        seg.bank.instance_means.mul_(1.0)  # an in-place edit (same values): a new version, recomputed
    assert torch.equal(seg._prototypes(seg.bank), first) and len(calls) == 2
    seg.bank.category_ids = list(seg.bank.category_ids)  # same content: still cached
    seg._prototypes(seg.bank)
    assert len(calls) == 2
