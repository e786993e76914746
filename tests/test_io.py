"""The data path (ntt/data/prefetch.py, ntt/runner/writer.py, ntt/utils/timing.py): image loading in worker processes
and result writing in a background thread give the same bytes as doing both in the loop; failures stay
per image; the writer drains; the timing file says where the time went.

Pipeline runs use tiny RANDOM backbones (plumbing only, never accuracy).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from helpers_pipeline import RUN_ARTIFACTS, run_smoke
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from ntt.data.images import load_test_image
from ntt.data.prefetch import ImageSpec, prefetch_images, resolve_num_workers
from ntt.runner.writer import ResultWriter

SYNTH = ("dataset=synthetic", "dataset.synthetic.num_images=9", "dataset.max_test_images=3")
SYNC = ("io.num_workers=0", "io.async_write=false")
ASYNC = ("io.num_workers=2", "io.async_write=true", "io.write_queue=1")


def _write_images(folder: Path) -> list[ImageSpec]:
    """Three small images (an RGB JPEG, a palette PNG, a JPEG with an EXIF rotation) and a corrupt one."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    specs = []
    for k, (name, mode) in enumerate([("a.jpg", "RGB"), ("b.png", "P"), ("c.jpg", "RGB")]):
        arr = (torch.rand(30 + k, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
        img = Image.fromarray(arr).convert(mode)
        kwargs = {}
        if name == "c.jpg":
            exif = Image.Exif()
            exif[0x0112] = 6  # a rotation the benchmark path ignores (and warns about)
            kwargs["exif"] = exif
        img.save(folder / name, **kwargs)
        specs.append(ImageSpec(k + 1, str(folder / name), 30 + k, 40))
    (folder / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    specs.insert(1, ImageSpec(9, str(folder / "bad.jpg"), 30, 40))
    return specs


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_gives_the_loop_s_tensors_in_order_and_failures_as_items(tmp_path, workers, caplog):
    from ntt.data import images

    specs = _write_images(tmp_path / f"img{workers}")
    images._warned_exif.clear()
    caplog.set_level(logging.WARNING)
    items = list(prefetch_images(specs, device="cpu", num_workers=workers, prefetch_factor=1, size=64))
    # the EXIF warning logged in a worker reaches this process's loggers (once)
    exif = [r for r in caplog.records if "EXIF orientation 6" in r.getMessage()]
    assert len(exif) == 1 and exif[0].name == "ntt.data.images"
    assert [i.img_id for i in items] == [1, 9, 2, 3]
    for spec, item in zip(specs, items):
        if spec.img_id == 9:
            assert item.image is None and item.error.startswith("ImageError: cannot read image")
            assert spec.path in item.error and "Traceback" in item.traceback
            with pytest.raises(OSError, match="bad.jpg"):
                item.raise_error()  # the original exception came back from the worker (fail_fast)
            continue
        assert item.error is None and item.wait_s >= 0
        want = load_test_image(spec.path, 64, height=spec.height, width=spec.width)
        assert item.image.dtype == want.dtype and torch.equal(item.image, want)  # same bytes in a worker


def test_num_workers_auto_and_bad_values():
    assert resolve_num_workers("auto", "cuda:1") == 2 and resolve_num_workers("auto", "cpu") == 0
    assert resolve_num_workers(3, "cpu") == 3
    with pytest.raises(ValueError, match="io.num_workers"):
        resolve_num_workers(-1, "cpu")


@pytest.mark.parametrize("async_write", [False, True])
def test_writer_keeps_order_turns_encoding_errors_into_failures_and_drains(tmp_path, async_write):
    out = tmp_path / "lines.jsonl"

    def slow(k):
        def make():
            time.sleep(0.05)
            if k == 2:
                raise ValueError("cannot encode")
            return {"image_id": k, "ok": True}

        return make

    def failed(k):
        return lambda exc: {"image_id": k, "ok": False, "error": str(exc)}

    with pytest.raises(KeyboardInterrupt), open(out, "a") as sink:
        with ResultWriter(async_write=async_write, depth=2) as writer:
            for k in range(5):
                writer.submit(sink, slow(k), failed(k))
            raise KeyboardInterrupt  # the loop stops with jobs still queued: they are written first
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["image_id"] for x in lines] == [0, 1, 2, 3, 4]
    assert lines[2] == {"image_id": 2, "ok": False, "error": "cannot encode"}
    assert not any(t.name == "ntt-result-writer" for t in threading.enumerate())


def test_writer_fail_fast_raises_in_the_loop(tmp_path):
    def boom():
        raise ValueError("cannot encode")

    with open(tmp_path / "x.jsonl", "a") as sink:
        with pytest.raises(ValueError, match="cannot encode"):
            with ResultWriter(async_write=True, depth=1, fail_fast=True) as writer:
                writer.submit(sink, boom, lambda exc: {})
                writer.close()


def _compose(*overrides: str):
    """A smoke config with its own run directory (derived from the config, as `ntt study` jobs get)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="main", overrides=["debug=smoke", "device=cpu", *SYNTH, *overrides])


def _run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def _artifacts(run_dir: Path) -> dict[str, bytes]:
    names = [*RUN_ARTIFACTS, "predictions/rank0.jsonl"]
    return {n: (run_dir / n).read_bytes() for n in names}


def test_workers_and_async_writing_give_the_same_bytes_and_a_timing_file(tmp_path):
    from ntt.data.synthetic import generate_synthetic_dataset

    root = tmp_path / "data"
    generate_synthetic_dataset(root, num_images=9, seed=0)
    run_smoke(tmp_path / "sync", *SYNC, f"dataset.root={root}", small=SYNTH)
    run_smoke(tmp_path / "async", *ASYNC, f"dataset.root={root}", small=SYNTH)
    a, b = _artifacts(_run_dir(tmp_path / "sync")), _artifacts(_run_dir(tmp_path / "async"))
    for name in a:
        assert a[name] == b[name], f"{name} differs between io settings"
    timing = json.loads((_run_dir(tmp_path / "async") / "predictions" / "timing_rank0.json").read_text())
    sections = timing["sections_seconds_per_image"]
    assert set(sections) == {"load", "dinov2", "sam2_encoder", "sam2_decoder", "write", "other"}
    assert all(v >= 0 for v in sections.values()) and sections["sam2_decoder"] > 0
    # the sections split the loop's time: they sum to the per-image seconds (+ the writer's final drain)
    assert sum(sections.values()) == pytest.approx(timing["seconds_per_image"], rel=0.25)
    assert 0 < timing["outside_models_fraction"] < 1
    assert timing["io"] == {"num_workers": 2, "prefetch_factor": 2, "async_write": True, "write_queue": 1}


def test_a_corrupt_image_among_good_ones_is_its_own_failure_with_workers(tmp_path):
    from ntt.data.synthetic import generate_synthetic_dataset
    from ntt.runner import StageError

    root = tmp_path / "data"
    generate_synthetic_dataset(root, num_images=9, seed=0)
    (root / "images" / "000006.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(StageError, match="1 image\\(s\\) failed"):
        run_smoke(tmp_path, *ASYNC, f"dataset.root={root}", small=SYNTH)
    run_dir = _run_dir(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["failed_images"] == [6] and metrics["num_detections"] > 0
    lines = [json.loads(x) for x in (run_dir / "predictions" / "rank0.jsonl").read_text().splitlines()]
    assert [x["image_id"] for x in lines] == [3, 6, 9] and [x["ok"] for x in lines] == [True, False, True]
    bad = lines[1]
    assert (
        bad["file"] == str(root / "images" / "000006.png")
        and str(root / "images" / "000006.png") in bad["error"]
    )
    assert bad["error"].startswith("ImageError") and "Traceback" in bad["traceback"]


def test_an_interrupted_loop_still_writes_every_finished_image(tmp_path, monkeypatch):
    """KeyboardInterrupt during image 3: images 1 and 2 (queued in the writer, slow to encode) are on disk."""
    from ntt import inference
    from ntt.runner import testloop

    real_infer, real_line = inference.propose_image, testloop.success_line
    calls = {"n": 0}

    def infer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_infer(*args, **kwargs)

    def slow_line(*args, **kwargs):
        time.sleep(0.3)
        return real_line(*args, **kwargs)

    monkeypatch.setattr(inference, "propose_image", infer)
    monkeypatch.setattr(testloop, "success_line", slow_line)
    with pytest.raises(KeyboardInterrupt):
        run_smoke(tmp_path, *ASYNC, small=SYNTH)
    lines = (_run_dir(tmp_path) / "predictions" / "rank0.jsonl").read_text().splitlines()
    assert [json.loads(x)["image_id"] for x in lines] == [3, 6]


@pytest.mark.slow  # ~25 s busy; workers + async bytes: test_workers_and_async_writing_give_the_same_bytes...; study pass bytes: test_study.py
def test_study_pass_gives_the_same_bytes_with_workers_and_async_writing(tmp_path):
    from ntt.data.synthetic import generate_synthetic_dataset
    from ntt.runner import run_jobs

    root = tmp_path / "data"
    generate_synthetic_dataset(root, num_images=9, seed=0)
    dirs = {}
    for name, io in (("sync", SYNC), ("async", ASYNC)):
        cfgs = [
            _compose(f"paths.output_dir={tmp_path / name}", f"dataset.root={root}", f"shots={k}", *io)
            for k in (1, 2)
        ]
        banks = run_jobs(cfgs)
        assert [b.error for b in banks] == [None, None]
        dirs[name] = [Path(str(b.cfg.run_dir)) for b in banks]
        timing = json.loads((dirs[name][0] / "predictions" / "timing_rank0.json").read_text())
        assert (
            timing["study_pass"]["banks"] == 2
            and "sam2_decoder" in timing["study_pass"]["sections_seconds_per_image"]
        )
    for sync_dir, async_dir in zip(dirs["sync"], dirs["async"]):
        assert sync_dir.relative_to(tmp_path / "sync") == async_dir.relative_to(tmp_path / "async")
        a, b = _artifacts(sync_dir), _artifacts(async_dir)
        for name in a:
            assert a[name] == b[name], f"{name} differs between io settings ({async_dir})"
