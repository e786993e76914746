"""AP against shots with 95% CI bands, box and mask panels (`ntt summarize`'s ``ap_vs_shots_<benchmark>.png``).

One line per setting (and dataset, where a benchmark has several, e.g. the VOC splits; named by its variant
alone when each variant is one setting, as the steps of an ablation walk): the mean over seeds
at each shot count, a band mean +- CI95 where there are two seeds or more (`ntt.runner.seedstats`). Drawn
with matplotlib's Agg canvas directly (no pyplot, no display: works headless and leaves no global state).
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Any

from ntt.runner.seedstats import KINDS
from ntt.utils.files import write_bytes_atomic

WIDTH = 11.0  # inches
PANELS_HEIGHT = 4.5  # inches: the two panels with their titles and axes
LEGEND_LINE = 0.25  # inches per legend text line, below the panels (settings' names are long)
LEGEND_PAD = 0.25
LABEL_WIDTH = 140  # characters of a legend line before it wraps
DPI = 100  # -> 1100 pixels wide, 450 + 25 per legend line + 25 high


def figure_size(legend_lines: int) -> tuple[float, float]:
    """(width, height) in inches: the panels plus a legend of `legend_lines` text lines under them."""
    return WIDTH, PANELS_HEIGHT + LEGEND_PAD + LEGEND_LINE * legend_lines


def _line_label(row, several_datasets: bool, named_by_variant: bool = False) -> str:
    label = f"{row['sam2']} + {row['dinov2']}, {row['variant']}"
    if not named_by_variant:
        label += f" ({row['setting']})"
    if row["random_weights"]:
        label += " [RANDOM WEIGHTS]"
    return f"{row['dataset']}: {label}" if several_datasets else label


def _clean(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _ci_band(ax, line: dict[str, list], color) -> None:
    """mean +- CI95 as a band, broken (NaN) at shot counts without a CI (one seed): never drawn across them;
    a CI with no neighbour to make a band with is an error bar."""
    has = [c is not None for c in line["ci95"]]
    lo = [m - c if c is not None else math.nan for m, c in zip(line["mean"], line["ci95"], strict=True)]
    hi = [m + c if c is not None else math.nan for m, c in zip(line["mean"], line["ci95"], strict=True)]
    ax.fill_between(line["shots"], lo, hi, alpha=0.2, color=color, linewidth=0)
    for i, k in enumerate(line["shots"]):
        alone = has[i] and not (i > 0 and has[i - 1]) and not (i + 1 < len(has) and has[i + 1])
        if alone:
            ax.errorbar([k], [line["mean"][i]], yerr=[line["ci95"][i]], color=color, capsize=3)


def plot_data(stats) -> dict[str, dict[str, dict[str, list]]]:
    """What `plot_shots` draws: ``{"box"|"mask": {line label: {"shots", "mean", "ci95", "n"}}}``.

    Args:
        stats: rows of `ntt.runner.seedstats.stats_table` (one benchmark). Shot counts without the metric
            (n = 0) are left out of a line; ci95 is None where n = 1 (no band there).
    """
    several = stats["dataset"].nunique() > 1
    # an ablation whose steps are variants (the NTT-to-FSOD-VFM walk): each variant one setting, so the
    # variant names the line and the settings' long names stay in summary.md
    per_variant = stats.groupby("variant", dropna=False)["setting_id"].nunique()
    by_variant = len(per_variant) > 1 and bool((per_variant == 1).all())
    data: dict[str, dict[str, dict[str, list]]] = {kind: {} for _, kind in KINDS}
    for _, row in stats.sort_values("shots", kind="stable").iterrows():
        if _clean(row["shots"]) is None:  # a metrics.json without a shot count has no place on this axis
            continue
        label = _line_label(row, several, by_variant)
        for _, kind in KINDS:
            if not row[f"{kind}_n"]:
                continue
            line = data[kind].setdefault(label, {"shots": [], "mean": [], "ci95": [], "n": []})
            line["shots"].append(int(row["shots"]))
            line["mean"].append(float(row[f"{kind}_mean"]))
            line["ci95"].append(_clean(row[f"{kind}_ci95"]))
            line["n"].append(int(row[f"{kind}_n"]))
    return data


def plot_shots(stats, path: str | Path, title: str) -> dict[str, dict[str, dict[str, list]]]:
    """Draw `plot_data(stats)` into a PNG at `path` (`figure_size` x DPI pixels) and return that data.

    Args:
        stats: rows of `ntt.runner.seedstats.stats_table` for one benchmark.
        path: the PNG to write (atomically).
        title: the figure's title (the benchmark; say RANDOM WEIGHTS where it applies).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = plot_data(stats)
    ap = str(stats["ap"].iloc[0])
    labels = list(dict.fromkeys([*data["box"], *data["mask"]]))  # one color per line in both panels
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    wrapped = {label: textwrap.fill(label, LABEL_WIDTH, subsequent_indent="    ") for label in labels}
    legend_lines = sum(w.count("\n") + 1 for w in wrapped.values())
    width, height = figure_size(legend_lines)
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    # the panels keep their height whatever the legend's: margins in inches, turned into fractions
    legend_h = LEGEND_PAD + LEGEND_LINE * legend_lines
    fig.subplots_adjust(left=0.07, right=0.98, top=1 - 0.75 / height, bottom=(legend_h + 0.6) / height)
    axes = fig.subplots(1, 2, sharey=True)
    shots = sorted({k for line in [*data["box"].values(), *data["mask"].values()] for k in line["shots"]})
    handles = {}
    for ax, (_, kind) in zip(axes, KINDS, strict=True):
        for label, line in data[kind].items():
            (handles[label],) = ax.plot(line["shots"], line["mean"], marker="o", color=colors[label])
            _ci_band(ax, line, colors[label])
        ax.set_title(f"{kind} {ap} (COCOeval iouType {'bbox' if kind == 'box' else 'segm'})")
        ax.set_xlabel("shots")
        ax.set_xscale("log")
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        if not data[kind]:
            ax.text(0.5, 0.5, f"no {kind} AP", ha="center", va="center", transform=ax.transAxes)
    fig.legend(
        [handles[label] for label in labels],
        [wrapped[label] for label in labels],
        loc="lower left",
        bbox_to_anchor=(0.01, 0.0),
        fontsize="small",
        frameon=False,
        handlelength=1.5,
        borderaxespad=0.3,
    )
    axes[0].set_ylabel(f"{ap} (%): mean over seeds, band = 95% CI")
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    write_bytes_atomic(path, buf.getvalue())
    return data
