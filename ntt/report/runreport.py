"""The report of one ``ntt run`` directory: metrics, per-class AP, the images most wrong, failures, config.

Reads what the run wrote (docs/ARCHITECTURE.md, "Artifacts of one run"): ``metrics.json`` (the numbers and the
run's identity), ``config.yaml`` (the test json and image folder, the classes), ``predictions.json`` (COCO
results) and ``predictions/rank*.jsonl`` (the error and traceback of each failed image). The test json and
the images are found as ``ntt visualize`` finds them: relative paths from ``root``, the current folder,
then the run directory. Without them the page still has the metrics, failures and config, and says why the
pictures are missing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ntt.eval import STAT_NAMES
from ntt.report.imagescore import WRONGNESS_DEFINITION, rank_images, score_images
from ntt.report.page import Cell, Page, esc, metric_cell, number_cell, table
from ntt.report.pictures import run_image_page
from ntt.report.plots import per_class_svg
from ntt.utils.files import resolve_run_path

__all__ = ["ReportOptions", "run_report", "failed_lines"]

log = logging.getLogger(__name__)

IOU_TYPES = (("bbox", "box AP (COCOeval bbox)"), ("segm", "mask AP (COCOeval segm)"))
PER_CLASS_COLUMNS = ("AP", "AP50", "AP75")


@dataclass(frozen=True)
class ReportOptions:
    """What the page shows.

    Args:
        max_images: pictures of the images most wrong (the table lists every image).
        score_thr: detections scoring at least this are drawn and counted (missed / false positives).
        max_draw: at most this many detections drawn per image, best first.
        long_side: long side of each picture panel, pixels.
        root: folder the config's relative dataset paths start from (default: current folder, run dir).
        max_rows: rows of the per-image table at most (the most wrong first).
    """

    max_images: int = 50
    score_thr: float = 0.5
    max_draw: int = 30
    long_side: int = 512
    root: Path | None = None
    max_rows: int = 2000


def failed_lines(run_dir: Path) -> dict[int, dict]:
    """The last failure line of each image in ``predictions/rank*.jsonl`` (``error``, ``traceback``,
    ``file``)."""
    failed: dict[int, dict] = {}
    for shard in sorted((run_dir / "predictions").glob("rank*.jsonl")):
        for raw in shard.read_text().splitlines():
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if isinstance(rec, dict) and rec.get("ok") is False and "image_id" in rec:
                failed[int(rec["image_id"])] = rec
    return failed


def identity_section(metrics: dict[str, Any], run_dir: Path) -> str:
    keys = ["dataset", "sam2", "dinov2", "shots", "seed", "variant", "study", "config_id", "setting_id"]
    keys += ["ntt_version", "num_images", "num_detections"]
    rows = [[k, Cell(esc(metrics.get(k, "-")), key=f"identity.{k}", html_text=True)] for k in keys]
    rows.append(["run directory", str(run_dir)])
    body = table(["key", "value"], rows, cls="plain", id="identity")
    if metrics.get("note"):
        body = f'<p class="warn">{esc(metrics["note"])}</p>' + body
    return body


def metrics_section(metrics: dict[str, Any]) -> str:
    """The COCOeval summary of each iou type: one row each, the 12 COCO numbers in percent."""
    present = [(t, label) for t, label in IOU_TYPES if t in metrics]
    if not present:
        return (
            '<p class="warn">No metrics: this run was not evaluated (eval.enabled=false or no ground '
            "truth).</p>"
        )
    rows = [
        [label, *(metric_cell(metrics[t].get(n), f"{t}.{n}") for n in STAT_NAMES)] for t, label in present
    ]
    note = (
        '<p class="note">Percent (metrics.json holds fractions); n/a: COCOeval\'s -1 (no ground truth). '
        f"pycocotools COCOeval on {metrics.get('num_images', '?')} images, default parameters "
        "(IoU .50:.05:.95, maxDets 1/10/100).</p>"
    )
    return table(["metric", *STAT_NAMES], rows, id="metrics") + note


def per_class_section(metrics: dict[str, Any]) -> str:
    per_class = metrics.get("per_class") or []
    if not per_class:
        return '<p class="note">No per-class table in metrics.json.</p>'
    types = [t for t, _ in IOU_TYPES if t in metrics]
    headers = [
        "class",
        "category id",
        "ground truth",
        *(f"{t} {c}" for t in types for c in PER_CLASS_COLUMNS),
    ]
    rows = []
    for row in per_class:
        cid = row["category_id"]
        cells = [
            metric_cell(row.get(f"{t}_{c}"), f"per_class.{cid}.{t}_{c}")
            for t in types
            for c in PER_CLASS_COLUMNS
        ]
        rows.append(
            [
                row.get("name", cid),
                number_cell(cid),
                number_cell(row.get("num_gt"), f"per_class.{cid}.num_gt"),
                *cells,
            ]
        )
    svg = per_class_svg(
        [r.get("name", r["category_id"]) for r in per_class],
        {f"{'box' if t == 'bbox' else 'mask'} AP": [r.get(f"{t}_AP") for r in per_class] for t in types},
        "AP per class (IoU .50:.05:.95)",
    )
    return table(headers, rows, id="per-class") + f"<figure>{svg}</figure>"


def failures_section(metrics: dict[str, Any], lines: dict[int, dict]) -> str:
    failed = [int(i) for i in metrics.get("failed_images") or []]
    missing = [int(i) for i in metrics.get("missing_images") or []]
    if not failed and not missing:
        return '<p class="note">No image failed.</p>'
    parts = [
        f'<p class="warn">{len(failed)} image(s) failed and {len(missing)} have no result line; they are left '
        "out of the metrics above. Rerun the same `ntt run` command to retry only these.</p>"
    ]
    rows = []
    for img_id in failed:
        rec = lines.get(img_id, {})
        tb = rec.get("traceback")
        tb_html = f"<details><summary>traceback</summary><pre>{esc(tb)}</pre></details>" if tb else ""
        rows.append(
            [
                number_cell(img_id, f"failed.{img_id}"),
                rec.get("file", "-"),
                Cell(esc(rec.get("error", "(no line found)")) + tb_html, html_text=True),
            ]
        )
    rows += [[number_cell(i, f"missing.{i}"), "-", "no result line (not reached)"] for i in missing]
    parts.append(table(["image id", "file", "error"], rows, id="failures"))
    return "".join(parts)


def config_section(run_dir: Path, metrics: dict[str, Any]) -> str:
    cfg_file = run_dir / "config.yaml"
    text = cfg_file.read_text() if cfg_file.is_file() else "(config.yaml not found)"
    identity = json.dumps(metrics.get("identity", {}), indent=1, sort_keys=True)
    return (
        f"<h3>config.yaml</h3><pre>{esc(text)}</pre>"
        "<details><summary>identity keys (what config_id is made of)</summary>"
        f"<pre>{esc(identity)}</pre></details>"
    )


def _dataset(run_dir: Path, opts: ReportOptions):
    """The run's test dataset (selected classes) and its evaluated image ids, as the test stage chose them."""
    from omegaconf import OmegaConf

    from ntt.data.coco import CocoDataset

    cfg = OmegaConf.load(run_dir / "config.yaml")
    spec = cfg.dataset
    test_json = resolve_run_path(str(spec.test_json), opts.root, run_dir)
    if not test_json.is_file():
        raise FileNotFoundError(
            f"dataset.test_json={spec.test_json} not found (looked in {test_json}): run `ntt report` from the "
            "folder the benchmark ran in, or pass --root"
        )
    ds = CocoDataset(
        test_json,
        resolve_run_path(str(spec.test_image_root), opts.root, run_dir),
        class_names=spec.get("class_names"),
        class_split=spec.get("class_split"),
    )
    ids = list(spec.test_image_ids) if spec.get("test_image_ids") is not None else list(ds.image_ids)
    if spec.get("max_test_images") is not None:
        ids = ids[: int(spec.max_test_images)]
    return ds, [int(i) for i in ids], bool(spec.get("exif_orientation", False))


def images_section(run_dir: Path, metrics: dict[str, Any], opts: ReportOptions) -> str:
    """The per-image table (most wrong first) and the pictures of the most wrong images."""
    try:
        ds, ids, exif = _dataset(run_dir, opts)
    except (FileNotFoundError, ValueError, KeyError) as err:
        log.warning("report: no per-image section: %s", err)
        return f'<p class="warn">No per-image analysis: {esc(err)}</p>'
    iou_type = "segm" if "segm" in metrics else "bbox"
    failed = {int(i) for i in metrics.get("failed_images") or []} | {
        int(i) for i in metrics.get("missing_images") or []
    }
    evaluated = [i for i in ids if i not in failed]
    results = json.loads((run_dir / "predictions.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(int(r["image_id"]), []).append(r)
    scores = score_images(
        ds.raw,
        results,
        category_ids=list(ds.category_ids),
        image_ids=evaluated,
        iou_type=iou_type,
        score_thr=opts.score_thr,
    )
    ranked = rank_images(scores)
    definition = WRONGNESS_DEFINITION.format(
        iou_kind="mask IoU" if iou_type == "segm" else "box IoU", thr=opts.score_thr
    )
    shown = ranked[: opts.max_images]
    rows = []
    for rank, s in enumerate(ranked[: opts.max_rows], start=1):
        name = ds.image_info(s.image_id)["file_name"]
        link = f'<a href="#img{s.image_id}">{esc(name)}</a>' if rank <= len(shown) else esc(name)
        rows.append(
            [
                number_cell(rank),
                number_cell(s.image_id),
                Cell(link, html_text=True),
                number_cell(s.num_gt),
                number_cell(s.num_shown),
                number_cell(s.missed),
                number_cell(s.false_positives),
                number_cell(s.errors),
                number_cell(None if s.ap50 is None else 100.0 * s.ap50, digits=1),
            ]
        )
    headers = ["rank", "image id", "file", "ground truth", f"detections >= {opts.score_thr:g}", "missed"]
    headers += ["false positives", "errors", "AP50 (%)"]
    parts = [f'<p class="note">{esc(definition)}</p>', table(headers, rows, id="images")]
    if len(ranked) > opts.max_rows:
        parts.append(
            f'<p class="note">The table lists the {opts.max_rows} most wrong of {len(ranked)} images.</p>'
        )
    left_out = len(ranked) - len(shown)
    parts.append(
        f"<h3>The {len(shown)} most wrong images (ground truth | prediction)</h3>"
        + (
            f'<p class="note">{left_out} less wrong image(s) are not shown (--max-images {opts.max_images}).</p>'
            if left_out
            else ""
        )
    )
    for rank, s in enumerate(shown, start=1):
        caption = (
            f"#{rank} image {s.image_id} ({esc(ds.image_info(s.image_id)['file_name'])}): {s.missed} missed, "
            f"{s.false_positives} false positive(s) of {s.num_shown} detection(s) >= {opts.score_thr:g}, "
            f"{s.num_gt} ground truth, AP50 {'n/a' if s.ap50 is None else f'{100 * s.ap50:.1f}%'}"
        )
        try:
            uri = run_image_page(
                ds,
                s.image_id,
                by_image.get(s.image_id, []),
                exif=exif,
                score_thr=opts.score_thr,
                max_draw=opts.max_draw,
                long_side=opts.long_side,
            )
            picture = f'<img src="{uri}" alt="image {s.image_id}">'
        except (OSError, ValueError) as err:  # a moved or unreadable image: said in its place
            picture = f'<p class="warn">picture unavailable: {esc(err)}</p>'
        parts.append(f'<figure id="img{s.image_id}">{picture}<figcaption>{caption}</figcaption></figure>')
    return "".join(parts)


def run_report(run_dir: Path, opts: ReportOptions) -> str:
    """The HTML page of one run directory."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    m = metrics.get
    title = f"ntt run: {m('dataset', '?')} {m('shots', '?')}-shot seed {m('seed', '?')}"
    page = Page(
        title,
        f"{m('sam2', '?')} + {m('dinov2', '?')}, {m('variant', '')} - {run_dir}",
    )
    page.add("identity", "Run", identity_section(metrics, run_dir))
    page.add("metrics", "Metrics", metrics_section(metrics))
    page.add("per-class", "Per class", per_class_section(metrics))
    page.add("images", "Images, most wrong first", images_section(run_dir, metrics, opts))
    page.add("failures", "Failed images", failures_section(metrics, failed_lines(run_dir)))
    page.add("config", "Config", config_section(run_dir, metrics))
    return page.render()
