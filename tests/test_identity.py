"""The run directory identifies the result (ntt/utils/identity.py): settings that can change a detection or a
metric never share a directory; keys that only say where or how a job runs do not split runs."""

from __future__ import annotations

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import ntt  # noqa: F401  registers `${ntt.config_id:}`
from ntt.utils.identity import config_id, identity_keys, setting_id


def _cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            config_name="main", overrides=[f"hydra.searchpath=[file://{REPO / 'experiments'}]", *overrides]
        )


@pytest.mark.parametrize(
    "override",
    ["matcher.nms_thr=0.6", "proposer.iou_thr=0.5", "dataset.max_test_images=5", "eval.iou_types=[bbox]",
     "backbone/sam2=sam2.1_hiera_l", "matcher=fixed", "dataset.refs_coco_mode=per_annotation"],
)  # fmt: skip
def test_result_changing_keys_make_a_new_run_dir(override):
    assert _cfg().run_dir != _cfg(override).run_dir


@pytest.mark.parametrize(
    "override",
    ["device=cpu", "stages=[test]", "force=true", "study_name=other", "logger=wandb", "paths.data=/elsewhere",
     "io.num_workers=3", "io.async_write=false", "io.timing=false", "io.write_queue=4"],
)  # fmt: skip
def test_keys_that_do_not_change_results_keep_the_run_dir(override):
    assert _cfg().run_dir == _cfg(override).run_dir


def test_setting_id_groups_seeds_shots_and_datasets_of_one_setting():
    a = _cfg("dataset=voc_split1", "shots=1", "seed=1")
    b = _cfg("dataset=voc_split2", "shots=5", "seed=2")
    assert config_id(a) != config_id(b) and setting_id(a) == setting_id(b)
    assert setting_id(a) != setting_id(_cfg("dataset=voc_split1", "matcher.nms_thr=0.6"))
    keys = identity_keys(a)
    assert "paths" not in keys and "device" not in keys and keys["dataset"]["root"] == "${paths.data}/voc"
    assert a.run_dir.endswith(f"voc_split1/sam2_hiera_l+dinov2_vitl14/1shot_seed1/parity-{config_id(a)}")
