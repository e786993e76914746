"""The report of a study folder: every run's metrics, box and mask AP over seeds (mean +- std, 95% CI) per
setting and shots, the AP-against-shots plot, and the runs left out of the statistics and why.

The numbers are those of ``ntt summarize`` (the same functions: ``collect``, ``stats_table``, ``write_plots``
of the runner): a run with failed or missing images, or without metrics, is left out of the statistics and
listed; settings are never averaged together (``setting_id``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from ntt.report.page import Cell, Page, esc, metric_cell, number_cell, table
from ntt.report.pictures import data_uri
from ntt.report.plots import per_class_svg
from ntt.runner import RUN_METRICS, collect_class_rows, collect_runs, seed_stats_table, write_shot_plots

__all__ = ["study_report"]

log = logging.getLogger(__name__)

STATS = (("n", None), ("mean", 1), ("std", 1), ("ci95", 1))


def _rel(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def stats_section(stats) -> str:
    if stats.empty:
        return '<p class="warn">No valid run: no statistics (see the runs table).</p>'
    headers = ["benchmark", "dataset", "setting", "shots", "AP"]
    headers += [f"{kind} {stat}" for kind in ("box", "mask") for stat, _ in STATS]
    rows = []
    for _, r in stats.iterrows():
        where = f"{r['setting_id']}.{r['dataset']}.{int(r['shots'])}"
        cells = [
            number_cell(r[f"{kind}_{stat}"], f"stats.{where}.{kind}_{stat}", digits)
            for kind in ("box", "mask")
            for stat, digits in STATS
        ]
        setting = f"{r['setting']}{' (RANDOM WEIGHTS)' if r['random_weights'] else ''}"
        rows.append([r["benchmark"], r["dataset"], setting, number_cell(r["shots"]), r["ap"], *cells])
    note = (
        '<p class="note">Percent. Over seeds: n runs, mean, sample standard deviation and the 95% confidence '
        "half-width 1.96 * std / sqrt(n) (none for n = 1); the benchmark's headline AP (VOC: AP50). The same "
        "numbers as `ntt summarize` (seed_stats.csv).</p>"
    )
    return table(headers, rows, id="seed-stats") + note


def per_class_section(classes, runs, max_plots: int = 6) -> str:
    """Per setting, dataset, shots and class: n runs, mean and std of the box and mask AP (valid runs only)."""
    valid = set(runs[runs["valid"]]["run_dir"]) if not runs.empty else set()
    if classes.empty or not valid:
        return '<p class="note">No per-class AP (no valid run with a per-class table).</p>'
    rows = classes[classes["run_dir"].isin(valid)]
    keys = ["setting_id", "dataset", "shots", "category_id", "name"]
    columns = [c for c in ("bbox_AP", "segm_AP") if c in rows]
    table_rows, plots = [], []
    for (setting_id, dataset, shots), group in rows.groupby(keys[:3], sort=True):
        per_class = group.groupby(keys[3:], sort=True)
        for (cid, name), runs_of_class in per_class:
            where = f"{setting_id}.{dataset}.{int(shots)}.{cid}"
            cells = []
            for col in columns:
                values = runs_of_class[col].dropna()
                std = float(values.std(ddof=1)) if len(values) > 1 else None
                cells += [
                    number_cell(
                        float(values.mean()) if len(values) else None, f"class.{where}.{col}_mean", 1
                    ),
                    number_cell(std, f"class.{where}.{col}_std", 1),
                ]
            table_rows.append(
                [dataset, setting_id, number_cell(shots), name, number_cell(len(runs_of_class)), *cells]
            )
        if len(plots) < max_plots:
            means = per_class[columns].mean().reset_index()
            svg = per_class_svg(
                list(means["name"]),
                {f"{'box' if c == 'bbox_AP' else 'mask'} AP": list(means[c] / 100.0) for c in columns},
                f"{dataset}, {int(shots)} shots, setting {setting_id}: AP per class, mean over seeds",
            )
            plots.append(f"<figure>{svg}</figure>")
    headers = ["dataset", "setting id", "shots", "class", "n"]
    headers += [f"{'box' if c == 'bbox_AP' else 'mask'} AP {s}" for c in columns for s in ("mean", "std")]
    note = '<p class="note">Percent, over the runs in the statistics; n/a classes (no ground truth) left out.</p>'
    groups = rows.groupby(keys[:3]).ngroups
    more = (
        f'<p class="note">Plots of the first {max_plots} of {groups} groups.</p>'
        if groups > max_plots
        else ""
    )
    return table(headers, table_rows, id="per-class") + note + "".join(plots) + more


def plots_section(stats) -> str:
    if stats.empty:
        return '<p class="note">No plot: no valid run.</p>'
    with tempfile.TemporaryDirectory(prefix="ntt-report-") as tmp:
        paths = write_shot_plots(stats, Path(tmp))
        from PIL import Image

        figures = []
        for bench, path in paths.items():
            with Image.open(path) as img:
                figures.append(
                    f'<figure><img src="{data_uri(img, "PNG")}" alt="AP against shots, {esc(bench)}">'
                    f"<figcaption>{esc(bench)}: box and mask AP against shots, mean over seeds with the 95% CI "
                    "band</figcaption></figure>"
                )
    return "".join(figures)


def runs_section(runs, root: Path) -> str:
    headers = ["run", "dataset", "shots", "seed", "setting"]
    headers += [f"{t} {n}" for t, n in RUN_METRICS] + ["failed images", "in statistics"]
    rows = []
    for _, r in runs.iterrows():
        rel = _rel(r["run_dir"], root)
        metrics: dict[str, Any] = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        cells = [metric_cell(metrics.get(t, {}).get(n), f"runs.{rel}.{t}.{n}") for t, n in RUN_METRICS]
        why = (
            "yes"
            if r["valid"]
            else ("no: not evaluated" if not r["evaluated"] else "no: failed or missing images")
        )
        rows.append(
            [
                Cell(esc(rel), html_text=True),
                r["dataset"],
                number_cell(r["shots"]),
                number_cell(r["seed"]),
                r.get("setting", r["setting_id"]),
                *cells,
                number_cell(int(r["failed_images"]) + int(r["missing_images"]), f"runs.{rel}.failed"),
                why,
            ]
        )
    note = (
        '<p class="note">One row per metrics.json below the folder, in percent (metrics.json holds fractions); '
        "`ntt report RUN_DIR` gives one run's images and errors.</p>"
    )
    return table(headers, rows, id="runs") + note


def study_report(root: Path, study: str | None = None) -> str:
    """The HTML page of the runs below ``root`` (only those of ``study`` when given)."""
    runs = collect_runs(root, study=study)
    runs = runs.sort_values(["benchmark", "dataset", "shots", "seed"], kind="stable")
    stats = seed_stats_table(runs)
    random = bool(runs["random_weights"].any())
    studies = sorted({str(s) for s in runs["study"].dropna()})
    page = Page(
        f"ntt study: {', '.join(studies) or root.name}",
        f"{len(runs)} run(s) below {root}; {int(runs['valid'].sum())} in the statistics",
    )
    warn = (
        '<p class="warn">Runs with random weights: their numbers measure plumbing and speed only, never '
        "accuracy.</p>"
        if random
        else ""
    )
    page.add("stats", "Box and mask AP over seeds", warn + stats_section(stats))
    page.add("plots", "AP against shots", plots_section(stats))
    page.add("per-class", "Per class", per_class_section(collect_class_rows(root, study=study), runs))
    page.add("runs", "Runs", runs_section(runs, root))
    left_out = runs[~runs["valid"]]
    if left_out.empty:
        body = '<p class="note">Every run is in the statistics.</p>'
    else:
        body = table(
            ["run", "failed images", "missing images", "evaluated"],
            [
                [
                    _rel(r["run_dir"], root),
                    number_cell(r["failed_images"]),
                    number_cell(r["missing_images"]),
                    str(bool(r["evaluated"])),
                ]
                for _, r in left_out.iterrows()
            ],
            id="left-out",
        )
    page.add("left-out", "Runs left out of the statistics", body)
    return page.render()
