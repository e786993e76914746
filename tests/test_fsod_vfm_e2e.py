"""`recipe=fsod_vfm` end to end against FSOD-VFM's own main.py flow (method.md §5.14).

The fixture (tests/fixtures/fsod_vfm_e2e, made by its generate.py with FSOD-VFM's functions at f5559b6 on the
parity fixture's tiny SAM2 and the tiny random DINOv2) holds every stage of their run: the reference masks
from box prompts, the prototypes, the selected query boxes, SAM2's masks and predicted IoUs, the pooled vectors,
the cosines, the diffusion grid masks and ``pi``, and the final COCO results. ntt runs the recipe's settings
(composed from conf/, as ``ntt run recipe=fsod_vfm`` does) through the functions its run calls: the memory
stage (``FillPlan`` -> ``encode_references`` -> ``assemble_bank`` -> ``MemoryBank.prototypes``), the boxes
file (``BoxSource``), ``propose_image``, ``classify_and_postprocess`` and ``detections_to_coco``.

SAM2 is the recipe's own ``backbone.sam2`` node (its ``add_no_mem_embed``, ``exact_attention: false`` and
``input_resize: bilinear_antialias``) built on the tiny weights; the query image goes through the test loop's
loader, the reference masks through the memory stage's SAM2 box decoding under the recipe's
``reference_mask_precision: bfloat16``. Nothing of FSOD-VFM's is fed in: on the fixture's kernels (AVX-512
with AMX, as the fixture was made) every stage is bit for bit, from the reference masks to the COCO results.
On other kernels the float sums round differently: the reference masks are compared on their own (bfloat16
rounding moves a mask's edge pixels) and the later stages are then fed FSOD-VFM's reference masks (stage
isolation), each comparison stating its bound (ntt's own float values tell a near-tie from a real
difference). The COCO ``bbox`` is FSOD-VFM's clipped prompt box (``matcher.output_box=prompt``, which the
recipe sets; NTT writes the mask's extent).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import torch_threads
from helpers_backbones import tiny_dinov2
from helpers_kernels import assert_fixture_close, on_fixture_bf16_kernels, on_fixture_kernels
from PIL import Image

# ntt's whole recipe on one image (SAM2 + DINOv2 tiny, 6 references, 28 boxes): ~10 s of CPU, so `slow`;
# `make parity` / `make parity-avx2` run it (`-m parity` selects it)
pytestmark = [pytest.mark.parity, pytest.mark.slow]

FIXTURE = Path(__file__).parent / "fixtures" / "fsod_vfm_e2e" / "fixture.npz"
IMAGE_ID = 7  # the fixture's query image id
CATEGORY_IDS = [1, 2, 3]


def _unpack(packed: np.ndarray, width: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed, axis=-1, count=width).astype(bool))


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _recipe():
    """The recipe's proposer / matcher nodes, built as the runner builds them, and its composed config."""
    from ntt.utils.compose import compose
    from ntt.utils.config import MatcherConfig, ProposerConfig, build_node

    cfg = compose(["recipe=fsod_vfm"])
    return build_node(cfg.proposer, ProposerConfig), build_node(cfg.matcher, MatcherConfig), cfg


def _recipe_sam2(cfg, parity_dir):
    """The recipe's ``backbone.sam2`` node, built as the runner builds it, on the parity fixture's tiny SAM2."""
    from omegaconf import OmegaConf

    from ntt.backbones import build_backbone

    node = OmegaConf.to_container(cfg.backbone.sam2, resolve=False)
    models = parity_dir / "models"
    node.update(name="sam2_parity_tiny", config=str(models / "sam2_tiny.yaml"), checkpoint=str(models / "sam2_tiny.pt"))  # fmt: skip
    return build_backbone(OmegaConf.create(node), device="cpu")


def _ref_masks(fx, sam2, matcher):
    """ntt's reference masks: the memory stage's SAM2 box decoding (``sam2_box_mask``) of each reference box."""
    from ntt.data.images import pil_to_tensor
    from ntt.prompts import sam2_box_mask

    image = pil_to_tensor(Image.fromarray(fx["ref_image"]))
    precision = matcher.semantics.reference_mask_precision
    return torch.stack(
        [sam2_box_mask(sam2, image, b, precision=precision) for b in fx["ref_boxes_xywh"].tolist()]
    )


def _bank(fx, matcher, sam2):
    """The memory stage's path on the reference image, SAM2's box masks included. On kernels other than the
    fixture's, the masks are FSOD-VFM's (stage isolation: see the module docstring and
    ``test_reference_masks_equal_fsod_vfm``)."""
    from helpers_memory import fixture_reference_jobs

    from ntt.data.images import pil_to_tensor
    from ntt.memory import FillPlan, assemble_bank, encode_references

    image = pil_to_tensor(Image.fromarray(fx["ref_image"]))
    no_mask = torch.zeros(image.shape[-2:], dtype=torch.bool)  # replaced by the SAM2 box mask (sam2_box)
    jobs = fixture_reference_jobs(fx, image, lambda i: no_mask)
    plan = FillPlan.create(
        jobs, category_ids=CATEGORY_IDS, category_names=list(fx["class_names"]), encoder=tiny_dinov2(0),
        batch_size=matcher.memory.batch_size, semantics=matcher.semantics, mask_model=sam2,
    )  # fmt: skip
    if on_fixture_bf16_kernels():
        encoded = encode_references(plan, tiny_dinov2(0), progress=False)
    else:
        theirs = _unpack(fx["ref_masks"], fx["ref_image"].shape[1])
        by_box = {tuple(b): theirs[k] for k, b in enumerate(fx["ref_boxes_xywh"].tolist())}
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("ntt.memory.sam2_box_mask", lambda model, img, box, precision: by_box[tuple(box)])
            encoded = encode_references(plan, tiny_dinov2(0), progress=False)
    return assemble_bank(plan, [encoded], encoder_name="tiny")


@pytest.fixture(scope="module")
def fx():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def run(fx, parity_dir, tmp_path_factory):
    """ntt's recipe on the fixture's inputs: every stage the comparisons read."""
    from ntt.boxproposals import BoxSource, boxes_to_frame, with_prompt_boxes
    from ntt.data.images import load_long_side_input, load_test_image
    from ntt.inference import InferenceParams, classify_and_postprocess, propose_image
    from ntt.postprocess import upsample_logits
    from ntt.results import detections_to_coco

    proposer, matcher, cfg = _recipe()
    params = InferenceParams.from_settings(proposer, matcher)
    sam2 = _recipe_sam2(cfg, parity_dir)
    image = fx["query_image"]
    height, width = image.shape[:2]
    boxes_json = tmp_path_factory.mktemp("boxes") / "upn_boxes.json"
    entries = [
        {"image_id": IMAGE_ID, "bbox": b, "score": s}
        for b, s in zip(fx["query_in_boxes"].tolist(), fx["query_in_scores"].tolist())
    ]
    boxes_json.write_text(json.dumps(entries))
    source = BoxSource.from_config(replace(proposer, boxes_json=str(boxes_json), box_format="xyxy"))
    found = source.boxes_for(
        image_id=IMAGE_ID,
        file_name="query.png",
        width=width,
        height=height,
        image_path=None,
        apply_exif=False,
    )
    # the test loop's loader (ntt.data.prefetch): SAM2's input as backbone.sam2.input_resize says, DINOv2's
    query_png = tmp_path_factory.mktemp("query") / "query.png"
    Image.fromarray(image).save(query_png)
    image1024 = load_test_image(query_png, 1024, height=height, width=width, resize=sam2.input_resize)
    semantic = load_long_side_input(query_png, params.long_side, params.input_size)
    with torch_threads(2), torch.inference_mode():
        bank = _bank(fx, matcher, sam2)
        ref_masks = _ref_masks(fx, sam2, matcher)
        shared = propose_image(
            image1024, sam2=sam2, dino=tiny_dinov2(0), params=params,
            boxes=boxes_to_frame(found.boxes, width=width, height=height),
            semantic_image=semantic, image_hw=(height, width),
        )  # fmt: skip
        det, trace = classify_and_postprocess(
            shared, bank.prototypes(), height=height, width=width, params=params
        )
        if matcher.output_box == "prompt":  # as the run's test loop (ntt/runner/testloop.py, lines.py)
            det = with_prompt_boxes(det, shared.props.grid_index, found.boxes)
        coco = detections_to_coco(
            det, IMAGE_ID, CATEGORY_IDS, box_plus_one=params.box_plus_one,
            prompt_boxes=matcher.output_box == "prompt",
        )  # fmt: skip
        full_logits = upsample_logits(shared.props.logits, height, width)
    return {
        "params": params, "bank": bank, "boxes": found.boxes, "shared": shared, "det": det, "trace": trace,
        "coco": coco, "full_logits": full_logits, "ref_masks": ref_masks, "image1024": image1024,
    }  # fmt: skip


def test_reference_masks_equal_fsod_vfm(fx, run):
    """ntt's SAM2 box masks of the 6 reference boxes (the recipe's bfloat16 autocast, one box per call, its
    bilinear 1024 input) equal FSOD-VFM's ``extract_masks_from_support``; the last box's mask is empty."""
    ours = run["ref_masks"]
    theirs = _unpack(fx["ref_masks"], fx["ref_image"].shape[1])
    assert not theirs[5].any() and not ours[5].any()
    if on_fixture_bf16_kernels():
        assert torch.equal(ours, theirs)
        return
    # other kernels round each bfloat16 product differently (a whole bfloat16 step, 2**-8 relative, in every
    # layer), which moves the soft edge of a mask: measured IoU 0.938 to 0.994 per mask with AVX-512 without
    # AMX and with AVX2 kernels (62 to 392 pixels); a wrong output or box would give an IoU far below 0.9
    inter = (ours & theirs).sum((1, 2)).double()
    union = (ours | theirs).sum((1, 2)).double()
    assert ((inter[:5] / union[:5]) >= 0.9).all(), (inter / union.clamp(min=1)).tolist()


def test_reference_masks_need_the_recipes_precision_and_resize(fx, parity_dir):
    """The two settings are what makes the masks FSOD-VFM's: with float32 decoding, or with ntt's PIL
    bicubic input, they differ from theirs by far more than a bfloat16 rounding (>= 100 pixels in a mask)."""
    _, matcher, cfg = _recipe()
    sam2 = _recipe_sam2(cfg, parity_dir)
    theirs = _unpack(fx["ref_masks"], fx["ref_image"].shape[1])
    float32 = replace(matcher, semantics=replace(matcher.semantics, reference_mask_precision="float32"))
    with torch_threads(2), torch.inference_mode():
        a = _ref_masks(fx, sam2, float32)
        sam2.input_resize = "pil_bicubic"
        b = _ref_masks(fx, sam2, matcher)
    assert int((a != theirs).sum((1, 2)).max()) >= 100
    assert int((b != theirs).sum((1, 2)).max()) >= 100


def test_prototypes_equal_fsod_vfm(fx, run):
    """Their references (5 masks non-empty on the 45x45 grid, one empty: dropped) -> their prototypes."""
    bank = run["bank"]
    used = [bank.weight_sums[c, :n] for c, n in enumerate(bank.counts.tolist())]
    assert [int((w == 0).sum()) for w in used] == [0, 0, 1]  # cherry's second reference is dropped
    assert list(fx["prototype_classes"]) == list(fx["class_names"])  # their class order is ntt's
    assert_fixture_close(bank.prototypes(), torch.from_numpy(fx["prototypes_dc"]).T, rtol=1e-4, atol=1e-5)


def test_selected_boxes_ious_and_masks_equal_fsod_vfm(fx, run):
    np.testing.assert_array_equal(run["boxes"], fx["query_boxes"])  # threshold, stable sort, clip, drop
    props = run["shared"].props
    height, width = fx["query_image"].shape[:2]
    from ntt.postprocess import resize_masks_to_image

    masks = resize_masks_to_image(props.logits, height, width)
    theirs = _unpack(fx["query_masks"], width)
    if not on_fixture_kernels():
        # other kernels: SAM2's float32 GEMMs round differently (logits ~10 move by ~1e-5, test_boxproposals);
        # a mask pixel may differ only where ntt's full-resolution logit is a near-tie (|logit| <= 1e-3)
        np.testing.assert_allclose(props.pred_ious.numpy(), fx["query_pred_ious"], rtol=0, atol=1e-4)
        differ = masks != theirs
        assert not (differ & (run["full_logits"].abs() > 1e-3)).any(), "mask pixels differ off a near-tie"
        return
    assert torch.equal(props.pred_ious, torch.from_numpy(fx["query_pred_ious"]))
    assert torch.equal(masks, theirs)


def test_vectors_cosines_and_labels_equal_fsod_vfm(fx, run):
    tr = run["trace"]
    assert_fixture_close(run["shared"].embeddings, torch.from_numpy(fx["query_vectors"]), rtol=1e-4, atol=1e-5, what="vectors")  # fmt: skip
    assert_fixture_close(tr["sim"], torch.from_numpy(fx["query_sims"]), rtol=1e-4, atol=1e-5, what="cosines")
    sims = torch.from_numpy(fx["query_sims"])
    best = sims.max(dim=1)
    if on_fixture_kernels():
        assert torch.equal(tr["labels"], best.indices) and torch.equal(tr["scores"], best.values)
    else:  # a label may differ only between near-tied classes
        top2 = sims.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-4
        assert torch.equal(tr["labels"][clear], best.indices[clear])
        torch.testing.assert_close(tr["scores"], best.values, rtol=1e-4, atol=1e-5)


def test_no_nms_and_no_score_filter_keep_every_proposal(fx, run):
    """FSOD-VFM keeps all 28 proposals in their order, the 8 with cosine 0 (empty grid masks) among them;
    NTT's `score > 0` would have dropped these."""
    tr = run["trace"]
    n = len(fx["query_boxes"])
    assert torch.equal(tr["nms_keep_pos"], torch.arange(n))
    assert int((tr["scores"] <= 0).sum()) == 8


def test_diffusion_grid_and_pi_equal_fsod_vfm(fx, run):
    from ntt.diffusion import resize_masks_linear
    from ntt.postprocess import resize_masks_to_image

    height, width = fx["query_image"].shape[:2]
    masks = resize_masks_to_image(run["shared"].props.logits, height, width)
    grid = resize_masks_linear(masks, (45, 45))
    theirs = _unpack(fx["query_grid_masks"], 45)
    assert tuple(run["shared"].feats_dino.shape[:2]) == (45, 45)  # diffusion.grid=dino: the same cells
    if on_fixture_kernels():
        assert torch.equal(grid, theirs)
        assert torch.equal(run["trace"]["ios"], torch.from_numpy(fx["diffusion_pi"]))
        assert torch.equal(run["trace"]["labels"], torch.from_numpy(fx["diffusion_labels"]))
    else:  # equal masks give equal 0/1 counts: pi within float32 rounding of the walk
        assert (grid != theirs).sum() <= 2, "grid masks differ beyond a near-tie cell"
        torch.testing.assert_close(
            run["trace"]["ios"], torch.from_numpy(fx["diffusion_pi"]), rtol=1e-5, atol=1e-6
        )


def test_final_coco_results_equal_fsod_vfm(fx, run):
    """Order, category ids, scores and boxes of the results equal theirs, ntt's RLEs those of their masks;
    their own `segmentation` field is a broken encoding (§5.14) they never write."""
    from ntt.results import encode_masks_rle

    theirs = json.loads(str(fx["coco_results"]))
    ours = run["coco"]
    tr = run["trace"]
    height, width = fx["query_image"].shape[:2]
    assert len(ours) == len(theirs) == len(fx["query_boxes"])
    their_masks = _unpack(fx["query_masks"], width)
    if on_fixture_kernels():
        assert torch.equal(tr["final_proposal"], torch.from_numpy(fx["result_proposal"]))
        for a, b in zip(ours, theirs, strict=True):
            assert (a["image_id"], a["category_id"], a["score"]) == (
                b["image_id"],
                b["category_id"],
                b["score"],
            )
        rles = encode_masks_rle(their_masks[torch.from_numpy(fx["result_proposal"])])
        assert [r["segmentation"] for r in ours] == rles
    else:  # scores within rounding; ranks can swap only between near-equal scores (ties at 0 keep the order)
        mine = {int(p): r for p, r in zip(tr["final_proposal"].tolist(), ours)}
        for p, b in zip(fx["result_proposal"].tolist(), theirs):
            assert abs(mine[p]["score"] - b["score"]) <= 1e-4
    # their RLE: SAM2 returns a batch's masks as [1, H, W] each, which pycocotools reads as W masks of 1 x H
    # (the first kept): every result of a batch of more than one box; run_coco_eval deletes the field anyway
    assert all(b["segmentation"]["size"] == [1, height] for b in theirs)
    # bbox: FSOD-VFM writes the clipped prompt box (floats): so does the recipe (matcher.output_box=prompt)
    sel = fx["query_boxes"]
    for p, b in zip(fx["result_proposal"].tolist(), theirs):
        x1, y1, x2, y2 = sel[p]
        assert b["bbox"] == [x1, y1, x2 - x1, y2 - y1]
    mine = {int(p): r for p, r in zip(tr["final_proposal"].tolist(), ours)}
    for p, b in zip(fx["result_proposal"].tolist(), theirs):
        assert mine[p]["bbox"] == b["bbox"]
