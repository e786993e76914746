"""metrics.json files -> one pandas table: mean +- std over seeds per setting, as CSV and Markdown."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

SETTING = ["dataset", "sam2", "dinov2", "variant", "shots"]
METRICS = [("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP75"), ("segm", "AP"), ("segm", "AP50")]


def collect(root: str | Path):
    """One row per run under `root` (every metrics.json found), metrics in percent."""
    import pandas as pd

    rows = []
    for path in sorted(Path(root).rglob("metrics.json")):
        m = json.loads(path.read_text())
        row = {k: m.get(k) for k in SETTING + ["seed", "num_images"]}
        for iou_type, name in METRICS:
            if iou_type in m:
                row[f"{iou_type}_{name}"] = 100.0 * float(m[iou_type][name])
        row["random_weights"] = "note" in m
        row["run_dir"] = str(path.parent)
        rows.append(row)
    return pd.DataFrame(rows)


def summarize(runs):
    """Mean, std and count over seeds for every setting (rows of `collect`)."""
    metric_cols = [c for c in runs.columns if c.startswith(("bbox_", "segm_"))]
    grouped = runs.groupby(SETTING + ["random_weights"], dropna=False)[metric_cols]
    table = grouped.agg(["mean", "std", "count"])
    table.columns = [f"{m}_{stat}" for m, stat in table.columns]
    return table.reset_index()


def main(argv: list[str] | None = None) -> int:
    """`ntt summarize ROOT [--out DIR]`: writes runs.csv, summary.csv and summary.md."""
    import argparse

    ap = argparse.ArgumentParser(prog="ntt summarize", description=__doc__)
    ap.add_argument("root", help="folder searched recursively for metrics.json (e.g. outputs)")
    ap.add_argument("--out", default=None, help="where to write the tables (default: ROOT)")
    args = ap.parse_args(argv)
    runs = collect(args.root)
    if runs.empty:
        log.error("no metrics.json under %s", args.root)
        return 1
    out = Path(args.out or args.root)
    out.mkdir(parents=True, exist_ok=True)
    table = summarize(runs)
    runs.to_csv(out / "runs.csv", index=False)
    table.to_csv(out / "summary.csv", index=False)
    md = table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False)
    note = ""
    if runs["random_weights"].any():
        note = "\n\nRows with random_weights=True come from random-weight models: plumbing and speed only.\n"
    (out / "summary.md").write_text(md + note)
    print(md + note)  # the table is this command's output
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
