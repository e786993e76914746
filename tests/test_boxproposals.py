"""Box-prompt proposals (`proposer=boxes`, method.md §5.11): reading a detector's boxes, FSOD-VFM's box
selection, the box -> mask step, and an end-to-end run on the synthetic data with tiny RANDOM models
(plumbing only: no number of these runs measures accuracy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import torch_threads
from helpers_kernels import on_fixture_kernels

from ntt.boxproposals import (
    BoxesError,
    BoxSource,
    ImageBoxes,
    boxes_to_frame,
    choose_single_output,
    generate_box_proposals,
    load_boxes_json,
    select_boxes,
)
from ntt.utils.config import ProposerConfig, build_node
from ntt.utils.errors import ConfigError


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------------------------------- the boxes file
def test_boxes_json_groups_entries_per_image_in_file_order_and_converts_xywh(tmp_path):
    f = write(
        tmp_path / "b.json",
        [
            {"image_id": 7, "bbox": [10, 20, 30, 40], "score": 0.5, "category_id": 1},
            {"image_id": 3, "bbox": [0, 0, 1, 2], "score": 0.9},
            {"image_id": 7, "bbox": [1.5, 2.5, 3, 4], "score": 0.7},
        ],
    )
    table = load_boxes_json(f)
    assert sorted(table) == [3, 7]
    np.testing.assert_array_equal(table[7].boxes, [[10, 20, 40, 60], [1.5, 2.5, 4.5, 6.5]])
    np.testing.assert_array_equal(table[7].scores, [0.5, 0.7])
    xyxy = load_boxes_json(f, box_format="xyxy")
    np.testing.assert_array_equal(xyxy[7].boxes[0], [10, 20, 30, 40])
    by_name = load_boxes_json(
        write(tmp_path / "n.json", [{"file_name": "a.png", "bbox": [0, 0, 4, 4], "score": 1}]),
        key="file_name",
    )
    assert list(by_name) == ["a.png"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"image_id": 1}, "expected a list of {image_id, bbox, score} entries, got dict"),
        ([{"bbox": [0, 0, 1, 1], "score": 1}], "entry 0 has no image_id (proposer.boxes_key=image_id)"),
        (
            [
                {"image_id": 1, "bbox": [0, 0, 1, 1], "score": 1},
                {"image_id": 2, "bbox": [0, 0, 1], "score": 1},
            ],
            "entry 1 (image_id 2): bbox must be 4 finite numbers [x, y, width, height], got [0, 0, 1]",
        ),
        (
            [{"image_id": 1, "bbox": [0, 0, 1, 1]}],
            "entry 0 (image_id 1): score must be a finite number, got None",
        ),
        ([{"image_id": 1, "bbox": [5, 5, -1, 2], "score": 1}], "has a negative width or height"),
        ([{"image_id": 1, "bbox": [0, 0, 1, "x"], "score": 1}], "bbox must be 4 finite numbers"),
        (
            [{"image_id": "1", "bbox": [0, 0, 1, 1], "score": 1}],
            "entry 0: image_id must be a whole number, got '1'",
        ),
    ],
)
def test_malformed_boxes_file_is_one_line_naming_the_file_and_the_entry(tmp_path, data, message):
    f = write(tmp_path / "bad.json", data)
    with pytest.raises(BoxesError) as err:
        load_boxes_json(f)
    text = str(err.value)
    assert text.startswith(f"proposer.boxes_json={f}") and message in text and "\n" not in text


def test_missing_or_unparseable_boxes_file_names_the_key(tmp_path):
    with pytest.raises(BoxesError, match=r"proposer.boxes_json=.*nope.json not found"):
        load_boxes_json(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(BoxesError, match=r"broken.json is not valid json"):
        load_boxes_json(tmp_path / "broken.json")


def test_a_file_without_boxes_for_any_evaluated_image_is_refused_and_partial_cover_warns(tmp_path, caplog):
    f = write(tmp_path / "b.json", [{"image_id": 99, "bbox": [0, 0, 4, 4], "score": 1}])
    src = BoxSource(boxes_json=str(f))
    with pytest.raises(BoxesError, match="none of the 2 evaluated images has boxes in it"):
        src.check_images([{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}])
    assert src.check_images([{"id": 99, "file_name": "z.png"}, {"id": 2, "file_name": "b.png"}]) == 1
    assert "no boxes for 1 of 2 evaluated image(s)" in caplog.text
    empty = src.boxes_for(image_id=2, file_name="b.png", width=10, height=10)
    assert len(empty) == 0 and empty.boxes.shape == (0, 4)


def test_proposer_config_needs_exactly_one_source_and_known_choices():
    with pytest.raises(BoxesError, match="needs exactly one of proposer.boxes_json"):
        BoxSource.from_config(build_node({"prompts": "boxes"}, ProposerConfig))
    with pytest.raises(BoxesError, match="needs exactly one of proposer.boxes_json"):
        BoxSource(boxes_json="x.json", detector={"_target_": "json.dumps"})
    with pytest.raises(ConfigError, match="proposer.box_format=ltrb: use one of xywh, xyxy"):
        build_node({"prompts": "boxes", "boxes_json": "x.json", "box_format": "ltrb"}, ProposerConfig)
    with pytest.raises(ConfigError, match="proposer.iou_thr=null: the point grid needs a number"):
        build_node({"iou_thr": None}, ProposerConfig)
    cfg = build_node({"prompts": "boxes", "boxes_json": "x.json", "iou_thr": None}, ProposerConfig)
    assert cfg.top_k == 100 and cfg.clip and cfg.stability_fallback


def gt_detector(image, *, image_id, file_name, shift=0.0):
    """A plug-in detector for the tests: two boxes from the image's size (the third call answers badly)."""
    w, h = image.size
    if file_name == "bad.png":
        return [[0, 0, 1, 1]] * 3, [0.5, 0.4]
    return [[shift, 0, w / 2, h / 2], [-5, -5, w + 5, h + 5]], [0.2, 0.9]


def test_plug_in_detector_is_called_per_image_and_a_bad_answer_names_the_image(tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGB", (40, 30)).save(path)
    src = BoxSource(detector={"_target_": "test_boxproposals.gt_detector", "_partial_": True, "shift": 2.0})
    got = src.boxes_for(image_id=1, file_name="a.png", width=40, height=30, image_path=path)
    np.testing.assert_array_equal(got.boxes, [[0, 0, 40, 30], [2, 0, 20, 15]])  # sorted by score, clipped
    with pytest.raises(BoxesError, match=r"proposer.detector on image 2 \(bad.png\): 3 boxes and 2 scores"):
        src.boxes_for(image_id=2, file_name="bad.png", width=40, height=30, image_path=path)
    with pytest.raises(BoxesError, match=r"_target_=json.dumps built a str, which is not callable"):
        BoxSource(detector={"_target_": "json.dumps", "obj": 1})
    with pytest.raises(BoxesError, match=r"_target_=no_such_module.f: cannot build it"):
        BoxSource(detector={"_target_": "no_such_module.f"})


# ------------------------------------------------------------------------------------ FSOD-VFM's selection
def test_selection_thresholds_sorts_stably_cuts_then_clips_and_drops_empty_boxes():
    found = ImageBoxes(
        boxes=np.array(
            [
                [10, 10, 20, 20],  # 0.5
                [-5, -5, 8, 9],  # 0.9: clipped to [0, 0, 8, 9]
                [30, 30, 40, 40],  # 0.005: under the score threshold
                [95, 10, 120, 20],  # 0.7: clipped to [95, 10, 100, 20]
                [101, 10, 130, 20],  # 0.7: outside -> empty after clipping, dropped (after top-k)
                [1, 1, 2, 2],  # 0.5: tie with entry 0, comes after it (file order)
            ],
            dtype=np.float64,
        ),
        scores=np.array([0.5, 0.9, 0.005, 0.7, 0.7, 0.5]),
    )
    out = select_boxes(found, width=100, height=50, top_k=5, score_thr=0.01)
    # sorted: 1 (0.9), 3 (0.7), 4 (0.7), 0 (0.5), 5 (0.5); top 5 keeps all five; 4 is dropped after clipping
    np.testing.assert_array_equal(
        out.boxes, [[0, 0, 8, 9], [95, 10, 100, 20], [10, 10, 20, 20], [1, 1, 2, 2]]
    )
    np.testing.assert_array_equal(out.scores, [0.9, 0.7, 0.5, 0.5])
    top2 = select_boxes(found, width=100, height=50, top_k=3, score_thr=0.01)
    assert len(top2) == 2  # the cut comes before clipping, as in FSOD-VFM: fewer than top_k can remain
    raw = select_boxes(found, width=100, height=50, top_k=None, score_thr=0.0, clip=False)
    assert len(raw) == 6 and raw.boxes[0].tolist() == [-5, -5, 8, 9]


def test_boxes_to_frame_is_sam2_predictors_float32_transform():
    boxes = np.array([[0.0, 0.0, 640.0, 480.0], [10.3, 20.7, 33.1, 470.2]])
    out = boxes_to_frame(boxes, width=640, height=480)
    t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 2, 2)
    expect = torch.stack([t[..., 0] / 640, t[..., 1] / 480], dim=-1) * 1024  # SAM2Transforms.transform_coords
    assert out.dtype == torch.float32 and torch.equal(out, expect.reshape(-1, 4))
    assert out[0].tolist() == [0.0, 0.0, 1024.0, 1024.0]


def test_single_output_with_stability_fallback_picks_the_best_multimask_output_when_unstable():
    logits = torch.zeros(2, 4, 4, 4)
    logits[0, 0] = 5.0  # stable: every pixel far from 0
    logits[1, 0] = 0.01  # unstable: inside (-0.05, 0.05] -> area_i 0, area_u 16, stability 0
    logits[:, 2] = 1.0
    ious = torch.tensor([[0.1, 0.2, 0.3, 0.25], [0.1, 0.2, 0.9, 0.25]])
    _, iou, index = choose_single_output(logits, ious, stability_fallback=True)
    assert index.tolist() == [0, 2] and iou.tolist() == pytest.approx([0.1, 0.9])
    _, _, index = choose_single_output(logits, ious, stability_fallback=False)
    assert index.tolist() == [0, 0]


def test_stability_test_in_bfloat16_does_not_count_a_logit_equal_to_its_rounded_delta():
    """SAM2 under bfloat16 autocast compares bfloat16 logits with 0.05 rounded to bfloat16 (0.050048828125):
    a logit equal to that value is not above it, while float32's 0.05 counts it (``decoder_dtype``)."""
    edge = float(torch.tensor(0.05, dtype=torch.bfloat16))
    assert edge == 0.050048828125
    logits = torch.full((1, 4, 10, 10), 5.0)
    logits[0, 0].view(-1)[:2] = edge  # 98 of 100 pixels > 0.05 in both; these 2 only in float32
    ious = torch.tensor([[0.1, 0.2, 0.9, 0.3]])
    _, _, index = choose_single_output(logits, ious, stability_fallback=True)
    assert index.tolist() == [0]  # float32: 100 / 100 >= 0.98, stable
    _, _, index = choose_single_output(logits, ious, stability_fallback=True, decoder_dtype=torch.bfloat16)
    assert index.tolist() == [0]  # bfloat16: 98 / 100 = 0.98, still stable
    logits[0, 0].view(-1)[:3] = edge
    _, _, index = choose_single_output(logits, ious, stability_fallback=True)
    assert index.tolist() == [0]  # float32: 100 / 100
    _, _, index = choose_single_output(logits, ious, stability_fallback=True, decoder_dtype=torch.bfloat16)
    assert index.tolist() == [2]  # bfloat16: 97 / 100 < 0.98: the best multimask output by IoU


class CountingDecoder:
    """A stand-in SAM2 (``decode`` only): output k of box b has logits ``b + k`` and IoU ``0.1 * k``."""

    image_size = 1024

    def __init__(self):
        self.calls = 0

    def decode(self, feats, *, image_index, boxes):
        self.calls += 1
        b = boxes.shape[0]
        logits = boxes[:, :1, None, None] + torch.arange(4.0)[None, :, None, None] + torch.zeros(b, 4, 8, 8)
        return logits, torch.tensor([0.1, 0.2, 0.3, 0.25]).expand(b, 4)


def test_box_proposals_keep_every_box_in_order_in_batches_and_an_image_without_boxes_has_none():
    class Feats:
        image_embed = torch.zeros(1)

    sam2 = CountingDecoder()
    boxes = torch.tensor([[float(i), 0, i + 10, 10] for i in range(5)])
    props = generate_box_proposals(sam2, Feats(), boxes, batch_size=2, stability_fallback=False)
    assert sam2.calls == 3 and len(props) == 5
    assert props.logits[:, 0, 0].tolist() == [0, 1, 2, 3, 4]  # output 0 of each box, in the given order
    assert props.pred_ious.tolist() == pytest.approx([0.1] * 5) and torch.equal(props.points, boxes)
    # box 0's output 0 is all 0 logits (unstable: falls back to output 2, IoU 0.3); the others are >= 1 (stable)
    filtered = generate_box_proposals(sam2, Feats(), boxes, stability_fallback=True, iou_thr=0.25)
    assert filtered.grid_best_index.tolist() == [2, 0, 0, 0, 0] and filtered.grid_index.tolist() == [0]
    assert len(generate_box_proposals(sam2, Feats(), boxes, stability_fallback=False, iou_thr=0.1)) == 0
    empty = generate_box_proposals(sam2, Feats(), torch.zeros(0, 4))
    assert len(empty) == 0 and empty.logits.shape == (0, 256, 256) and sam2.calls == 5


@pytest.mark.slow
def test_box_proposals_do_not_depend_on_the_decoder_batch():
    from helpers_backbones import random_images, tiny_sam2

    sam2 = tiny_sam2()
    boxes = torch.tensor([[0, 0, 512, 512], [100, 200, 900, 1000.0], [10, 10, 20, 30]])
    with torch_threads(2), torch.inference_mode():
        feats = sam2.encode_image(random_images(1, 1024))
        together = generate_box_proposals(sam2, feats, boxes)
        one_by_one = generate_box_proposals(sam2, feats, boxes, batch_size=1)
    assert torch.equal(together.logits, one_by_one.logits)
    assert torch.equal(together.pred_ious, together.grid_ious_all[torch.arange(3), together.grid_best_index])


# ---------------------------------------------------------------------------------------- end to end
def gt_boxes_json(test_json: Path, out: Path, *, skip_image: int | None = None, seed: int = 0) -> Path:
    """The test set's ground-truth boxes, jittered by up to 3 px, with decreasing scores (one image left out)."""
    coco = json.loads(test_json.read_text())
    rng = np.random.default_rng(seed)
    entries = []
    for k, ann in enumerate(coco["annotations"]):
        if ann["image_id"] == skip_image:
            continue
        x, y, w, h = ann["bbox"]
        j = rng.uniform(-3, 3, size=4)
        entries.append({"image_id": ann["image_id"], "bbox": [x + j[0], y + j[1], w + j[2], h + j[3]],
                        "score": round(1.0 - 0.01 * k, 3)})  # fmt: skip
    return write(out, entries)


def test_smoke_run_with_box_prompts_writes_results_and_an_image_without_boxes_has_none(tmp_path):
    from test_e2e import SMALL_SYNTH, compose_cfg

    from ntt.data.synthetic import generate_synthetic_dataset
    from ntt.runner import run_pipeline
    from ntt.runner.context import make_context
    from ntt.runner.keys import predictions_key

    root = tmp_path / "datasets" / "synthetic_n9_s0"  # = conf/dataset/synthetic.yaml's root for these values
    generate_synthetic_dataset(root, num_images=9, seed=0)
    test = json.loads((root / "test.json").read_text())
    first, second = (img["id"] for img in test["images"][:2])
    boxes = gt_boxes_json(root / "test.json", tmp_path / "upn_boxes.json", skip_image=second)
    overrides = [*SMALL_SYNTH, "proposer=boxes", f"proposer.boxes_json={boxes}"]
    with torch_threads(2):
        cfg = compose_cfg(tmp_path, *overrides)
        metrics = run_pipeline(cfg)
    run_dir = Path(str(cfg.run_dir))
    assert metrics["num_images"] == 2 and metrics["failed_images"] == []
    preds = json.loads((run_dir / "predictions.json").read_text())
    n_first = sum(a["image_id"] == first for a in test["annotations"])
    assert {p["image_id"] for p in preds} == {first}  # the image without boxes: no detections, no failure
    assert len(preds) == n_first  # one proposal per box; random weights: every mask non-empty, no NMS hit
    cfg_file = (run_dir / "config.yaml").read_text()
    assert "prompts: boxes" in cfg_file

    # the boxes file enters the keys by content (same run directory): a copy elsewhere keeps the key, an edit
    # changes it (its images are segmented again)
    def key_with(path: Path) -> str:
        return predictions_key(make_context(compose_cfg(tmp_path, *overrides[:-1], f"proposer.boxes_json={path}",
                                                        f"run_dir={run_dir}")))  # fmt: skip

    copy = tmp_path / "elsewhere" / "upn_boxes.json"
    copy.parent.mkdir()
    copy.write_bytes(boxes.read_bytes())
    key = key_with(boxes)
    assert key_with(copy) == key
    gt_boxes_json(root / "test.json", copy, seed=1)
    assert key_with(copy) != key


def test_missing_boxes_file_is_one_line_and_exit_2_before_any_stage(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run(
        [sys.executable, "-m", "ntt", "run", "debug=smoke", "device=cpu", f"paths.output_dir={tmp_path}",
         "dataset.synthetic.num_images=6", "proposer=boxes", f"proposer.boxes_json={tmp_path / 'none.json'}"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert f"proposer.boxes_json={tmp_path / 'none.json'} not found" in out
    assert "Traceback" not in out
    assert not list(tmp_path.glob("synthetic/*/*/*/memory.pt"))  # refused before any stage


# ------------------------------------------------------------------------------- parity with FSOD-VFM
FSOD_VFM_FIXTURE = Path(__file__).parent / "fixtures" / "fsod_vfm_boxes" / "fixture.npz"


@pytest.mark.parity
def test_box_masks_match_fsod_vfm(parity_dir):
    """FSOD-VFM's box -> mask step (their metric.py block + their predictor, f5559b6; fixture made by
    tests/fixtures/fsod_vfm_boxes/generate.py) against ntt's on the parity fixture's tiny SAM2, same image and
    boxes: the selected boxes, the predicted IoUs, the 256x256 logits and the full-resolution masks."""
    import hashlib

    import torch.nn.functional as F
    from helpers_backbones import fsod_vfm_parity_sam2

    from ntt.postprocess import resize_masks_to_image, upsample_logits

    fx = np.load(FSOD_VFM_FIXTURE)
    sam2 = fsod_vfm_parity_sam2(parity_dir)
    image = fx["image"]
    height, width = image.shape[:2]
    sel = select_boxes(ImageBoxes(fx["in_boxes"], fx["in_scores"]), width=width, height=height, top_k=100)
    np.testing.assert_array_equal(sel.boxes, fx["boxes"])  # sort (ties), top 100, clip, drop: exact
    # SAM2ImagePredictor.set_image: ToTensor, then torchvision's Resize((1024, 1024)) = bilinear + antialias
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255)
    image1024 = F.interpolate(
        x[None], size=(1024, 1024), mode="bilinear", align_corners=False, antialias=True
    )
    with torch_threads(2), torch.inference_mode():
        feats = sam2.encode_image(image1024)
        props = generate_box_proposals(sam2, feats, boxes_to_frame(sel.boxes, width=width, height=height))
        masks = resize_masks_to_image(props.logits, height, width)
    logits = np.ascontiguousarray(props.logits.numpy())
    full = 32 * (len(logits) // 32)
    theirs = np.unpackbits(fx["masks_packed"], axis=-1, count=width).astype(bool)
    if not on_fixture_kernels():
        # other kernels: the encoder's and decoder's float32 GEMMs round differently (logits ~10 move by ~1e-5,
        # NTT's parity tolerance); IoUs agree to that, and a mask pixel may differ only where ntt's own
        # full-resolution logit is a near-tie (|logit| <= 1e-3: the 1e-5 bound after the x4 bilinear upsampling)
        np.testing.assert_allclose(props.pred_ious.numpy(), fx["pred_ious"], rtol=0, atol=1e-4)
        differ = masks.numpy() != theirs
        near = upsample_logits(props.logits, height, width).abs().numpy() <= 1e-3
        assert not (differ & ~near).any(), f"{int((differ & ~near).sum())} mask pixels differ off a near-tie"
        return
    np.testing.assert_array_equal(props.pred_ious.numpy(), fx["pred_ious"])
    assert hashlib.sha256(logits[:full].tobytes()).hexdigest() == str(fx["logits_full_batches_sha256"])
    # Their last batch holds one box: SAM2ImagePredictor then decodes without `repeat_image`, where PyTorch
    # takes other matmul kernels than for a batch; ntt decodes every box in equal padded chunks. Measured:
    # at most 4.2e-7 on logits of magnitude ~10 (a few float32 ulps); the masks are still equal.
    np.testing.assert_allclose(logits[full:], fx["logits_last_batch"], rtol=0, atol=2e-6)
    np.testing.assert_array_equal(masks.numpy(), theirs)
    # random weights: no single-mask output is stable (>= 0.98), so every box takes the fallback that
    # FSOD-VFM's build_sam2(apply_postprocessing=True) adds (its other branch: the unit test above)
    assert props.grid_best_index.gt(0).all()


def test_inference_params_carry_the_box_settings_and_propose_image_needs_the_boxes():
    from ntt.inference import InferenceParams, propose_image
    from ntt.utils.config import MatcherConfig

    prop = build_node({"prompts": "boxes", "boxes_json": "x.json", "iou_thr": None}, ProposerConfig)
    params = InferenceParams.from_settings(prop, MatcherConfig())
    assert (params.prompts, params.iou_thr, params.stability_fallback) == ("boxes", None, True)
    assert (
        InferenceParams.from_settings(ProposerConfig(), MatcherConfig()) == InferenceParams()
    )  # grid as before
    with pytest.raises(ValueError, match="prompts='boxes' needs the image's boxes"):
        propose_image(torch.zeros(3, 1024, 1024), sam2=None, dino=None, params=params)
