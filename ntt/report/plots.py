"""Plots of the page, drawn with matplotlib (Agg) and inlined as SVG text (no file, no font download)."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence

__all__ = ["per_class_svg", "figure_svg"]


def figure_svg(fig) -> str:
    """The figure as an inline ``<svg>`` element (the XML prologue and DOCTYPE dropped), then closed."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _clean(v) -> float:
    return (
        float("nan") if v is None or (isinstance(v, float) and math.isnan(v)) or float(v) < 0 else 100.0 * v
    )


def per_class_svg(names: Sequence[str], series: dict[str, Sequence[float | None]], title: str) -> str:
    """Horizontal bars, one group per class, one bar per series (e.g. box AP, mask AP), in percent.

    Args:
        names: class names (top to bottom).
        series: label -> one value per class (fractions; -1 / None: no ground truth, no bar).
        title: the plot's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: small, searchable
    n, k = len(names), max(1, len(series))
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.28 * n * k))
    height = 0.8 / k
    for j, (label, values) in enumerate(series.items()):
        ys = [i + (j - (k - 1) / 2) * height for i in range(n)]
        ax.barh(ys, [_clean(v) for v in values], height=height, label=label)
    ax.set_yticks(range(n), [re.sub(r"\s+", " ", str(x)) for x in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("AP (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return figure_svg(fig)
