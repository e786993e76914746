"""Box and mask AP over seeds (`ntt summarize`: seed_stats.csv, summary.md's section, the AP-vs-shots PNG)
and their names on W&B. Every expected number is computed by hand in the comment next to it.

Tolerance: 1e-9 absolute on percent values. Inputs are fractions (0.30) that summarize turns into percent
(100 * 0.30 = 30.000000000000004): the only error is float rounding, ~1e-14; 1e-9 is far below the 0.1 the
tables print and would still catch any wrong formula.
"""

from __future__ import annotations

import json
import math
import sys

import pandas as pd
import pytest
from PIL import Image

from ntt.runner.seedstats import seed_stats
from ntt.runner.summarize import main

TOL = 1e-9


def _metrics(
    root, name, *, shots, seed, box, mask=None, dataset="coco_fewshot", setting="s1", dinov2="b", failed=()
):
    """One metrics.json (fractions, as ntt writes them); mask None = a box-only dataset (no `segm`)."""
    run = root / name
    run.mkdir(parents=True)
    m = {
        "dataset": dataset, "sam2": "a", "dinov2": dinov2, "variant": "parity", "shots": shots, "seed": seed,
        "num_images": 3, "failed_images": list(failed), "missing_images": [], "study": "st", "setting_id": setting,
        "bbox": {"AP": box, "AP50": box + 0.1, "AP75": box},
    }  # fmt: skip
    if mask is not None:
        m["segm"] = {"AP": mask, "AP50": mask + 0.1, "AP75": mask}
    (run / "metrics.json").write_text(json.dumps(m))


def test_three_seeds_mean_sample_std_ci_and_quartiles():
    s = seed_stats([30.0, 32.0, 34.0])
    assert s.n == 3 and s.mean == pytest.approx(32.0, abs=TOL)
    assert s.std == pytest.approx(2.0, abs=TOL)  # sqrt((4 + 0 + 4) / (3 - 1)): sample std, ddof=1
    assert s.ci95 == pytest.approx(2.263213, abs=1e-6)  # 3.92 / 1.7320508
    # linear interpolation: position (n-1)q = 0.5 -> 30 + 0.5 * 2; 1 -> 32; 1.5 -> 32 + 0.5 * 2
    assert (s.q25, s.median, s.q75) == pytest.approx((31.0, 32.0, 33.0), abs=TOL)


def test_quartiles_interpolate_as_numpy_percentile():
    s = seed_stats([80.0, 10.0, 40.0, 20.0])  # unsorted on purpose
    # sorted 10 20 40 80: q25 at 0.75 -> 10 + 0.75 * 10; median at 1.5 -> 20 + 0.5 * 20; q75 at 2.25 -> 40 + 0.25 * 40
    assert (s.q25, s.median, s.q75) == pytest.approx((17.5, 30.0, 50.0), abs=TOL)


def test_one_seed_has_no_std_nor_ci_and_no_metric_is_none():
    s = seed_stats([5.0, math.nan])  # a NaN (no metric in that run) is left out, not counted
    assert s.n == 1 and s.mean == 5.0 and s.std is None and s.ci95 is None
    assert (s.q25, s.median, s.q75) == (5.0, 5.0, 5.0)
    assert seed_stats([math.nan]) is None and seed_stats([]) is None


def _two_settings(root):
    # setting s1: 1 shot x 3 seeds (box 30 32 34, mask 20 22 27), 5 shots x 1 seed; s2: one run per shot count
    for seed, box, mask in ((1, 0.30, 0.20), (2, 0.32, 0.22), (3, 0.34, 0.27)):
        _metrics(root, f"s1_1_{seed}", shots=1, seed=seed, box=box, mask=mask)
    _metrics(root, "s1_5_1", shots=5, seed=1, box=0.40, mask=0.35)
    _metrics(root, "bad", shots=5, seed=2, box=0.99, mask=0.99, failed=[7])  # a failed image: in no statistic
    for shots, box in ((1, 0.10), (5, 0.15)):
        _metrics(root, f"s2_{shots}", shots=shots, seed=1, box=box, mask=box / 2, setting="s2", dinov2="c")


def test_summarize_writes_box_and_mask_statistics_side_by_side(tmp_path):
    _two_settings(tmp_path)
    assert main([str(tmp_path), "--out", str(tmp_path / "t")]) == 0
    stats = pd.read_csv(tmp_path / "t" / "seed_stats.csv")
    one = stats[(stats.setting_id == "s1") & (stats.shots == 1)].iloc[0]
    assert one["ap"] == "AP" and one["box_n"] == 3 and one["mask_n"] == 3
    assert [one[f"box_{s}"] for s in ("mean", "std", "q25", "median", "q75")] == pytest.approx(
        [32.0, 2.0, 31.0, 32.0, 33.0], abs=TOL
    )
    assert one["box_ci95"] == pytest.approx(1.96 * 2 / math.sqrt(3), abs=TOL)
    # mask 20 22 27: mean 23, std sqrt((9 + 1 + 16) / 2) = sqrt(13), quartiles 21 / 22 / 22 + 0.5 * 5
    assert one["mask_mean"] == pytest.approx(23.0, abs=TOL)
    assert one["mask_std"] == pytest.approx(math.sqrt(13), abs=TOL)
    assert one["mask_ci95"] == pytest.approx(1.96 * math.sqrt(13) / math.sqrt(3), abs=TOL)
    assert [one["mask_q25"], one["mask_median"], one["mask_q75"]] == pytest.approx([21, 22, 24.5], abs=TOL)
    five = stats[(stats.setting_id == "s1") & (stats.shots == 5)].iloc[0]
    assert five["box_n"] == 1 and five["box_mean"] == pytest.approx(40.0, abs=TOL)  # not the failed run's 99
    assert math.isnan(five["box_std"]) and math.isnan(five["box_ci95"])  # empty csv cells, not a number

    # the long and the pandas tables: the same three APs of box (bbox) and mask (segm)
    runs = pd.read_csv(tmp_path / "t" / "runs.csv")
    for iou_type in ("bbox", "segm"):
        assert {f"{iou_type}_{m}" for m in ("AP", "AP50", "AP75")} <= set(runs.columns)
    summary = pd.read_csv(tmp_path / "t" / "summary.csv")
    s1 = summary[(summary.setting_id == "s1") & (summary.shots == 1)].iloc[0]
    assert s1["segm_AP75_mean"] == pytest.approx(23.0, abs=TOL) and s1["segm_AP75_count"] == 3

    md = (tmp_path / "t" / "summary.md").read_text()
    assert "## Over seeds: box AP and mask AP side by side" in md
    assert "### coco: box AP and mask AP over seeds - a + b, parity (setting s1)" in md
    assert (
        "| coco_fewshot | 1 | 3 | 32.0 | 2.0 | 2.3 | 31.0 | 32.0 | 33.0 | 23.0 | 3.6 | 4.1 | 21.0 | 22.0 | 24.5 |"
        in md
    )
    assert (
        "| coco_fewshot | 5 | 1 | 40.0 | - | - | 40.0 | 40.0 | 40.0 | 35.0 | - | - | 35.0 | 35.0 | 35.0 |"
        in md
    )
    assert "nan" not in md.lower()


def test_box_only_dataset_shows_mask_as_na_and_voc_uses_ap50(tmp_path):
    for seed, box in ((1, 0.50), (2, 0.60)):
        _metrics(tmp_path, f"voc{seed}", dataset="voc_split1", shots=1, seed=seed, box=box)
    assert main([str(tmp_path), "--no-plot"]) == 0
    stats = pd.read_csv(tmp_path / "seed_stats.csv")
    row = stats.iloc[0]
    # VOC's headline is AP50 (box + 0.1 here): 60 and 70 -> mean 65, std sqrt(2 * 25 / 1) = 7.071
    assert row["ap"] == "AP50" and row["box_mean"] == pytest.approx(65.0, abs=TOL)
    assert row["box_std"] == pytest.approx(math.sqrt(50), abs=TOL) and row["mask_n"] == 0
    md = (tmp_path / "summary.md").read_text()
    assert (
        "| voc_split1 | 1 | 2 | 65.0 | 7.1 | 9.8 | 62.5 | 65.0 | 67.5 |" + " n/a |" * 6 in md
    )  # 1.96*7.071/1.414
    assert not list(tmp_path.glob("*.png"))  # --no-plot


def test_plot_png_is_written_decodes_and_draws_the_table_numbers(tmp_path):
    from ntt.runner.seedstats import stats_table
    from ntt.runner.shotplot import DPI, figure_size, plot_shots
    from ntt.runner.summarize import collect

    _two_settings(tmp_path)
    assert main([str(tmp_path), "--out", str(tmp_path / "t")]) == 0
    png = tmp_path / "t" / "ap_vs_shots_coco.png"
    with Image.open(png) as im:
        im.load()  # decodes the whole image
        # 11 in x (4.5 in panels + 0.25 in pad + 2 legend lines x 0.25 in), at 100 dpi
        assert figure_size(2) == (11.0, 5.25) and DPI == 100
        assert im.format == "PNG" and im.size == (1100, 525)

    table = pd.read_csv(tmp_path / "t" / "seed_stats.csv")
    data = plot_shots(stats_table(collect(tmp_path)), tmp_path / "again.png", "coco")
    assert set(data) == {"box", "mask"} and len(data["box"]) == 2  # one line per setting
    for kind in ("box", "mask"):
        for label, line in data[kind].items():
            sid = "s1" if "(setting s1)" in label else "s2"
            rows = table[table.setting_id == sid].sort_values("shots")
            assert line["shots"] == rows["shots"].tolist() == [1, 5]
            assert line["mean"] == pytest.approx(rows[f"{kind}_mean"].tolist(), abs=TOL)
            assert line["n"] == rows[f"{kind}_n"].tolist()
            ci = [None if math.isnan(c) else c for c in rows[f"{kind}_ci95"]]
            assert [c is None for c in line["ci95"]] == [c is None for c in ci]
            assert [c for c in line["ci95"] if c] == pytest.approx([c for c in ci if c], abs=TOL)
    s1 = next(v for k, v in data["box"].items() if "(setting s1)" in k)
    assert s1["mean"] == pytest.approx([32.0, 40.0], abs=TOL) and s1["ci95"][1] is None


def test_summarize_without_matplotlib_is_one_line_naming_no_plot(tmp_path, monkeypatch, caplog):
    from ntt import cli

    _metrics(tmp_path, "r", shots=1, seed=1, box=0.3, mask=0.2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert cli.main(["summarize", str(tmp_path)]) == 2
    (error,) = [r for r in caplog.records if r.levelname == "ERROR"]  # the one line the user sees
    assert "the plot needs matplotlib" in error.getMessage() and "--no-plot" in error.getMessage()
    assert error.exc_info is None  # no traceback
    assert (tmp_path / "seed_stats.csv").is_file() and not list(tmp_path.glob("*.png"))
    assert cli.main(["summarize", str(tmp_path), "--no-plot"]) == 0


def test_wandb_names_box_and_mask_ap_in_percent():
    from ntt.runner.loggers import percent_aps

    got = percent_aps({"bbox": {"AP": 0.25, "AP50": -1.0}, "segm": {"AP": 0.5, "AP75": 0.125}, "shots": 1})
    assert got == {"box/AP": 25.0, "mask/AP": 50.0, "mask/AP75": 12.5}  # -1 (no ground truth) left out
