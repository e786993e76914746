"""``ntt report PATH``: one self-contained HTML page of a run, a study or an ``ntt segment`` folder.

    ntt report RUN_DIR | STUDY_DIR | SEGMENT_OUT [--out FILE] [--study NAME] [--max-images N]
               [--score-thr S] [--max-draw M] [--long-side PX] [--root DIR]

What PATH is, is read from its files:

* a run directory of ``ntt run``: ``metrics.json`` and ``config.yaml``;
* an ``ntt segment`` output folder: ``dataset.json`` and ``predictions.json`` (no ``metrics.json``);
* a study folder: ``metrics.json`` files below it (an output folder of ``ntt study`` / ``ntt run -m``).

The page (default ``PATH/report.html``) loads nothing: pictures are data URIs, plots inline SVG or PNG, the
style and the few lines of script (sortable tables) inline. Anything else is one error line, exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ntt.report.runreport import ReportOptions, run_report
from ntt.utils.errors import UserError
from ntt.utils.files import write_text_atomic

__all__ = ["kind_of", "write_report", "main"]

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"


def kind_of(path: Path) -> str:
    """``"run"``, ``"segment"`` or ``"study"`` (see the module docstring).

    Raises:
        UserError: PATH is none of them (the message says what each needs).
    """
    if not path.is_dir():
        raise UserError(
            f"ntt report: {path} is not a folder: give an `ntt run` directory, a study folder or an "
            "`ntt segment` output folder"
        )
    if (path / "metrics.json").is_file():
        if not (path / "config.yaml").is_file():
            raise UserError(
                f"ntt report: {path} has metrics.json but no config.yaml: "
                "is it a complete `ntt run` directory?"
            )
        return "run"
    if (path / "dataset.json").is_file() and (path / "predictions.json").is_file():
        return "segment"
    if next(path.rglob("metrics.json"), None) is not None:
        return "study"
    raise UserError(
        f"ntt report: {path} is not an `ntt run` directory (metrics.json + config.yaml), a study folder "
        "(metrics.json files below it) or an `ntt segment` output folder (dataset.json + predictions.json)"
    )


def write_report(
    path: str | Path,
    out: str | Path | None = None,
    opts: ReportOptions | None = None,
    study: str | None = None,
) -> Path:
    """Write the HTML report of ``path`` and return the file.

    Args:
        path: a run directory, a study folder or an ``ntt segment`` output folder.
        out: the HTML file (default ``path/report.html``).
        opts: what the page shows (:class:`ReportOptions`).
        study: a study folder: only the runs of this study (metrics.json's ``study``).
    """
    path = Path(path)
    opts = opts or ReportOptions()
    kind = kind_of(path)
    t0 = time.perf_counter()
    if kind == "run":
        text = run_report(path, opts)
    elif kind == "segment":
        from ntt.report.segmentreport import segment_report

        text = segment_report(path, opts)
    else:
        from ntt.report.studyreport import study_report

        text = study_report(path, study)
    target = Path(out) if out is not None else path / REPORT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, text)
    log.info(
        "report of the %s %s -> %s (%.1f s, %.1f MB)",
        kind,
        path,
        target,
        time.perf_counter() - t0,
        len(text) / 1e6,
    )
    return target


def main(argv: list[str] | None = None) -> int:
    """``ntt report PATH``: a self-contained HTML page of a run, a study or an ``ntt segment`` folder."""
    ap = argparse.ArgumentParser(
        prog="ntt report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("path", help="an `ntt run` directory, a study folder or an `ntt segment` output folder")
    ap.add_argument("--out", default=None, help=f"the HTML file to write (default PATH/{REPORT_FILE})")
    ap.add_argument("--study", default=None, help="a study folder: only the runs of this study name")
    ap.add_argument(
        "--max-images", type=int, default=50, help="pictures of the N most wrong images (default 50)"
    )
    ap.add_argument(
        "--score-thr", type=float, default=0.5, help="detections scoring >= this are drawn and counted (0.5)"
    )
    ap.add_argument("--max-draw", type=int, default=30, help="detections drawn per image, best first (30)")
    ap.add_argument(
        "--long-side", type=int, default=512, help="long side of each picture panel, pixels (512)"
    )
    ap.add_argument(
        "--root", default=None, help="a run: folder the config's relative dataset paths start from"
    )
    args = ap.parse_args(argv)
    if args.max_images < 0 or args.max_draw < 1 or args.long_side < 16:
        raise UserError("ntt report: --max-images must be >= 0, --max-draw >= 1 and --long-side >= 16")
    opts = ReportOptions(
        max_images=args.max_images,
        score_thr=args.score_thr,
        max_draw=args.max_draw,
        long_side=args.long_side,
        root=Path(args.root) if args.root else None,
    )
    target = write_report(args.path, args.out, opts, args.study)
    print(f"report: {target.resolve()} (open it in a browser; it needs no server and no network)")
    return 0
