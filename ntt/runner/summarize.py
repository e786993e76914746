"""metrics.json files -> the tables of a paper: `ntt summarize ROOT [--study S] [--out DIR]`.

Writes into ``--out`` (default ROOT):

* ``summary.md``: per benchmark and setting, a paper-style table (rows: shots; columns: datasets or
  splits; cells ``mean +- std (n seeds)``) of the benchmark's headline metric (COCO: bbox and segm nAP;
  VOC: nAP50 = COCOeval bbox AP50; CD-FSOD: bbox nAP; LVIS: bbox and segm AP with pycocotools, or with the
  official LVIS metric and its APr/APc/APf for eval=lvis runs); where several settings ran one dataset and
  shot count (an ablation), one row per setting with its box and mask AP side by side
  (`seedstats.side_by_side_sections`); then the runs left out and why;
* ``runs.csv`` / ``runs.md``: the long table, one row per run (metrics in percent);
* ``summary.csv``: mean, std and count over seeds for every setting and metric;
* ``seed_stats.csv`` (and a section of summary.md): per setting, dataset and shots, n seeds, mean, sample
  std, 95% CI half-width and quartiles of the box AP and the mask AP side by side (`ntt.runner.seedstats`);
* ``ap_vs_shots_<benchmark>.png``: that AP against shots with CI bands, box and mask panels, one line per
  setting (`ntt.runner.shotplot`; ``--no-plot`` leaves it out);
* ``per_class.csv`` (one row per run and class) and ``per_class_summary.csv`` (mean over seeds).

Rules: a run with failed or missing test images is excluded from every mean and listed; a metric of -1
(COCOeval's "no ground truth", e.g. an empty test set) is shown as n/a, never as -100; runs are grouped
by their ``setting_id`` (ntt/utils/identity.py), so different settings are never averaged together, and a
setting is named by what differs: its backbones, variant and the config values that are not
conf/main.yaml's defaults (`setting_names`); rows from random-weight runs are flagged (plumbing and speed
only, never accuracy). Names: ``bbox`` (metrics.json, the csv columns) is the box AP, COCOeval
``iouType="bbox"``; ``segm`` is the mask AP, ``iouType="segm"``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from ntt.runner.seedstats import markdown_sections, side_by_side_sections, stats_table
from ntt.runner.shotplot import plot_shots
from ntt.utils.errors import UserError
from ntt.utils.files import write_text_atomic
from ntt.utils.identity import setting_keys

log = logging.getLogger(__name__)

SETTING = ["dataset", "sam2", "dinov2", "variant", "shots"]
# the setting values a table's heading names otherwise (the backbones by name, the variant): left out of a
# setting's name unless two settings differ only there
NAMED_APART = ("variant", "backbone.", "dataset._target_")
MISSING = object()
# box AP (COCOeval bbox) and mask AP (segm), the same three of each (runs.csv, summary.csv)
METRICS = [
    ("bbox", "AP"),
    ("bbox", "AP50"),
    ("bbox", "AP75"),
    ("segm", "AP"),
    ("segm", "AP50"),
    ("segm", "AP75"),
]
GROUP = ["benchmark", "sam2", "dinov2", "variant", "setting_id", "random_weights"]
# benchmark -> (metric columns of its paper table, what the metric is called)
HEADLINE = {
    "coco": [("bbox_AP", "bbox nAP"), ("segm_AP", "segm nAP")],
    "voc": [("bbox_AP50", "nAP50 (COCOeval bbox AP50)")],
    "cdfsod": [("bbox_AP", "bbox nAP")],
    "lvis": [
        ("bbox_AP", "bbox AP (pycocotools, NOT the official LVIS metric)"),
        ("segm_AP", "segm AP (pycocotools)"),
    ],
    # eval=lvis: the lvis package's LVISEval (docs/method.md §6.1), with its frequency groups
    "lvis_official": [
        (f"{iou}_{name}", f"{iou} {name} (official LVIS metric)")
        for iou in ("bbox", "segm")
        for name in ("AP", "APr", "APc", "APf")
    ],
    "other": [("bbox_AP", "bbox AP"), ("segm_AP", "segm AP")],
}
# what the authors reported, for comparison only (docs/method.md §8): never measured by ntt
PAPER = {
    "coco": "Paper (reported by the authors, not measured here): bbox nAP 24.5 +- 1.5 / 29.5 +- 2.0 / "
    "32.3 +- 1.3 / 34.4 +- 0.8 / 35.9 +- 0.5 / 37.0 +- 0.2 at 1/2/3/5/10/30 shots over 10 seeds (their "
    "ablation CSV); 36.8 bbox / 34.2 segm nAP at 30 shots, seed 33 (their README).",
    "voc": "Paper (reported, not measured here): 71.2 nAP50 (abstract).",
    "cdfsod": "Paper (reported, not measured here): 22.4 nAP (abstract).",
    "lvis": "LVIS numbers here come from pycocotools COCOeval (as the authors ran it), not the official LVIS API.",
    "lvis_official": "LVIS numbers here come from the official LVIS metric (eval=lvis: federated, APr/APc/APf by "
    "the gt's frequency); the authors reported pycocotools COCOeval on LVIS.",
}
# the official LVIS metric's frequency groups, tabulated when a run has them (eval=lvis)
LVIS_GROUPS = ("APr", "APc", "APf")
RANDOM_NOTE = "Rows with random_weights=True come from random-weight models: plumbing and speed only."


def benchmark_of(dataset: str, backend: str | None = None) -> str:
    """The benchmark a dataset name belongs to (coco, voc, cdfsod, lvis or other); LVIS evaluated with the
    official metric (`backend` "lvis", metrics.json's `backend`) is `lvis_official`, never averaged with the
    pycocotools numbers."""
    for prefix, name in (("coco_", "coco"), ("voc_", "voc"), ("cdfsod_", "cdfsod"), ("lvis", "lvis")):
        if str(dataset).startswith(prefix):
            return "lvis_official" if name == "lvis" and backend == "lvis" else name
    return "other"


def _pct(value: Any) -> float:
    """Fraction -> percent; -1 (no ground truth) and missing -> NaN (never -100)."""
    if value is None:
        return math.nan
    v = float(value)
    return 100.0 * v if v >= 0 else math.nan


def collect(root: str | Path, study: str | None = None):
    """One row per run under `root` (every metrics.json found), metrics in percent.

    Args:
        root: folder searched recursively.
        study: keep only runs of this study (metrics.json's `study`, the config's `study_name`).
    """
    import pandas as pd

    rows, identities = [], {}
    for path in sorted(Path(root).rglob("metrics.json")):
        try:
            m = json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s is not valid json: skipped", path)
            continue
        if study is not None and m.get("study") != study:
            continue
        row = {k: m.get(k) for k in SETTING + ["seed", "num_images"]}
        row["study"] = m.get("study")
        row["benchmark"] = benchmark_of(row["dataset"], m.get("backend"))
        row["setting_id"] = m.get("setting_id", "")
        row["config_id"] = m.get("config_id", "")
        row["failed_images"] = len(m.get("failed_images") or [])
        row["missing_images"] = len(m.get("missing_images") or [])
        for iou_type, name in METRICS:
            row[f"{iou_type}_{name}"] = _pct(m.get(iou_type, {}).get(name))
        for iou_type in ("bbox", "segm"):  # only runs of the official LVIS metric have these
            for name in LVIS_GROUPS:
                if name in m.get(iou_type, {}):
                    row[f"{iou_type}_{name}"] = _pct(m[iou_type][name])
        row["evaluated"] = any(t in m for t in ("bbox", "segm"))
        row["valid"] = row["evaluated"] and row["failed_images"] == 0 and row["missing_images"] == 0
        row["random_weights"] = "note" in m
        row["run_dir"] = str(path.parent)
        rows.append(row)
        if "identity" in m:
            identities.setdefault(row["setting_id"], flat(setting_keys(m["identity"])))
    runs = pd.DataFrame(rows)
    if not runs.empty:
        runs["setting"] = runs["setting_id"].map(setting_names(runs, identities))
    return runs


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config values as ``{"matcher.memory.batch_size": 8, ...}``."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def setting_names(runs, identities: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Per setting id, what names the setting next to its backbones and variant: its config values that differ
    from the defaults (conf/main.yaml with the setting's `dataset` option; `paper settings` when none), plus
    what tells apart two settings of one benchmark, backbones and variant that would otherwise read the same;
    `setting <id>` for a metrics.json without its identity (written before ntt recorded it).

    Args:
        runs: the rows of `collect` (``setting_id``, ``dataset`` and the family columns).
        identities: per setting id, its flattened `ntt.utils.identity.setting_keys`.
    """
    from omegaconf import OmegaConf

    from ntt.utils.compose import compose
    from ntt.utils.errors import ConfigError
    from ntt.utils.identity import inert_values

    defaults: dict[str, dict[str, Any]] = {}

    def defaults_of(dataset: str) -> dict[str, Any]:
        if dataset not in defaults:
            try:
                cfg = compose([f"dataset={dataset}"])
            except ConfigError:  # a dataset without an option of its own (e.g. `custom` renamed)
                cfg = compose([])
            base = flat(setting_keys(cfg))
            # the keys an identity leaves out at their default (INERT_*) are compared with that default too:
            # a merge=diffusion setting is named by `matcher.merge`, not by every `matcher.diffusion.*` value
            for dotted, node in inert_values(OmegaConf.to_container(cfg, resolve=False)).items():
                base.update(flat(node, dotted))
            defaults[dataset] = base
        return defaults[dataset]

    settings = runs.drop_duplicates("setting_id")
    names = {}
    for sid, dataset in zip(settings["setting_id"], settings["dataset"], strict=True):
        values = identities.get(sid)
        if values is None:
            names[sid] = f"setting {sid or '?'}"
            continue
        base = defaults_of(str(dataset))
        diff = [k for k, v in values.items() if not k.startswith(NAMED_APART) and base.get(k, MISSING) != v]
        names[sid] = _values(values, diff) or "paper settings"
    for _, group in settings.groupby(["benchmark", "sam2", "dinov2", "variant"], dropna=False):
        by_name: dict[str, list[str]] = {}
        for sid in group["setting_id"]:
            by_name.setdefault(names[sid], []).append(sid)
        for same in (s for s in by_name.values() if len(s) > 1 and all(sid in identities for sid in s)):
            keys = sorted({k for sid in same for k in identities[sid]})
            apart = [k for k in keys if len({json.dumps(identities[s].get(k)) for s in same}) > 1]
            for sid in same:
                names[sid] = f"{names[sid]}; {_values(identities[sid], apart)}"
    return names


def _values(values: dict[str, Any], keys: list[str]) -> str:
    """`key=value, ...` as on the command line."""
    shown = {k: values.get(k) for k in keys}
    return ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in shown.items())


def collect_per_class(root: str | Path, study: str | None = None):
    """One row per run and class (per-class AP in percent; n/a where the class has no ground truth)."""
    import pandas as pd

    rows = []
    for path in sorted(Path(root).rglob("metrics.json")):
        try:
            m = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if study is not None and m.get("study") != study:
            continue
        for c in m.get("per_class") or []:
            row = {k: m.get(k) for k in SETTING + ["seed"]}
            row["setting_id"] = m.get("setting_id", "")
            row.update(
                {"category_id": c.get("category_id"), "name": c.get("name"), "num_gt": c.get("num_gt")}
            )
            for key, val in c.items():
                if key.startswith(("bbox_", "segm_")):
                    row[key] = _pct(val)
            row["run_dir"] = str(path.parent)
            rows.append(row)
    return pd.DataFrame(rows)


def summarize(runs):
    """Mean, std and count over seeds for every setting (valid rows of `collect` only)."""
    import pandas as pd

    metric_cols = [c for c in runs.columns if c.startswith(("bbox_", "segm_"))]
    valid = runs[runs["valid"]] if "valid" in runs else runs
    if valid.empty:
        return pd.DataFrame()
    keys = SETTING + [k for k in ("setting_id", "random_weights") if k in valid]
    grouped = valid.groupby(keys, dropna=False)[metric_cols]
    table = grouped.agg(["mean", "std", "count"])
    table.columns = [f"{m}_{stat}" for m, stat in table.columns]
    return table.reset_index()


def cell(values) -> str:
    """``mean +- std (n)`` of the non-NaN values (one decimal); ``n/a`` when there is none."""
    vals = [float(v) for v in values if not math.isnan(float(v))]
    if not vals:
        return "n/a"
    n = len(vals)
    mean = sum(vals) / n
    if n == 1:
        return f"{mean:.1f} (1)"
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))  # sample std, as pandas
    return f"{mean:.1f} +- {std:.1f} ({n})"


def paper_tables(runs) -> list[dict[str, Any]]:
    """Paper-style tables of the valid runs: one per benchmark x setting x headline metric.

    Returns:
        Dicts with ``title``, ``benchmark``, ``metric`` and ``table`` (a DataFrame: index shots,
        columns datasets, string cells ``mean +- std (n)``).
    """
    import pandas as pd

    out = []
    valid = runs[runs["valid"]]
    if valid.empty:
        return out
    for key, group in valid.groupby(GROUP, dropna=False, sort=True):
        bench, sam2, dinov2, variant, setting, random_weights = key
        for column, label in HEADLINE[bench]:
            if column not in group or group[column].isna().all():
                continue
            datasets = sorted(group["dataset"].unique())
            shots = sorted(group["shots"].unique())
            data = {
                d: [cell(group[(group.dataset == d) & (group.shots == k)][column]) for k in shots]
                for d in datasets
            }
            table = pd.DataFrame(data, index=pd.Index(shots, name="shots"))
            name = group["setting"].iloc[0] if "setting" in group else f"setting {setting or '?'}"
            what = benchmark_label(bench, datasets)
            title = f"{what}: {label} - {sam2} + {dinov2}, {variant} ({name})"
            if random_weights:
                title += " - RANDOM WEIGHTS (plumbing only)"
            out.append({"title": title, "benchmark": bench, "metric": column, "table": table})
    return out


def benchmark_label(bench: str, datasets: list[str]) -> str:
    """What a heading calls a benchmark: its name, or its datasets for `other`."""
    if bench == "lvis_official":
        return "lvis (official LVIS metric)"
    return bench if bench != "other" else ", ".join(datasets)


def markdown_table(frame, index: bool = True) -> str:
    """A GitHub Markdown table (no extra dependency)."""
    cols = ([frame.index.name or ""] if index else []) + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in frame.iterrows():
        cells = ([str(idx)] if index else []) + [_md_value(v) for v in row.tolist()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _md_value(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.2f}"
    return str(v).replace("|", "\\|")


def render_markdown(runs, tables: list[dict[str, Any]], study: str | None, stats=None) -> str:
    """The summary.md text: paper tables, box and mask statistics over seeds, paper references, excluded
    runs, notes.

    Args:
        runs: the rows of `collect`.
        tables: `paper_tables(runs)`.
        study: the study the rows were kept for (the heading names it).
        stats: `seedstats.stats_table(runs)` (None: no statistics section).
    """
    parts = [f"# Results{f' - study {study}' if study else ''}", ""]
    parts.append(
        "Cells: mean +- sample std over seeds (n seeds), in percent. n/a: no ground truth / no metric. "
        "bbox = box AP (COCOeval iouType bbox), segm = mask AP (iouType segm)."
    )
    parts.append("")
    seen_bench = []
    for t in tables:
        parts += [f"## {t['title']}", "", markdown_table(t["table"]), ""]
        if t["benchmark"] not in seen_bench:
            seen_bench.append(t["benchmark"])
    if stats is not None:
        parts += side_by_side_sections(stats, benchmark_label)
        parts += markdown_sections(stats, benchmark_label)
    for bench in seen_bench:
        if bench in PAPER:
            parts += [f"*{PAPER[bench]}*", ""]
    excluded = runs[~runs["valid"]]
    if not excluded.empty:
        parts += ["## Runs left out of the means", ""]
        for _, r in excluded.iterrows():
            why = (
                f"{r['failed_images']} failed and {r['missing_images']} missing image(s)"
                if r["evaluated"]
                else "not evaluated (no metrics)"
            )
            parts.append(f"- `{r['run_dir']}`: {why}")
        parts.append("")
    if runs["random_weights"].any():
        parts += [RANDOM_NOTE, ""]
    return "\n".join(parts)


def write_plots(stats, out: Path) -> dict[str, Path]:
    """One ``ap_vs_shots_<benchmark>.png`` per benchmark of `stats` (`shotplot.plot_shots`); their paths."""
    paths = {}
    if stats.empty:
        return paths
    try:
        import matplotlib  # noqa: F401  (a dependency; missing only in an install made with --no-deps)
    except ImportError as err:
        raise UserError(
            f"the plot needs matplotlib ({err}): `pip install matplotlib`, or pass --no-plot"
        ) from err
    for bench, group in stats.groupby("benchmark", sort=True):
        ap = group["ap"].iloc[0]
        title = (
            f"{benchmark_label(bench, sorted(group['dataset'].unique()))}: box and mask {ap} against shots"
        )
        if group["random_weights"].any():
            title += " - RANDOM WEIGHTS (plumbing only, not accuracy)"
        paths[bench] = out / f"ap_vs_shots_{bench}.png"
        plot_shots(group, paths[bench], title)
    return paths


def main(argv: list[str] | None = None) -> int:
    """`ntt summarize ROOT [--study S] [--out DIR] [--no-plot]`: paper tables, box and mask statistics over
    seeds, their plot against shots, long table, per-class AP, summary.md."""
    import argparse

    ap = argparse.ArgumentParser(prog="ntt summarize", description=__doc__)
    ap.add_argument("root", help="folder searched recursively for metrics.json (e.g. outputs)")
    ap.add_argument("--out", default=None, help="where to write the tables (default: ROOT)")
    ap.add_argument(
        "--study", default=None, help="only runs of this study (the config's study_name, e.g. coco)"
    )
    ap.add_argument(
        "--no-plot", action="store_true", help="do not draw ap_vs_shots_<benchmark>.png (matplotlib)"
    )
    args = ap.parse_args(argv)
    runs = collect(args.root, study=args.study)
    if runs.empty:
        raise UserError(
            f"no metrics.json under {args.root}{f' for study {args.study}' if args.study else ''}: "
            "point ROOT at an output folder of `ntt run` / `ntt study`"
        )
    out = Path(args.out or args.root)
    out.mkdir(parents=True, exist_ok=True)
    runs = runs.sort_values(["benchmark", "dataset", "shots", "seed"], kind="stable")
    write_text_atomic(out / "runs.csv", runs.to_csv(index=False))
    write_text_atomic(out / "runs.md", markdown_table(runs.drop(columns=["run_dir"]), index=False) + "\n")
    write_text_atomic(out / "summary.csv", summarize(runs).to_csv(index=False))
    stats = stats_table(runs)
    write_text_atomic(out / "seed_stats.csv", stats.to_csv(index=False))
    if not args.no_plot:
        for path in write_plots(stats, out).values():
            log.info("wrote %s", path)
    per_class = collect_per_class(args.root, study=args.study)
    write_text_atomic(out / "per_class.csv", per_class.to_csv(index=False))
    if not per_class.empty:
        valid_dirs = set(runs[runs["valid"]]["run_dir"])
        pc = per_class[per_class["run_dir"].isin(valid_dirs)]
        metric_cols = [c for c in pc.columns if c.startswith(("bbox_", "segm_"))]
        keys = SETTING[:-1] + ["setting_id", "shots", "category_id", "name"]
        table = pc.groupby(keys, dropna=False)[metric_cols].mean().reset_index()
        write_text_atomic(out / "per_class_summary.csv", table.to_csv(index=False))
    text = render_markdown(runs, paper_tables(runs), args.study, stats)
    write_text_atomic(out / "summary.md", text)
    print(text)  # the table is this command's output
    return 0
