"""`ntt report`: how wrong an image is (known answers, and pycocotools' own per-image AP), the pages of a run,
a study and an `ntt segment` folder (their tables hold the json's numbers; nothing is loaded from outside),
and the bad inputs. The page in a real browser: tests/test_report_browser.py."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from helpers_report import fake_run, fake_segment_output

from ntt import cli
from ntt.report import ReportOptions, kind_of, write_report
from ntt.report.imagescore import _interpolated_ap, rank_images, score_images
from ntt.utils.errors import UserError


class Cells(HTMLParser):
    """Every ``<td data-key>``: key -> (shown text, data-value), and every ``src`` (img, script, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, tuple[str, str | None]] = {}
        self.sources: list[tuple[str, str]] = []
        self._key: str | None = None
        self._value: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and "data-key" in a:
            self._key, self._value, self._text = a["data-key"], a.get("data-value"), []
        if "src" in a or "href" in a and tag == "link":
            self.sources.append((tag, a.get("src") or a.get("href")))

    def handle_data(self, data):
        if self._key is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._key is not None:
            self.cells[self._key] = ("".join(self._text).strip(), self._value)
            self._key = None


def parse(path: Path) -> Cells:
    parser = Cells()
    parser.feed(path.read_text())
    return parser


def check_metric(cells: Cells, key: str, value: float) -> None:
    """The cell shows the fraction in percent with two decimals and holds it exactly in data-value."""
    text, exact = cells.cells[key]
    if value < 0:
        assert text == "n/a" and exact is None, key
    else:
        assert float(exact) == value, key  # repr round-trips a float exactly
        assert text == f"{100 * value:.2f}", key


# ---- how wrong an image is ------------------------------------------------------------------------


def _gt():
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2, 3)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
    ]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    return {"images": images, "annotations": anns, "categories": cats}


RESULTS = [
    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.9},  # finds annotation 1
    {"image_id": 1, "category_id": 1, "bbox": [80, 0, 10, 10], "score": 0.8},  # matches nothing
    {"image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20], "score": 0.3},  # finds 2, below 0.5
    {"image_id": 3, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.7},  # an image without ground truth
]


def test_image_scores_count_missed_and_false_positives_above_the_threshold():
    scores = score_images(
        _gt(), RESULTS, category_ids=[1, 2], image_ids=[1, 2, 3], iou_type="bbox", score_thr=0.5
    )
    one, two, three = scores[1], scores[2], scores[3]
    # image 1: annotation 2 is found only by a detection under the threshold: missed; one false positive
    assert (one.num_gt, one.num_shown, one.missed, one.false_positives, one.errors) == (2, 2, 1, 1, 2)
    # hit, miss, hit: precision envelope 1 up to recall .5, then 2/3: (51 * 1 + 50 * 2/3) / 101
    assert one.ap50 == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)
    assert (two.num_gt, two.missed, two.false_positives, two.ap50) == (1, 1, 0, 0.0)
    assert (three.num_gt, three.false_positives, three.ap50) == (0, 1, None)
    # most errors first; equal errors: lower AP50 first, no ground truth last
    assert [s.image_id for s in rank_images(scores)] == [1, 2, 3]
    at_zero = score_images(
        _gt(), RESULTS, category_ids=[1, 2], image_ids=[1, 2, 3], iou_type="bbox", score_thr=0.0
    )
    assert (at_zero[1].missed, at_zero[1].false_positives, at_zero[1].ap50) == (0, 1, one.ap50)


def test_image_ap50_equals_cocoeval_on_that_image_alone():
    """The per-image AP50 is COCOeval's own AP50 of the image evaluated alone (pycocotools, exact)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    gt = _gt()
    results = [
        {
            "image_id": 1,
            "category_id": 1,
            "bbox": [float(x) for x in rng.uniform(0, 60, 2)] + [20, 20],
            "score": float(s),
        }
        for s in rng.uniform(0, 1, 12)
    ] + RESULTS[:3]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.params.imgIds = [1]
        ev.params.catIds = [1]
        ev.evaluate()
        ev.accumulate()
    want = float(np.mean(ev.eval["precision"][0, :, 0, 0, -1]))
    got = score_images(gt, results, category_ids=[1, 2], image_ids=[1, 2, 3], iou_type="bbox", score_thr=0.5)
    assert got[1].ap50 == pytest.approx(want, abs=1e-12)
    assert _interpolated_ap([], [], 3) == 0.0 and _interpolated_ap([0.5], [True], 0) == -1.0


# ---- the pages --------------------------------------------------------------------------------------


def test_run_report_tables_hold_metrics_json(tmp_path):
    run = tmp_path / "run"
    metrics = fake_run(run, tmp_path / "data")
    page = write_report(run, opts=ReportOptions(max_images=2, score_thr=0.5))
    assert page == run / "report.html"
    cells = parse(page)
    for iou_type in ("bbox", "segm"):
        for name, value in metrics[iou_type].items():
            check_metric(cells, f"{iou_type}.{name}", value)
    assert 0 < metrics["segm"]["AP"] < 1  # the fake run's numbers are not all 0 or 1
    for row in metrics["per_class"]:
        cid = row["category_id"]
        assert cells.cells[f"per_class.{cid}.num_gt"][0] == str(row["num_gt"])
        for key in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP75"):
            check_metric(cells, f"per_class.{cid}.{key}", row[key])
    assert cells.cells["identity.config_id"][0] == metrics["config_id"]
    failed = metrics["failed_images"][0]
    assert f"failed.{failed}" in cells.cells
    text = page.read_text()
    assert "RuntimeError: out of memory &lt;when&gt; decoding" in text  # escaped, with its traceback
    assert "Traceback (most recent call last)" in text
    # pictures: the 2 most wrong of the 3 evaluated images, the third said to be left out
    imgs = [src for tag, src in cells.sources if tag == "img"]
    assert len(imgs) == 2 and all(src.startswith("data:image/jpeg;base64,") for src in imgs)
    assert "1 less wrong image(s) are not shown" in text
    # the most wrong first: the image with every instance missed and a false positive
    ranked = re.findall(r'<figure id="img(\d+)"', text)
    assert int(ranked[0]) == json.loads((run / "predictions.json").read_text())[-1]["image_id"]
    assert "<svg" in text and "errors = missed + false positives" in text
    assert not [s for _, s in cells.sources if not s.startswith("data:")]  # nothing loaded from anywhere


def test_run_report_without_the_dataset_keeps_metrics_and_says_why(tmp_path):
    run = tmp_path / "run"
    metrics = fake_run(run, tmp_path / "data")
    (tmp_path / "data" / "test.json").unlink()
    page = write_report(run, tmp_path / "r.html")
    text = page.read_text()
    assert "No per-image analysis: dataset.test_json=" in text
    check_metric(parse(page), "segm.AP", metrics["segm"]["AP"])


def test_study_report_has_mean_std_and_ci_over_seeds(tmp_path):
    runs = [
        fake_run(tmp_path / "study" / f"seed{s}", tmp_path / "data", seed=s, drop_extra=k)
        for k, s in enumerate((1, 2, 3))
    ]
    assert kind_of(tmp_path / "study") == "study"
    page = write_report(tmp_path / "study")
    cells = parse(page)
    for k, m in enumerate(runs):
        check_metric(cells, f"runs.seed{k + 1}.segm.AP", m["segm"]["AP"])
        assert cells.cells[f"runs.seed{k + 1}.failed"][0] == "1"
    # the fake runs each have a failed image: none is in the statistics, every one is listed as left out
    assert "No valid run" in page.read_text() and page.read_text().count("failed or missing images") == 3
    for m in runs:
        m["failed_images"] = []
    for k, m in enumerate(runs):
        (tmp_path / "study" / f"seed{k + 1}" / "metrics.json").write_text(json.dumps(m))
    cells = parse(write_report(tmp_path / "study"))
    aps = [100 * m["segm"]["AP"] for m in runs]
    mean, std = float(np.mean(aps)), float(np.std(aps, ddof=1))
    assert std > 0
    key = "stats.set1.synthetic.2.mask_"
    assert float(cells.cells[key + "mean"][1]) == pytest.approx(mean, abs=1e-9)
    assert cells.cells[key + "mean"][0] == f"{mean:.1f}"
    assert float(cells.cells[key + "std"][1]) == pytest.approx(std, abs=1e-9)
    assert float(cells.cells[key + "ci95"][1]) == pytest.approx(
        1.96 * std / math.sqrt(3), abs=1e-9
    )  # seedstats.Z95
    assert cells.cells[key + "n"][0] == "3"
    imgs = [src for tag, src in cells.sources if tag == "img"]
    assert len(imgs) == 1 and imgs[0].startswith("data:image/png;base64,")  # AP against shots
    for c, row in enumerate(runs[0]["per_class"]):  # per class: mean and std over the seeds
        values = [100 * m["per_class"][c]["segm_AP"] for m in runs]
        key = f"class.set1.synthetic.2.{row['category_id']}.segm_AP_"
        assert float(cells.cells[key + "mean"][1]) == pytest.approx(np.mean(values), abs=1e-9)
        assert float(cells.cells[key + "std"][1]) == pytest.approx(np.std(values, ddof=1), abs=1e-9)


def test_segment_report_lists_detections_overlays_and_failures(tmp_path):
    out = tmp_path / "seg"
    fake_segment_output(out, tmp_path)
    assert kind_of(out) == "segment"
    page = write_report(out, opts=ReportOptions(score_thr=0.5))
    cells = parse(page)
    assert cells.cells["summary.images"][0] == "2" and cells.cells["summary.failed"][0] == "1"
    assert cells.cells["summary.detections"][0] == "3" and cells.cells["summary.shown"][0] == "2"
    assert cells.cells["class.1"][0] == "1" and cells.cells["class.2"][0] == "1"
    assert cells.cells["image.1.detections"][0] == "2" and cells.cells["image.1.shown"][0] == "1"
    assert len([s for t, s in cells.sources if t == "img"]) == 2
    assert "OSError: truncated" in page.read_text()


# ---- bad inputs ---------------------------------------------------------------------------------------


def _errors(caplog) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    caplog.clear()
    return lines


def test_not_a_report_folder_is_one_line_and_exit_2(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    (line,) = _errors(caplog)
    assert "is not an `ntt run` directory (metrics.json + config.yaml), a study folder" in line
    assert "\n" not in line
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in _errors(caplog)[0]
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match="metrics.json but no config.yaml"):
        kind_of(tmp_path / "half")
    assert cli.main(["report", str(tmp_path / "empty"), "--long-side", "3"]) == 2
    assert "--long-side >= 16" in _errors(caplog)[0]


def test_report_cli_writes_the_page(tmp_path, capsys):
    run = tmp_path / "run"
    fake_run(run, tmp_path / "data")
    assert cli.main(["report", str(run), "--out", str(tmp_path / "x" / "r.html"), "--max-images", "0"]) == 0
    assert f"report: {(tmp_path / 'x' / 'r.html').resolve()}" in capsys.readouterr().out
    assert "<img" not in (tmp_path / "x" / "r.html").read_text()


@pytest.mark.slow
def test_report_of_a_real_smoke_run(tmp_path):
    """`make smoke`'s pipeline (tiny random models), then its page: every metric of metrics.json in the tables
    and the 4 test images drawn (random weights: the numbers are plumbing only)."""
    from helpers_pipeline import run_smoke

    run_smoke(tmp_path)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    cells = parse(write_report(run))
    for iou_type in ("bbox", "segm"):
        for name, value in metrics[iou_type].items():
            check_metric(cells, f"{iou_type}.{name}", value)
    assert cells.cells["identity.config_id"][0] == metrics["config_id"]
    assert len([s for t, s in cells.sources if t == "img"]) == metrics["num_images"] == 4
