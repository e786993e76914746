"""`matcher.classes`: a class subset of the bank for `ntt run` / `ntt study` (issue 18), on tiny RANDOM models.

The subset keeps the run's references and bank (the memory stages are reused) and labels with only those
classes' prototypes; its predictions must be those of a run whose bank holds only those classes' references
(the same ones: `dataset.class_names` with `dataset.sampling.all_classes=true` draws every class as the full
run does and keeps the selected), and evaluation covers only those categories. Null changes no run id.
"""

from __future__ import annotations

import json

import pytest
from test_e2e import SMALL_SYNTH, compose_cfg, run

from ntt.utils.errors import ConfigError
from ntt.utils.identity import config_id

SUBSET = "matcher.classes=[triangle,square]"  # synthetic category ids 3 and 2 (kept in the json order)


def test_a_null_class_subset_leaves_the_run_id_unchanged(tmp_path):
    assert config_id(compose_cfg(tmp_path)) == "04157930"  # debug=smoke's id (tests/test_recipe.py)
    assert config_id(compose_cfg(tmp_path, "matcher.classes=null")) == "04157930"
    assert config_id(compose_cfg(tmp_path, SUBSET)) != "04157930"


def test_a_class_subset_run_reuses_the_bank_and_evaluates_only_those_classes(tmp_path, caplog):
    same_dir = f"run_dir={tmp_path / 'run'}"
    run(tmp_path, *SMALL_SYNTH, same_dir)
    caplog.set_level("INFO")
    run_dir, metrics = run(tmp_path, *SMALL_SYNTH, same_dir, SUBSET)
    skipped = [r.message for r in caplog.records if "skipped" in r.message]
    assert len(skipped) == 3 and not any("stage test" in s for s in skipped)  # the same bank, relabelled
    assert {r["category_id"] for r in metrics["per_class"]} == {2, 3}  # evaluation: only those classes
    preds = json.loads((run_dir / "predictions.json").read_text())
    assert preds and {r["category_id"] for r in preds} <= {2, 3}


@pytest.mark.slow
def test_a_class_subset_run_equals_a_run_whose_bank_holds_only_those_classes(tmp_path):
    run_dir, metrics = run(tmp_path, *SMALL_SYNTH, SUBSET)
    subset_preds = json.loads((run_dir / "predictions.json").read_text())
    assert subset_preds
    only_dir, only_metrics = run(
        tmp_path / "only",
        *SMALL_SYNTH,
        f"dataset.root={run_dir.parents[3]}/datasets/synthetic_n9_s0",
        "dataset.class_names=[square,triangle]",
        "+dataset.sampling.all_classes=true",
    )
    assert json.loads((only_dir / "predictions.json").read_text()) == subset_preds
    assert only_metrics["bbox"] == metrics["bbox"] and only_metrics["segm"] == metrics["segm"]


def test_an_unknown_class_in_the_subset_names_the_close_ones(tmp_path):
    with pytest.raises(
        ConfigError, match=r"matcher.classes: no class 'sqare' among the run's 4 classes \(did "
    ):
        run(tmp_path, *SMALL_SYNTH, "matcher.classes=[sqare]")


def test_an_empty_subset_and_a_subset_for_the_segmenter_are_refused_with_the_key():
    from omegaconf import OmegaConf

    from ntt.app.settings import compose_config, params_from_config
    from ntt.utils.config import MatcherConfig, build_node

    with pytest.raises(ConfigError, match=r"matcher.classes=\[\]: give at least one class name"):
        build_node(OmegaConf.create({"classes": []}), MatcherConfig)
    cfg = compose_config(sam2="tiny_random", dinov2="tiny_random", overrides=["matcher.classes=[a]"])
    with pytest.raises(ConfigError, match=r"segmenter takes the classes per call: predict\(..., classes="):
        params_from_config(cfg)
