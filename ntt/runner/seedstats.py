"""Statistics over the seeds of one setting, box AP and mask AP side by side (`ntt summarize`).

Per setting (``setting_id``: never two settings averaged together), dataset and shot count: the number of
seeds n, the mean, the sample standard deviation, the 95% confidence half-width of the mean and the
quartiles, of the box AP (COCOeval ``iouType="bbox"``, metrics.json's ``bbox``) and of the mask AP
(``iouType="segm"``, metrics.json's ``segm``), in percent.

Conventions, and where they come from:

* std is the SAMPLE standard deviation (ddof=1, divides by n - 1), as ntt's other tables (pandas' ``std``)
  and as the ``mean +- std`` of the authors' COCO seed table (docs/method.md §8.2: their 2-shot box AP
  29.5 +- 2.0 over 10 seeds is the sample std 1.97; the population std would be 1.87).
  TFA (Wang et al., "Frustratingly Simple Few-Shot Object Detection", ICML 2020), whose seed protocol the
  few-shot detection literature follows, computes its std and CI in ``tools/aggregate_seeds.py`` with
  ``np.std``, the POPULATION std (ddof=0): a TFA-style number is ours times sqrt((n - 1) / n) (0.949 for
  10 seeds, 0.983 for 30).
* 95% CI half-width = 1.96 * std / sqrt(n) (TFA's normal approximation, with the sample std): the mean's
  interval is mean +- ci95. With n = 1 there is neither std nor CI (None, shown as ``-``), never NaN.
* quartiles (25 / 50 / 75) interpolate linearly between order statistics (``np.percentile``'s default, as
  TFA; pandas' ``quantile`` gives the same); with n = 1 all three are the one value.

Rows come from `ntt.runner.summarize.collect` (valid runs only: a run with failed or missing images is
in no statistic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# metric column of `collect` -> the name the tables, the csv and the plot give it
KINDS = (("bbox", "box"), ("segm", "mask"))
STATS = ("n", "mean", "std", "ci95", "q25", "median", "q75")
Z95 = 1.96  # two-sided 95% of the normal distribution (TFA's CI)
# the AP each benchmark's paper reports (VOC: AP50, its nAP50); every other one: AP over IoU 0.5:0.95
HEADLINE_AP = {"voc": "AP50"}
GROUP = ["benchmark", "sam2", "dinov2", "variant", "setting_id", "random_weights"]


@dataclass(frozen=True)
class SeedStats:
    """n, mean, sample std, 95% CI half-width and quartiles of one metric over seeds (percent)."""

    n: int
    mean: float
    std: float | None  # None when n == 1
    ci95: float | None  # None when n == 1
    q25: float
    median: float
    q75: float


def _percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default `linear` method)."""
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def seed_stats(values) -> SeedStats | None:
    """The statistics of the finite `values` (NaN = no metric for that run: left out); None if none is left.

    Args:
        values: one number per seed (percent), e.g. ``[30, 32, 34]`` -> n 3, mean 32, std 2,
            ci95 1.96 * 2 / sqrt(3) = 2.263, quartiles 31 / 32 / 33.
    """
    vals = sorted(float(v) for v in values if v is not None and not math.isnan(float(v)))
    if not vals:
        return None
    n = len(vals)
    mean = sum(vals) / n
    std = ci95 = None
    if n > 1:
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        ci95 = Z95 * std / math.sqrt(n)
    return SeedStats(n, mean, std, ci95, *(_percentile(vals, q) for q in (25, 50, 75)))


def headline_ap(benchmark: str) -> str:
    """`AP` or `AP50`: the average precision the benchmark's papers report."""
    return HEADLINE_AP.get(benchmark, "AP")


def stats_table(runs):
    """One row per setting, dataset and shot count: box and mask statistics side by side.

    Args:
        runs: the rows of `ntt.runner.summarize.collect` (only the valid ones are used).

    Returns:
        A DataFrame with the setting columns (``benchmark, dataset, sam2, dinov2, variant, setting,
        setting_id, random_weights, shots``), ``ap`` (``AP`` or ``AP50``, `headline_ap`), then
        ``box_<stat>`` and ``mask_<stat>`` for every stat of `STATS` (n = 0 and empty cells where a
        metric is missing, e.g. mask AP of a box-only dataset).
    """
    import pandas as pd

    valid = runs[runs["valid"]] if "valid" in runs else runs
    rows = []
    if valid.empty:
        return pd.DataFrame()
    keys = GROUP + ["dataset", "shots"]
    for key, group in valid.groupby(keys, dropna=False, sort=True):
        named = dict(zip(keys, key, strict=True))
        ap = headline_ap(named["benchmark"])
        row: dict[str, Any] = {k: named[k] for k in ("benchmark", "dataset", "sam2", "dinov2", "variant")}
        row["setting"] = group["setting"].iloc[0] if "setting" in group else named["setting_id"]
        row.update({k: named[k] for k in ("setting_id", "random_weights", "shots")})
        row["ap"] = ap
        for iou_type, kind in KINDS:
            column = f"{iou_type}_{ap}"
            stats = seed_stats(group[column]) if column in group else None
            for stat in STATS:
                row[f"{kind}_{stat}"] = (
                    (0 if stat == "n" else None) if stats is None else getattr(stats, stat)
                )
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(value: Any) -> str:
    """One decimal, as the paper tables; ``-`` for none (n = 1 has no std or CI)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.1f}"


def markdown_sections(stats, what_of) -> list[str]:
    """The summary.md lines of `stats_table`: one table per benchmark and setting (rows: dataset x shots).

    Args:
        stats: `stats_table`'s frame.
        what_of: benchmark, datasets -> what a heading calls the benchmark (as the paper tables do).
    """
    if stats.empty:
        return []
    lines = [
        "## Over seeds: box AP and mask AP side by side",
        "",
        "Box AP = COCOeval iouType bbox (metrics.json `bbox`), mask AP = iouType segm (metrics.json `segm`), "
        "in percent. n: seeds; std: sample std (ddof=1); CI95: 1.96 std / sqrt(n), the mean's 95% interval "
        "is mean +- CI95; q25 / median / q75: quartiles. `-`: no std or CI with one seed; n/a: no metric.",
        "",
    ]
    for key, group in stats.groupby(GROUP, dropna=False, sort=True):
        bench, sam2, dinov2, variant, _sid, random_weights = key
        ap = group["ap"].iloc[0]
        what = what_of(bench, sorted(group["dataset"].unique()))
        title = f"### {what}: box {ap} and mask {ap} over seeds - {sam2} + {dinov2}, {variant}"
        title += f" ({group['setting'].iloc[0]})"
        if random_weights:
            title += " - RANDOM WEIGHTS (plumbing only)"
        stat_cols = ["mean", "std", "CI95", "q25", "median", "q75"]
        head = ["dataset", "shots", "n"] + [f"{k} {ap} {s}" for k in ("box", "mask") for s in stat_cols]
        lines += [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, r in group.iterrows():
            n = int(r["box_n"]) or int(r["mask_n"])
            cells = [str(r["dataset"]), str(r["shots"]), str(n)]
            for kind in ("box", "mask"):
                if not r[f"{kind}_n"]:
                    cells += ["n/a"] * len(stat_cols)
                    continue
                values = [r[f"{kind}_{s}"] for s in ("mean", "std", "ci95", "q25", "median", "q75")]
                cells += [_fmt(_none(v)) for v in values]
                if int(r[f"{kind}_n"]) != n:  # a metric missing in some seeds: say over how many
                    cells[-6] += f" (n={int(r[f'{kind}_n'])})"
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def side_by_side_sections(stats, what_of) -> list[str]:
    """The summary.md lines comparing settings: per benchmark, dataset and shot count that several settings
    ran (an ablation, e.g. the NTT-to-FSOD-VFM walk), one row per setting (variant and backbones), its box and
    mask AP mean and 95% CI side by side; rows in variant order. Nothing when every cell has one setting.

    Args:
        stats: `stats_table`'s frame.
        what_of: benchmark, datasets -> what a heading calls the benchmark.
    """
    if stats.empty:
        return []
    lines: list[str] = []
    for (bench, dataset, shots), group in stats.groupby(["benchmark", "dataset", "shots"], sort=True):
        if group["setting_id"].nunique() < 2:
            continue
        ap = group["ap"].iloc[0]
        title = f"### {what_of(bench, [dataset])}: {shots} shots"
        if group["random_weights"].any():
            title += " - RANDOM WEIGHTS (plumbing only)"
        head = [
            "variant",
            "sam2 + dinov2",
            "n",
            f"box {ap} mean",
            "CI95",
            f"mask {ap} mean",
            "CI95",
            "setting",
        ]
        lines += [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for _, r in group.sort_values(["variant", "sam2", "dinov2", "setting_id"], kind="stable").iterrows():
            cells = [
                str(r["variant"]),
                f"{r['sam2']} + {r['dinov2']}",
                str(int(r["box_n"]) or int(r["mask_n"])),
            ]
            for kind in ("box", "mask"):
                ok = bool(r[f"{kind}_n"])
                cells += [_fmt(_none(r[f"{kind}_{s}"])) if ok else "n/a" for s in ("mean", "ci95")]
            cells.append(str(r["setting"]).replace("|", "\\|"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if lines:
        lines = [
            "## Settings side by side: box AP and mask AP",
            "",
            "One row per setting that ran the same dataset and shots; mean over seeds and the 95% CI "
            "half-width (1.96 std / sqrt(n)), in percent.",
            "",
            *lines,
        ]
    return lines


def _none(value: Any) -> Any:
    """pandas turns None into NaN in float columns: back to None."""
    return None if isinstance(value, float) and math.isnan(value) else value
