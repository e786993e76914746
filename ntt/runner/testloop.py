"""The test loop: one pass over the test images for one job or many (method.md §5).

Per image, everything before the classification does not depend on the memory bank (method.md §5.1-5.3:
DINOv2 features, SAM2 encoding, prompt decoding, IoU filter, masks and their pooled embeddings:
`ntt.inference.propose_image`), so it runs once per image; then each job that needs the image classifies,
de-duplicates and ranks the proposals with its own prototypes (`classify_and_postprocess`) and appends its
line to its own `predictions/rank<r>.jsonl`. A single `ntt run` is the case of one job: the same code, the same
bytes. Images come decoded ahead from `ntt.data.prefetch`; lines are encoded and written by
`ntt.runner.writer`; one failing image is recorded for every job needing it and never stops the others.
"""

from __future__ import annotations

import itertools
import logging
import time
from contextlib import closing
from functools import partial
from typing import Any

from ntt.runner.context import RunContext, StageError, build_backbone, log_expected_time
from ntt.runner.lines import failure_line, failure_record, loop_timing, success_line
from ntt.utils import dist
from ntt.utils.console import EVERY_RANK
from ntt.utils.timing import SectionTimer, section, timing

log = logging.getLogger(__name__)

# full-resolution proposal masks kept per image for the jobs (recomputed beyond it: same bits, bounded memory)
MASK_CACHE_BYTES = 1 << 30


def load_prototypes(ctx: RunContext, test_ds):
    """The job's `[C, D]` class prototypes on its device (bank checked against the test set's classes),
    only those of `matcher.classes` when set (the rows of `labelled_category_ids`)."""
    from ntt.bank import MemoryBank
    from ntt.runner.keys import PROTOTYPES_FILE
    from ntt.runner.stages import bank_expectation

    bank = MemoryBank.load(ctx.path(PROTOTYPES_FILE), expect=bank_expectation(ctx))
    if list(bank.category_ids) != list(test_ds.category_ids):
        raise StageError(
            f"the memory bank holds category ids {list(bank.category_ids)} but the test set selects "
            f"{list(test_ds.category_ids)}: rerun with stages including fill_memory"
        )
    if ctx.matcher.classes is not None:
        from ntt.bank_edit import subset

        bank = subset(bank, list(ctx.matcher.classes), what="matcher.classes")
    return bank.prototypes().to(ctx.device)


def image_spec(test_ds, img_id: int):
    """What the image loader needs of one test image: id, file, the json's height and width."""
    from ntt.data.prefetch import ImageSpec

    info = test_ds.image_info(img_id)
    return ImageSpec(
        img_id, str(test_ds.image_path(img_id, check=False)), int(info["height"]), int(info["width"])
    )


def test_pass(jobs: list, label: str = "test") -> None:
    """Segment the union of the jobs' images still to do (this process's share) for every job needing each.

    Args:
        jobs: `ntt.runner.lifecycle.Job`s of one pass group (equal `keys.pass_key`), each with its test plan,
            the ids it still needs (`todo`), its prototypes and inference settings.
        label: the progress bar's name.
    """
    from tqdm import tqdm

    from ntt.data.prefetch import prefetch_images
    from ntt.runner.writer import ResultWriter

    ctx0: RunContext = jobs[0].ctx
    union: list[int] = []
    seen: set[int] = set()
    for job in jobs:  # each job's images in its own order; first occurrence wins
        for img_id in job.test.todo:
            if img_id not in seen:
                seen.add(img_id)
                union.append(img_id)
    mine = dist.shard(union, ctx0.rank, ctx0.world_size)
    sam2 = build_backbone(ctx0, "sam2")
    dino = build_backbone(ctx0, "dinov2")
    log.info(
        "%s: %d image(s) for %d job(s), %d for this process (%d/%d)",
        label,
        len(union),
        len(jobs),
        len(mine),
        ctx0.rank,
        ctx0.world_size,
        extra=EVERY_RANK,  # each process's own share: logged by every rank
    )
    log_expected_time(ctx0, len(mine))
    fail_fast = any(bool(j.ctx.cfg.get("fail_fast")) for j in jobs)
    # every job of a pass group reads the same test images (pass_key): the first job needing one names it
    specs = [image_spec(_owner(jobs, i).test.test_ds, i) for i in mine]
    timer = SectionTimer(ctx0.device) if ctx0.io.timing else None
    timings: list[float] = []
    images = prefetch_images(
        specs,
        device=ctx0.device,
        num_workers=ctx0.io.workers(ctx0.device),
        prefetch_factor=ctx0.io.prefetch_factor,
        apply_exif=ctx0.dataset.exif_orientation,
        semantic_input=_semantic_input(jobs[0].params),
        resize=sam2.input_resize,  # backbone.sam2.input_resize (method.md §5.11)
    )
    head = next(images, None)  # the loader's workers start before the writer's thread
    items = itertools.chain([head] if head is not None else [], images)
    writer = ResultWriter(async_write=ctx0.io.async_write, depth=ctx0.io.write_queue, fail_fast=fail_fast)
    try:
        for job in jobs:
            job.sink = open(job.test.pred_dir / f"rank{job.ctx.rank}.jsonl", "a")
        with closing(images), writer, timing(timer):
            for spec, item in tqdm(
                zip(specs, items), total=len(specs), desc=label, disable=not ctx0.is_main, unit="img"
            ):
                t0 = time.perf_counter()
                if timer is not None:
                    timer.add("load", item.wait_s)
                _pass_image(jobs, spec, item, sam2, dino, writer, fail_fast)
                timings.append(item.wait_s + time.perf_counter() - t0)
            t0 = time.perf_counter()
            with section("write"):
                writer.close()  # the last queued lines
            drain = time.perf_counter() - t0
    finally:
        for job in jobs:
            if job.sink is not None:
                job.sink.close()
                job.sink = None
    for job in jobs:
        job.pass_timing = loop_timing(ctx0, timer, writer, sum(timings) + drain, len(timings))


def _semantic_input(params) -> tuple[int, int] | None:
    """``(long_side, input_size)`` when the pass encodes the original images as FSOD-VFM (method.md §5.13)."""
    if getattr(params, "encoder_input", "square") != "long_side":
        return None
    return int(params.long_side), int(params.input_size)


def _owner(jobs: list, img_id: int):
    return next(j for j in jobs if img_id in j.todo)


def _pass_image(jobs: list, spec, item, sam2, dino, writer, fail_fast: bool) -> None:
    """One image: the memory-independent part once, then each job needing it."""
    import torch

    from ntt.boxproposals import with_prompt_boxes
    from ntt.inference import classify_and_postprocess, propose_image
    from ntt.maskcache import ProposalMasks

    img_id = spec.img_id
    needing = [j for j in jobs if img_id in j.todo]
    t0 = time.perf_counter()
    try:
        if item.error is not None:
            item.raise_error()  # the image could not be read (in a loader worker)
        with torch.inference_mode():
            boxes, image_boxes = _box_prompts(needing[0], spec, item.image.shape[-1])
            shared = propose_image(
                item.image,
                sam2=sam2,
                dino=dino,
                params=needing[0].params,
                boxes=boxes,
                semantic_image=item.semantic,
                image_hw=(spec.height, spec.width),
            )
        item.image = item.semantic = None
    except Exception as exc:  # one bad image must not lose the others (in any job)
        if fail_fast:
            raise
        with section("write"):
            for job in needing:
                if item.error is not None:
                    line = failure_record(job.ctx, job.test, img_id, item.error, item.traceback)
                else:
                    line = failure_line(job.ctx, job.test, img_id, exc)
                writer.write_now(job.sink, line)
        return
    t_shared = (item.wait_s + time.perf_counter() - t0) / len(needing)
    # a proposal's full-resolution mask and RLE are the same for every job: with several jobs computed once
    masks = (
        ProposalMasks(shared.props.logits, spec.height, spec.width, max_bytes=MASK_CACHE_BYTES)
        if len(needing) > 1
        else None
    )
    for job in needing:
        t1 = time.perf_counter()
        try:
            with torch.inference_mode():
                det, tr = classify_and_postprocess(
                    shared,
                    job.prototypes,
                    height=spec.height,
                    width=spec.width,
                    params=job.params,
                    full_masks=masks,
                )
            if image_boxes is not None and job.ctx.matcher.output_box == "prompt":  # FSOD-VFM's bbox (§5.14)
                det = with_prompt_boxes(det, shared.props.grid_index, image_boxes)
        except Exception as exc:
            if fail_fast:
                raise
            with section("write"):
                writer.write_now(job.sink, failure_line(job.ctx, job.test, img_id, exc))
        else:
            with section("write"):  # encoding + writing, or only the hand-off when async
                writer.submit(
                    job.sink,
                    partial(_job_line, job, img_id, det, tr, shared, masks),
                    partial(failure_line, job.ctx, job.test, img_id),
                )
            del det, tr
        job.seconds[img_id] = t_shared + time.perf_counter() - t1


def _box_prompts(job, spec, size: int):
    """`proposer=boxes`: the image's selected boxes in the SAM frame (method.md §5.11) and in image pixels
    (`[G, 4]` float64, for `matcher.output_box=prompt`); `(None, None)` for the grid."""
    if job.boxes is None:
        return None, None
    from ntt.boxproposals import boxes_to_frame

    info = job.test.test_ds.image_info(spec.img_id)
    found = job.boxes.boxes_for(
        image_id=spec.img_id,
        file_name=str(info["file_name"]),
        width=spec.width,
        height=spec.height,
        image_path=spec.path,
        apply_exif=job.ctx.dataset.exif_orientation,
    )
    return boxes_to_frame(found.boxes, width=spec.width, height=spec.height, size=size), found.boxes


def _job_line(job, img_id: int, det, tr, shared, masks) -> dict[str, Any]:
    """One job's line of an image: RLEs (each proposal encoded once for all jobs when cached), trace, line."""
    import torch

    rles = None
    if masks is not None:
        with torch.inference_mode():
            rles = masks.rles(det.proposal_index, det.masks)
    trace = shared.trace(tr) if job.ctx.cfg.trace else None
    return success_line(job.ctx, job.test, img_id, det, trace, rles=rles)
