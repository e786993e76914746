"""`ntt summarize`, the `ntt` command and the W&B logger (offline/disabled: no network)."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from conftest import REPO


def _metrics(root, shots, seed, ap, note=False):
    run = root / "coco_fewshot" / "a+b" / f"{shots}shot_seed{seed}" / "parity"
    run.mkdir(parents=True)
    m = {
        "dataset": "coco_fewshot",
        "sam2": "a",
        "dinov2": "b",
        "variant": "parity",
        "shots": shots,
        "seed": seed,
        "num_images": 10,
        "bbox": {"AP": ap, "AP50": ap, "AP75": ap},
        "segm": {"AP": ap / 2, "AP50": ap},
    }
    if note:
        m["note"] = "random weights"
    (run / "metrics.json").write_text(json.dumps(m))


def test_summarize_mean_std_over_seeds(tmp_path):
    from ntt.runner.summarize import main

    _metrics(tmp_path, 1, 1, 0.20)
    _metrics(tmp_path, 1, 2, 0.30)
    _metrics(tmp_path, 5, 1, 0.40)
    assert main([str(tmp_path), "--out", str(tmp_path / "t")]) == 0
    table = pd.read_csv(tmp_path / "t" / "summary.csv")
    one = table[table.shots == 1].iloc[0]
    assert one["bbox_AP_mean"] == pytest.approx(25.0)
    assert one["bbox_AP_std"] == pytest.approx(7.0710678, rel=1e-6)  # sample std of 20 and 30
    assert one["bbox_AP_count"] == 2 and one["segm_AP_mean"] == pytest.approx(12.5)
    assert len(pd.read_csv(tmp_path / "t" / "runs.csv")) == 3
    assert (tmp_path / "t" / "summary.md").read_text().strip()


def test_lvis_runs_of_the_official_metric_are_tabulated_apart_with_their_frequency_groups(tmp_path):
    from ntt.runner.summarize import main

    def lvis_run(seed, backend, ap):
        run = tmp_path / backend / f"10shot_seed{seed}"
        run.mkdir(parents=True)
        m = {
            "dataset": "lvis",
            "sam2": "a",
            "dinov2": "b",
            "variant": "parity",
            "shots": 10,
            "seed": seed,
            "num_images": 5,
            "bbox": {"AP": ap, "AP50": ap, "AP75": ap},
            "segm": {"AP": ap, "AP50": ap},
        }
        if backend == "lvis":
            m["backend"] = "lvis"
            for t in ("bbox", "segm"):
                m[t].update(APr=ap / 4, APc=ap / 2, APf=ap)
        (run / "metrics.json").write_text(json.dumps(m))  # fmt: skip

    lvis_run(42, "pycocotools", 0.10)
    lvis_run(42, "lvis", 0.20)
    lvis_run(43, "lvis", 0.40)
    assert main([str(tmp_path), "--out", str(tmp_path / "t"), "--no-plot"]) == 0
    text = (tmp_path / "t" / "summary.md").read_text()
    assert "lvis: bbox AP (pycocotools, NOT the official LVIS metric)" in text
    assert "lvis (official LVIS metric): bbox APr (official LVIS metric)" in text
    runs = pd.read_csv(tmp_path / "t" / "runs.csv")
    official = runs[runs.benchmark == "lvis_official"].sort_values("seed")
    assert list(official.bbox_APr) == pytest.approx([5.0, 10.0]) and list(official.segm_APf) == pytest.approx(
        [20.0, 40.0]
    )
    assert list(runs[runs.benchmark == "lvis"].bbox_AP) == pytest.approx([10.0])  # never averaged together


def test_summarize_flags_random_weight_runs(tmp_path):
    from ntt.runner.summarize import main

    _metrics(tmp_path, 1, 1, 0.0, note=True)
    assert main([str(tmp_path)]) == 0
    assert "plumbing and speed only" in (tmp_path / "summary.md").read_text()


def test_summarize_empty_folder_fails(tmp_path):
    from ntt import cli

    assert cli.main(["summarize", str(tmp_path)]) == 2  # a user error: one line, the one exit status


def test_ntt_command_help_and_download_list():
    out = subprocess.run([sys.executable, "-m", "ntt", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "ntt download" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "ntt", "download", "--list"], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0 and "sam2_hiera_l" in out.stdout and "dinov2_vitl14" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "ntt", "bogus"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2


@pytest.mark.parametrize(
    "cmd", ["study", "download", "summarize", "synth", "segment", "bank", "visualize", "prepare", "report"]
)
def test_every_ntt_subcommand_is_dispatched(cmd, capsys):
    """Each subcommand the `ntt` usage lists reaches its own parser (its --help), not the top-level usage."""
    from ntt import cli

    assert cmd in cli.COMMANDS and f"ntt {cmd}" in cli.__doc__
    with pytest.raises(SystemExit) as exit_info:
        code = cli.main([cmd, "--help"])
        raise SystemExit(code)
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "usage:" in out and "ntt run [hydra overrides]" not in out, out[:300]


def test_wandb_logger_disabled_mode_logs_without_network(tmp_path):
    from ntt.runner.loggers import NullLogger, build_logger

    assert isinstance(build_logger(kind="wandb", is_main=False), NullLogger)
    logger = build_logger(kind="wandb", mode="disabled", name="t", run_dir=str(tmp_path))
    try:
        logger.log_config({"shots": 1})
        logger.log_metrics({"bbox": {"AP": 0.5}, "per_class": [1, 2]})
    finally:
        logger.finish()
    with pytest.raises(ValueError, match="logger.kind"):
        build_logger(kind="tensorboard")
