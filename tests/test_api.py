"""The practitioner Python API (ntt.app.segmenter.Segmenter) with tiny RANDOM models on real images.

Plumbing, not accuracy: random weights make every mask and score meaningless. What is checked: references
from masks, boxes and clicks each give a bank and predictions in the documented formats; any number of
references per class without padding; prototypes identical to the benchmark's fill_memory for the same
references; save -> load -> predict gives identical predictions, also from a file in the former
``ntt-reference-bank`` layout.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, require_path
from helpers_backbones import tiny_dinov2, tiny_sam2

from ntt.app.segmenter import Segmenter
from ntt.app.settings import compose_config
from ntt.bank import MemoryBank
from ntt.prompts import normalize_boxes, normalize_points

FSS = DATA / "geti-instant-learn-samples" / "library" / "examples" / "assets" / "fss-1000"
FRUITS = DATA / "fruits_nuts" / "data"
NEU = DATA / "neu-det" / "NEU-DET"
# a 4x4 grid and no IoU filter: random weights predict near-constant IoUs
TINY = ["proposer.points_per_side=4", "proposer.points_batch_size=16", "proposer.iou_thr=0.0"]


def tiny_segmenter(*overrides: str) -> Segmenter:
    cfg = compose_config(sam2="tiny_random", dinov2="tiny_random", overrides=[*TINY, *overrides])
    return Segmenter(cfg, device="cpu", sam2=tiny_sam2(), dinov2=tiny_dinov2())


def check_instances(inst, height: int, width: int, names: list[str]) -> None:
    n = len(inst)
    assert (inst.height, inst.width) == (height, width)
    assert inst.masks.dtype == torch.bool and tuple(inst.masks.shape) == (n, height, width)
    assert tuple(inst.boxes.shape) == (n, 4) and tuple(inst.scores.shape) == (n,)
    assert inst.labels.dtype == torch.int64 and all(0 <= int(c) < len(names) for c in inst.labels)
    assert inst.names == names and all(c in names for c in inst.class_names)
    assert bool(((inst.scores >= 0) & (inst.scores <= 1)).all())  # clamped cosines
    results = inst.to_coco(image_id=7)
    assert len(results) == n
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"}
        assert r["image_id"] == 7 and r["category_id"] in inst.category_ids
        assert r["segmentation"]["size"] == [height, width] and isinstance(r["segmentation"]["counts"], str)


# ----------------------------------------------------------------------------------------------------------
# Without data


def test_import_ntt_stays_light_and_exports_the_api():
    code = "import sys, ntt; assert 'torch' not in sys.modules; ntt.Segmenter; print('sam2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]


def test_prototype_of_a_class_is_the_mean_of_its_own_references_only():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(2, 3, 8, generator=g)
    means[1, 1:] = 1e6  # padding rows of class 1 (1 reference): must never be read
    bank = MemoryBank(
        category_names=["a", "b"],
        category_ids=[1, 2],
        instance_means=means,
        weight_sums=torch.ones(2, 3),
        counts=torch.tensor([3, 1]),
        encoder="x",
        refs=[[{}] * 3, [{}]],
    )
    protos = bank.prototypes()
    want = torch.stack([means[0].mean(0), means[1, 0]])
    torch.testing.assert_close(protos, want / want.norm(dim=-1, keepdim=True), rtol=0, atol=1e-6)


def test_prompt_normalisation():
    assert normalize_boxes([1, 2, 3, 4]).tolist() == [[1, 2, 3, 4]]
    with pytest.raises(ValueError, match="not COCO"):
        normalize_boxes([[10, 10, 5, 20]])  # x2 < x1: probably xywh
    one = normalize_points([5, 6])
    assert len(one) == 1 and one[0][0].tolist() == [[5, 6]] and one[0][1].tolist() == [1]
    two = normalize_points([[5, 6], [7, 8]])  # [N, 2]: N instances, one click each
    assert [p.tolist() for p, _ in two] == [[[5, 6]], [[7, 8]]]
    ragged = normalize_points([[[1, 2], [3, 4]], [[5, 6]]], point_labels=[[1, 0], [1]])
    assert [lab.tolist() for _, lab in ragged] == [[1, 0], [1]]
    with pytest.raises(ValueError, match="no positive click"):
        normalize_points([[1, 2]], point_labels=[0])


def test_config_knobs_and_clear_errors():
    seg = tiny_segmenter("matcher.nms_thr=0.7", "matcher.pooling=adjoint")
    assert seg.params.points_per_side == 4 and seg.params.nms_thr == 0.7 and seg.params.pooling == "adjoint"
    with pytest.raises(ValueError, match="exactly one of"):
        seg.add_reference(np.zeros((8, 8, 3), np.uint8), "x")
    with pytest.raises(ValueError, match="mask is 4x4"):
        seg.add_reference(np.zeros((8, 8, 3), np.uint8), "x", masks=np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="no references"):
        seg.build()
    assert seg._call_params({"num_out": 1, "iou_thr": 0.5}).num_out == 1  # predict(..., num_out=1)
    assert seg.params.num_out == 100  # a per-call setting does not stick
    with pytest.raises(TypeError, match="unknown setting"):
        seg._call_params({"nms_threshold": 0.3})
    cpu_fast = compose_config(sam2="tiny_random", dinov2="tiny_random", proposer="cpu_fast")
    assert cpu_fast.proposer.points_per_side == 12


def test_cpu_users_are_told_the_expected_time_and_pointed_to_cpu_fast(caplog):
    from ntt.utils.speed import estimate_seconds_per_image

    caplog.set_level("WARNING")
    Segmenter(compose_config(sam2="sam2.1_hiera_t", dinov2="vits14"), device="cpu")  # models built lazily
    assert "proposer=cpu_fast" in caplog.text and "32x32 prompt grid on the CPU" in caplog.text
    est = {
        p: estimate_seconds_per_image(
            sam2="sam2.1_hiera_t", dinov2="dinov2_vits14", points_per_side=p, device="cpu", threads=2
        )
        for p in (32, 12)
    }
    # benchmarks/README.md, 2 cores: ~41 ms per prompt (86 ms x 0.48 after the decoder speedups)
    assert 30 < est[32] < 80 and 4 < est[12] < 15
    assert estimate_seconds_per_image(sam2="x", dinov2="y", points_per_side=32, device="cuda") is None


def test_images_are_read_upright_and_masks_are_in_the_upright_frame(tmp_path):
    from PIL import Image

    from ntt.data.images import read_image

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 200x150, shown rotated by 90 degrees: 150x200
    Image.new("RGB", (200, 150), (10, 20, 30)).save(tmp_path / "rot.jpg", exif=exif)
    assert read_image(tmp_path / "rot.jpg")[0].size == (150, 200)
    seg = tiny_segmenter()
    with pytest.raises(ValueError, match="upright"):
        seg.add_reference(tmp_path / "rot.jpg", "x", masks=np.ones((150, 200), bool))  # stored frame
    mask = np.zeros((200, 150), bool)
    mask[50:150, 40:110] = True
    assert seg.add_reference(tmp_path / "rot.jpg", "x", masks=mask) == 1


# ----------------------------------------------------------------------------------------------------------
# On real images (../shared/data)


def test_prototypes_are_exactly_the_benchmark_fill_memory_ones():
    """Equal references through the API and through the benchmark's fill_memory: bit-identical features."""
    require_path(FRUITS, "fruits_nuts dataset")
    from ntt.data.coco import CocoDataset
    from ntt.fill import fill_memory
    from ntt.refs import RefEntry

    ds = CocoDataset(FRUITS / "trainval.json", FRUITS / "images")
    by_cat: dict[int, list[dict]] = {}
    for a in ds.raw["annotations"]:
        if len(by_cat.setdefault(a["category_id"], [])) < 3:
            by_cat[a["category_id"]].append(a)
    refs = {c: [RefEntry(c, a["image_id"], [a["id"]]) for a in anns] for c, anns in by_cat.items()}
    dino = tiny_dinov2()
    bank_ref = fill_memory(
        refs,
        dataset_json=ds.raw,
        image_root=FRUITS / "images",
        encoder=dino,
        class_ids=list(refs),
        progress=False,
    )
    seg = tiny_segmenter()
    for c in sorted(by_cat, reverse=True):  # insertion order of classes does not matter: ids do
        for a in by_cat[c]:
            info = ds.image_info(a["image_id"])
            seg.add_reference(
                FRUITS / "images" / info["file_name"],
                ds.name_of(c),
                masks=ds.mask(a["id"]),
                bboxes_xywh=[a["bbox"]],
                category_id=c,
            )
    bank = seg.build(progress=False)
    assert bank.category_names == bank_ref.category_names and bank.category_ids == bank_ref.category_ids
    assert bank.counts.tolist() == [3, 3, 3]
    assert torch.equal(bank.instance_means, bank_ref.instance_means)
    assert torch.equal(bank.weight_sums, bank_ref.weight_sums)
    assert torch.equal(bank.prototypes(), bank_ref.prototypes())


@pytest.fixture(scope="module")
def fss_segmenter():
    """References from a mask, a box and clicks on FSS-1000 sample images (apple: 2 refs, basketball: 1)."""
    require_path(FSS, "FSS-1000 sample (geti-instant-learn-samples)")
    seg = tiny_segmenter()
    assert seg.add_reference(FSS / "images/apple/1.jpg", "apple", masks=FSS / "masks/apple/1.png") == 1
    assert seg.add_reference(FSS / "images/basketball/1.jpg", "basketball", boxes=[[30, 30, 190, 190]]) == 1
    assert seg.add_reference(FSS / "images/apple/2.jpg", "apple", points=[[110, 120]]) == 1
    return seg


def test_references_from_mask_box_and_points_give_a_bank_and_predictions(fss_segmenter, tmp_path):
    seg = fss_segmenter
    bank = seg.build(progress=False)
    assert bank.category_names == ["apple", "basketball"] and bank.category_ids == [1, 2]
    assert bank.counts.tolist() == [2, 1]  # no padding to a common K
    assert [r["prompt"] for r in bank.refs[0]] == ["mask", "points"]
    assert bank.refs[1][0]["prompt"] == "box" and bank.refs[1][0]["bbox"] == [30, 30, 160, 160]
    assert torch.allclose(bank.prototypes().norm(dim=-1), torch.ones(2))
    inst = seg.predict(FSS / "images/apple/5.jpg")
    check_instances(inst, 224, 224, ["apple", "basketball"])
    assert inst.overlay().size == (224, 224)


def test_box_and_click_references_record_their_prompt_and_image_digest(fss_segmenter):
    """A reference's provenance says what it was made from (issue 18): the image's sha256 and the prompt."""
    from ntt.utils.files import sha256_file

    bank = fss_segmenter.build(progress=False)
    mask_ref, click_ref = bank.refs[0]
    box_ref = bank.refs[1][0]
    assert box_ref["image_sha256"] == sha256_file(FSS / "images/basketball/1.jpg")
    assert click_ref["image_sha256"] == sha256_file(FSS / "images/apple/2.jpg")
    assert box_ref["box"] == [30.0, 30.0, 190.0, 190.0] and "mask_sha256" not in box_ref
    assert click_ref["points"] == [[110.0, 120.0]] and click_ref["point_labels"] == [1]
    assert len(mask_ref["mask_sha256"]) == 64 and bank.format_version() == 3
    from ntt.bank_edit import describe

    text = describe(bank)
    assert f"0: 1.jpg  box [30.0, 30.0, 190.0, 190.0]  image sha256 {box_ref['image_sha256'][:12]}" in text
    assert "1: 2.jpg  points [[110.0, 120.0]] labels [1]  image sha256 " in text


def test_save_load_predict_gives_identical_predictions(fss_segmenter, tmp_path):
    seg = fss_segmenter
    image = FSS / "images/basketball/6.jpg"
    before = seg.predict(image)
    path = seg.save(tmp_path / "refs.ntt")
    assert path.stat().st_size < 100_000  # features and metadata, never model weights
    loaded = Segmenter.load(path, device="cpu")
    assert loaded.params == seg.params and loaded.class_names == ["apple", "basketball"]
    after = loaded.predict(image)
    assert torch.equal(before.masks, after.masks) and torch.equal(before.scores, after.scores)
    assert torch.equal(before.labels, after.labels) and torch.equal(before.boxes, after.boxes)
    assert json.dumps(before.to_coco(1)) == json.dumps(after.to_coco(1))
    assert Segmenter.load(path, device="cpu", overrides=["proposer=cpu_fast"]).params.points_per_side == 12
    tuned = Segmenter.load(
        path, device="cpu", overrides=["proposer.points_per_side=3", "matcher.nms_thr=0.7"]
    )
    assert (tuned.params.points_per_side, tuned.params.iou_thr, tuned.params.nms_thr) == (3, 0.0, 0.7)
    with pytest.raises(ValueError, match="holds dinov2_tiny_random features"):
        Segmenter.load(path, device="cpu", overrides=["backbone/dinov2=vits14"])
    # a loaded bank takes new references (issue 18; it refused them before): tests/test_bank_edit.py
    assert loaded.add_reference(image, "apple", boxes=[0, 0, 10, 10]) == 1


def test_a_bank_in_the_former_reference_bank_layout_loads_and_predicts_alike(fss_segmenter, tmp_path):
    """bank.ntt files written before the one MemoryBank (format ntt-reference-bank v1) still load."""
    seg = fss_segmenter
    bank = seg.build(progress=False)
    config = copy.deepcopy(bank.config)  # with the matcher.memory keys of the time
    config["matcher"]["memory"].update(compute_stats=False, kmeans_k=4, n_pca=3)
    meta = {  # the layout of ReferenceBank.save (ntt 0.1.0 before the bank classes were merged)
        "format": "ntt-reference-bank",
        "format_version": 1,
        "names": bank.category_names,
        "category_ids": bank.category_ids,
        "encoder": bank.encoder,
        "fill_settings": bank.fill_settings,
        "references": bank.refs,
        "config": config,
        "ntt_version": "0.1.0",
    }
    payload = {
        "meta_json": json.dumps(meta, sort_keys=True),
        "instance_means": bank.instance_means,
        "weight_sums": bank.weight_sums,
        "counts": bank.counts,
    }
    torch.save(payload, tmp_path / "old.ntt")
    loaded = Segmenter.load(tmp_path / "old.ntt", device="cpu", sam2=seg.sam2, dinov2=seg.dinov2)
    assert loaded.params == seg.params and loaded.class_names == ["apple", "basketball"]
    assert (
        loaded.bank.counts.tolist() == [2, 1] and loaded.bank.refs == bank.refs and loaded.bank.shots is None
    )
    assert torch.equal(loaded.bank.prototypes(), bank.prototypes()) and loaded.bank.config == bank.config
    image = FSS / "images/basketball/6.jpg"
    assert json.dumps(loaded.predict(image).to_coco(1)) == json.dumps(seg.predict(image).to_coco(1))


def test_progress_bar_counts_each_image_as_it_finishes(fss_segmenter, monkeypatch):
    """The bar stood one short: it counted an image when the next one was asked for, never the last."""
    import tqdm

    bars = []

    class Recorded(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if kwargs.get("desc") == "segment":
                bars.append(self)

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    images = [FSS / "images/apple/5.jpg", FSS / "images/basketball/6.jpg"]
    fss_segmenter.build(progress=False)
    seen = []
    for _ in fss_segmenter.iter_predict(images, keep_image=False):  # as a consumer that stops at the last
        seen.append(bars[-1].n)
    assert seen == [1, 2] and bars[-1].total == 2


def test_a_folder_predict_skips_the_overlays_written_next_to_the_images(fss_segmenter, tmp_path):
    """The documented ``<image>.overlay.png`` next to a photo is not segmented by the next predict."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(FSS / "images/apple/5.jpg", photos / "a.jpg")
    shutil.copy(FSS / "images/apple/5.jpg", photos / "a.jpg.overlay.png")
    assert [Path(inst.path).name for inst in fss_segmenter.predict(photos, keep_image=False)] == ["a.jpg"]
    (photos / "a.jpg").unlink()
    with pytest.raises(ValueError, match="besides the overlays ntt wrote"):
        fss_segmenter.predict(photos)


def test_box_references_from_a_boxes_only_coco_json(tmp_path):
    """NEU-DET has boxes only: its annotations become references through SAM2 box prompts."""
    require_path(NEU, "NEU-DET dataset")
    from ntt.app.references import add_references, load_reference_specs

    full = json.loads((NEU / "instances_neu_det_bbox.json").read_text())
    keep_cats = {1, 6}
    anns = []
    for cat in sorted(keep_cats):
        anns += [a for a in full["annotations"] if a["category_id"] == cat][:1]
    img_ids = {a["image_id"] for a in anns}
    sub = {
        "images": [im for im in full["images"] if im["id"] in img_ids],
        "annotations": anns,
        "categories": [c for c in full["categories"] if c["id"] in keep_cats],
    }
    (tmp_path / "refs.json").write_text(json.dumps(sub))
    specs = load_reference_specs(tmp_path / "refs.json", NEU / "IMAGES")
    assert all(s.boxes is not None and s.masks is None for s in specs)
    seg = tiny_segmenter()
    assert add_references(seg, specs) == 2
    bank = seg.build(progress=False)
    assert bank.category_ids == [1, 6] and bank.category_names == ["crazing", "scratches"]
    assert bank.counts.tolist() == [1, 1] and torch.isfinite(bank.instance_means).all()
    target = NEU / "IMAGES" / sub["images"][0]["file_name"]
    check_instances(seg.predict(target), 416, 416, ["crazing", "scratches"])


def test_predictions_equal_the_benchmark_test_stage_for_its_memory_bank(tmp_path):
    """A benchmark run's bank through Segmenter.load (with the run's config) gives the run's own predictions."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from ntt.runner import run_pipeline
    from ntt.utils.compose import conf_path

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_path()), version_base="1.3"):
        cfg = compose(
            config_name="main",
            overrides=[
                "debug=smoke",
                "device=cpu",
                "eval=none",
                f"paths.output_dir={tmp_path}",
                "dataset=synthetic",
                "dataset.synthetic.num_images=6",
                "dataset.max_test_images=1",
            ],
        )
    GlobalHydra.instance().clear()
    run_pipeline(cfg)
    run_dir = next(p.parent for p in tmp_path.rglob("memory_postprocessed.pt"))
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    with pytest.raises(ValueError, match="records no segmenter config"):
        Segmenter.load(run_dir / "memory_postprocessed.pt", device="cpu")
    seg = Segmenter.load(run_dir / "memory_postprocessed.pt", config=run_cfg, device="cpu")
    preds = json.loads((run_dir / "predictions.json").read_text())
    test = json.loads(Path(run_cfg.dataset.test_json).read_text())
    image = test["images"][0]
    inst = seg.predict(Path(run_cfg.dataset.test_image_root) / image["file_name"])
    assert preds and json.dumps(inst.to_coco(image["id"])) == json.dumps(preds)
