"""Bad inputs give one clear message before any work (docs/bad_inputs.md lists them with these tests).

Tiny RANDOM backbones on synthetic data (plumbing only). Most checks stop in the preflight, so they are fast.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from helpers_pipeline import compose_smoke, run_smoke

from ntt.utils.errors import RunLockedError, UserError

SMALL = ["dataset=synthetic", "dataset.synthetic.num_images=9", "dataset.max_test_images=1"]


def compose_cfg(tmp_path: Path, *overrides: str):
    return compose_smoke(tmp_path, *overrides, small=tuple(SMALL))


def run(tmp_path: Path, *overrides: str):
    return run_smoke(tmp_path, *overrides, small=tuple(SMALL))


@pytest.fixture
def data(tmp_path) -> Path:
    """The synthetic dataset's folder (generated once, no stage run)."""
    from ntt.data.synthetic import generate_synthetic_dataset

    root = tmp_path / "datasets" / "synthetic_n9_s0"
    generate_synthetic_dataset(root, num_images=9, seed=0)
    return root


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_cuda_without_cuda_is_refused_before_any_stage(tmp_path, data):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match=r"device=cuda but this machine has no usable CUDA device"):
        run(tmp_path, "device=cuda")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_empty_polygon_in_a_reference_names_file_image_and_annotation(tmp_path, data):
    refs = tmp_path / "refs.json"

    def pick(d):  # one reference per class, the first one's polygon emptied
        d["annotations"] = [next(a for a in d["annotations"] if a["category_id"] == c) for c in (1, 2, 3, 4)]
        d["annotations"][0]["segmentation"] = [[]]

    train = json.loads((data / "train.json").read_text())
    pick(train)
    bad_id = train["annotations"][0]["id"]
    img_id = train["annotations"][0]["image_id"]
    refs.write_text(json.dumps(train))
    # the pool json carries the same broken annotation (the refs point into it)
    _edit(
        data / "train.json",
        lambda d: [a.update(segmentation=[[]]) for a in d["annotations"] if a["id"] == bad_id],
    )
    with pytest.raises(
        UserError, match=rf"train.json:\n  image {img_id} annotation {bad_id}: empty or degenerate"
    ):
        run(
            tmp_path,
            f"dataset.refs_file={refs}",
            "dataset.refs_format=coco",
            "shots=1",
            "stages=[sample_refs,fill_memory]",
        )


def test_not_enough_shots_lists_every_short_class_with_its_count(tmp_path, data):
    with pytest.raises(UserError, match=r"shots=5 .*\n  class 2 \(square\): 4 usable"):
        run(tmp_path, "shots=5")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_unknown_class_name_and_unparseable_json(tmp_path, data):
    with pytest.raises(UserError, match=r"dataset.ref_json: .*class names \['hexagon'\].*available names"):
        run(tmp_path, "dataset.class_names=[circle,hexagon]")
    (data / "test.json").write_text("{ not json")
    with pytest.raises(UserError, match=r"dataset.test_json: .*test.json is not valid json"):
        run(tmp_path)


def test_empty_test_set_is_an_error_not_ap_minus_one(tmp_path, data):
    _edit(data / "test.json", lambda d: d.update(images=[], annotations=[]))
    with pytest.raises(UserError, match=r"the test set is empty: .*test.json has 0 image"):
        run(tmp_path)


def test_second_run_in_the_same_directory_is_refused_with_the_pid(tmp_path, data):
    from ntt.runner.runlock import RunLock

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".ntt.lock").write_text("pid 999999999 on nowhere\n")  # stale: nobody holds it
    with RunLock(tmp_path / "run"):
        assert f"pid {os.getpid()}" in (tmp_path / "run" / ".ntt.lock").read_text()
        with pytest.raises(RunLockedError, match=rf"in use by another ntt run \(pid {os.getpid()} on"):
            run(tmp_path)
    with RunLock(tmp_path / "run"):  # released: can be taken again
        pass


def test_artifacts_follow_the_umask(tmp_path):
    from ntt.refs import save_refs
    from ntt.utils.files import write_text_atomic

    old = os.umask(0o022)
    try:
        save_refs(tmp_path / "refs.json", {}, {})
        write_text_atomic(tmp_path / "x.json", "{}")
    finally:
        os.umask(old)
    for name in ("refs.json", "x.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def _cli(tmp_path: Path, *args: str, flags: tuple[str, ...] = (), env: dict | None = None):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ntt",
            "run",
            *flags,
            "debug=smoke",
            f"paths.output_dir={tmp_path}",
            *SMALL,
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        # no traceback unless the line asks for it (an in-process `-v` of another test may have set NTT_TRACEBACK)
        env={**os.environ, "HYDRA_FULL_ERROR": "0", "NTT_TRACEBACK": "0", **(env or {})},
        timeout=300,
    )


def test_cli_user_error_is_one_message_without_traceback_and_v_shows_it(tmp_path):
    out = _cli(tmp_path, "dataset.ref_json=/nowhere/train.json")
    assert out.returncode == 2
    assert "dataset.ref_json=/nowhere/train.json not found" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr
    verbose = _cli(tmp_path, "dataset.ref_json=/nowhere/train.json", "-v")
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr
    assert "multirun" not in verbose.stderr  # a single run's failure is not listed as a multirun job


def test_bad_io_setting_is_one_message_before_any_stage(tmp_path):
    for arg, msg in (("io.num_workers=-2", "io.num_workers=-2"), ("io.write_queue=0", "io.write_queue=0")):
        out = _cli(tmp_path, arg)
        assert out.returncode == 2, out.stderr[-2000:]
        assert msg in out.stderr + out.stdout and "Traceback" not in out.stderr + out.stdout
        assert not list(tmp_path.rglob("stage_*.json"))  # refused before the first stage


def test_multirun_lists_every_failed_job(tmp_path):
    out = _cli(tmp_path, "dataset.ref_json=/nowhere/a.json,/nowhere/b.json", flags=("--multirun",))
    assert out.returncode != 0
    assert "2 job(s) of the multirun failed" in out.stderr
    assert "/nowhere/a.json not found" in out.stderr and "/nowhere/b.json not found" in out.stderr


@pytest.mark.slow  # ~20 s busy; the same report through the basic launcher: test_multirun_lists_every_failed_job
def test_multirun_on_the_submitit_launcher_lists_every_failed_job(tmp_path):
    """Jobs of Hydra's submitit launcher (the SLURM path, here its local twin) run in other processes: they
    report their failures through a folder under the sweep dir, which the launching process reads and removes."""
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed"
    )
    out = _cli(
        tmp_path,
        "dataset.ref_json=/nowhere/a.json,/nowhere/b.json",
        "hydra/launcher=slurm_local",
        "hydra.launcher.timeout_min=5",
        flags=("--multirun",),
    )
    assert out.returncode != 0
    assert "2 job(s) of the multirun failed" in out.stderr, out.stderr[-2000:]
    assert "/nowhere/a.json not found" in out.stderr and "/nowhere/b.json not found" in out.stderr
    assert not (tmp_path / ".ntt_multirun").exists()


def _ntt(caplog, *argv: str) -> tuple[int, list[str]]:
    """`ntt <argv>` in this process: its exit status and the ERROR lines it logged."""
    from ntt.cli import main

    caplog.clear()
    with caplog.at_level(logging.INFO):
        status = main(list(argv))
    return status, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["shots=abc"], "shots=abc: expected a whole number"),
        (["+shot=3"], "shot=3: `shot` is not a config key (did you mean shots?)"),
        (["matcher.nms_thres=0.6"], "`matcher.nms_thres` is not a config key (did you mean matcher.nms_thr?)"),
        (["paper=nope"], "paper=nope: `paper` has no option `nope`; its options: coco_30shot"),
        (["foo=1"], "foo=1: `foo` is not a config key"),
        (["-m", "shots=1,abc"], "shots=abc: expected a whole number"),  # every job of a multirun
    ],
)  # fmt: skip
def test_bad_config_on_the_line_is_one_line_and_nothing_is_written(tmp_path, caplog, argv, message):
    out = tmp_path / "out"
    status, errors = _ntt(caplog, "run", *argv, "debug=smoke", f"paths.output_dir={out}", *SMALL)
    assert status == 2 and len(errors) == 1 and message in errors[0] and "\n" not in errors[0], errors
    assert not out.exists()  # no run directory, no config.yaml, no generated dataset


def test_study_refuses_a_bad_job_before_any_job_runs(tmp_path, caplog):
    out = tmp_path / "out"
    status, errors = _ntt(caplog, "study", "debug=smoke", f"paths.output_dir={out}", *SMALL, "seed=1,x")
    assert status == 2 and errors == ["seed=x: expected a whole number"]
    assert not out.exists()


def test_bad_config_through_the_cli_has_no_traceback_and_leaves_no_folder(tmp_path):
    """Hydra made `abcshot_seed33/` and printed its own error (exit 1) before ntt saw the config."""
    out = _cli(tmp_path, "shots=abc")
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if "[ERROR]" in ln]
    assert len(errors) == 1 and errors[0].endswith("shots=abc: expected a whole number")
    assert "Traceback" not in out.stderr + out.stdout and not list(tmp_path.iterdir())


def test_unwritable_output_folder_is_refused_before_hydra_makes_it(tmp_path, caplog):
    (tmp_path / "file").write_text("")
    status, errors = _ntt(
        caplog, "run", "debug=smoke", f"paths.output_dir={tmp_path / 'file' / 'out'}", *SMALL
    )
    assert status == 2 and f"{tmp_path / 'file'} is a file, not a folder" in errors[0]
    assert "Point paths.output_dir (env NTT_OUTPUT) at a folder" in errors[0]
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders: the permission case needs another user")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    status, errors = _ntt(caplog, "run", "debug=smoke", f"paths.output_dir={ro / 'out'}", *SMALL)
    assert status == 2 and f"{ro} is not writable by this user" in errors[0]
    assert not (ro / "out").exists()


def test_image_records_without_sizes_are_refused_before_any_stage(tmp_path, data):
    def drop_sizes(d, which):
        for im in d["images"]:
            if which(im):
                im.pop("width"), im.pop("height")

    _edit(data / "test.json", lambda d: drop_sizes(d, lambda im: True))
    with pytest.raises(UserError, match=r"dataset.test_json=.*test.json: 1 evaluated image record\(s\) cannot be "
                       r"used:\n  image \d+ \(images/\d+.png\) has no height, width\nImage sizes come from the json"):  # fmt: skip
        run(tmp_path)
    assert not (tmp_path / "run" / "refs.json").exists()  # the preflight refused it (it was 3 stages later)
    holder = json.loads((data / "train.json").read_text())["annotations"][0]["image_id"]
    _edit(data / "train.json", lambda d: drop_sizes(d, lambda im: im["id"] == holder))
    with pytest.raises(
        UserError, match=rf"1 reference candidate image record\(s\) cannot be used:\n  image {holder} "
    ):
        run(tmp_path)


def test_box_only_references_point_at_the_commands_that_make_masks(tmp_path, data):
    def strip(d, which):
        for a in d["annotations"]:
            if which(a):
                a.pop("segmentation")

    train = data / "train.json"
    _edit(train, lambda d: strip(d, lambda a: a["category_id"] == 1))
    with pytest.raises(UserError, match=r"reference annotation\(s\) of .*train.json have no mask") as err:
        run(tmp_path, "shots=1")  # the sampled reference of class 1 has none: refused before encoding
    msg = str(err.value)
    assert (
        f"ntt prepare masks {train} {data}" in msg
        and f"ntt segment --refs {train} --ref-images {data}" in msg
    )
    assert not (tmp_path / "run" / "memory.pt").exists()
    _edit(
        train, lambda d: strip(d, lambda a: "segmentation" in a)
    )  # a box-only pool: refused in the preflight
    (tmp_path / "run" / "refs.json").unlink()
    with pytest.raises(UserError, match="ntt prepare masks"):
        run(tmp_path, "shots=1")
    assert not (tmp_path / "run" / "refs.json").exists()


def test_stages_hint_names_the_whole_chain_at_once(tmp_path, data):
    from ntt.runner import StageError

    chain = r"stages=\[sample_refs,fill_memory,postprocess_memory,test\] \(the default\)"
    with pytest.raises(StageError, match=rf"stage test needs the artifacts of stages sample_refs, fill_memory, "
                       rf"postprocess_memory \(.*refs.json is missing\): use {chain}"):  # fmt: skip
        run(tmp_path, "stages=[test]")
    with pytest.raises(StageError, match=r"use stages=\[sample_refs,fill_memory,postprocess_memory\],"):
        run(tmp_path, "stages=[postprocess_memory]")


def test_several_processes_prefix_every_line_with_the_rank_and_only_rank_0_logs_info(monkeypatch):
    from ntt.utils.compose import compose
    from ntt.utils.console import EVERY_RANK, LOG_FORMAT, RankFilter

    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Keep()
    handler.setFormatter(logging.Formatter("%(rank)s%(levelname)s %(message)s"))
    handler.addFilter(RankFilter())
    logger = logging.getLogger("ntt.test_rank")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for rank, world in (("0", "1"), ("0", "2"), ("1", "2")):
            monkeypatch.setenv("WORLD_SIZE", world)
            monkeypatch.setenv("RANK", rank)
            logger.warning("w")
            logger.info("i")
            logger.info("mine", extra=EVERY_RANK)  # a process's own share: every rank says it
    finally:
        logger.removeHandler(handler)
    assert lines == ["WARNING w", "INFO i", "INFO mine", "[rank 0]WARNING w", "[rank 0]INFO i", "[rank 0]INFO mine",
                     "[rank 1]WARNING w", "[rank 1]INFO mine"]  # fmt: skip
    # Hydra's job logging (`ntt run`) uses the same format and filter on both of its handlers
    logging_cfg = compose([], return_hydra_config=True).hydra.job_logging
    assert logging_cfg.formatters.simple.format == LOG_FORMAT
    assert logging_cfg.filters.rank["()"] == "ntt.utils.console.RankFilter"
    assert list(logging_cfg.handlers.console.filters) == list(logging_cfg.handlers.file.filters) == ["rank"]
