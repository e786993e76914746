"""The test stage's result lines: one JSONL line per finished or failed image, and their merge.

Every process appends a line per image to `predictions/rank<r>.jsonl` as the image finishes (`success_line` /
`failure_line`, written by `ntt.runner.writer`); each line carries the image's key (`keys.image_key`), so a
rerun keeps the lines of unchanged images and redoes the others. `merge_and_evaluate` (main process) reads
every shard, writes `predictions.json` in dataset image order and `metrics.json`, and marks the stage done
when no image failed.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any

from ntt import __version__
from ntt.runner.context import RANDOM_WEIGHTS_NOTE, RunContext, StageError, labelled_category_ids
from ntt.runner.keys import METRICS_FILE, PREDICTIONS_FILE
from ntt.runner.stages import mark_stage_done
from ntt.utils.files import write_json_atomic
from ntt.utils.identity import config_id, identity_keys, portable_config, setting_id

log = logging.getLogger(__name__)


def success_line(
    ctx: RunContext, plan, img_id: int, det, trace, rles: list[dict] | None = None
) -> dict[str, Any]:
    """The per-image JSONL record of a segmented image (and its trace file when tracing); `rles`: the
    detections' mask RLEs when already encoded."""
    from ntt.results import detections_to_coco

    results = detections_to_coco(
        det,
        img_id,
        labelled_category_ids(ctx, plan.test_ds),
        box_plus_one=ctx.matcher.box_plus_one,
        rles=rles,
        prompt_boxes=ctx.matcher.output_box == "prompt",  # FSOD-VFM's bbox (method.md §5.14)
    )
    if trace is not None:
        save_image_trace(ctx, img_id, trace)
    return {"image_id": img_id, "key": plan.keys[img_id], "ok": True, "results": results}


def failure_line(ctx: RunContext, plan, img_id: int, exc: BaseException) -> dict[str, Any]:
    """The per-image JSONL record of a failed image (error and traceback; a rerun retries it); called
    while `exc` is being handled."""
    return failure_record(ctx, plan, img_id, f"{type(exc).__name__}: {exc}", traceback.format_exc())


def failure_record(ctx: RunContext, plan, img_id: int, error: str, tb: str | None) -> dict[str, Any]:
    """`failure_line` from the error text and traceback (of an image that failed to load in a worker).

    Args:
        ctx: the run.
        plan: its test plan.
        img_id: the image.
        error: ``"<ExceptionType>: <message>"``.
        tb: the formatted traceback.
    """
    img_file = str(plan.test_ds.image_path(img_id, check=False))
    log.error(
        "image %s (%s) failed: %s (recorded; rerun to retry)", img_id, img_file, error.split(": ", 1)[-1]
    )
    return {
        "image_id": img_id,
        "key": plan.keys[img_id],
        "file": img_file,
        "ok": False,
        "error": error,
        "traceback": tb,
    }


def save_image_trace(ctx: RunContext, img_id: int, trace: dict[str, Any]) -> None:
    import numpy as np
    import torch

    trace_dir = ctx.path("trace")
    trace_dir.mkdir(exist_ok=True)
    arrays = {
        k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
        for k, v in trace.items()
        if v is not None
    }
    np.savez(trace_dir / f"img{img_id}.npz", **arrays)


def read_lines(pred_dir: Path, keys: dict[int, str], *, log_stale: bool = True) -> dict[int, dict]:
    """Per image id, the latest record made with its current key (a success supersedes a failure).

    Records of other settings, of another version of the image file or of its json record are ignored
    (they stay in the shard files, harmless): that image is redone and the others are kept.
    """
    records: dict[int, dict] = {}
    stale = 0
    for shard_file in sorted(pred_dir.glob("rank*.jsonl")):
        with open(shard_file) as f:
            for raw in f:
                raw = raw.strip()
                if not raw:
                    continue
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError:  # a line cut by a kill: that image is simply redone
                    continue
                img_id = rec.get("image_id")
                if img_id not in keys:
                    continue
                if rec.get("key") != keys[img_id]:
                    stale += 1
                    continue
                prev = records.get(img_id)
                if prev is None or not prev["ok"] or rec["ok"]:
                    records[img_id] = rec
    if stale and log_stale:
        log.info("test: %d per-image result(s) of other settings or older inputs ignored", stale)
    return records


def write_timing(ctx: RunContext, plan, timings: list[float], **extra: Any) -> None:
    """`predictions/timing_rank<r>.json`: seconds per image of this process (information only).

    Args:
        ctx: the run.
        plan: its test plan.
        timings: wall seconds of each image this process did.
        extra: further entries (`loop_timing`'s sections, the study pass's note).
    """
    if timings:
        write_json_atomic(
            plan.pred_dir / f"timing_rank{ctx.rank}.json",
            {
                "images": len(timings),
                "seconds_total": sum(timings),
                "seconds_per_image": sum(timings) / len(timings),
                "device": ctx.device,
                **extra,
            },
        )


def loop_timing(ctx: RunContext, timer, writer, total: float, images: int) -> dict[str, Any]:
    """Where a test loop's time went (`ntt.utils.timing`), for `write_timing`: seconds per image per section
    (`load`: waiting for the image; the three models; `write`: handing the result to the writer, which
    is encoding and writing itself when `io.async_write` is off; `other`: pooling, classification, NMS,
    resizing, soft merging), `outside_models_fraction`, and the writer's own seconds per image."""
    from ntt.utils.timing import section_report

    if timer is None or not images:
        return {}
    return {
        **section_report(timer.seconds, total, images),
        "writer_seconds_per_image": writer.busy_s / images,
        "io": {
            "num_workers": ctx.io.workers(ctx.device),
            "prefetch_factor": ctx.io.prefetch_factor,
            "async_write": ctx.io.async_write,
            "write_queue": ctx.io.write_queue,
        },
    }


def merge_and_evaluate(ctx: RunContext, plan) -> None:
    """Merge every shard's lines in image order into predictions.json, evaluate into metrics.json (main).

    Args:
        ctx: the run.
        plan: its `plan.TestPlan`.

    Raises:
        StageError: an image failed or has no line (after both files are written; the stage stays
            not done, so a rerun redoes only those images).
    """
    test_ds, ids, pred_dir, keys = plan.test_ds, plan.ids, plan.pred_dir, plan.keys
    records = read_lines(pred_dir, keys, log_stale=False)  # said when the test stage was planned
    failed = [i for i in ids if i in records and not records[i]["ok"]]
    missing = [i for i in ids if i not in records]
    results = [r for i in ids if i in records and records[i]["ok"] for r in records[i]["results"]]
    write_json_atomic(ctx.path(PREDICTIONS_FILE), results, indent=None)
    metrics: dict[str, Any] = {
        "dataset": ctx.dataset.name,
        "sam2": str(ctx.cfg.backbone.sam2.name),
        "dinov2": str(ctx.cfg.backbone.dinov2.name),
        "shots": int(ctx.cfg.shots),
        "seed": int(ctx.cfg.seed),
        "variant": str(ctx.cfg.variant),
        "num_images": len(ids),
        "num_detections": len(results),
        "failed_images": failed,
        "missing_images": missing,
        "ntt_version": __version__,
        # what identifies this result (ntt/utils/identity.py): tables group and filter by these
        "study": str(ctx.cfg.get("study_name", "adhoc")),
        "config_id": config_id(ctx.cfg),
        "setting_id": setting_id(ctx.cfg),
        "identity": identity_keys(ctx.cfg),
        "config": portable_config(ctx.cfg),
    }
    if ctx.random_weights:
        metrics["note"] = RANDOM_WEIGHTS_NOTE
    if ctx.eval.enabled:
        from ntt.eval import make_evaluator

        evaluator = make_evaluator(
            test_ds.raw,
            category_ids=labelled_category_ids(ctx, test_ds),  # matcher.classes: only those
            image_ids=ids,
            backend=ctx.eval.backend,
            iou_types=tuple(ctx.eval.iou_types),
        )
        evaluator.process(results)
        metrics.update(evaluator.evaluate())
    write_json_atomic(ctx.path(METRICS_FILE), metrics)
    log_summary(ctx, metrics)
    if failed or missing:
        raise StageError(
            f"{len(failed)} image(s) failed and {len(missing)} are missing (first: "
            f"{(failed + missing)[:5]}); their errors are in {pred_dir}/rank*.jsonl. The other "
            "images are kept: rerun the same command to retry only these."
        )
    mark_stage_done(ctx, "test", ctx.inputs.get("test"))


def log_summary(ctx: RunContext, metrics: dict[str, Any]) -> None:
    parts = []
    for iou_type in ("bbox", "segm"):
        if iou_type in metrics:
            m = metrics[iou_type]
            parts.append(f"{iou_type} AP {m['AP']:.4f} AP50 {m['AP50']:.4f} AP75 {m['AP75']:.4f}")
    if parts:
        log.info("metrics (%s): %s", ctx.run_dir, " | ".join(parts))
    if ctx.random_weights:
        log.warning("%s", RANDOM_WEIGHTS_NOTE.upper())
