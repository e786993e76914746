"""End-to-end runs of the Hydra app with tiny RANDOM backbones: plumbing, artifacts, resume, determinism.

Every metric these runs produce measures plumbing only (random weights), never accuracy.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA, REPO, require_path, torch_threads
from helpers_pipeline import RUN_ARTIFACTS, count_calls
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ARTIFACTS = ["config.yaml", *RUN_ARTIFACTS]


def compose_cfg(out_dir: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            config_name="main",
            overrides=[
                f"hydra.searchpath=[file://{REPO / 'tests' / 'configs'}]",
                "debug=smoke",
                "device=cpu",
                f"paths.output_dir={out_dir}",
                *overrides,
            ],
        )


def run(out_dir: Path, *overrides: str):
    from ntt.runner import run_pipeline

    cfg = compose_cfg(out_dir, *overrides)
    metrics = run_pipeline(cfg)
    return Path(str(cfg.run_dir)), metrics


SMALL_SYNTH = ["dataset=synthetic", "dataset.synthetic.num_images=9", "dataset.max_test_images=2"]


def test_smoke_pipeline_on_synthetic_data_writes_every_artifact(tmp_path):
    run_dir, metrics = run(tmp_path, *SMALL_SYNTH)
    for name in ARTIFACTS:
        assert (run_dir / name).is_file(), f"missing artifact {name}"
    assert (
        run_dir.parent.relative_to(tmp_path).as_posix()
        == "synthetic/sam2_tiny_random+dinov2_tiny_random/2shot_seed33"
    )
    assert re.fullmatch(r"smoke-[0-9a-f]{8}", run_dir.name)  # variant + config id (ntt/utils/identity.py)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m == metrics
    assert m["note"].startswith("random weights")  # the run says loudly that its numbers are plumbing only
    assert m["num_images"] == 2 and m["failed_images"] == []
    for iou_type in ("bbox", "segm"):
        assert set(m[iou_type]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}
        assert -1.0 <= m[iou_type]["AP"] <= 1.0
    assert {r["category_id"] for r in m["per_class"]} == {1, 2, 3, 4}
    preds = json.loads((run_dir / "predictions.json").read_text())
    assert len(preds) == m["num_detections"] <= 2 * 100
    for r in preds:
        assert set(r) >= {"image_id", "category_id", "bbox", "score", "segmentation"}
        assert isinstance(r["segmentation"]["counts"], str)
    from ntt.bank import MemoryBank

    bank = MemoryBank.load(run_dir / "memory_postprocessed.pt", expect={"shots": 2, "seed": 33})
    assert tuple(bank.instance_means.shape) == (4, 2, 64) and bank.postprocessed
    assert bank.category_names == ["circle", "square", "triangle", "star"]
    assert torch.allclose(bank.prototypes().norm(dim=-1), torch.ones(4))
    assert (run_dir / "memory.pt").stat().st_size < 1e6  # features and metadata, never model weights


def test_rerun_skips_finished_stages_and_same_seed_is_byte_identical(tmp_path, caplog):
    run_dir, _ = run(tmp_path / "a", *SMALL_SYNTH)
    before = {n: (run_dir / n).read_bytes() for n in ARTIFACTS if n != "config.yaml"}
    caplog.set_level("INFO")
    run(tmp_path / "a", *SMALL_SYNTH)
    assert sum("matches the config, skipped" in r.message for r in caplog.records) == 4
    assert {n: (run_dir / n).read_bytes() for n in before} == before
    # a fresh output directory with the same config and seed gives byte-identical artifacts
    run_dir_b, _ = run(
        tmp_path / "b", *SMALL_SYNTH, f"dataset.root={run_dir.parents[3]}/datasets/synthetic_n9_s0"
    )
    for name in ["refs.json", "memory.pt", "memory_postprocessed.pt", "predictions.json"]:
        assert (run_dir_b / name).read_bytes() == before[name], f"{name} differs between identical runs"
    # metrics.json also records the config, which here differs only by the dataset.root override
    where = ("config", "identity", "config_id")
    a, b = json.loads(before["metrics.json"]), json.loads((run_dir_b / "metrics.json").read_text())
    assert {k: v for k, v in a.items() if k not in where} == {k: v for k, v in b.items() if k not in where}


def test_changed_matcher_reruns_only_the_test_stage(tmp_path, caplog):
    same_dir = f"run_dir={tmp_path / 'run'}"  # a matcher change gets its own run dir by default
    run(tmp_path, *SMALL_SYNTH, same_dir)
    caplog.set_level("INFO")
    run(tmp_path, *SMALL_SYNTH, "matcher.nms_thr=0.7", same_dir)
    skipped = [r.message for r in caplog.records if "skipped" in r.message]
    assert len(skipped) == 3 and not any("stage test" in s for s in skipped)


def test_a_failing_image_is_recorded_and_the_others_kept(tmp_path, monkeypatch):
    from ntt.data import images
    from ntt.runner import StageError

    real = images.load_test_image
    calls = {"n": 0}

    def flaky(path, size=1024, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(f"cannot read {path}")
        return real(path, size, **kwargs)

    monkeypatch.setattr(images, "load_test_image", flaky)
    with pytest.raises(StageError, match="1 image\\(s\\) failed"):
        run(tmp_path, *SMALL_SYNTH)
    run_dir = next(tmp_path.glob("synthetic/*/*/smoke-*"))
    m = json.loads((run_dir / "metrics.json").read_text())
    assert len(m["failed_images"]) == 1 and m["num_detections"] > 0
    # the rerun retries only the failed image and then succeeds
    monkeypatch.setattr(images, "load_test_image", real)
    _, metrics = run(tmp_path, *SMALL_SYNTH)
    assert metrics["failed_images"] == []


def test_bad_config_names_the_key(tmp_path):
    from ntt.runner import StageError

    with pytest.raises(StageError, match="stages="):
        run(tmp_path, *SMALL_SYNTH, "stages=[sample_refs,bogus]")
    with pytest.raises(StageError, match="needs .*refs.json"):
        run(tmp_path, *SMALL_SYNTH, "stages=[fill_memory]")


def test_cli_prints_a_fully_resolved_config():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ntt",
            "run",
            "--cfg",
            "job",
            "--resolve",
            "dataset=voc_split2",
            "backbone/sam2=sam2.1_hiera_s",
            "shots=5",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    ).stdout
    assert "class_split: voc_split2" in out and "sam2.1/sam2.1_hiera_s.yaml" in out and "${" not in out


@pytest.mark.data
def test_fruits_nuts_random_weights_plumbing(tmp_path):
    """fruits_nuts (shared test data, via `paths.data`), random weights: every artifact and the metrics file.

    PLUMBING ONLY: random weights, so the metrics are meaningless as accuracy."""
    require_path(DATA / "fruits_nuts", "fruits_nuts dataset")
    run_dir, metrics = run(tmp_path, "dataset=fruits_nuts", f"paths.data={DATA}", "dataset.max_test_images=3")
    for name in ARTIFACTS:
        assert (run_dir / name).is_file(), name
    refs = json.loads((run_dir / "refs.json").read_text())
    assert metrics["num_images"] == 3 and metrics["note"].startswith("random weights")
    assert [c["name"] for c in metrics["per_class"]] == ["date", "fig", "hazelnut"]
    assert refs  # sampled with the reference's validity filter from the real annotations


@pytest.mark.slow  # the default suite has the same check through `accelerate launch` (tests/test_scaleout.py)
def test_results_do_not_depend_on_the_number_of_processes(tmp_path):
    """Two real CPU processes (torchrun, gloo) give the same bytes as one.

    Memory batches of 2 crops (4 classes x 2 shots: 4 batches): each process encodes two of them
    (ntt/runner/memory_shard.py), the test images are sharded too."""
    small = [*SMALL_SYNTH, "dataset.max_test_images=3", "matcher.memory.batch_size=2"]
    with torch_threads(1):  # as each torchrun process below (conftest.torch_threads says why)
        one, _ = run(tmp_path / "one", *small)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "ntt",
        "run",
        "debug=smoke",
        "device=cpu",
        f"paths.output_dir={tmp_path / 'two'}",
        *small,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=600)
    assert "kB, 2 process(es))" in proc.stdout  # the bank was filled by both processes
    two = tmp_path / "two" / one.relative_to(tmp_path / "one")
    assert (two / "predictions" / "rank1.jsonl").exists()
    for name in ["refs.json", "memory.pt", "memory_postprocessed.pt", "predictions.json", "metrics.json"]:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name


def test_missing_checkpoint_is_a_clear_error_with_the_fetch_command(tmp_path):
    from ntt.backbones.checkpoints import MissingCheckpointError

    with pytest.raises(MissingCheckpointError, match=r"ntt download dinov2_vits14") as info:
        run(tmp_path, *SMALL_SYNTH, "backbone/dinov2=vits14", f"paths.checkpoints={tmp_path / 'ckpt'}")
    assert str(tmp_path / "ckpt" / "dinov2_vits14_pretrain.pth") in str(info.value)
    # reported by the preflight, before any stage ran or config.yaml was written
    run_dir = next(tmp_path.glob("synthetic/*/*/smoke-*"))
    assert not (run_dir / "refs.json").exists() and not (run_dir / "config.yaml").exists()


def test_two_missing_checkpoints_are_named_in_one_error(tmp_path):
    from ntt.backbones.checkpoints import MissingCheckpointError

    ckpt = tmp_path / "ckpt"
    with pytest.raises(MissingCheckpointError) as info:
        run(tmp_path, *SMALL_SYNTH, "backbone/sam2=sam2.1_hiera_t", "backbone/dinov2=vits14",
            f"paths.checkpoints={ckpt}")  # fmt: skip
    msg = str(info.value)
    assert str(ckpt / "sam2.1_hiera_tiny.pt") in msg and str(ckpt / "dinov2_vits14_pretrain.pth") in msg
    assert f"`ntt download sam2.1_hiera_t dinov2_vits14 --dir {ckpt}`" in msg


def test_missing_dataset_file_names_the_config_key(tmp_path):
    from ntt.runner import StageError

    with pytest.raises(StageError, match=r"dataset\.ref_json=.*nowhere.json not found"):
        run(tmp_path, "dataset=fruits_nuts", "dataset.ref_json=/nowhere.json")


@pytest.mark.slow
def test_paper_size_backbones_run_the_pipeline_on_random_weights(tmp_path):
    """SAM2.0 Hiera-L + DINOv2 ViT-L/14 at their real sizes (random weights, 2x2 grid, one image):
    the shapes and memory of the paper setting go through every stage. Plumbing only."""
    run_dir, metrics = run(
        tmp_path,
        *SMALL_SYNTH,
        "backbone/sam2=sam2_hiera_l",
        "backbone/dinov2=vitl14",
        "backbone.sam2.random_init=true",
        "backbone.sam2.checkpoint=null",
        "backbone.dinov2.random_init=true",
        "backbone.dinov2.checkpoint=null",
        "dataset.max_test_images=1",
        "proposer.points_per_side=2",
    )
    from ntt.bank import MemoryBank

    assert MemoryBank.load(run_dir / "memory.pt").instance_means.shape[-1] == 1024
    assert "sam2_hiera_l+dinov2_vitl14" in str(run_dir) and metrics["num_images"] == 1


def test_fixed_matcher_runs_in_its_own_directory(tmp_path):
    """matcher=fixed (every fix flag on, adjoint pooling) through every stage, beside the parity run."""
    parity_dir, _ = run(tmp_path, *SMALL_SYNTH)
    fixed_dir, metrics = run(tmp_path, *SMALL_SYNTH, "matcher=fixed", "variant=fixed")
    assert fixed_dir.name.startswith("fixed-") and parity_dir.name.startswith("smoke-")
    assert fixed_dir.parent == parity_dir.parent
    cfg = (fixed_dir / "config.yaml").read_text()
    assert "mask_pooling: area" in cfg and "pooling: adjoint" in cfg and "box_plus_one: true" in cfg
    assert metrics["failed_images"] == []


def test_changing_what_is_evaluated_reuses_the_segmented_images(tmp_path, caplog, monkeypatch):
    """eval backend and image count are not inputs of an image's detections: no image is segmented twice."""
    from ntt import backbones, inference

    run(tmp_path, *SMALL_SYNTH)
    segmented = count_calls(monkeypatch, inference, "propose_image")  # once per image through the models
    built = count_calls(monkeypatch, backbones, "build_backbone")  # (config node,) per model built
    run_dir, metrics = run(tmp_path, *SMALL_SYNTH, "eval=coco_fast")
    # only merged and evaluated again: no image segmented, and no model built (not even by the preflight)
    assert segmented == [] and built == [] and metrics["num_images"] == 2 and "bbox" in metrics
    run_dir, metrics = run(tmp_path, *SMALL_SYNTH, "dataset.max_test_images=3")
    assert len(segmented) == 1 and metrics["num_images"] == 3  # only the new image
    # the new image needs both models
    assert sorted({"sam2" if "sam2" in str(node.name) else "dinov2" for (node,) in built}) == [
        "dinov2",
        "sam2",
    ]
    lines = [
        json.loads(x)
        for f in sorted((run_dir / "predictions").glob("rank*.jsonl"))
        for x in f.read_text().splitlines()
    ]
    assert sorted(x["image_id"] for x in lines) == sorted(
        {x["image_id"] for x in lines}
    )  # none segmented twice
    assert len(lines) == 3
