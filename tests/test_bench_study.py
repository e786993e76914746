"""`python -m ntt.tools.study_ratio`: the N-bank study ratio benchmark (RANDOM weights: plumbing and timings only)."""

from __future__ import annotations

import json

import pytest

from ntt.tools import study_ratio as bench_study

SINGLE_LOG = """[2026-11-29 15:31:44,832][ntt.runner.lifecycle][INFO] stage test ... (predictions.json does not exist)
[2026-11-29 15:32:16,216][ntt.runner.lifecycle][INFO] stage test done in 31.4 s
"""
STUDY_LOG = """[2026-11-29 15:33:19,454][ntt.runner.lifecycle][INFO] stage postprocess_memory done in 0.0 s
[2026-11-29 15:33:19,458][ntt.runner.testloop][INFO] study pass 1/1: 12 image(s) for 59 memory bank(s), 12 for this process
study: 100%|##########| 12/12 [00:32<00:00,  2.69s/img]
[2026-11-29 15:33:51,869][ntt.runner.lifecycle][INFO] stage test done in 58.7 s
[2026-11-29 15:33:54,406][ntt.runner.lifecycle][INFO] stage test done in 35.0 s
[2026-11-29 15:33:54,425][ntt.runner.testloop][INFO] study: ok     /tmp/x
"""


def test_test_stage_times_are_read_from_the_logs():
    assert bench_study.single_test_seconds(SINGLE_LOG) == 31.4
    # from the pass's first line to the last bank's evaluation, not any bank's own "done in"
    assert bench_study.study_pass_seconds(STUDY_LOG) == pytest.approx(34.948, abs=1e-3)
    assert bench_study.single_test_seconds("nothing") is None
    assert bench_study.study_pass_seconds(SINGLE_LOG) is None  # no study pass line


def test_clean_test_outputs_keeps_the_memory_stages(tmp_path):
    run = tmp_path / "synthetic" / "m" / "2shot_seed1" / "smoke-abc"
    (run / "predictions").mkdir(parents=True)
    (run / "predictions" / "rank0.jsonl").write_text("{}\n")
    keep = ["refs.json", "memory.pt", "memory_postprocessed.pt", "stage_fill_memory.json", "config.yaml"]
    for name in keep + ["predictions.json", "metrics.json", "stage_test.json"]:
        (run / name).write_text("x")
    assert bench_study.clean_test_outputs(tmp_path) == 4
    assert sorted(p.name for p in run.iterdir()) == sorted(keep)


def test_quick_settings():
    args = bench_study.parse_args(["--quick"])
    assert (args.shots, args.seeds, args.images, args.rounds) == ("1,2", 2, 2, 1)
    assert bench_study.parse_args([]).shots == "1,2,3,5,10,30"


@pytest.mark.slow
def test_quick_run_writes_the_ratios(tmp_path):
    out = bench_study.main(["--quick", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    rec = json.loads(out.read_text())
    assert rec["WARNING"].startswith("RANDOM WEIGHTS") and rec["settings"]["banks"] == 4
    for name in ("single", "study"):
        assert rec["rounds"][0][name]["test_s"] > 0 and rec["rounds"][0][name]["wall_s"] > 0
    assert rec["ratio_study_over_single"]["test_stage"] > 0
    # the study's banks landed in their own run dirs; the single job is one of them
    assert len(list((tmp_path / "work" / "outputs").rglob("metrics.json"))) == 4
