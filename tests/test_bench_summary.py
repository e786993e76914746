"""Paper-style tables from metrics.json (`ntt summarize`) and the W&B mirror, offline.

The smoke sweep uses tiny RANDOM backbones on the synthetic dataset: its numbers are plumbing only.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ntt.runner.summarize import cell, main

FAST = [
    "dataset=synthetic",
    "dataset.synthetic.num_images=9",
    "dataset.max_test_images=1",
    "proposer.points_per_side=2",
    "study_name=smoke_study",
]


def _run(out: Path, *overrides: str) -> Path:
    from ntt.runner import run_pipeline

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="main",
            overrides=["debug=smoke", "device=cpu", f"paths.output_dir={out}", *FAST, *overrides],
        )
    run_pipeline(cfg)
    return Path(str(cfg.run_dir))


def _table_rows(md: str, title_part: str) -> dict[str, list[str]]:
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("## ") and title_part in ln)
    rows = {}
    for ln in lines[start + 4 :]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow  # four pipeline runs: ~30 s on an idle 2-core machine, minutes on a busy one
def test_smoke_sweep_2_shots_x_2_seeds_gives_the_table_of_its_metrics_files(tmp_path):
    dirs = {(k, s): _run(tmp_path / "out", f"shots={k}", f"seed={s}") for k in (1, 2) for s in (1, 2)}
    assert len(set(dirs.values())) == 4
    assert main([str(tmp_path / "out"), "--study", "smoke_study", "--out", str(tmp_path / "t")]) == 0
    md = (tmp_path / "t" / "summary.md").read_text()
    rows = _table_rows(md, "synthetic: bbox AP")
    for k in (1, 2):
        aps = [json.loads((dirs[(k, s)] / "metrics.json").read_text())["bbox"]["AP"] for s in (1, 2)]
        expected = cell([100 * a if a >= 0 else math.nan for a in aps])
        assert rows[str(k)] == [expected], (k, aps)
    assert "RANDOM WEIGHTS" in md and "plumbing and speed only" in md
    runs = (tmp_path / "t" / "runs.csv").read_text().splitlines()
    assert len(runs) == 5  # header + one row per run
    per_class = (tmp_path / "t" / "per_class.csv").read_text().splitlines()
    assert len(per_class) == 1 + 4 * 4  # 4 runs x 4 classes
    m = json.loads((dirs[(1, 1)] / "metrics.json").read_text())
    assert m["study"] == "smoke_study" and m["config"]["shots"] == 1 and "paths" not in m["identity"]
    assert dirs[(1, 1)].name == f"smoke-{m['config_id']}"


def _write(root: Path, name: str, *, dataset="voc_split1", shots=1, seed=1, ap=0.5, setting="s1", **extra):
    run = root / name
    run.mkdir(parents=True)
    m = {
        "dataset": dataset, "sam2": "a", "dinov2": "b", "variant": "parity", "shots": shots, "seed": seed,
        "num_images": 3, "failed_images": [], "missing_images": [], "study": "st", "setting_id": setting,
        "bbox": {"AP": ap, "AP50": ap, "AP75": ap}, "segm": {"AP": ap, "AP50": ap},
        "per_class": [{"category_id": 1, "name": "cat", "num_gt": 0, "bbox_AP": -1.0, "bbox_AP50": -1.0}],
    }  # fmt: skip
    m.update(extra)
    (run / "metrics.json").write_text(json.dumps(m))


def test_failed_runs_are_excluded_and_listed_and_minus_one_is_never_minus_100(tmp_path):
    _write(tmp_path, "r1", seed=1, ap=0.60)
    _write(tmp_path, "r2", seed=2, ap=0.70)
    _write(tmp_path, "r3", seed=3, ap=0.10, failed_images=[7])  # left out of the mean
    _write(tmp_path, "r4", dataset="voc_split2", ap=-1.0)  # empty test set: n/a, not -100
    _write(tmp_path, "r5", seed=1, ap=0.20, setting="s2")  # another setting: another table
    _write(tmp_path, "other_study", seed=9, ap=0.99, study="zz")
    assert main([str(tmp_path), "--study", "st", "--out", str(tmp_path / "t")]) == 0
    md = (tmp_path / "t" / "summary.md").read_text()
    rows = _table_rows(md, "setting s1")
    assert rows["1"] == ["65.0 +- 7.1 (2)", "n/a"]  # columns voc_split1, voc_split2
    assert _table_rows(md, "setting s2")["1"] == ["20.0 (1)"]
    assert "r3`: 1 failed and 0 missing image(s)" in md and "-100" not in md
    assert "Paper (reported, not measured here): 71.2 nAP50" in md
    assert "99" not in (tmp_path / "t" / "runs.csv").read_text()
    per_class = (tmp_path / "t" / "per_class.csv").read_text()
    assert "-100" not in per_class


def test_settings_are_named_by_what_differs_not_by_a_hash(tmp_path):
    from ntt.utils.compose import compose as ntt_compose
    from ntt.utils.identity import identity_keys, setting_id

    def write(name, *overrides, dataset="coco_fewshot"):
        cfg = ntt_compose([f"dataset={dataset}", *overrides])
        _write(tmp_path, name, dataset=dataset, setting=setting_id(cfg), identity=identity_keys(cfg))

    write("paper")
    write("nms", "matcher.nms_thr=0.6", "proposer=grid16")
    write("synth_a", "debug=smoke", "dataset.synthetic.num_images=9", dataset="synthetic")
    write("synth_b", "debug=smoke", "dataset.synthetic.num_images=12", dataset="synthetic")
    write("ckpt", "backbone.sam2.checkpoint=/other/sam2.pt")  # same backbone name, other weights
    assert main([str(tmp_path), "--out", str(tmp_path / "t")]) == 0
    titles = [ln for ln in (tmp_path / "t" / "summary.md").read_text().splitlines() if ln.startswith("## ")]
    assert "## coco: bbox nAP - a + b, parity (proposer.points_per_side=16, matcher.nms_thr=0.6)" in titles
    # the defaults of the setting's own dataset option (conf/dataset/synthetic.yaml: 24 images)
    smoke = "proposer.points_per_side=4, proposer.points_batch_size=16, proposer.iou_thr=0.0"
    for n in (9, 12):
        title = f"## synthetic: bbox AP - a + b, parity (dataset.max_test_images=4, dataset.synthetic.num_images={n}, {smoke})"
        assert title in titles, titles
    # two settings that would read the same (the backbone is named apart): what tells them apart is added
    ckpt = "backbone.sam2.checkpoint={p}"
    assert f"## coco: bbox nAP - a + b, parity (paper settings; {ckpt.format(p='/other/sam2.pt')})" in titles
    default_ckpt = "${paths.checkpoints}/sam2_hiera_large.pt"
    assert f"## coco: bbox nAP - a + b, parity (paper settings; {ckpt.format(p=default_ckpt)})" in titles
    assert not [t for t in titles if "setting " in t or "other:" in t]


def test_a_diffusion_setting_is_named_by_what_differs_from_the_defaults_of_its_keys(tmp_path):
    from ntt.utils.compose import compose as ntt_compose
    from ntt.utils.identity import identity_keys, setting_id

    for name, overrides in (
        ("soft", []),
        ("diffusion", ["matcher.merge=diffusion"]),
        ("alpha", ["matcher.merge=diffusion", "matcher.diffusion.alpha=0.5"]),
    ):
        cfg = ntt_compose(["dataset=coco_fewshot", *overrides])
        _write(tmp_path, name, dataset="coco_fewshot", setting=setting_id(cfg), identity=identity_keys(cfg))
    assert main([str(tmp_path), "--out", str(tmp_path / "t")]) == 0
    titles = [ln for ln in (tmp_path / "t" / "summary.md").read_text().splitlines() if ln.startswith("## ")]
    head = "## coco: bbox nAP - a + b, parity"
    assert f"{head} (paper settings)" in titles
    assert f"{head} (matcher.merge=diffusion)" in titles  # not every matcher.diffusion.* at its default
    assert f"{head} (matcher.merge=diffusion, matcher.diffusion.alpha=0.5)" in titles, titles


def test_cell_format():
    assert cell([20.0, 30.0]) == "25.0 +- 7.1 (2)" and cell([5.0]) == "5.0 (1)" and cell([math.nan]) == "n/a"


def _wandb_records(path: Path):
    """Records of a W&B offline run file (its leveldb-log format: 7-byte header, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind == 2 else buf + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


@pytest.mark.timeout(120)
def test_wandb_offline_run_holds_group_tags_metrics_and_tables(tmp_path):
    pytest.importorskip("wandb")
    from ntt.runner.loggers import build_logger

    metrics = {
        "dataset": "voc_split1", "shots": 1, "seed": 33, "sam2": "a", "dinov2": "b", "variant": "parity",
        "config_id": "abcd1234", "num_images": 2, "bbox": {"AP": 0.25, "AP50": 0.5}, "config": {"x": 1},
        "per_class": [{"category_id": 2, "name": "bird", "num_gt": 3, "bbox_AP": 0.25}],
    }  # fmt: skip
    logger = build_logger(
        kind="wandb",
        mode="offline",
        group="voc",
        tags=["voc_split1", "1shot"],
        name="r",
        run_dir=str(tmp_path),
    )
    logger.log_config({"shots": 1})
    logger.log_metrics(metrics)
    logger.finish()
    run_files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    recs = _wandb_records(run_files[0])
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    assert run.run_group == "voc" and list(run.tags) == ["voc_split1", "1shot"]
    history = [r.history for r in recs if r.WhichOneof("record_type") == "history"]
    items = {"/".join(i.nested_key) or i.key: i.value_json for h in history for i in h.item}
    assert json.loads(items["bbox/AP"]) == 0.25
    assert (
        json.loads(items["per_class_AP/_type"]) == "table-file"
        and json.loads(items["summary/_type"]) == "table-file"
    )
    table_file = run_files[0].parent / "files" / json.loads(items["per_class_AP/path"])
    table = json.loads(table_file.read_text())
    assert table["columns"][0] == "name" and table["data"][0][0] == "bird"
    summary = json.loads((run_files[0].parent / "files" / json.loads(items["summary/path"])).read_text())
    assert summary["data"][0][summary["columns"].index("bbox/AP")] == 0.25


@pytest.mark.timeout(120)
def test_wandb_offline_run_file_is_complete_when_finish_returns_every_time(tmp_path):
    """Several runs in one process (a study's jobs): before `finish` waited for wandb-core, the second and
    third run files held only their 7-byte header when `finish` returned (2 of 3 in one process)."""
    pytest.importorskip("wandb")
    from ntt.runner.loggers import build_logger

    for i in range(3):
        logger = build_logger(
            kind="wandb", mode="offline", group="g", tags=[], name=f"r{i}", run_dir=str(tmp_path / f"r{i}")
        )
        logger.log_metrics({"bbox": {"AP": 0.5}})
        logger.finish()
        (run_file,) = (tmp_path / f"r{i}").glob("wandb/offline-run-*/run-*.wandb")
        kinds = [r.WhichOneof("record_type") for r in _wandb_records(run_file)]
        assert "run" in kinds and "history" in kinds, (i, kinds)


@pytest.mark.timeout(120)
def test_wandb_offline_run_names_box_and_mask_ap_in_percent_next_to_bbox_and_segm(tmp_path):
    """box/* and mask/* are metrics.json's bbox/* and segm/* in percent (the summarize tables' numbers),
    in the history and in the summary table; a -1 (no ground truth) is not logged as -100."""
    pytest.importorskip("wandb")
    from ntt.runner.loggers import build_logger

    logger = build_logger(kind="wandb", mode="offline", group="g", tags=[], name="r", run_dir=str(tmp_path))
    logger.log_metrics({"bbox": {"AP": 0.25, "AP50": -1.0}, "segm": {"AP": 0.125}})
    logger.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history = [r.history for r in _wandb_records(run_file) if r.WhichOneof("record_type") == "history"]
    items = {"/".join(i.nested_key) or i.key: i.value_json for h in history for i in h.item}
    assert json.loads(items["bbox/AP"]) == 0.25 and json.loads(items["segm/AP"]) == 0.125
    assert json.loads(items["box/AP"]) == 25.0 and json.loads(items["mask/AP"]) == 12.5
    assert "box/AP50" not in items and json.loads(items["bbox/AP50"]) == -1.0
    summary = json.loads((run_file.parent / "files" / json.loads(items["summary/path"])).read_text())
    row = dict(zip(summary["columns"], summary["data"][0], strict=True))
    assert row["box/AP"] == 25.0 and row["mask/AP"] == 12.5
