"""FSOD-VFM's selection and output (method.md §5.14): no NMS (`matcher.nms_thr=null`), no `score > 0` filter
(`matcher.score_filter=none`), the prompt box as the COCO bbox (`matcher.output_box=prompt`); NTT's defaults
leave every key and byte as before."""

from __future__ import annotations

import pytest
import torch
from helpers_pipeline import compose_smoke

from ntt.postprocess import postprocess_detections
from ntt.utils.config import MatcherConfig, build_node
from ntt.utils.errors import ConfigError


def _proposals():
    """Five disjoint masks in one class; predicted IoUs ascending (NMS would reverse the order); scores with
    a negative, a zero and a NaN (the NaN: NTT's score of an empty 256 mask)."""
    logits = torch.full((5, 256, 256), -1.0)
    for i in range(5):
        logits[i, 10 + 40 * i : 40 + 40 * i, 20:80] = 1.0
    pred_ious = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9])
    labels = torch.zeros(5, dtype=torch.int64)
    scores = torch.tensor([0.3, -0.2, 0.0, 0.7, float("nan")])
    emb = torch.nn.functional.normalize(torch.ones(5, 4), dim=-1)
    return logits, pred_ious, labels, scores, emb


def test_ntt_keeps_positive_scores_in_nms_order():
    _, tr = postprocess_detections(*_proposals(), height=64, width=64, merge="none")
    assert tr["nms_keep"].tolist() == [4, 3, 2, 1, 0]  # descending predicted IoU, nothing overlaps
    assert tr["nms_keep_pos"].tolist() == [3, 0]  # NaN, 0 and -0.2 leave (§5.5 item 4)


def test_fsod_vfm_keeps_every_proposal_in_the_proposers_order():
    det, tr = postprocess_detections(
        *_proposals(), height=64, width=64, merge="none", nms_thr=None, score_filter="none"
    )
    assert tr["nms_keep"].tolist() == tr["nms_keep_pos"].tolist() == [0, 1, 2, 3, 4]
    # the final stable descending sort: NaN first (torch's sort, as FSOD-VFM can only meet it with NTT's scores)
    assert tr["final_proposal"].tolist() == [4, 3, 0, 2, 1]
    assert det.scores[1:].tolist() == pytest.approx([0.7, 0.3, 0.0, -0.2])
    # each flag alone
    _, tr = postprocess_detections(*_proposals(), height=64, width=64, merge="none", score_filter="none")
    assert tr["nms_keep_pos"].tolist() == [4, 3, 2, 1, 0]
    _, tr = postprocess_detections(*_proposals(), height=64, width=64, merge="none", nms_thr=None)
    assert tr["nms_keep_pos"].tolist() == [0, 3]


def test_bad_score_filter_is_one_line_naming_the_key():
    with pytest.raises(ConfigError) as err:
        build_node({"score_filter": "positives"}, MatcherConfig)
    assert str(err.value) == "matcher.score_filter=positives: choose one of positive, none"
    assert build_node({"nms_thr": None}, MatcherConfig).nms_thr is None


def test_defaults_stay_out_of_the_identity_and_the_flags_enter_it(tmp_path):
    from ntt.utils.identity import config_id, identity_keys

    assert config_id(compose_smoke(tmp_path)) == "04157930"  # debug=smoke's id before the flag existed
    assert "score_filter" not in identity_keys(compose_smoke(tmp_path))["matcher"]
    assert "output_box" not in identity_keys(compose_smoke(tmp_path))["matcher"]
    ids = {
        config_id(compose_smoke(tmp_path, *o))
        for o in [
            (),
            ("matcher.score_filter=none",),
            ("matcher.nms_thr=null",),
            ("matcher.output_box=prompt",),
        ]
    }
    assert len(ids) == 4
    keys = identity_keys(compose_smoke(tmp_path, "matcher.score_filter=none", "matcher.nms_thr=null"))
    assert (keys["matcher"]["score_filter"], keys["matcher"]["nms_thr"]) == ("none", None)


def test_output_box_prompt_needs_box_prompts_and_the_recipe_has_both():
    from ntt.utils.compose import compose
    from ntt.utils.config import validate_config

    with pytest.raises(ConfigError) as err:
        validate_config(compose(["matcher.output_box=prompt"]))
    assert str(err.value) == (
        "matcher.output_box=prompt needs proposer=boxes (a detection's prompt box); with the point grid use "
        "matcher.output_box=mask"
    )
    validate_config(compose(["recipe=fsod_vfm", "proposer.boxes_json=b.json"]))
    with pytest.raises(ConfigError, match=r"^matcher.output_box=box: choose one of mask, prompt$"):
        build_node({"output_box": "box"}, MatcherConfig)


def test_prompt_boxes_are_written_as_floats_of_the_proposals_boxes():
    """The detections' rows go back to their proposals' boxes (grid_index: the IoU filter may drop some)."""
    import numpy as np

    from ntt.boxproposals import with_prompt_boxes
    from ntt.results import detections_to_coco

    det, _ = postprocess_detections(
        *_proposals(), height=64, width=64, merge="none", nms_thr=None, score_filter="none"
    )
    boxes = np.array([[0.5, 1.25, 10.0, 20.0], [2.0, 3.0, 4.0, 5.0], [0, 0, 64, 64], [1.1, 2.2, 3.3, 4.4],
                      [7.0, 8.0, 9.5, 9.75], [50.0, 50.0, 60.0, 61.0]])  # fmt: skip
    grid_index = torch.tensor([0, 1, 2, 3, 5])  # box 4 left no proposal
    out = detections_to_coco(
        with_prompt_boxes(det, grid_index, boxes), 3, [11], prompt_boxes=True, rles=[{}] * len(det)
    )
    assert [r["bbox"] for r in out] == [
        [50.0, 50.0, 10.0, 11.0], [1.1, 2.2, 3.3 - 1.1, 4.4 - 2.2], [0.5, 1.25, 9.5, 18.75],
        [0.0, 0.0, 64.0, 64.0], [2.0, 3.0, 2.0, 2.0],
    ]  # fmt: skip
    masks = detections_to_coco(det, 3, [11], rles=[{}] * len(det))  # NTT's: the mask's extent, integers
    assert all(isinstance(v, int) for r in masks for v in r["bbox"])
