"""The NTT-to-FSOD-VFM walk (experiments/walk/, ablation=ntt_to_fsod_vfm[_smoke]) and FSOD-VFM's studies
(experiments/study/fsod_vfm_*.yaml): what each step composes to, that the last one is recipe=fsod_vfm, that
a sweep without its detector boxes stops in one line before anything runs, and the smoke walk end to end on
tiny RANDOM models (plumbing only, never accuracy).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import torch_threads

WALK = [
    "walk0_ntt",
    "walk1_diffusion",
    "walk2_boxes",
    "walk3_sam21",
    "walk4_dino630",
    "walk5_class_mean",
    "walk6_grid_pool",
    "walk7_cosine",
    "walk8_keep_all",
    "walk9_fsod_vfm",
]
# what each step changes from the one before (its variant aside), as `key: new value`; a key that the step
# before did not have (a new option's own keys) is listed with its value too
PROPOSER_BOXES = {
    "proposer.prompts": "boxes",
    "proposer.boxes_key": "image_id",
    "proposer.box_format": "xywh",
    "proposer.detector": None,
    "proposer.top_k": 100,
    "proposer.score_thr": 0.01,
    "proposer.clip": True,
    "proposer.stability_fallback": True,
    "proposer.points_batch_size": 32,
    "proposer.iou_thr": None,
}
STEPS = {
    "walk0_ntt": {},
    "walk1_diffusion": {"matcher.merge": "diffusion"},
    "walk2_boxes": PROPOSER_BOXES,
    "walk3_sam21": {
        "backbone.sam2.name": "sam2.1_hiera_l",
        "backbone.sam2.config": "sam2.1/sam2.1_hiera_l.yaml",
        "backbone.sam2.checkpoint": "${paths.checkpoints}/sam2.1_hiera_large.pt",
        "backbone.sam2.add_no_mem_embed": True,
        "backbone.sam2.exact_attention": False,
        "backbone.sam2.input_resize": "bilinear_antialias",
    },
    "walk4_dino630": {
        "matcher.semantics.encoder_input": "long_side",
        "matcher.semantics.long_side": 630,
        "matcher.semantics.input_size": 630,
        "matcher.semantics.final_norm": False,
        "matcher.memory.batch_size": 1,
        "matcher.diffusion.grid": "dino",
        # matcher=fsod_vfm's other semantics keys, at NTT's values until their own step
        "matcher.semantics.references": "context_crop",
        "matcher.semantics.reference_masks": "annotation",
        "matcher.semantics.reference_mask_precision": "float32",
        "matcher.semantics.proposal_pooling": "upsampled",
        "matcher.semantics.scoring": "clamped_cosine",
        "matcher.semantics.sam_iou_decay": False,
    },
    "walk5_class_mean": {
        "matcher.semantics.references": "whole_image",
        "matcher.semantics.reference_masks": "sam2_box",
        "matcher.semantics.reference_mask_precision": "bfloat16",
    },
    "walk6_grid_pool": {"matcher.semantics.proposal_pooling": "grid_mask"},
    "walk7_cosine": {"matcher.semantics.scoring": "cosine"},
    "walk8_keep_all": {"matcher.nms_thr": None, "matcher.score_filter": "none"},
    "walk9_fsod_vfm": {"matcher.output_box": "prompt"},
}


def flat(tree, prefix=""):
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def composed(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    from ntt.utils.compose import compose

    return flat(OmegaConf.to_container(compose(list(overrides)), resolve=False))


def test_each_step_adds_one_option_to_the_step_before():
    before = composed()  # NTT: conf/main.yaml's defaults
    for step in WALK:
        now = composed(f"walk={step}")
        assert now["variant"] == step
        changed = {
            k: now.get(k, "<absent>")
            for k in set(before) | set(now)
            if k not in ("variant", "proposer.boxes_json")
            and before.get(k, "<absent>") != now.get(k, "<absent>")
        }
        assert changed == STEPS[step], step
        before = now


def test_the_last_step_is_the_recipe_key_for_key():
    walk = composed("walk=walk9_fsod_vfm")
    recipe = composed("recipe=fsod_vfm")
    assert recipe["variant"] == "fsod_vfm" and walk["variant"] == "walk9_fsod_vfm"
    walk.pop("variant"), recipe.pop("variant")
    assert walk == recipe
    # ... and on the tiny random models of the smoke walk, too (its backbones win over the steps')
    smoke = composed("walk=walk9_fsod_vfm", "ablation=ntt_to_fsod_vfm_smoke")
    assert (
        smoke["backbone.sam2.name"] == "sam2_tiny_random" and smoke["backbone.sam2.add_no_mem_embed"] is True
    )


def test_the_first_step_is_ntt_with_the_same_config_id_whatever_boxes_file_it_is_given():
    from ntt.utils.compose import compose
    from ntt.utils.identity import config_id

    ntt = config_id(compose(["debug=smoke"]))
    assert ntt == "04157930"  # the smoke run's id, pinned in test_recipe.py
    step0 = ["walk=walk0_ntt", "debug=smoke", "variant=smoke"]  # debug=smoke's variant, to compare ids
    assert config_id(compose(step0)) == ntt
    # the grid does not read proposer.boxes_json: it stays out of the id (identity.INERT_UNLESS)
    assert config_id(compose([*step0, "proposer.boxes_json=upn.json"])) == ntt
    boxes = ["walk=walk2_boxes", "debug=smoke"]
    assert config_id(compose([*boxes, "proposer.boxes_json=a.json"])) != config_id(
        compose([*boxes, "proposer.boxes_json=b.json"])
    )


def sweep(*overrides: str) -> list[dict[str, str]]:
    """The jobs of a sweep as `{key: value}` of their overrides (cheap: one composition)."""
    from ntt.runner.main import expand_sweep

    return [dict(o.split("=", 1) for o in job) for job in expand_sweep(list(overrides))]


def test_the_ablations_sweep_every_step_in_order():
    jobs = sweep("ablation=ntt_to_fsod_vfm", "proposer.boxes_json=b.json")
    assert [j["walk"] for j in jobs] == WALK
    smoke = sweep("ablation=ntt_to_fsod_vfm_smoke", "proposer.boxes_json=b.json")
    assert [(j["walk"], j["shots"], j["seed"]) for j in smoke] == [
        (step, k, s) for step in WALK for k in ("1", "2") for s in ("1", "2")
    ]


def test_every_step_of_the_walk_lands_in_its_own_run_directory(tmp_path):
    from ntt.runner.main import compose_jobs

    boxes = tmp_path / "boxes.json"
    line = ["ablation=ntt_to_fsod_vfm", f"proposer.boxes_json={boxes}", f"paths.output_dir={tmp_path}"]
    jobs = [cfg for _, cfg in compose_jobs(line)]
    assert [cfg.variant for cfg in jobs] == WALK
    assert len({str(cfg.run_dir) for cfg in jobs}) == len(WALK)
    assert {(cfg.dataset.name, cfg.shots, cfg.seed, cfg.study_name) for cfg in jobs} == {
        ("coco_fewshot", 10, 33, "ntt_to_fsod_vfm")
    }
    assert {str(cfg.proposer.boxes_json) for cfg in jobs} == {str(boxes)}  # one line serves every step


def test_a_walk_without_its_boxes_stops_in_one_line_before_anything_runs(tmp_path, caplog):
    from ntt import cli

    out = tmp_path / "out"
    # the first step (point grid) and a box step of the smoke walk, one bank each
    line = ["study", "ablation=ntt_to_fsod_vfm_smoke", "walk=walk0_ntt,walk2_boxes", "shots=1", "seed=1",
            f"paths.output_dir={out}"]  # fmt: skip
    assert cli.main(line) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith("proposer=boxes needs exactly one of proposer.boxes_json=")
    assert not out.exists()  # not even the first (grid) step ran
    caplog.clear()
    missing = tmp_path / "nope.json"
    assert cli.main([*line, f"proposer.boxes_json={missing}"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [errors[0]] and errors[0].startswith(f"proposer.boxes_json={missing} not found")
    assert not out.exists()


STUDIES = {
    # study: (datasets, shots, refs_coco_mode, where its boxes file is looked for)
    "fsod_vfm_coco": (["coco_fewshot"], [10, 30], "reference_pkl", "coco/annotations/upn_boxes_val2017.json"),
    "fsod_vfm_voc": (
        ["voc_split1", "voc_split2", "voc_split3"],
        [1, 2, 3, 5, 10],
        "reference_pkl",
        "voc/annotations/upn_boxes_voc07_test.json",
    ),
    "fsod_vfm_cdfsod": (
        [f"cdfsod_{d}" for d in ("artaxor", "clipart1k", "dior", "fish", "neu_det", "uodd")],
        [1, 5, 10],
        "per_annotation",
        "cdfsod/DIOR/annotations/upn_boxes_test.json",
    ),
}


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_fsod_vfm_studies_run_the_recipe_at_its_settings_and_need_the_boxes(study, tmp_path):
    from omegaconf import OmegaConf

    from ntt.runner.configcheck import check_config
    from ntt.runner.main import compose_jobs
    from ntt.utils.errors import ConfigError

    datasets, shots, refs_mode, boxes = STUDIES[study]
    jobs = sweep(f"study={study}")
    assert [(j.get("dataset", datasets[0]), int(j["shots"])) for j in jobs] == [
        (d, k) for d in datasets for k in shots
    ]
    # one job composed (the first dataset at its last shot count): the recipe's options, FSOD-VFM's seed
    only = [f"study={study}", f"paths.data={tmp_path}", f"shots={shots[-1]}"]
    if len(datasets) > 1:
        only.append(f"dataset={datasets[0] if study != 'fsod_vfm_cdfsod' else 'cdfsod_dior'}")
    [(_, cfg)] = compose_jobs(only)
    assert (cfg.seed, cfg.variant, cfg.study_name, cfg.dataset.refs_coco_mode) == (
        33,
        "fsod_vfm",
        study,
        refs_mode,
    )
    mine, recipe = flat(OmegaConf.to_container(cfg, resolve=False)), composed("recipe=fsod_vfm")
    for key in [k for k in recipe if k.startswith(("matcher.", "backbone.", "proposer."))]:
        if key != "proposer.boxes_json":
            assert mine[key] == recipe[key], (study, key)
    assert Path(str(cfg.proposer.boxes_json)) == tmp_path / boxes
    with pytest.raises(ConfigError, match=r"^proposer\.boxes_json=.* not found: ") as err:
        check_config(cfg)
    assert "\n" not in str(err.value)
    (tmp_path / boxes).parent.mkdir(parents=True)
    (tmp_path / boxes).write_text("[]")
    check_config(cfg)  # with the file there, the job's config passes


def test_gtboxes_writes_the_ground_truth_as_a_detector_s_boxes(tmp_path):
    from ntt.tools.gtboxes import gt_boxes, main

    coco = {"annotations": [{"image_id": 3, "bbox": [10, 20, 30, 40]}, {"image_id": 5, "bbox": [0, 0, 5, 6]}]}
    assert gt_boxes(coco, jitter=0) == [
        {"image_id": 3, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 1.0},
        {"image_id": 5, "bbox": [0.0, 0.0, 5.0, 6.0], "score": 0.99},
    ]
    jittered = gt_boxes(coco, jitter=3, seed=0)
    assert jittered == gt_boxes(coco, jitter=3, seed=0)  # the seed fixes the file
    moved = [
        abs(a - b) for e, ann in zip(jittered, coco["annotations"]) for a, b in zip(e["bbox"], ann["bbox"])
    ]
    assert 0 < max(moved) <= 3.0 + 0.005  # +-3 px, rounded to 0.01
    (tmp_path / "test.json").write_text(json.dumps(coco))
    assert main([str(tmp_path / "test.json"), str(tmp_path / "b.json"), "--jitter", "0"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())[1]["bbox"] == [0.0, 0.0, 5.0, 6.0]


def test_side_by_side_table_has_one_row_per_setting_in_variant_order():
    import pandas as pd

    from ntt.runner.seedstats import side_by_side_sections, stats_table

    rows = []
    for variant, sid, aps in (("walk1_b", "s1", (0.30, 0.40)), ("walk0_a", "s0", (0.10, 0.20))):
        for seed, ap in enumerate(aps):
            rows.append({"benchmark": "other", "dataset": "synthetic", "sam2": "t", "dinov2": "d",
                         "variant": variant, "setting_id": sid, "setting": variant, "random_weights": True,
                         "shots": 1, "seed": seed, "valid": True, "bbox_AP": 100 * ap,
                         "segm_AP": 50 * ap})  # fmt: skip
    lines = side_by_side_sections(stats_table(pd.DataFrame(rows)), lambda bench, datasets: datasets[0])
    table = [ln for ln in lines if ln.startswith("| walk")]
    ci = 1.96 * math.sqrt(50.0) / math.sqrt(2)  # sample std of 10 and 20 (and of 30 and 40): 7.07
    assert table == [
        f"| walk0_a | t + d | 2 | 15.0 | {ci:.1f} | 7.5 | {ci / 2:.1f} | walk0_a |",
        f"| walk1_b | t + d | 2 | 35.0 | {ci:.1f} | 17.5 | {ci / 2:.1f} | walk1_b |",
    ]
    assert "### synthetic: 1 shots - RANDOM WEIGHTS (plumbing only)" in lines
    # the plot names each line by its variant when each variant is one setting (its long name: summary.md)
    from ntt.runner.shotplot import plot_data

    assert sorted(plot_data(stats_table(pd.DataFrame(rows)))["box"]) == [
        "t + d, walk0_a [RANDOM WEIGHTS]",
        "t + d, walk1_b [RANDOM WEIGHTS]",
    ]
    one = pd.DataFrame([r for r in rows if r["variant"] == "walk0_a"])
    assert side_by_side_sections(stats_table(one), lambda b, d: d[0]) == []  # one setting: nothing to compare


@pytest.mark.slow  # 20 jobs (10 steps x 2 shots, one seed) on 2 images: 68 s measured, minutes on 2 busy cores
@pytest.mark.timeout(1800)
def test_the_smoke_walk_runs_end_to_end_and_summarizes_to_a_table_and_a_plot(tmp_path):
    from ntt import cli
    from ntt.data.synthetic import generate_synthetic_dataset
    from ntt.tools.gtboxes import main as gtboxes

    out = tmp_path / "out"
    data = out / "datasets" / "synthetic_n9_s0"  # the smoke ablation's dataset.root for these values
    generate_synthetic_dataset(data, num_images=9, seed=0)
    assert gtboxes([str(data / "test.json"), str(tmp_path / "boxes.json")]) == 0
    line = ["ablation=ntt_to_fsod_vfm_smoke", f"paths.output_dir={out}", f"proposer.boxes_json={tmp_path / 'boxes.json'}",
            "device=cpu", "seed=1"]  # fmt: skip
    with torch_threads(2):
        assert cli.main(["study", *line]) == 0
    tables = tmp_path / "tables"
    assert cli.main(["summarize", str(out), "--study", "ntt_to_fsod_vfm_smoke", "--out", str(tables)]) == 0
    text = (tables / "summary.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| walk")]
    for shots in (1, 2):  # one side-by-side table per shot count, one row per step, box and mask AP
        assert f"### synthetic: {shots} shots - RANDOM WEIGHTS (plumbing only)" in text
    assert [r.split(" | ")[0][2:] for r in rows[: len(WALK)]] == WALK
    assert all(r.split(" | ")[2] == "1" for r in rows[: 2 * len(WALK)])  # the one seed each
    assert (tables / "ap_vs_shots_other.png").stat().st_size > 10_000


def test_fsod_vfm_shot_files_become_ntt_references_of_the_same_annotations(tmp_path):
    from ntt.data.synthetic import generate_synthetic_dataset
    from ntt.prepare import main as prepare
    from ntt.prepare.errors import PrepareError
    from ntt.prepare.fsodvfm_shots import refs_from_shots
    from ntt.refs import load_refs, validate_refs

    generate_synthetic_dataset(tmp_path / "data", num_images=9, seed=0)
    ref_json = tmp_path / "data" / "train.json"
    coco = json.loads(ref_json.read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {i["id"]: i["file_name"] for i in coco["images"]}
    # FSOD-VFM's layout: {class name: [{image: <its path>, bbox}]}, boxes a pixel off (its VOC boxes are 1-based)
    chosen: dict[int, list[int]] = {}
    shots: dict[str, list] = {}
    for ann in coco["annotations"]:
        cat, ids = ann["category_id"], chosen.setdefault(ann["category_id"], [])
        if len(ids) < 2 and all(
            a["image_id"] != ann["image_id"] for a in coco["annotations"] if a["id"] in ids
        ):
            ids.append(ann["id"])
            x, y, w, h = ann["bbox"]
            shots.setdefault(names[cat], []).append(
                {"image": f"dataset/train/{files[ann['image_id']]}", "bbox": [x + 1, y + 1, w, h]}
            )
    assert all(len(v) == 2 for v in chosen.values())
    (tmp_path / "shots.json").write_text(json.dumps(shots))
    out = tmp_path / "refs.json"
    assert (
        prepare(
            ["fsod-vfm-shots", str(tmp_path / "shots.json"), "--ref-json", str(ref_json), "--out", str(out)]
        )
        == 0
    )
    refs = load_refs(out)
    assert {c: [e.ann_ids[0] for e in entries] for c, entries in refs.items()} == chosen
    validate_refs(refs, coco, sorted(chosen), 2)  # what the run's sample_refs stage checks
    bad = {"zebra": shots[names[1]]}
    with pytest.raises(PrepareError, match=r"class\(es\) \['zebra'\] are not categories"):
        refs_from_shots(bad, coco)
    far = {names[1]: [{"image": shots[names[1]][0]["image"], "bbox": [0, 0, 1, 1]}]}
    with pytest.raises(PrepareError, match=r"entry 0 .*: no .* annotation of image \d+ overlaps its box"):
        refs_from_shots(far, coco)
    missing = {names[1]: [{"image": "x/nope.jpg", "bbox": [0, 0, 1, 1]}]}
    with pytest.raises(PrepareError, match="no image 'nope.jpg' in the reference json"):
        refs_from_shots(missing, coco)
