"""`ntt report` pages in a real headless browser: Debian's Chromium (/usr/bin/chromium) driven by playwright.

Each page is opened from its file:// URL, as a person opens it: it must load with no console error and no
page error, request nothing but itself and its data: URIs, show in its table cells the numbers of
metrics.json (read from the DOM), and every <img> must have decoded (naturalWidth > 0). A full-page
screenshot of each is kept in test-artifacts/report/ (git-ignored; the path is printed).

Chromium comes from the system (`.ci/run` installs the `chromium` package); playwright never downloads a
browser here. Without Chromium the tests skip, except under CI=true, where they fail: CI must run them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import REPO
from helpers_report import fake_run, fake_segment_output

from ntt.report import ReportOptions, write_report

CHROMIUM = os.environ.get("NTT_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts" / "report"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _missing() -> str | None:
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing (pip install -c constraints.txt -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One Chromium with a fresh profile for the module's pages."""
    reason = _missing()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {reason}: the browser test must run in CI")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
        )
        yield context
        context.close()


def open_page(context, html: Path, shot: str):
    """Open ``html`` from its file:// URL; returns (page, problems). Saves a full-page screenshot."""
    page = context.new_page()
    problems: list[str] = []
    page.on(
        "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    url = html.resolve().as_uri()
    page.on(
        "request",
        lambda r: (
            problems.append(f"request: {r.url[:80]}")
            if r.url != url and not r.url.startswith("data:")
            else None
        ),
    )
    page.goto(url, wait_until="load")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    target = ARTIFACTS / shot
    page.screenshot(path=str(target), full_page=True)
    print(f"screenshot of {html.name}: {target}")
    return page, problems


def dom_cells(page) -> dict[str, tuple[str, str | None]]:
    rows = page.eval_on_selector_all(
        "td[data-key]",
        "els => els.map(e => [e.dataset.key, e.textContent.trim(), e.getAttribute('data-value')])",
    )
    return {k: (text, value) for k, text, value in rows}


def images_decoded(page) -> list[int]:
    return page.evaluate("Array.from(document.images).map(i => (i.complete ? i.naturalWidth : 0))")


def test_run_report_in_chromium(browser, tmp_path):
    run = tmp_path / "run"
    metrics = fake_run(run, tmp_path / "data")
    html = write_report(run, opts=ReportOptions(max_images=3))
    page, problems = open_page(browser, html, "run-report.png")
    assert problems == []
    cells = dom_cells(page)
    checked = 0
    for iou_type in ("bbox", "segm"):
        for name, value in metrics[iou_type].items():
            text, exact = cells[f"{iou_type}.{name}"]
            assert text == ("n/a" if value < 0 else f"{100 * value:.2f}"), (iou_type, name)
            assert (exact is None) if value < 0 else float(exact) == value
            checked += 1
    for row in metrics["per_class"]:
        for key in ("bbox_AP", "segm_AP", "segm_AP50"):
            text, _ = cells[f"per_class.{row['category_id']}.{key}"]
            assert text == ("n/a" if row[key] < 0 else f"{100 * row[key]:.2f}")
            checked += 1
    assert checked == 24 + 3 * len(metrics["per_class"])
    widths = images_decoded(page)
    assert len(widths) == 3 and all(w > 0 for w in widths), widths
    # the inline script sorts: a second click on "errors" puts the largest count first
    header = page.locator("#images th", has_text="errors")
    header.click()
    header.click()
    col = page.eval_on_selector_all("#images tbody tr", "rows => rows.map(r => +r.cells[7].dataset.value)")
    assert col == sorted(col, reverse=True) and col[0] > col[-1]
    assert problems == []
    page.close()


def test_study_and_segment_reports_in_chromium(browser, tmp_path):
    runs = [
        fake_run(tmp_path / "study" / f"seed{s}", tmp_path / "data", seed=s, drop_extra=s, fail=False)
        for s in (0, 1)
    ]
    page, problems = open_page(browser, write_report(tmp_path / "study"), "study-report.png")
    assert problems == []
    cells = dom_cells(page)
    for s, m in enumerate(runs):
        assert cells[f"runs.seed{s}.bbox.AP"][0] == f"{100 * m['bbox']['AP']:.2f}"
    mean = (runs[0]["segm"]["AP"] + runs[1]["segm"]["AP"]) / 2
    assert cells["stats.set1.synthetic.2.mask_mean"][0] == f"{100 * mean:.1f}"
    widths = images_decoded(page)
    assert len(widths) == 1 and widths[0] > 0, widths  # the AP-against-shots plot
    page.close()

    fake_segment_output(tmp_path / "seg", tmp_path)
    page, problems = open_page(browser, write_report(tmp_path / "seg"), "segment-report.png")
    assert problems == []
    assert dom_cells(page)["summary.detections"][0] == "3"
    widths = images_decoded(page)
    assert len(widths) == 2 and all(w > 0 for w in widths)
    page.close()
