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
6. ``infer_image``: the whole per-image test path on one synthetic 1024 image with a small prompt grid.

Each timing also records ``cpu_time_per_wall`` (this process) and ``other_load_cores`` (CPU used by other
processes meanwhile, from /proc/stat); measurements taken under competing load are listed in
``contention_warnings`` (on a shared 2-core machine such load can inflate timings several-fold).
The result is written to ``<out>/results-<YYYYmmdd>-<cpu|gpu-name-slug>[-quick].json``; a table is logged.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

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
MERGE_CLASSES = 3
MASK_RES = 256  # SAM2 low-res mask side


# ----------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware_info(device: torch.device) -> dict[str, Any]:
    """Hostname-free description of the machine and software."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "os": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    info["load_average_1_5_15_at_start"] = _loadavg()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu_name=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def device_slug(device: torch.device) -> str:
    """``cpu`` or the GPU name in lower-case dashes (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-") or "gpu"


def _machine_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine since boot (all cores; /proc/stat), None if unavailable."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


@dataclass
class Timer:
    """Times a callable: ``warmup`` untimed runs, then ``repeats`` timed runs (synchronised on CUDA)."""

    device: torch.device
    repeats: int
    warmup: int = 1

    def __call__(self, fn: Callable[[], Any], *, warmup: int | None = None) -> tuple[dict[str, Any], Any]:
        """Returns ``(timing, last_output)``; timing = ``median_s``, ``min_s``, ``repeats``, ``warmup``,
        ``times_s`` (and ``peak_mem_mib`` on CUDA)."""
        device = self.device
        warmup = self.warmup if warmup is None else warmup
        out = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            out = fn()
        _sync(device)
        times = []
        cpu0, busy0 = time.process_time(), _machine_busy_s()
        for _ in range(max(1, self.repeats)):
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        own = time.process_time() - cpu0
        wall = sum(times)
        busy1 = _machine_busy_s()
        res: dict[str, Any] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "repeats": len(times),
            "warmup": warmup,
            "times_s": times,
            # CPU seconds of this process per wall second over the timed runs (about the thread count for
            # well-parallelised ops on an idle machine).
            "cpu_time_per_wall": round(own / wall, 2),
            # cores' worth of CPU time used by OTHER processes meanwhile (Linux /proc/stat; None elsewhere):
            # clearly above 0 means the timings are inflated by competing load.
            "other_load_cores": (
                None if busy0 is None or busy1 is None else round(max(0.0, busy1 - busy0 - own) / wall, 2)
            ),
        }
        if device.type == "cuda":
            res["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        return res, out


# ----------------------------------------------------------------------------------------------------
# Models (random weights only)
# ----------------------------------------------------------------------------------------------------


def _option_kwargs(group: str, option: str) -> dict[str, Any]:
    """Builder kwargs of ``conf/backbone/<group>/<option>.yaml`` with random init forced (no checkpoint)."""
    from omegaconf import OmegaConf

    from ntt.utils.config import conf_path

    folder = Path(str(conf_path())) / "backbone" / group
    path = folder / f"{option}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise SystemExit(f"unknown --{group} option {option!r}; known: {', '.join(known) or '(no conf dir)'}")
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    node.pop("_target_", None)
    node.update(checkpoint=None, random_init=True)  # never loads weights (`${paths...}` stays unresolved)
    return node


def build_models(sam2_option: str, dinov2_option: str, device: torch.device):
    """Random-init SAM2 and DINOv2 from their config options."""
    from ntt.backbones.dinov2 import build_dinov2
    from ntt.backbones.sam2 import build_sam2

    sam2_kw = _option_kwargs("sam2", sam2_option)
    dino_kw = _option_kwargs("dinov2", dinov2_option)
    sam2 = build_sam2(**sam2_kw, device=device)
    dino = build_dinov2(**dino_kw, device=device)
    return sam2, dino, sam2_kw, dino_kw


# ----------------------------------------------------------------------------------------------------
# Synthetic inputs
# ----------------------------------------------------------------------------------------------------


def smooth_images(batch: int, size: int, *, generator: torch.Generator, device: torch.device) -> Tensor:
    """``[batch, 3, size, size]`` smooth random images in [0, 1]."""
    low = torch.rand(batch, 3, 16, 16, generator=generator)
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1).to(device)


def blob_logits(n: int, res: int, *, generator: torch.Generator, device: torch.device) -> Tensor:
    """``[n, res, res]`` smooth random logits whose ``> 0`` masks are blobs of varied size, none empty."""
    low = torch.randn(n, 1, 8, 8, generator=generator)
    bias = torch.rand(n, 1, 1, 1, generator=generator) * 2.0 - 1.5  # mask areas from small to large
    logits = F.interpolate(low, size=(res, res), mode="bilinear", align_corners=False) + bias
    c = res // 2
    logits[:, 0, c - 2 : c + 2, c - 2 : c + 2] = logits[:, 0, c - 2 : c + 2, c - 2 : c + 2].clamp(min=1.0)
    return logits[:, 0].to(device)


def _unit_rows(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1)


# ----------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------


def bench_dinov2(dino, *, timer: Timer, gen) -> dict[str, Any]:
    device = timer.device
    x = smooth_images(1, int(dino.img_size), generator=gen, device=device)
    res, out = timer(lambda: dino(x))
    res["shapes"] = {"input": list(x.shape), "output": list(out.shape)}
    return res


def bench_sam2_encoder(sam2, *, timer: Timer, gen) -> tuple[dict[str, Any], Any]:
    device = timer.device
    x = smooth_images(1, int(sam2.image_size), generator=gen, device=device)
    res, feats = timer(lambda: sam2.encode_image(x))
    res["shapes"] = {
        "input": list(x.shape),
        "image_embed": list(feats.image_embed.shape),
        "high_res_feats": [list(f.shape) for f in feats.high_res_feats],
    }
    return res, feats


def bench_sam2_decoder(sam2, feats, *, batch: int, timer: Timer) -> dict[str, Any]:
    from ntt.proposals import point_grid

    device = timer.device
    side = math.ceil(math.sqrt(batch))
    points = point_grid(side, int(sam2.image_size))[:batch, None, :].to(
        device
    )  # [B, 1, 2], spread over the image
    res, (logits, ious) = timer(lambda: sam2.decode(feats, points=points))
    res["batch_prompts"] = batch
    res["per_prompt_median_s"] = res["median_s"] / batch
    res["per_prompt_min_s"] = res["min_s"] / batch
    res["shapes"] = {"points": list(points.shape), "logits": list(logits.shape), "ious": list(ious.shape)}
    return res


def _rusage() -> tuple[float, int]:
    """(user + system CPU seconds, minor page faults) of this process so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt


def bench_decoder_paths(sam2, feats, *, batch: int, timer: Timer) -> dict[str, Any]:
    """Official vs cached decoder on the same prompts, interleaved (A B A B ...), with page faults.

    A = ``cached_decoder=False`` with one call of ``batch`` prompts (the pre-cache code path: official
    ``predict_masks`` on features expanded per prompt, all 4 outputs); B = the default cached path
    (``prepare_decoder`` once, then ``decode_best`` in ``decoder_chunk`` chunks). Both run in this process, so
    both get the same malloc setting (``NTT_MALLOC_TUNING``); ``benchmarks/ab_per_image.py`` compares
    whole processes of two source trees. Also checks that both give the same bits.
    """
    from ntt.proposals import point_grid, select_best_multimask

    device = timer.device
    side = math.ceil(math.sqrt(batch))
    points = point_grid(side, int(sam2.image_size))[:batch, None, :].to(device)
    saved = sam2.cached_decoder, sam2.decoder_chunk

    def official():
        sam2.cached_decoder, sam2.decoder_chunk = False, batch
        try:
            return sam2.decode(feats, points=points)
        finally:
            sam2.cached_decoder, sam2.decoder_chunk = saved

    def cached():
        cache = sam2.prepare_decoder(feats, 0)  # once per image: timed with it
        return sam2.decode_best(feats, points=points, cache=cache)

    runs: dict[str, list[dict[str, float]]] = {"official": [], "cached": []}
    outs = {}
    for name, fn in (("official", official), ("cached", cached)):
        outs[name] = fn()  # warm-up (allocator, caches)
    for _ in range(max(1, timer.repeats)):
        for name, fn in (("official", official), ("cached", cached)):
            load = _loadavg()
            _sync(device)
            cpu0, flt0 = _rusage()
            t0 = time.perf_counter()
            fn()
            _sync(device)
            wall = time.perf_counter() - t0
            cpu1, flt1 = _rusage()
            runs[name].append(
                {
                    "wall_s": wall,
                    "cpu_s": cpu1 - cpu0,
                    "minflt": flt1 - flt0,
                    "load1": load[0] if load else None,
                }
            )
    want_best, _, want_idx = select_best_multimask(*outs["official"])
    got_best, got_ious, got_idx = outs["cached"]
    res: dict[str, Any] = {"batch_prompts": batch, "decoder_chunk": saved[1], "runs": runs}
    for name, rs in runs.items():
        res[name] = {
            "median_s": statistics.median(r["wall_s"] for r in rs),
            "min_s": min(r["wall_s"] for r in rs),
            "per_prompt_median_s": statistics.median(r["wall_s"] for r in rs) / batch,
            "cpu_per_prompt_median_s": statistics.median(r["cpu_s"] for r in rs) / batch,
            "minflt_per_prompt_median": statistics.median(r["minflt"] for r in rs) / batch,
            "repeats": len(rs),
            "times_s": [r["wall_s"] for r in rs],
            "cpu_time_per_wall": round(sum(r["cpu_s"] for r in rs) / sum(r["wall_s"] for r in rs), 2),
            "other_load_cores": None,  # see load1 of each run (1-min load average, this process included)
        }
    res["speedup_wall"] = res["official"]["median_s"] / res["cached"]["median_s"]
    res["speedup_cpu"] = res["official"]["cpu_per_prompt_median_s"] / res["cached"]["cpu_per_prompt_median_s"]
    res["bit_identical"] = bool(
        torch.equal(got_best, want_best)
        and torch.equal(got_idx, want_idx)
        and torch.equal(got_ious, outs["official"][1])
    )
    res["max_abs_diff_logits"] = float((got_best - want_best).abs().max())
    return res


def bench_pooling(*, n: int, grid: int, dim: int, timer: Timer, gen) -> dict[str, Any]:
    from ntt.matching import mask_embeddings

    device = timer.device
    masks = blob_logits(n, MASK_RES, generator=gen, device=device) > 0
    feats = torch.randn(grid, grid, dim, generator=gen).to(device)
    dense, e_dense = timer(lambda: mask_embeddings(masks, feats, method="dense"))
    adjoint, e_adj = timer(lambda: mask_embeddings(masks, feats, method="adjoint"))
    return {
        "dense": dense,
        "adjoint": adjoint,
        "max_abs_diff": float((e_dense - e_adj).abs().max()),
        "speedup_adjoint_over_dense": dense["median_s"] / adjoint["median_s"],
        "mean_mask_area_px": float(masks.flatten(1).sum(1).float().mean()),
        "shapes": {"masks": list(masks.shape), "feats": list(feats.shape), "embeddings": list(e_dense.shape)},
    }


def bench_soft_merge(*, n: int, height: int, width: int, dim: int, timer: Timer, gen) -> dict[str, Any]:
    from ntt.postprocess import resize_masks_to_image, semantic_soft_merge

    device = timer.device
    logits = blob_logits(n, MASK_RES, generator=gen, device=device)
    labels = (torch.arange(n) % MERGE_CLASSES).to(device)
    emb = _unit_rows(torch.randn(n, dim, generator=gen)).to(device)
    scores = torch.rand(n, generator=gen).to(device)
    resize, masks = timer(lambda: resize_masks_to_image(logits, height, width))
    merge, (ios, _, _) = timer(lambda: semantic_soft_merge(masks, labels, emb, scores))
    return {
        "semantic_soft_merge": merge,
        "resize_masks_to_image": resize,
        "classes": MERGE_CLASSES,
        "mean_ios": float(ios.nan_to_num().mean()),
        "shapes": {"logits": list(logits.shape), "masks": list(masks.shape), "embeddings": list(emb.shape)},
    }


def bench_infer_image(
    sam2, dino, *, grid: int, batch: int, height: int, width: int, timer: Timer, gen
) -> dict[str, Any]:
    from ntt.inference import InferenceParams, infer_image

    device = timer.device
    image = smooth_images(1, int(sam2.image_size), generator=gen, device=device)[0]
    prototypes = _unit_rows(torch.randn(MERGE_CLASSES, int(dino.embed_dim), generator=gen)).to(device)
    params = InferenceParams(points_per_side=grid, points_batch_size=batch)

    def run(trace: bool = False):
        return infer_image(
            image, height, width, sam2=sam2, dino=dino, prototypes=prototypes, params=params, trace=trace
        )

    if timer.warmup > 0:
        _, tr = run(trace=True)  # the warm-up, with counts of what flowed through
        res, (det, _) = timer(run, warmup=0)
        res["warmup"] = 1
    else:  # no warm-up (--quick): the timed runs themselves give the counts
        res, (det, tr) = timer(lambda: run(trace=True))
    res.update(
        prompts=grid * grid,
        points_batch_size=batch,
        proposals_after_iou_filter=int(tr["pred_ious"].shape[0]),
        kept_after_nms_and_score=int(tr["nms_keep_pos"].shape[0]),
        detections=len(det),
        params=params.to_dict(),
        shapes={
            "image1024": list(image.shape),
            "output_hw": [height, width],
            "prototypes": list(prototypes.shape),
        },
    )
    return res


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


def contention_warnings(results: dict[str, Any], threshold: float = 0.25) -> list[str]:
    """Measurements during which other processes used more than ``threshold`` cores on average."""
    return [
        f"{name}: other processes used {t['other_load_cores']:.2f} cores meanwhile"
        for name, t in _timings(results)
        if (t.get("other_load_cores") or 0.0) > threshold
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


def _command_line(argv: list[str] | None) -> str:
    if argv is None:
        return shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    return shlex.join(["python", "-m", "ntt.tools.bench", *argv]) + "   # via ntt.tools.bench.main(argv)"


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
        "command": _command_line(argv),
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
        "load_average_1_5_15_at_end": _loadavg(),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"results-{started:%Y%m%d}-{device_slug(device)}{'-quick' if args.quick else ''}.json"
    path = out_dir / name
    path.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s (%.0f s in all)", path, report["total_wall_s"])
    log.warning(RANDOM_WEIGHTS_NOTE)
    print(f"\n{RANDOM_WEIGHTS_NOTE}\n{hardware['cpu_model']}, device {args.device}\n{table}")
    return path


if __name__ == "__main__":
    main()
