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
from ntt.runner import collect_runs, seed_stats_table, write_shot_plots

__all__ = ["study_report"]

log = logging.getLogger(__name__)

STATS = (("n", None), ("mean", 1), ("std", 1), ("ci95", 1))
RUN_METRICS = (
    ("bbox", "AP"),
    ("bbox", "AP50"),
    ("bbox", "AP75"),
    ("segm", "AP"),
    ("segm", "AP50"),
    ("segm", "AP75"),
)


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
