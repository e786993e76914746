"""`ntt study`: one pass over the test images for many memory banks equals separate runs, byte for byte.

Tiny RANDOM backbones on the synthetic dataset (plumbing only, never accuracy).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, torch_threads
from helpers_pipeline import RUN_ARTIFACTS, count_calls
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

# 3 test images (ids 3, 6, 9); two banks (1 and 2 shots) of one seed
BASE = ["dataset=synthetic", "dataset.synthetic.num_images=9", "debug=smoke", "device=cpu"]
ARTIFACTS = RUN_ARTIFACTS


def compose_cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="main", overrides=[*BASE, *overrides])


def study_cfgs(out: Path, data: Path, shots=(1, 2), seed=5, *extra: str):
    return [
        compose_cfg(f"paths.output_dir={out}", f"dataset.root={data}", f"shots={k}", f"seed={seed}", *extra)
        for k in shots
    ]


@pytest.fixture
def data_root(tmp_path) -> Path:
    from ntt.data.synthetic import generate_synthetic_dataset

    root = tmp_path / "data"
    generate_synthetic_dataset(root, num_images=9, seed=0)
    return root


@pytest.fixture
def count_passes(monkeypatch):
    """Counts the memory-independent per-image computations (calls of propose_image)."""
    from ntt import inference

    return count_calls(monkeypatch, inference, "propose_image")


def test_study_pass_equals_separate_runs_byte_for_byte(tmp_path, data_root, count_passes, caplog):
    from ntt.runner import run_jobs, run_pipeline

    banks = run_jobs(study_cfgs(tmp_path / "study", data_root))
    assert [b.error for b in banks] == [None, None]
    assert len(count_passes) == 3  # once per image, not once per image and bank
    for bank in banks:
        single_cfg = compose_cfg(
            f"paths.output_dir={tmp_path / 'single'}",
            f"dataset.root={data_root}",
            f"shots={bank.cfg.shots}",
            "seed=5",
        )
        run_pipeline(single_cfg)
        single = Path(str(single_cfg.run_dir))
        study = Path(str(bank.cfg.run_dir))
        assert study.relative_to(tmp_path / "study") == single.relative_to(tmp_path / "single")
        for name in ARTIFACTS:
            assert (study / name).read_bytes() == (single / name).read_bytes(), f"{name} differs ({study})"
        # config.yaml differs only by the output folder
        text = (study / "config.yaml").read_text().replace(str(tmp_path / "study"), str(tmp_path / "single"))
        assert text == (single / "config.yaml").read_text()
        assert bank.metrics == json.loads((study / "metrics.json").read_text())
    # a later normal run of a study job finds every stage done and segments nothing
    count_passes.clear()
    caplog.set_level("INFO")
    run_pipeline(banks[1].cfg)
    assert sum("matches the config, skipped" in r.getMessage() for r in caplog.records) == 4
    assert count_passes == []


@pytest.mark.slow  # three study runs (~1 min on 2 cores)
def test_study_resumes_per_bank_and_keeps_going_past_failures(tmp_path, data_root, count_passes, monkeypatch):
    from ntt.data import images
    from ntt.runner import run_jobs
    from ntt.runner.runlock import RunLock

    real = images.load_test_image

    def broken_six(path, size=1024, **kwargs):
        if Path(path).name == "000006.png":
            raise OSError(f"cannot read {path}")
        return real(path, size, **kwargs)

    monkeypatch.setattr(images, "load_test_image", broken_six)
    cfgs = study_cfgs(tmp_path, data_root)
    banks = run_jobs(cfgs)
    # the shared part failed on image 6: recorded in both banks, the other images kept
    assert all("1 image(s) failed" in b.error for b in banks) and len(count_passes) == 2
    for bank in banks:
        metrics = json.loads((Path(str(bank.cfg.run_dir)) / "metrics.json").read_text())
        assert metrics["failed_images"] == [6] and metrics["num_images"] == 3
    monkeypatch.setattr(images, "load_test_image", real)

    # a third bank joins; the second bank's directory is held by another run
    cfgs = study_cfgs(tmp_path, data_root, (1, 2, 3))
    held = RunLock(Path(str(cfgs[1].run_dir)))
    held.acquire()
    try:
        count_passes.clear()
        banks = run_jobs(cfgs)
    finally:
        held.release()
    assert banks[0].error is None and banks[2].error is None
    assert "is in use by another ntt run" in banks[1].error
    assert len(count_passes) == 3  # bank 3 needs every image; bank 1 only image 6 (shared with bank 3)

    count_passes.clear()
    banks = run_jobs(cfgs)
    assert [b.error for b in banks] == [None, None, None]
    assert len(count_passes) == 1  # only the second bank's image 6 was left
    assert banks[1].metrics["failed_images"] == [] and banks[1].metrics["num_images"] == 3


@pytest.mark.slow  # two processes + one (~1 min on 2 cores)
def test_study_in_two_processes_equals_one_byte_for_byte(tmp_path, data_root):
    """`torchrun --nproc_per_node 2 -m ntt study`: each job's memory batches and the test images are split
    over the processes (ntt/runner/memory_shard.py); every job's artifacts equal the one-process study's."""
    import os
    import subprocess
    import sys

    from ntt.runner import run_jobs

    extra = "matcher.memory.batch_size=1"  # 4 classes x 1-2 shots: 4-8 batches, both processes encode some
    with torch_threads(1):  # as each torchrun process below (conftest.torch_threads says why)
        banks = run_jobs(study_cfgs(tmp_path / "one", data_root, (1, 2), 5, extra))
    assert [b.error for b in banks] == [None, None]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "ntt",
        "study",
        *BASE,
    ]
    cmd += [f"paths.output_dir={tmp_path / 'two'}", f"dataset.root={data_root}", "shots=1,2", "seed=5", extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for bank in banks:
        one = Path(str(bank.cfg.run_dir))
        two = tmp_path / "two" / one.relative_to(tmp_path / "one")
        assert (two / "predictions" / "rank1.jsonl").exists()
        for name in ARTIFACTS:
            assert (two / name).read_bytes() == (one / name).read_bytes(), f"{name} differs ({two})"


def test_sweep_expansion_follows_hydras_basic_sweeper():
    from ntt.runner.main import expand_sweep

    jobs = expand_sweep(["study=coco"])
    assert len(jobs) == 60
    assert jobs[0] == ["shots=1", "seed=42", "study=coco"]
    assert jobs[-1] == ["shots=30", "seed=99", "study=coco"]
    # a command-line sweep replaces the config's, in place
    jobs = expand_sweep(["study=coco", "shots=1,5", "seed=7"])
    assert jobs == [["shots=1", "seed=7", "study=coco"], ["shots=5", "seed=7", "study=coco"]]
    assert expand_sweep(["dataset=synthetic", "seed=1,2"]) == [
        ["dataset=synthetic", "seed=1"],
        ["dataset=synthetic", "seed=2"],
    ]


def test_jobs_that_cannot_share_the_per_image_work_get_their_own_pass(tmp_path, data_root):
    from ntt.runner.context import make_context
    from ntt.runner.keys import pass_key

    same = [make_context(c) for c in study_cfgs(tmp_path, data_root, (1, 2, 3))]
    assert len({pass_key(c) for c in same}) == 1
    # the matcher's NMS / output settings are per bank; the proposer, pooling and backbones are not
    other = [
        make_context(c)
        for c in (
            study_cfgs(tmp_path, data_root, (1,), 5, "matcher.nms_thr=0.7")
            + study_cfgs(tmp_path, data_root, (1,), 5, "proposer.points_per_side=2")
            + study_cfgs(tmp_path, data_root, (1,), 5, "matcher.pooling=adjoint")
            + study_cfgs(tmp_path, data_root, (1,), 5, "backbone/dinov2=vits14")
        )
    ]
    keys = [pass_key(c) for c in other]
    assert keys[0] == pass_key(same[0]) and len(set(keys[1:]) | {keys[0]}) == 4


def test_cli_lists_the_jobs_and_their_run_directories(tmp_path, capsys):
    from ntt.runner.main import study_main

    assert study_main(["--list", *BASE, f"paths.output_dir={tmp_path}", "shots=1,2", "seed=3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{tmp_path}/synthetic/sam2_tiny_random+dinov2_tiny_random/1shot_seed3/smoke-")
    assert lines[1].split("\t")[1].endswith("shots=2 seed=3")


def _blob_logits(n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    centers = torch.rand(n, 2, generator=g) * 256
    radii = 8 + torch.rand(n, generator=g) * 60
    dist = ((xx - centers[:, 0, None, None]) ** 2 + (yy - centers[:, 1, None, None]) ** 2).sqrt()
    return radii[:, None, None] - dist  # overlapping discs, positive inside


@pytest.mark.parametrize("max_bytes", [1 << 30, 5 * 90 * 120])  # everything cached / only 5 masks kept
def test_shared_proposal_masks_give_the_same_bits_in_every_bank(max_bytes):
    """Two banks (different labels and scores) post-processing the same proposals with one shared
    ProposalMasks equal each bank computed alone: detections, trace and COCO results (RLE included)."""
    import torch

    from ntt.maskcache import ProposalMasks
    from ntt.postprocess import postprocess_detections
    from ntt.results import detections_to_coco

    n, height, width = 120, 90, 120
    logits = _blob_logits(n)
    g = torch.Generator().manual_seed(1)
    pred_ious = torch.rand(n, generator=g)
    emb = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1)
    shared = ProposalMasks(logits, height, width, max_bytes=max_bytes, chunk_size=7)
    for _bank in range(2):
        labels = torch.randint(0, 3, (n,), generator=g)
        scores = torch.rand(n, generator=g) * 0.9 + 0.05
        kwargs = dict(height=height, width=width, nms_thr=0.7, num_out=40, nms_cap_factor=2)
        alone, tr_alone = postprocess_detections(logits, pred_ious, labels, scores, emb, **kwargs)
        det, tr = postprocess_detections(logits, pred_ious, labels, scores, emb, full_masks=shared, **kwargs)
        assert len(det) > 10
        assert torch.equal(det.masks, alone.masks) and torch.equal(det.scores, alone.scores)
        assert all(torch.equal(tr[k], tr_alone[k]) for k in tr_alone)
        rles = shared.rles(det.proposal_index, det.masks)
        cat_ids = [1, 2, 3]
        assert detections_to_coco(det, 7, cat_ids, rles=rles) == detections_to_coco(alone, 7, cat_ids)
    # the cache's memory stays within max_bytes: what it holds owns no more storage than its masks
    held = {m.untyped_storage().data_ptr(): m.untyped_storage().nbytes() for m in shared._masks.values()}
    assert sum(held.values()) <= max_bytes
