"""Input-aware resume: a stage or an image result is reused only when everything it read is unchanged.

Tiny RANDOM backbones on a small synthetic dataset (plumbing only, never accuracy). Every run uses an
explicit `run_dir`, so these tests do not depend on how run directories are named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from helpers_pipeline import count_calls, run_smoke
from PIL import Image

SMALL = ["dataset=synthetic", "dataset.synthetic.num_images=9"]


def run(tmp_path: Path, *overrides: str):
    return run_smoke(tmp_path, *overrides, small=tuple(SMALL))


def data_root(tmp_path: Path) -> Path:
    return tmp_path / "datasets" / "synthetic_n9_s0"


@pytest.fixture
def count_images(monkeypatch):
    """Counts the images actually segmented (calls of propose_image: SAM2 + DINOv2 on the image)."""
    from ntt import inference

    return count_calls(monkeypatch, inference, "propose_image")


def stage_lines(caplog) -> dict[str, str]:
    out = {}
    for r in caplog.records:
        msg = r.getMessage()
        for stage in ("sample_refs", "fill_memory", "postprocess_memory", "test"):
            if msg.startswith(f"stage {stage}: ") and "skipped" in msg:
                out[stage] = "skipped"
            elif msg.startswith(f"stage {stage} ..."):
                out[stage] = "ran"
    return out


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data))


def test_reference_file_edited_in_place_recomputes_the_memory(tmp_path, caplog):
    """A refs COCO json with two references swapped (same size, same name) -> new refs, memory, results."""
    run(tmp_path, "stages=[sample_refs]")  # generates the dataset
    train = json.loads((data_root(tmp_path) / "train.json").read_text())
    picked = []
    for cat in (1, 2, 3, 4):
        picked += [a for a in train["annotations"] if a["category_id"] == cat][:2]
    refs_file = tmp_path / "references.json"
    _write_json(refs_file, {**train, "annotations": picked})
    refs_args = [
        f"dataset.refs_file={refs_file}",
        "dataset.refs_format=coco",
        "dataset.refs_coco_mode=per_annotation",
    ]
    memory_only = "stages=[sample_refs,fill_memory,postprocess_memory]"
    run(tmp_path, *refs_args, memory_only)
    from ntt.bank import MemoryBank

    before = MemoryBank.load(tmp_path / "run" / "memory.pt").instance_means.clone()
    size = refs_file.stat().st_size
    picked[0], picked[1] = picked[1], picked[0]  # two references of class 1 swapped: slots 0 and 1
    _write_json(refs_file, {**train, "annotations": picked})
    assert refs_file.stat().st_size == size
    caplog.set_level("INFO")
    run(tmp_path, *refs_args)
    assert stage_lines(caplog) == dict.fromkeys(
        ["sample_refs", "fill_memory", "postprocess_memory", "test"], "ran"
    )
    after = MemoryBank.load(tmp_path / "run" / "memory.pt").instance_means
    assert np.allclose(after[0, 0].numpy(), before[0, 1].numpy()) and np.allclose(after[1:], before[1:])
    # unchanged inputs: everything skipped
    caplog.clear()
    run(tmp_path, *refs_args, memory_only)
    assert set(stage_lines(caplog).values()) == {"skipped"}


def test_memory_stages_are_adopted_from_a_sibling_only_under_the_same_inputs(tmp_path, caplog):
    """A new run dir beside a finished one copies its memory stages when the stage keys, the artifacts and
    the recorded input files all match (e.g. a change of `eval` only); a modified artifact or an edited
    reference image is never adopted."""
    memory_only = "stages=[sample_refs,fill_memory,postprocess_memory]"
    runs = tmp_path / "runs"
    run(tmp_path, memory_only, f"run_dir={runs / 'a'}")
    caplog.set_level("INFO")

    def adopted() -> dict[str, str]:
        out = {}
        for r in caplog.records:
            msg = r.getMessage()
            if msg.startswith("stage ") and "reused from" in msg:
                out[msg.split()[1].rstrip(":")] = Path(msg.rsplit(" from ", 1)[1].split(" (")[0]).name
        return out

    run(tmp_path, memory_only, f"run_dir={runs / 'b'}")
    stages = ["sample_refs", "fill_memory", "postprocess_memory"]
    assert adopted() == dict.fromkeys(stages, "a")
    assert set(stage_lines(caplog).values()) == {"skipped"}  # nothing computed
    for name in ["refs.json", "memory.pt", "memory_postprocessed.pt"] + [f"stage_{s}.json" for s in stages]:
        assert (runs / "b" / name).read_bytes() == (runs / "a" / name).read_bytes(), name

    mem_a = runs / "a" / "memory.pt"
    mem_a.write_bytes(mem_a.read_bytes() + b"\0")  # a's memory modified after its stage wrote it
    caplog.clear()
    run(tmp_path, memory_only, f"run_dir={runs / 'c'}")
    assert adopted() == {"sample_refs": "a", "fill_memory": "b", "postprocess_memory": "a"}

    refs = json.loads((runs / "a" / "refs.json").read_text())
    train = json.loads((data_root(tmp_path) / "train.json").read_text())
    img_id = refs["refs"]["1"][0]["image_id"]
    path = data_root(tmp_path) / next(im["file_name"] for im in train["images"] if im["id"] == img_id)
    arr = np.asarray(Image.open(path)).copy()
    Image.fromarray(255 - arr).save(path)  # a reference image edited: no sibling's memory is current
    caplog.clear()
    run(tmp_path, memory_only, f"run_dir={runs / 'd'}")
    assert adopted() == {"sample_refs": "a"}
    assert stage_lines(caplog) == {
        "sample_refs": "skipped",
        "fill_memory": "ran",
        "postprocess_memory": "ran",
    }


@pytest.mark.slow
def test_edited_reference_image_recomputes_the_memory_only_from_there(tmp_path, caplog):
    run(tmp_path)
    refs = json.loads((tmp_path / "run" / "refs.json").read_text())
    train = json.loads((data_root(tmp_path) / "train.json").read_text())
    img_id = refs["refs"]["1"][0]["image_id"]
    name = next(im["file_name"] for im in train["images"] if im["id"] == img_id)
    path = data_root(tmp_path) / name
    arr = np.asarray(Image.open(path)).copy()
    arr[: arr.shape[0] // 2] = 255 - arr[: arr.shape[0] // 2]
    Image.fromarray(arr).save(path)
    caplog.set_level("INFO")
    run(tmp_path)
    lines = stage_lines(caplog)
    assert lines["sample_refs"] == "skipped" and lines["fill_memory"] == "ran" and lines["test"] == "ran"
    assert any(f"input file {path} changed" in r.getMessage() for r in caplog.records)


def test_edited_test_json_redoes_only_the_affected_images(tmp_path, count_images):
    """A wrong width fails that image (named); fixing it and dropping another redoes only the fixed one."""
    run(tmp_path, "stages=[sample_refs]")
    test_json = data_root(tmp_path) / "test.json"
    good = json.loads(test_json.read_text())
    assert [im["id"] for im in good["images"]] == [3, 6, 9]
    bad = json.loads(test_json.read_text())
    bad["images"][0]["width"] = 641
    _write_json(test_json, bad)
    from ntt.runner import StageError

    with pytest.raises(StageError, match=r"1 image\(s\) failed"):
        run(tmp_path)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["failed_images"] == [3] and len(count_images) == 2  # image 3 failed before inference
    lines = [
        json.loads(x) for x in (tmp_path / "run" / "predictions" / "rank0.jsonl").read_text().splitlines()
    ]
    failure = next(x for x in lines if not x["ok"])
    assert "000003.png is 640x480" in failure["error"] and "width=641" in failure["error"]
    assert failure["file"].endswith("images/000003.png")

    good["images"] = [im for im in good["images"] if im["id"] != 9]
    good["annotations"] = [a for a in good["annotations"] if a["image_id"] != 9]
    _write_json(test_json, good)
    count_images.clear()
    metrics = run(tmp_path)
    assert len(count_images) == 1  # the fixed image only; image 6 kept, image 9 dropped
    assert metrics["num_images"] == 2 and metrics["failed_images"] == []


@pytest.mark.slow
def test_edited_test_image_is_redone_and_the_others_kept(tmp_path, count_images):
    run(tmp_path)
    assert len(count_images) == 3
    path = data_root(tmp_path) / "images" / "000006.png"
    arr = np.asarray(Image.open(path)).copy()
    arr[::2] = 0
    Image.fromarray(arr).save(path)
    count_images.clear()
    run(tmp_path)
    assert len(count_images) == 1


def test_finished_run_asked_for_another_config_refuses_before_touching_anything(tmp_path):
    two = "dataset.max_test_images=2"  # two test images are enough to finish a run
    run(tmp_path, two)
    run_dir = tmp_path / "run"
    before = {
        p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != "file_hashes.json"
    }
    from ntt.runner import StageError

    with pytest.raises(
        StageError, match=r"stage test would use .* does not match the present config.*sample_refs"
    ):
        run(tmp_path, two, "shots=3", "stages=[test]")
    after = {
        p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != "file_hashes.json"
    }
    assert after == before  # config.yaml, metrics, manifests untouched
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["predictions"]
    # a setting of the test stage alone recomputes it (images re-segmented, upstream kept)
    metrics = run(tmp_path, two, "matcher.nms_thr=0.7", "stages=[test]")
    assert metrics["failed_images"] == [] and "nms_thr: 0.7" in (run_dir / "config.yaml").read_text()


def test_file_digests_fast_path_and_change_detection(tmp_path):
    from ntt.utils.files import FileDigests, sha256_file

    f = tmp_path / "a.bin"
    f.write_bytes(b"one")
    cache = tmp_path / "hashes.json"
    digests = FileDigests(cache)
    assert digests.sha256(f) == sha256_file(f) and digests.sha256(tmp_path / "missing") is None
    digests.save()
    f.write_bytes(b"two")  # same size, new content
    assert FileDigests(cache).sha256(f) == sha256_file(f)
    # an old, unchanged file is served from the cache without reading it
    old = 1_000_000_000
    os.utime(f, ns=(old, old))
    d = FileDigests(cache)
    d.sha256(f)
    d.save()
    d._entries[str(f.resolve())]["sha256"] = "cached"
    assert d.sha256(f) == "cached"
    os.utime(f, ns=(old + 1, old + 1))  # a touched file is hashed again
    assert d.sha256(f) == sha256_file(f)


@pytest.mark.slow
def test_kill_9_mid_test_stage_then_rerun_is_byte_identical(tmp_path):
    """A run killed with SIGKILL after some test images resumes and ends byte-identical to an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    def cmd(out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "ntt",
            "run",
            "debug=smoke",
            "device=cpu",
            f"paths.output_dir={out}",
            f"run_dir={out / 'run'}",
            *SMALL,
            "dataset.max_test_images=6",
        ]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = killed / "run" / "predictions" / "rank0.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if shard.exists() and shard.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail("the run finished before it could be killed mid test stage")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = shard.read_text().count("\n")
    assert 2 <= done_before < 6 and not (killed / "run" / "metrics.json").exists()
    subprocess.run(cmd(killed), cwd=REPO, check=True, capture_output=True, timeout=600)
    clean = tmp_path / "clean"
    subprocess.run(cmd(clean), cwd=REPO, check=True, capture_output=True, timeout=600)
    for name in ["refs.json", "memory.pt", "memory_postprocessed.pt", "predictions.json", "metrics.json"]:
        assert (killed / "run" / name).read_bytes() == (clean / "run" / name).read_bytes(), name


def test_result_lines_of_other_settings_are_said_once_per_job(tmp_path, caplog):
    run(tmp_path, "dataset.max_test_images=2")
    caplog.set_level("INFO")
    run(tmp_path, "dataset.max_test_images=2", "matcher.nms_thr=0.6")  # same run_dir, other settings
    said = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert said == ["test: 2 per-image result(s) of other settings or older inputs ignored"]
