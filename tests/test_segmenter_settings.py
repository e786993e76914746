"""Settings the practitioner path (`Segmenter`, `ntt segment`) cannot honour are refused in one line.

The segmenter proposes with NTT's point grid and encodes and scores as NTT; FSOD-VFM's box prompts and
semantic side run with `ntt run` (method.md §5.11, §5.13). What comes after the scores (NMS, score filter,
re-scoring, §5.14) is the run's own code and is honoured.
"""

from __future__ import annotations

import pytest
from test_segment_cli import MODELS, fss  # noqa: F401  (fixture)

from ntt.app.settings import params_from_config
from ntt.utils.compose import compose
from ntt.utils.errors import ConfigError

BOXES = (
    "proposer.prompts=boxes: the segmenter proposes with the point grid; box-prompt proposals "
    "(proposer=boxes, recipe=fsod_vfm) run with `ntt run`"
)


def test_the_fsod_vfm_recipe_is_refused_naming_the_box_proposer():
    with pytest.raises(ConfigError) as err:
        params_from_config(compose(["recipe=fsod_vfm"]))
    assert str(err.value) == BOXES


def test_fsod_vfm_semantics_are_refused_naming_the_keys():
    with pytest.raises(ConfigError) as err:
        params_from_config(compose(["matcher=fsod_vfm"]))
    assert str(err.value) == (
        "matcher.semantics: the segmenter encodes and scores as NTT; FSOD-VFM's semantic side (matcher=fsod_vfm, "
        "recipe=fsod_vfm; here encoder_input=long_side, final_norm=False, references=whole_image, "
        "proposal_pooling=grid_mask, scoring=cosine) runs with `ntt run`"
    )


def test_prompt_boxes_as_output_are_refused():
    with pytest.raises(ConfigError) as err:
        params_from_config(compose(["matcher.output_box=prompt"]))
    assert str(err.value) == (
        "matcher.output_box=prompt: the segmenter's boxes are its masks' extents; prompt boxes "
        "(proposer=boxes, recipe=fsod_vfm) run with `ntt run`"
    )


def test_the_stages_after_the_scores_are_honoured():
    p = params_from_config(
        compose(["matcher.merge=diffusion", "matcher.nms_thr=null", "matcher.score_filter=none"])
    )
    assert (p.merge, p.nms_thr, p.score_filter, p.diffusion.alpha) == ("diffusion", None, "none", 0.3)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"prompts": "boxes"}, "predict(prompts=boxes): the segmenter proposes with the point grid"),
        ({"encoder_input": "long_side"}, "predict(encoder_input=long_side): the segmenter encodes and scores as NTT"),
        ({"scoring": "cosine"}, "predict(scoring=cosine): the segmenter encodes and scores as NTT"),
    ],
)  # fmt: skip
def test_predict_refuses_a_per_call_setting_it_cannot_honour(setting, message):
    from ntt.app.segmenter import Segmenter

    seg = Segmenter.from_config("tiny_random", "tiny_random", device="cpu")  # models are built on first use
    with pytest.raises(ConfigError) as err:
        seg.predict("never_read.jpg", **setting)
    assert str(err.value).startswith(message)
    assert seg._sam2 is None and seg._dinov2 is None  # refused before any model or image is touched


def test_ntt_segment_refuses_the_recipe_with_exit_2(fss, caplog):  # noqa: F811
    from ntt import cli

    argv = ["--refs", str(fss / "refs"), "--images", str(fss / "images"), "--out", str(fss / "o"), *MODELS]
    assert cli.main(["segment", *argv, "recipe=fsod_vfm"]) == 2
    assert caplog.records[-1].getMessage() == BOXES
