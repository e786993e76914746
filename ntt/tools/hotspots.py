"""The hot-spot measurements of ``make bench`` (method.md §10), each on fixed synthetic inputs.

Each ``bench_*`` function times one hot spot with a :class:`Timer` and returns a JSON-ready dict (timings,
shapes, side checks); ``ntt.tools.bench`` runs them in order and writes the report. Models come with RANDOM
weights (``ntt.tools.random_models``): timings only, the outputs mean nothing.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ntt.tools.machine import cpu_seconds_and_faults, load_average, machine_busy_s, sync

MERGE_CLASSES = 3
MASK_RES = 256  # SAM2 low-res mask side


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
        sync(device)
        times = []
        cpu0, busy0 = time.process_time(), machine_busy_s()
        for _ in range(max(1, self.repeats)):
            sync(device)
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        own = time.process_time() - cpu0
        wall = sum(times)
        busy1 = machine_busy_s()
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


def bench_decoder_paths(sam2, feats, *, batch: int, timer: Timer) -> dict[str, Any]:
    """Official vs cached decoder on the same prompts, interleaved (A B A B ...), with page faults.

    A = ``cached_decoder=False`` with one call of ``batch`` prompts (the pre-cache code path: official
    ``predict_masks`` on features expanded per prompt, all 4 outputs); B = the default cached path
    (``prepare_decoder`` once, then ``decode_best`` in ``decoder_chunk`` chunks). Both run in this process, so
    both get the same malloc setting (``NTT_MALLOC_TUNING``); ``benchmarks/ab_per_image.py`` compares
    whole processes of two source trees. Also checks that the cache gives the official decoder's bits on
    the same chunks (``bit_identical``). With fewer prompts than ``decoder_chunk`` (``--quick``) the cached
    path decodes a padded chunk: the speed ratio then includes that padding (``decoded_prompts``).
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
            load = load_average()
            sync(device)
            cpu0, flt0 = cpu_seconds_and_faults()
            t0 = time.perf_counter()
            fn()
            sync(device)
            wall = time.perf_counter() - t0
            cpu1, flt1 = cpu_seconds_and_faults()
            runs[name].append(
                {
                    "wall_s": wall,
                    "cpu_s": cpu1 - cpu0,
                    "minflt": flt1 - flt0,
                    "load1": load[0] if load else None,
                }
            )
    # bits: like with like. A GEMM's bits can depend on its row count (decoder calls of `batch` vs `chunk`
    # prompts differ in the last bits on some CPUs), so the cache is checked against the official decoder
    # called on the same chunks, each padded like the cached path's last one.
    chunk = int(saved[1])
    parts = []
    for start in range(0, batch, chunk):
        part = points[start : start + chunk]
        padded = torch.cat([part, part[-1:].expand(chunk - len(part), -1, -1)])
        sam2.cached_decoder, sam2.decoder_chunk = False, chunk
        try:
            m4, i4 = sam2.decode(feats, points=padded)
        finally:
            sam2.cached_decoder, sam2.decoder_chunk = saved
        parts.append((m4[: len(part)], i4[: len(part)]))
    want_best, _, want_idx = select_best_multimask(
        torch.cat([m for m, _ in parts]), torch.cat([i for _, i in parts])
    )
    want_ious = torch.cat([i for _, i in parts])
    got_best, got_ious, got_idx = outs["cached"]
    res: dict[str, Any] = {
        "batch_prompts": batch,
        "decoder_chunk": chunk,
        # prompts the cached path decodes, padding included (> batch_prompts: it pays for the padding)
        "decoded_prompts": math.ceil(batch / chunk) * chunk,
        "runs": runs,
    }
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
        and torch.equal(got_ious, want_ious)
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
