"""Fast paths measured against parity mode: speed, memory and agreement in one command.

``make bench-fastpaths`` / ``python -m ntt.tools.fastpaths [--device cuda] [--sam2 OPTION] [--dinov2 OPTION]
[--grid P] [--modes a,b,...]``. Models are built with RANDOM weights from ``conf/backbone`` options
(``ntt.tools.random_models``): the figures measure speed and how far each fast path moves the outputs away
from parity mode's, never accuracy.

Each mode is the per-image test path (``ntt.inference.propose_image`` + ``classify_and_postprocess``, i.e.
``infer_image``) with some ``SAM2Backbone`` fast-path flags (``ntt.tools.fastpath_modes.MODES``). All modes
share the same model weights, images and class prototypes (the memory of ``--shots`` references per class
sampled from the dataset's reference json, as the pipeline does). Per image the modes run one after the other
(parity first, so load changes hit every mode alike); every mode first runs the first image once untimed (its
time, which includes ``torch.compile``'s compilation, is reported as ``warmup_s``).

Per mode: images/s and seconds per image over the timed images, peak memory (CUDA: max allocated during
the mode's calls, model weights included; CPU: growth of the process's peak RSS, a lower bound since the
peak is process-wide), and agreement with the parity run of the same images (``ntt.tools.agreement``):
proposal level (same chosen multimask output, IoU-score differences, mask IoU of the same proposal),
detection level (matched by source prompt: score difference, mask IoU, counts) and the AP of the mode's
detections with the parity detections above ``--gt-score-thr`` as the ground truth.

Random weights predict near-constant IoUs and masks that overlap each other by more than 0.9, so with the
paper's ``iou_thr=0.4`` / ``nms_thr=0.5`` (and even ``nms_thr=0.9``) one detection per image is left. The
defaults here therefore keep every prompt (``--iou-thr -1``) and turn NMS off (``--nms-thr 1.0``: a box
is removed only above IoU 1), so every proposal reaches soft merging and top-k (``--num-out 100``) and
there are proposals and detections to compare; all settings are recorded in the output.

Output: ``<out>/fastpaths-<YYYYmmdd>-<cpu|gpu-name>[-<tag>].json`` and ``.md`` (table, command, hardware,
load averages, the random-weights warning). This module is the command and its report; the measurement is
:mod:`ntt.tools.fastpath_measure`, the modes :mod:`ntt.tools.fastpath_modes`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import re
import signal
from pathlib import Path
from typing import Any

import torch

from ntt.tools.fastpath_measure import RANDOM_WEIGHTS_NOTE, measure, raise_interrupted
from ntt.tools.fastpath_modes import DEFAULT_MODES, MODES
from ntt.tools.machine import command_line, load_average
from ntt.utils.files import write_json_atomic, write_text_atomic

__all__ = ["RANDOM_WEIGHTS_NOTE", "main"]

log = logging.getLogger("ntt.tools.fastpaths")


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def _f(x, fmt: str = ".4f") -> str:
    return "n/a" if x is None else format(x, fmt)


def table_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per mode: speed, memory and the headline agreement figures."""
    rows = []
    cuda = report["settings"]["device"] == "cuda"
    for name, m in report["modes"].items():
        if "timing" not in m:
            rows.append((name, m["flags"], m["status"], *([""] * 8)))
            continue
        t, mem = m["timing"], m["memory"]
        mem_cell = (
            f"{mem['cuda_peak_allocated_mib']:.0f} MiB"
            if cuda
            else f"+{mem['cpu_peak_rss_growth_mib']:.0f} MiB RSS"
        )
        speed = f"{t['images_per_s']:.3g}" + (
            f" (x{t['speedup_vs_parity']:.2f})" if "speedup_vs_parity" in t else ""
        )
        a, ap = m.get("agreement"), m.get("ap_vs_parity")
        if a is None:
            ap_cell = (
                "n/a" if ap is None else f"{_f(ap['segm_AP'], '.3f')} / {_f(ap['bbox_AP'], '.3f')} (self)"
            )
            warm = "n/a" if t["warmup_s"] is None else f"{t['warmup_s']:.2f} s"
            rows.append((name, m["flags"], speed, warm, mem_cell, *(["reference"] * 5), ap_cell))
            continue
        p, d = a["proposals"], a["detections"]
        rows.append(
            (
                name,
                m["flags"],
                speed,
                "n/a" if t["warmup_s"] is None else f"{t['warmup_s']:.2f} s",
                mem_cell,
                _f(p["same_chosen_output"]),
                f"{_f(p['mask_iou']['mean'])} / {_f(p['mask_iou']['min'])}",
                f"{_f(p['iou_score_abs_diff']['mean'], '.1e')} / {_f(p['iou_score_abs_diff']['max'], '.1e')}",
                f"{d['fast']} vs {d['parity']} ({d['matched']} matched)",
                f"{_f(d['score_abs_diff']['max'], '.1e')} / {_f(d['mask_iou']['min'])}",
                f"{_f(ap['segm_AP'], '.3f')} / {_f(ap['bbox_AP'], '.3f')}",
            )
        )
    return rows


TABLE_HEADER = (
    "mode",
    "flags",
    "images/s (vs parity)",
    "warm-up (1st image)",
    "peak memory",
    "same chosen output",
    "proposal mask IoU mean / min",
    "IoU-score abs diff mean / max",
    "detections (fast vs parity)",
    "matched det. score abs diff max / mask IoU min",
    "AP vs parity segm / bbox",
)


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Markdown table of :func:`table_rows`."""

    def line(cells) -> str:
        return "| " + " | ".join(cells) + " |"

    return "\n".join([line(TABLE_HEADER), "|" + "---|" * len(TABLE_HEADER), *(line(r) for r in rows)])


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page."""
    hw, s = report["hardware"], report["settings"]
    p = s["params"]
    gpu = f", {hw['gpu_name']}" if "gpu_name" in hw else ""
    lines = [
        f"# Fast paths vs parity mode, {report['timestamp_utc'][:10]}, {report['device_slug']}",
        "",
        f"> **{report['WARNING']}**",
        "",
        f"- Command: `{report['command']}`",
        f"- Hardware: {hw['cpu_model']}, {hw['cpu_cores']} cores ({s['threads']} torch threads){gpu}, torch "
        f"{hw['torch']}; load average (1/5/15 min) at start {hw.get('load_average_1_5_15_at_start')}, at end "
        f"{report.get('load_average_1_5_15_at_end')}",
        f"- Models (random init): SAM2 `{s['sam2_option']}` + DINOv2 `{s['dinov2_option']}`; data: {s['data']}, "
        f"{len(s['image_ids'])} images (+{s['warmup']} warm-up run per mode), {s['shots']} shots, seed {s['seed']}",
        f"- Settings: {p['points_per_side']}x{p['points_per_side']} grid, iou_thr {p['iou_thr']}, nms_thr "
        f"{p['nms_thr']}, num_out {p['num_out']}; AP ground truth = parity detections with score > "
        f"{s['gt_score_thr']}",
        f"- Total wall time {report['total_wall_s']:.0f} s",
        *(
            [f"- **Interrupted ({report['interrupted']})**: the figures cover only the images finished"]
            if report.get("interrupted")
            else []
        ),
        "",
        format_table(table_rows(report)),
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ntt.tools.fastpaths",
        description="Fast paths vs parity mode: images/s, peak memory, agreement (RANDOM weights).",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    p.add_argument(
        "--sam2", default="tiny_random", help="conf/backbone/sam2 option, random init (tiny_random)"
    )
    p.add_argument(
        "--dinov2", default="tiny_random", help="conf/backbone/dinov2 option, random init (tiny_random)"
    )
    p.add_argument(
        "--grid", type=int, default=4, help="prompt grid side P (P*P prompts; default 4, paper 32)"
    )
    p.add_argument(
        "--points-batch-size", type=int, default=256, help="prompts per proposer batch (paper 256)"
    )
    p.add_argument(
        "--decoder-chunk", type=int, default=None, help="prompts per decoder call except one_batch/combo (16)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        choices=[0, 1],
        help="one untimed first-image run per mode (default 1)",
    )
    p.add_argument("--iou-thr", type=float, default=-1.0, help="proposal IoU filter (default -1: keep all)")
    p.add_argument(
        "--nms-thr", type=float, default=1.0, help="NMS IoU threshold (default 1.0: none removed; paper 0.5)"
    )
    p.add_argument("--num-out", type=int, default=100, help="final detections per image (paper 100)")
    p.add_argument(
        "--gt-score-thr",
        type=float,
        default=0.0,
        help="parity detections above this score are the AP ground truth",
    )
    p.add_argument(
        "--modes", default=DEFAULT_MODES, help=f"comma-separated, parity first (default {DEFAULT_MODES})"
    )
    p.add_argument("--force", default="", help="comma-separated CUDA-only modes to run on the CPU anyway")
    p.add_argument(
        "--coco-json", default=None, help="a COCO json with masks (default: the synthetic smoke set)"
    )
    p.add_argument("--image-root", default=None, help="image folder of --coco-json (default: its folder)")
    p.add_argument(
        "--data-root", default=None, help="where the synthetic set lives (default $NTT_OUTPUT/datasets)"
    )
    p.add_argument(
        "--synthetic-images", type=int, default=24, help="synthetic set size (default 24, as make smoke)"
    )
    p.add_argument("--max-images", type=int, default=4, help="test images measured (default 4; 0 = all)")
    p.add_argument("--shots", type=int, default=2, help="references per class for the prototypes (default 2)")
    p.add_argument("--seed", type=int, default=0, help="reference sampling seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="benchmarks", help="output folder (default benchmarks/)")
    p.add_argument("--tag", default="", help="appended to the output file names")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.force = {m.strip() for m in args.force.split(",") if m.strip()}
    unknown = [m for m in [*args.modes, *args.force] if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    if not args.modes or args.modes[0] != "parity":
        p.error("--modes must start with parity (every other mode is compared with it)")
    if args.grid < 1 or args.max_images < 0 or args.shots < 1:
        p.error("--grid and --shots must be >= 1, --max-images >= 0")
    return args


def main(argv: list[str] | None = None) -> Path:
    """Measure, write ``fastpaths-*.json`` and ``.md``, print the table.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        Path of the written json.
    """
    from ntt.utils.console import setup_logging

    setup_logging()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    log.warning(RANDOM_WEIGHTS_NOTE)
    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        report = measure(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    report["timestamp_utc"] = started.isoformat(timespec="seconds")
    report["command"] = command_line("ntt.tools.fastpaths", argv)
    report["load_average_1_5_15_at_end"] = load_average()
    md = markdown(report)
    report["table_markdown"] = format_table(table_rows(report)).splitlines()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"-{re.sub(r'[^A-Za-z0-9_.-]+', '-', args.tag)}" if args.tag else ""
    path = out_dir / f"fastpaths-{started:%Y%m%d}-{report['device_slug']}{tag}.json"
    write_json_atomic(path, report, indent=2)
    write_text_atomic(path.with_suffix(".md"), md)
    log.info("wrote %s and %s", path, path.with_suffix(".md").name)
    print(md)
    return path


if __name__ == "__main__":
    main()
