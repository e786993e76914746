"""Micro-benchmarks of the hot spots (method.md §10) with RANDOM weights: TIMINGS ONLY, NO ACCURACY.

``make bench`` / ``python -m ntt.tools.bench [--quick] [--device cpu|cuda] [--sam2 OPTION] [--dinov2 OPTION]``.
Every model is built with ``random_init=True`` from a ``conf/backbone/{sam2,dinov2}/<OPTION>.yaml`` option; no
checkpoint is ever loaded. Random weights run the same kernels on the same shapes as the real ones, so the
model timings transfer; the outputs are meaningless, and so are the data-dependent counts (proposals passing
the IoU filter, NMS survivors), which is why sections 4-5 time fixed synthetic sizes.

Measured (median and min of ``--repeats`` runs after ``--warmup`` untimed runs (1; none with ``--quick``),
under ``torch.inference_mode``, with ``torch.cuda.synchronize`` around every run on CUDA):

1. ``dinov2_forward``: DINOv2 patch-grid forward of one 518x518 image.
2. ``sam2_image_encoder``: SAM2 ``encode_image`` (Hiera trunk + FPN neck) of one 1024x1024 image.
3. ``sam2_decoder``: SAM2 prompt decoder on one batch of B single-point prompts (also per prompt).
4. ``mask_pooling``: ``mask_embeddings`` ``dense`` vs ``adjoint`` for n 256x256 masks on a 37x37xD grid, and
   the max abs difference of their outputs (correctness side check: they are the same linear map).
5. ``soft_merge``: ``resize_masks_to_image`` (256 -> H x W) and ``semantic_soft_merge`` of n full-res masks
   spread over 3 classes.
6. ``sam2_decoder_paths``: the official and the cached decoder on the same prompts, interleaved, with CPU
   time and page faults per prompt, and whether both give the same bits.
7. ``infer_image``: the whole per-image test path on one synthetic 1024 image with a small prompt grid.

Each timing also records ``cpu_time_per_wall`` (this process) and ``other_load_cores`` (CPU used by other
processes meanwhile, from /proc/stat); measurements taken under competing load are listed in
``contention_warnings`` (on a shared 2-core machine such load can inflate timings several-fold).
The result is written to ``<out>/results-<YYYYmmdd>-<cpu|gpu-name-slug>[-quick].json``; a table is logged.
This module is the command and its report; the measurements are :mod:`ntt.tools.hotspots`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ntt.tools.hotspots import (
    Timer,
    bench_decoder_paths,
    bench_dinov2,
    bench_infer_image,
    bench_pooling,
    bench_sam2_decoder,
    bench_sam2_encoder,
    bench_soft_merge,
    smooth_images,
)
from ntt.tools.machine import CONTENTION_CORES, command_line, device_slug, hardware_info, load_average
from ntt.tools.random_models import build_models
from ntt.utils.files import write_json_atomic

__all__ = ["main", "RANDOM_WEIGHTS_NOTE"]

log = logging.getLogger("ntt.tools.bench")

RANDOM_WEIGHTS_NOTE = (
    "RANDOM WEIGHTS: every model was built with random_init=True and no checkpoint was loaded. "
    "These numbers are TIMINGS ONLY; nothing here says anything about accuracy."
)
SCHEMA_VERSION = 1

# Per-mode defaults (None in argparse = take these).
_DEFAULTS = {
    "cpu": dict(
        warmup=1, repeats=5, decoder_batch=16, grid=4, pool_masks=256, merge_masks=200, height=600, width=800
    ),
    "cuda": dict(
        warmup=1,
        repeats=10,
        decoder_batch=256,
        grid=32,
        pool_masks=256,
        merge_masks=200,
        height=600,
        width=800,
    ),
    "quick": dict(
        warmup=0, repeats=1, decoder_batch=2, grid=2, pool_masks=32, merge_masks=24, height=120, width=160
    ),
}


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def _fmt_s(x: float) -> str:
    if x >= 1:
        return f"{x:.3f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.0f} us"


def _load_cells(t: dict[str, Any]) -> tuple[str, str]:
    other = t.get("other_load_cores")
    return f"{t['cpu_time_per_wall']:.2f}", "n/a" if other is None else f"{other:.2f}"


def _timings(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(dotted name, timing dict)`` of every timed measurement."""
    found = []
    for key, val in results.items():
        if isinstance(val, dict) and "median_s" in val:
            found.append((key, val))
        elif isinstance(val, dict):
            found += [(f"{key}.{k}", v) for k, v in _timings(val)]
    return found


def contention_warnings(results: dict[str, Any]) -> list[str]:
    """Measurements during which other processes used more than ``CONTENTION_CORES`` cores on average."""
    return [
        f"{name}: other processes used {t['other_load_cores']:.2f} cores meanwhile"
        for name, t in _timings(results)
        if (t.get("other_load_cores") or 0.0) > CONTENTION_CORES
    ]


def table_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """``(measurement, median, min, repeats, cpu/wall, other load, shapes)`` rows of the results."""
    rows = []

    def add(name: str, t: dict[str, Any], shape: str) -> None:
        rows.append(
            (name, _fmt_s(t["median_s"]), _fmt_s(t["min_s"]), str(t["repeats"]), *_load_cells(t), shape)
        )

    r = results
    d = r["dinov2_forward"]
    add("DINOv2 forward", d, f"{d['shapes']['input']} -> {d['shapes']['output']}")
    e = r["sam2_image_encoder"]
    add("SAM2 image encoder", e, f"{e['shapes']['input']}")
    s = r["sam2_decoder"]
    add(f"SAM2 decoder, batch of {s['batch_prompts']}", s, f"points {s['shapes']['points']}")
    rows.append(
        (
            "SAM2 decoder, per prompt",
            _fmt_s(s["per_prompt_median_s"]),
            _fmt_s(s["per_prompt_min_s"]),
            str(s["repeats"]),
            *_load_cells(s),
            f"batch {s['batch_prompts']}",
        )
    )
    if "sam2_decoder_paths" in r:
        dp = r["sam2_decoder_paths"]
        for name in ("official", "cached"):
            t = dp[name]
            loads = [x["load1"] for x in dp["runs"][name] if x["load1"] is not None]
            rows.append(
                (
                    f"SAM2 decoder {name}, per prompt",
                    _fmt_s(t["per_prompt_median_s"]),
                    _fmt_s(t["min_s"] / dp["batch_prompts"]),
                    str(t["repeats"]),
                    *_load_cells(t),
                    f"cpu {_fmt_s(t['cpu_per_prompt_median_s'])}/prompt, {t['minflt_per_prompt_median']:.0f} "
                    f"faults/prompt, load1 {max(loads, default=float('nan')):.1f}"
                    + (
                        f", x{dp['speedup_wall']:.2f}, bit-identical {dp['bit_identical']}"
                        + (
                            f" (padded: {dp['decoded_prompts']} prompts decoded for {dp['batch_prompts']})"
                            if dp.get("decoded_prompts", dp["batch_prompts"]) > dp["batch_prompts"]
                            else ""
                        )
                        if name == "cached"
                        else ""
                    ),
                )
            )
    p = r["mask_pooling"]
    shp = f"masks {p['shapes']['masks']}, feats {p['shapes']['feats']}"
    add("mask pooling dense", p["dense"], shp)
    add("mask pooling adjoint", p["adjoint"], f"max|dense-adjoint| = {p['max_abs_diff']:.1e}")
    m = r["soft_merge"]
    add(
        "resize masks to image",
        m["resize_masks_to_image"],
        f"{m['shapes']['logits']} -> {m['shapes']['masks']}",
    )
    add("semantic soft merge", m["semantic_soft_merge"], f"{m['shapes']['masks']}, {m['classes']} classes")
    i = r["infer_image"]
    add(
        "infer_image (whole image)",
        i,
        f"{i['prompts']} prompts, {i['proposals_after_iou_filter']} proposals, {i['detections']} detections",
    )
    return rows


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Markdown table of :func:`table_rows`."""
    header = ("measurement", "median", "min", "n", "cpu/wall", "other load", "shapes / notes")
    widths = [max(len(x[k]) for x in [header, *rows]) for k in range(len(header))]

    def line(cells) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ntt.tools.bench",
        description="Hot-spot micro-benchmarks with RANDOM weights (timings only, no accuracy).",
    )
    p.add_argument(
        "--quick", action="store_true", help="seconds-long run (tiny models, small shapes; for tests)"
    )
    p.add_argument(
        "--out", default="benchmarks", help="output folder of the result json (default: benchmarks/)"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed runs per measurement (cpu 5, cuda 10, quick 1)"
    )
    p.add_argument(
        "--sam2",
        default=None,
        help="conf/backbone/sam2 option, random init forced (default sam2.1_hiera_t; quick: tiny_random)",
    )
    p.add_argument(
        "--dinov2",
        default=None,
        help="conf/backbone/dinov2 option, random init forced (default vits14; quick: tiny_random)",
    )
    p.add_argument(
        "--decoder-batch", type=int, default=None, help="prompts per decoder call (cpu 16, cuda 256)"
    )
    p.add_argument("--grid", type=int, default=None, help="infer_image points per side (cpu 4, cuda 32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    args = p.parse_args(argv)
    mode = "quick" if args.quick else args.device
    for key, val in _DEFAULTS[mode].items():
        if getattr(args, key, None) is None:
            setattr(args, key, val)
    args.sam2 = args.sam2 or ("tiny_random" if args.quick else "sam2.1_hiera_t")
    args.dinov2 = args.dinov2 or ("tiny_random" if args.quick else "vits14")
    if args.repeats < 1 or args.decoder_batch < 1 or args.grid < 1 or args.warmup < 0:
        p.error("--repeats, --decoder-batch and --grid must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> Path:
    """Run the benchmarks, write the result json and print the table.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        Path of the written json.
    """
    from ntt.utils.console import setup_logging

    setup_logging()
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available in this torch build / machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = dt.datetime.now(dt.timezone.utc)
    hardware = hardware_info(device)
    log.warning(RANDOM_WEIGHTS_NOTE)
    gen = torch.Generator().manual_seed(args.seed)
    timer = Timer(device, args.repeats, args.warmup)
    t_all = time.perf_counter()

    with torch.inference_mode():
        t0 = time.perf_counter()
        sam2, dino, sam2_kw, dino_kw = build_models(args.sam2, args.dinov2, device)
        log.info("built %s + %s (random init) in %.1f s", args.sam2, args.dinov2, time.perf_counter() - t0)
        dim = int(dino.embed_dim)
        results: dict[str, Any] = {}

        log.info("1/7 DINOv2 forward")
        results["dinov2_forward"] = bench_dinov2(dino, timer=timer, gen=gen)
        results["dinov2_forward"]["model"] = dino_kw["name"]
        log.info("2/7 SAM2 image encoder")
        results["sam2_image_encoder"], feats = bench_sam2_encoder(sam2, timer=timer, gen=gen)
        results["sam2_image_encoder"]["model"] = sam2_kw["name"]
        log.info("3/7 SAM2 decoder (batch %d)", args.decoder_batch)
        results["sam2_decoder"] = bench_sam2_decoder(sam2, feats, batch=args.decoder_batch, timer=timer)
        results["sam2_decoder"]["model"] = sam2_kw["name"]
        del feats
        log.info("4/7 mask pooling dense vs adjoint (%d masks, D=%d)", args.pool_masks, dim)
        results["mask_pooling"] = bench_pooling(
            n=args.pool_masks, grid=int(dino.grid_size), dim=dim, timer=timer, gen=gen
        )
        log.info("5/7 soft merging (%d masks at %dx%d)", args.merge_masks, args.height, args.width)
        results["soft_merge"] = bench_soft_merge(
            n=args.merge_masks,
            height=args.height,
            width=args.width,
            dim=dim,
            timer=timer,
            gen=gen,
        )
        log.info("6/7 SAM2 decoder: official vs cached path (batch %d)", args.decoder_batch)
        feats = sam2.encode_image(smooth_images(1, int(sam2.image_size), generator=gen, device=device))
        results["sam2_decoder_paths"] = bench_decoder_paths(
            sam2, feats, batch=args.decoder_batch, timer=timer
        )
        results["sam2_decoder_paths"]["model"] = sam2_kw["name"]
        del feats
        log.info("7/7 infer_image (%dx%d grid)", args.grid, args.grid)
        results["infer_image"] = bench_infer_image(
            sam2,
            dino,
            grid=args.grid,
            batch=args.decoder_batch,
            height=args.height,
            width=args.width,
            timer=timer,
            gen=gen,
        )

    contended = contention_warnings(results)
    for w in contended:
        log.warning("competing load, timing inflated: %s", w)
    if contended:
        log.warning("%d measurement(s) ran under competing load: rerun on a quiet machine", len(contended))
    rows = table_rows(results)
    table = format_table(rows)
    report = {
        "WARNING": RANDOM_WEIGHTS_NOTE,
        "schema_version": SCHEMA_VERSION,
        "timestamp_utc": started.isoformat(timespec="seconds"),
        "command": command_line("ntt.tools.bench", argv),
        "hardware": hardware,
        "settings": {
            "quick": args.quick,
            "device": args.device,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": args.seed,
            "sam2_option": args.sam2,
            "sam2_config": sam2_kw.get("config"),
            "dinov2_option": args.dinov2,
            "dinov2_arch": dino_kw.get("arch"),
            "random_init": True,
            "decoder_batch": args.decoder_batch,
            "grid": args.grid,
            "pool_masks": args.pool_masks,
            "merge_masks": args.merge_masks,
            "image_hw": [args.height, args.width],
        },
        "results": results,
        "contention_warnings": contended,
        "table_markdown": table.splitlines(),
        "total_wall_s": time.perf_counter() - t_all,
        "load_average_1_5_15_at_end": load_average(),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"results-{started:%Y%m%d}-{device_slug(device)}{'-quick' if args.quick else ''}.json"
    path = out_dir / name
    write_json_atomic(path, report, indent=2)
    log.info("wrote %s (%.0f s in all)", path, report["total_wall_s"])
    log.warning(RANDOM_WEIGHTS_NOTE)
    print(f"\n{RANDOM_WEIGHTS_NOTE}\n{hardware['cpu_model']}, device {args.device}\n{table}")
    return path


if __name__ == "__main__":
    main()
