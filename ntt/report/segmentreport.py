"""The report of an ``ntt segment`` output folder: detections per image and class, the overlays, the failures.

Reads ``dataset.json`` (images, classes), ``predictions.json`` (COCO results), ``failed.json`` and the
``overlays/`` PNGs ``ntt segment`` drew (``<stem>.png``, ``<stem>_<id>.png`` for equal stems). There is no
ground truth in such a folder, so nothing is scored: images are listed by the number of detections scoring
at least the threshold (fewest first: the likeliest misses), and no AP is shown.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ntt.report.page import Cell, Page, esc, number_cell, table
from ntt.report.pictures import load_picture
from ntt.report.runreport import ReportOptions

__all__ = ["segment_report"]


def _overlay(out: Path, file_name: str, image_id: int) -> Path | None:
    stem = Path(file_name).stem
    for name in (f"{stem}.png", f"{stem}_{image_id}.png"):
        if (out / "overlays" / name).is_file():
            return out / "overlays" / name
    return None


def segment_report(out: Path, opts: ReportOptions) -> str:
    """The HTML page of an ``ntt segment`` output folder."""
    dataset: dict[str, Any] = json.loads((out / "dataset.json").read_text())
    results: list[dict] = json.loads((out / "predictions.json").read_text())
    failed: list[dict] = (
        json.loads((out / "failed.json").read_text()) if (out / "failed.json").is_file() else []
    )
    names = {int(c["id"]): str(c["name"]) for c in dataset.get("categories", [])}
    failed_ids = {int(f["image_id"]) for f in failed}
    images = [im for im in dataset.get("images", []) if int(im["id"]) not in failed_ids]
    shown = Counter(int(r["image_id"]) for r in results if float(r["score"]) >= opts.score_thr)
    total = Counter(int(r["image_id"]) for r in results)
    per_class = Counter(int(r["category_id"]) for r in results if float(r["score"]) >= opts.score_thr)

    page = Page(f"ntt segment: {out.name}", f"{len(images)} image(s), {len(results)} detection(s) - {out}")
    page.add(
        "summary",
        "Summary",
        table(
            ["key", "value"],
            [
                ["output folder", str(out)],
                ["images segmented", number_cell(len(images), "summary.images")],
                ["images failed", number_cell(len(failed), "summary.failed")],
                ["detections", number_cell(len(results), "summary.detections")],
                [f"detections >= {opts.score_thr:g}", number_cell(sum(shown.values()), "summary.shown")],
            ],
            cls="plain",
            id="summary",
        )
        + '<p class="note">No ground truth in an `ntt segment` folder: no AP, no missed instances. To score '
        "predictions against ground truth, run the benchmark (`ntt run`) and `ntt report RUN_DIR`.</p>",
    )
    page.add(
        "classes",
        "Detections per class",
        table(
            ["class", "category id", f"detections >= {opts.score_thr:g}"],
            [
                [names[c], number_cell(c), number_cell(per_class.get(c, 0), f"class.{c}")]
                for c in sorted(names)
            ],
            id="classes",
        ),
    )
    ordered = sorted(images, key=lambda im: (shown.get(int(im["id"]), 0), int(im["id"])))
    rows = [
        [
            number_cell(im["id"]),
            im["file_name"],
            number_cell(total.get(int(im["id"]), 0), f"image.{im['id']}.detections"),
            number_cell(shown.get(int(im["id"]), 0), f"image.{im['id']}.shown"),
        ]
        for im in ordered
    ]
    body = table(["image id", "file", "detections", f"detections >= {opts.score_thr:g}"], rows, id="images")
    drawn = ordered[: opts.max_images]
    if len(ordered) > len(drawn):
        left_out = len(ordered) - len(drawn)
        body += f'<p class="note">{left_out} image(s) not shown (--max-images {opts.max_images}).</p>'
    for im in drawn:
        path = _overlay(out, im["file_name"], int(im["id"]))
        count = shown.get(int(im["id"]), 0)
        caption = f"image {im['id']} ({esc(im['file_name'])}): {count} detection(s) >= {opts.score_thr:g}"
        picture = (
            f'<img src="{load_picture(path, opts.long_side)}" alt="overlay of image {im["id"]}">'
            if path is not None
            else '<p class="note">no overlay (ntt segment ran with --no-overlays?)</p>'
        )
        caption += " - the overlay as ntt segment drew it"
        body += f'<figure id="img{im["id"]}">{picture}<figcaption>{caption}</figcaption></figure>'
    page.add("images", "Images, fewest detections first", body)
    if failed:
        fbody = table(
            ["image id", "file", "error"],
            [
                [
                    number_cell(f["image_id"]),
                    f.get("file_name", "-"),
                    Cell(esc(f.get("error", "-")), html_text=True),
                ]
                for f in failed
            ],
            id="failures",
        )
    else:
        fbody = '<p class="note">No image failed.</p>'
    page.add("failures", "Failed images", fbody)
    return page.render()
