"""`recipe=fsod_vfm`: FSOD-VFM's whole method as one config choice (conf/recipe/fsod_vfm.yaml).

What each of its steps computes is held to FSOD-VFM's own functions elsewhere (test_boxproposals,
test_gridmatching, test_diffusion); here: the recipe selects exactly those options, leaves NTT's run ids alone,
and runs end to end on tiny RANDOM models (plumbing only, never accuracy).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import torch_threads


def test_the_recipe_selects_every_fsod_vfm_option():
    from ntt.utils.compose import compose

    cfg = compose(["recipe=fsod_vfm"])
    assert (cfg.backbone.sam2.name, cfg.backbone.dinov2.name) == ("sam2.1_hiera_l", "dinov2_vitl14")
    assert cfg.backbone.sam2.add_no_mem_embed is True  # its SAM2 predictor adds no_mem_embed (§5.11)
    assert (cfg.proposer.prompts, cfg.proposer.top_k, cfg.proposer.score_thr) == ("boxes", 100, 0.01)
    assert cfg.matcher.merge == "diffusion"
    d = cfg.matcher.diffusion
    assert (d.alpha, d.lamb, d.steps, d.row_normalize, d.solver) == (0.3, 0.5, 30, False, "iterate")
    s = cfg.matcher.semantics
    assert (s.encoder_input, s.long_side, s.input_size, s.final_norm) == ("long_side", 630, 630, False)
    assert (s.references, s.reference_masks, s.proposal_pooling, s.scoring) == (
        "whole_image", "sam2_box", "grid_mask", "cosine"
    )  # fmt: skip
    assert s.sam_iou_decay is False and cfg.variant == "fsod_vfm"
    # debug=smoke keeps the recipe's method and swaps in the tiny random backbones
    smoke = compose(["recipe=fsod_vfm", "debug=smoke"])
    assert smoke.backbone.sam2.name == "sam2_tiny_random" and smoke.matcher.merge == "diffusion"


def test_the_recipe_keeps_every_proposal_in_the_detectors_order():
    """FSOD-VFM has no NMS and no `score > 0` filter (method.md §5.14): the recipe turns both off, so the
    diffusion and the final stable sort see the boxes in the detector's order (their end-to-end parity:
    tests/test_fsod_vfm_e2e.py)."""
    from ntt.utils.compose import compose

    m = compose(["recipe=fsod_vfm"]).matcher
    assert (m.nms_thr, m.score_filter, m.merge) == (None, "none", "diffusion")
    assert (m.diffusion.grid, m.diffusion.order) == ("dino", "proposal")
    assert (compose([]).matcher.nms_thr, compose([]).matcher.score_filter) == (0.5, "positive")  # NTT's


def test_the_recipe_group_leaves_ntt_run_ids_alone():
    from ntt.utils.compose import compose
    from ntt.utils.identity import config_id

    assert config_id(compose(["debug=smoke"])) == "04157930"  # as before the recipe group existed
    assert config_id(compose(["recipe=fsod_vfm", "debug=smoke"])) != "04157930"


@pytest.mark.slow  # SAM2 box masks for every reference, then the box prompts: ~30-60 s on 2 busy cores
def test_the_recipe_runs_end_to_end_on_tiny_random_models(tmp_path):
    from test_boxproposals import gt_boxes_json
    from test_e2e import SMALL_SYNTH, compose_cfg

    from ntt.data.synthetic import generate_synthetic_dataset
    from ntt.runner import run_pipeline

    root = tmp_path / "datasets" / "synthetic_n9_s0"  # = conf/dataset/synthetic.yaml's root for these values
    generate_synthetic_dataset(root, num_images=9, seed=0)
    boxes = gt_boxes_json(root / "test.json", tmp_path / "upn_boxes.json")
    with torch_threads(2):
        cfg = compose_cfg(tmp_path, *SMALL_SYNTH, "recipe=fsod_vfm", f"proposer.boxes_json={boxes}")
        metrics = run_pipeline(cfg)
    run_dir = Path(str(cfg.run_dir))
    assert metrics["num_images"] == 2 and metrics["failed_images"] == []
    assert "bbox" in metrics and "segm" in metrics  # box and mask AP both (random weights: plumbing only)
    # random weights: meaningless detections (the recipe keeps every box's mask, negative cosines too, as
    # FSOD-VFM: method.md §5.14); the file is there and well formed
    preds = json.loads((run_dir / "predictions.json").read_text())
    assert all(set(p) >= {"image_id", "category_id", "bbox", "score", "segmentation"} for p in preds)
    config = (run_dir / "config.yaml").read_text()
    for line in (
        "prompts: boxes",
        "merge: diffusion",
        "reference_masks: sam2_box",
        "encoder_input: long_side",
    ):
        assert line in config
