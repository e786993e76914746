"""One pass over the test images for many memory banks: `ntt study [overrides]`.

A study (e.g. the COCO benchmark: shots 1,2,3,5,10,30 x 10 seeds = 60 runs) tests 60 memory banks on the
same images. Per image, everything before the classification does not depend on the memory (method.md
§5.1-5.3: DINOv2 features, SAM2 encoding, prompt decoding, IoU filter, masks and their pooled embeddings),
so this runs it once per image and only the memory-dependent part once per bank (classification, NMS, soft
merging, top-k, encoding; `ntt.inference.propose_image` / `classify_and_postprocess`).

`ntt study` takes the same overrides as `ntt run -m` (sweeps such as `shots=1,2,3` and the sweep params of a
`+bench=...` / `+sweep=...` file) and expands them into the same jobs as Hydra's basic sweeper. Each job is
a normal run with its own run directory, lock, stages and manifests: the memory stages run per job as usual
(cheap), then one test pass serves every job that shares the test images, backbones, proposer and pooling
(a "pass group"; jobs of other groups get their own pass), then each job merges and evaluates its own
results. The per-image lines carry the same keys as a single run's, so a job's directory ends exactly as if
it had been run alone (same predictions.json, metrics.json, manifests: a later `ntt run` of that config
finds it done), a killed study resumes per job and per image, and a failing job or image never loses the
others. Images (and each job's memory batches) are sharded over processes (torchrun / accelerate), results do
not depend on their number.
"""

from __future__ import annotations

import itertools
import logging
import time
import traceback
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ntt.utils import dist
from ntt.utils.config import config_hash, to_plain
from ntt.utils.errors import UserError
from ntt.utils.timing import SectionTimer, section, timing

log = logging.getLogger(__name__)

# full-resolution proposal masks kept per image for the banks (recomputed beyond it: same bits, bounded memory)
MASK_CACHE_BYTES = 1 << 30


# --------------------------------------------------------------------------------------------------
# The jobs of a sweep


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The override list of every job of `ntt run -m <overrides>`, in Hydra's basic-sweeper order.

    The sweep params of the composed config (`hydra.sweeper.params`, e.g. from `+bench=coco`) come first,
    then the command line's overrides (a command-line sweep of the same key replaces the config's).
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ntt.utils.config import compose

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    base = compose(fixed, return_hydra_config=True, job_name="ntt_study")
    params = dict(base.hydra.sweeper.get("params") or {})
    args = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    batches = BasicSweeper.split_arguments(parser.parse_overrides(args), None)
    return [list(job) for batch in batches for job in batch]


def compose_jobs(overrides: list[str]) -> list[tuple[list[str], DictConfig]]:
    """`(job overrides, composed config)` of every job of the sweep (the config a Hydra job receives)."""
    from ntt.utils.config import compose_all

    jobs = expand_sweep(overrides)
    return list(zip(jobs, compose_all(jobs, job_name="ntt_study")))


# --------------------------------------------------------------------------------------------------
# Banks and pass groups


@dataclass
class Bank:
    """One job of the study: its run context and where it stands."""

    name: str
    cfg: DictConfig
    ctx: Any = None  # ntt.runner.pipeline.RunContext
    lock: Any = None
    done: set[str] = field(default_factory=set)
    plan: Any = None  # ntt.runner.pipeline.TestPlan when its test stage runs in the pass
    todo: set[int] = field(default_factory=set)
    prototypes: Any = None
    params: Any = None
    sink: Any = None
    t_test: float = 0.0
    seconds: dict[int, float] = field(default_factory=dict)
    pass_timing: dict[str, Any] = field(
        default_factory=dict
    )  # sections of the whole pass (ntt/utils/timing.py)
    error: str | None = None
    metrics: dict[str, Any] | None = None


def pass_key(ctx) -> str:
    """What the memory-independent per-image work depends on: banks with equal keys share one pass.

    Test images (json, folder, EXIF handling), both backbones, the proposer, the pooling and the device.
    """
    spec = ctx.dataset
    return config_hash(
        "study_pass",
        to_plain(ctx.cfg.backbone.sam2),
        to_plain(ctx.cfg.backbone.dinov2),
        to_plain(ctx.cfg.proposer),
        str(ctx.matcher.pooling),
        str(Path(spec.test_json).resolve()),
        str(Path(spec.test_image_root).resolve()),
        bool(spec.exif_orientation),
        str(ctx.device),
    )


def _backbone_key(ctx) -> str:
    return config_hash(to_plain(ctx.cfg.backbone.sam2), to_plain(ctx.cfg.backbone.dinov2), str(ctx.device))


def _split_key(ctx) -> str:
    return config_hash(to_plain(ctx.cfg.dataset))


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


# --------------------------------------------------------------------------------------------------
# The study


def run_study(cfgs: list[DictConfig], names: list[str] | None = None) -> list[Bank]:
    """Run every config (one job each) with one test pass per pass group; returns the banks with their
    metrics or error. Never raises for a job's failure (it is recorded in `Bank.error`)."""
    from ntt.runner.pipeline import make_context

    names = names or [f"job{i}" for i in range(len(cfgs))]
    banks = [Bank(name=n, cfg=c) for n, c in zip(names, cfgs)]
    digests: dict = {}
    splits: dict[str, dict] = {}
    models: dict[str, dict] = {}
    groups: dict[str, list[Bank]] = {}
    for bank in banks:
        try:
            bank.ctx = make_context(bank.cfg)
        except Exception as err:  # a config that does not even resolve
            _fail(bank, err)
            continue
        _share(bank.ctx, digests, splits, models)
        groups.setdefault(pass_key(bank.ctx), []).append(bank)
    log.info(
        "study: %d job(s) in %d pass group(s) (jobs sharing test images, backbones, proposer and pooling)",
        len(banks),
        len(groups),
    )
    order = list(groups)
    for gi, key in enumerate(order):
        group = groups[key]
        try:
            _run_group(group, gi, len(order))
        finally:
            for bank in group:
                _release(bank)
            # drop the backbones no later group uses (models of another size are not kept alive)
            later = {_backbone_key(b.ctx) for k in order[gi + 1 :] for b in groups[k]}
            for bk in {_backbone_key(b.ctx) for b in group} - later:
                models[bk].clear()
    return banks


def _share(ctx, digests: dict, splits: dict, models: dict) -> None:
    """Give the run the study's shared state: parsed datasets, built backbones, file digests."""
    from ntt.utils.files import FileDigests

    ctx.files = FileDigests(ctx.files.cache_file, shared=digests)
    ctx.splits = splits.setdefault(_split_key(ctx), {})
    ctx.backbones = models.setdefault(_backbone_key(ctx), {})


def _fail(bank: Bank, err: BaseException) -> None:
    bank.error = _short(err)
    if isinstance(err, UserError):
        log.error("job %s failed: %s", bank.name, err)
    else:
        log.error("job %s failed:\n%s", bank.name, "".join(traceback.format_exception(err)))


def _release(bank: Bank) -> None:
    if bank.ctx is not None and bank.ctx.is_main:
        bank.ctx.files.save()
    if bank.sink is not None:
        bank.sink.close()
        bank.sink = None
    if bank.lock is not None:
        bank.lock.release()
        bank.lock = None


def _run_group(group: list[Bank], gi: int, n_groups: int) -> None:
    from ntt.runner import pipeline

    for bank in group:
        try:
            _prepare(bank)
        except Exception as err:
            if bank.ctx.cfg.get("fail_fast"):
                raise
            _fail(bank, err)
            _release(bank)
    active = [b for b in group if b.error is None and b.plan is not None and b.todo]
    if active:
        _test_pass(active, gi, n_groups)
    for bank in group:
        if bank.error is not None:
            continue
        logger = None
        try:
            if bank.plan is not None:
                pipeline.write_timing(
                    bank.ctx,
                    bank.plan,
                    list(bank.seconds.values()),
                    study_pass={
                        "banks": len(active),
                        "note": "shared per-image work split evenly; sections: the whole pass",
                        **bank.pass_timing,
                    },
                )
                pipeline.finish_test(bank.ctx, bank.plan)  # merge + evaluate + manifest (raises on failures)
                pipeline.end_stage(bank.ctx, "test", bank.done, bank.t_test)
            for stage in _stages_after_test(bank.ctx.cfg):
                _run_stage(bank, stage)
            logger = pipeline.build_logger(bank.ctx)
            bank.metrics = pipeline.close_run(bank.ctx, logger)
        except Exception as err:
            if bank.ctx.cfg.get("fail_fast"):
                raise
            _fail(bank, err)
        finally:
            if logger is not None:
                logger.finish()
            _release(bank)


def _stages_after_test(cfg) -> list[str]:
    stages = list(cfg.stages)
    return stages[stages.index("test") + 1 :] if "test" in stages else []


def _run_stage(bank: Bank, stage: str) -> None:
    from ntt.runner import pipeline

    if pipeline.begin_stage(bank.ctx, stage, bank.done):
        t0 = time.perf_counter()
        pipeline.STAGES[stage][0](bank.ctx)
        pipeline.end_stage(bank.ctx, stage, bank.done, t0)


def _prepare(bank: Bank) -> None:
    """Lock, open and run the stages before `test` of one job; plan its test stage (not sharded yet)."""
    from ntt.runner import pipeline
    from ntt.runner.runlock import RunLock

    ctx = bank.ctx
    unknown = [s for s in ctx.cfg.stages if s not in pipeline.STAGES]
    if unknown:
        raise pipeline.StageError(
            f"stages={list(ctx.cfg.stages)}: unknown {unknown}; choose from {list(pipeline.STAGES)}"
        )
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        bank.lock = RunLock(ctx.run_dir)
        bank.lock.acquire()
    log.info("study: job %s -> %s", bank.name, ctx.run_dir)
    pipeline.open_run(ctx, with_logger=False)
    stages = list(ctx.cfg.stages)
    for stage in stages[: stages.index("test")] if "test" in stages else stages:
        _run_stage(bank, stage)
    if "test" not in stages or not pipeline.begin_stage(ctx, "test", bank.done):
        return
    bank.t_test = time.perf_counter()
    bank.plan = pipeline.plan_test(ctx, shard=False)
    bank.todo = set(bank.plan.todo)
    if bank.todo:
        bank.prototypes = pipeline.load_prototypes(ctx, bank.plan.test_ds)
        bank.params = pipeline.inference_params(ctx)


def _test_pass(banks: list[Bank], gi: int, n_groups: int) -> None:
    """Per image (this process's shard of the union of the banks' images): the memory-independent part
    once, then each bank that needs the image: its detections, appended to its own `rank<r>.jsonl`."""
    from tqdm import tqdm

    from ntt.runner import pipeline

    ctx0 = banks[0].ctx
    union: list[int] = []
    seen: set[int] = set()
    for bank in banks:  # each bank's images in its own order; first occurrence wins
        for img_id in bank.plan.todo:
            if img_id not in seen:
                seen.add(img_id)
                union.append(img_id)
    mine = dist.shard(union, ctx0.rank, ctx0.world_size)
    sam2 = pipeline.build_backbone(ctx0, "sam2")
    dino = pipeline.build_backbone(ctx0, "dinov2")
    log.info(
        "study pass %d/%d: %d image(s) for %d memory bank(s), %d for this process (%d/%d)",
        gi + 1,
        n_groups,
        len(union),
        len(banks),
        len(mine),
        ctx0.rank,
        ctx0.world_size,
    )
    pipeline.log_expected_time(ctx0, len(mine))
    for bank in banks:
        bank.sink = open(bank.plan.pred_dir / f"rank{bank.ctx.rank}.jsonl", "a")
    fail_fast = any(bool(b.ctx.cfg.get("fail_fast")) for b in banks)
    # every bank of a pass group reads the same test images (pass_key): the first bank needing one names it
    specs = [pipeline.image_spec(_owner(banks, i).plan.test_ds, i) for i in mine]
    timer = SectionTimer(ctx0.device) if ctx0.io.timing else None
    timings: list[float] = []
    images = pipeline.load_images(ctx0, specs)
    head = next(images, None)  # the loader's workers start before the writer's thread
    items = itertools.chain([head] if head is not None else [], images)
    with closing(images), pipeline.result_writer(ctx0) as writer, timing(timer):
        for spec, item in tqdm(
            zip(specs, items), total=len(specs), desc="study", disable=not ctx0.is_main, unit="img"
        ):
            t0 = time.perf_counter()
            if timer is not None:
                timer.add("load", item.wait_s)
            _pass_image(banks, spec, item, sam2, dino, writer, fail_fast)
            timings.append(item.wait_s + time.perf_counter() - t0)
        t0 = time.perf_counter()
        with section("write"):
            writer.close()  # the last queued lines
        drain = time.perf_counter() - t0
    for bank in banks:
        bank.sink.close()
        bank.sink = None
        bank.pass_timing = pipeline.loop_timing(ctx0, timer, writer, sum(timings) + drain, len(timings))


def _owner(banks: list[Bank], img_id: int) -> Bank:
    return next(b for b in banks if img_id in b.todo)


def _pass_image(banks: list[Bank], spec, item, sam2, dino, writer, fail_fast: bool) -> None:
    """One image of a study pass: the memory-independent part once, then each bank needing it."""
    import torch

    from ntt.inference import classify_and_postprocess, propose_image
    from ntt.maskcache import ProposalMasks
    from ntt.runner import pipeline

    img_id = spec.img_id
    needing = [b for b in banks if img_id in b.todo]
    t0 = time.perf_counter()
    owner = needing[0]
    try:
        if item.error is not None:
            item.raise_error()  # the image could not be read (in a loader worker)
        with torch.inference_mode():
            shared = propose_image(item.image, sam2=sam2, dino=dino, params=owner.params)
        item.image = None
    except Exception as exc:  # one bad image must not lose the others (in any bank)
        if fail_fast:
            raise
        with section("write"):
            for bank in needing:
                if item.error is not None:
                    line = pipeline.failure_record(bank.ctx, bank.plan, img_id, item.error, item.traceback)
                else:
                    line = pipeline.failure_line(bank.ctx, bank.plan, img_id, exc)
                writer.write_now(bank.sink, line)
        return
    t_shared = (item.wait_s + time.perf_counter() - t0) / len(needing)
    # a proposal's full-resolution mask and RLE are the same in every bank: computed once per image
    masks = ProposalMasks(shared.props.logits, spec.height, spec.width, max_bytes=MASK_CACHE_BYTES)
    for bank in needing:
        t1 = time.perf_counter()
        try:
            with torch.inference_mode():
                det, tr = classify_and_postprocess(
                    shared,
                    bank.prototypes,
                    height=spec.height,
                    width=spec.width,
                    params=bank.params,
                    full_masks=masks,
                )
        except Exception as exc:
            if fail_fast:
                raise
            with section("write"):
                writer.write_now(bank.sink, pipeline.failure_line(bank.ctx, bank.plan, img_id, exc))
        else:
            with section("write"):  # encoding + writing, or only the hand-off when async
                writer.submit(
                    bank.sink,
                    partial(_bank_line, bank, img_id, det, tr, shared, masks),
                    partial(pipeline.failure_line, bank.ctx, bank.plan, img_id),
                )
        bank.seconds[img_id] = t_shared + time.perf_counter() - t1


def _bank_line(bank: Bank, img_id: int, det, tr, shared, masks) -> dict[str, Any]:
    """One bank's record of an image: RLEs (each proposal's encoded once for all banks), trace, line."""
    import torch

    from ntt.runner import pipeline

    with torch.inference_mode():
        rles = masks.rles(det.proposal_index, det.masks)
    trace = shared.trace(tr) if bank.ctx.cfg.trace else None
    return pipeline.success_line(bank.ctx, bank.plan, img_id, det, trace, rles=rles)
