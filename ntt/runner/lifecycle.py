"""The one orchestrator: jobs open, run their memory stages, share test passes, and close.

`run_jobs` runs a list of configs (a study's jobs); `run_pipeline` is the case of one job (`ntt run`, one
job of a Hydra multirun). Each job is a normal run with its own run directory, lock, stages and manifests:

    open     lock the run directory, prepare the dataset, plan (`plan.plan_run`), refuse stale upstream
             artifacts, preflight (checks + the models the planned stages need), write config.yaml
    memory   the planned stages before `test` (each skipped when its artifact is current)
    test     the jobs sharing test images, backbones, proposer and pooling (`keys.pass_key`) share one
             pass over their images (`testloop.test_pass`); each job then merges and evaluates its lines
    close    the stages after `test`, the metrics logger, the file-digest cache, the lock

A failing job (or image) is recorded and never stops the others (`Job.error`); a single run raises instead.
Results never depend on how jobs are grouped or on the number of processes (tests/test_study.py).
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ntt.backbones.checkpoints import check_checkpoints
from ntt.runner.configcheck import check_config
from ntt.runner.context import (
    RANDOM_WEIGHTS_NOTE,
    RunContext,
    Shared,
    backbone_key,
    box_source,
    build_backbone,
    inference_params,
    labelled_category_ids,
    load_split,
    make_context,
    prepare_dataset,
)
from ntt.runner.keys import METRICS_FILE, STAGE_ARTIFACTS, pass_key
from ntt.runner.lines import merge_and_evaluate, write_timing
from ntt.runner.plan import (
    RunPlan,
    TestPlan,
    check_upstream,
    images_to_segment,
    plan_run,
    plan_test,
    test_image_ids,
)
from ntt.runner.preflight import (
    annotation_problems,
    check_device,
    check_image_records,
    check_lvis_eval,
    check_reference_masks,
    check_shots,
    report_annotations,
)
from ntt.runner.runlock import RunLock
from ntt.runner.stages import MEMORY_STAGES, mark_stage_done, stage_status
from ntt.runner.testloop import load_prototypes, test_pass
from ntt.utils import dist
from ntt.utils.config import to_plain
from ntt.utils.errors import UserError
from ntt.utils.files import write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One job: a config, its run directory and where it stands.

    Attributes:
        name: how reports name it (its overrides).
        cfg: its composed config.
        ctx: its run context (None when the config does not even resolve).
        plan: which of its stages run (`plan.plan_run`).
        test: its test plan when its test stage runs in a pass.
        todo: the image ids it still needs.
        prototypes: its `[C, D]` prototypes (while its test stage runs).
        params: its inference settings.
        boxes: its box prompts' source (`proposer=boxes`, `ntt.boxproposals.BoxSource`), else None.
        sink: its open `predictions/rank<r>.jsonl` (during the pass).
        seconds: per image, its share of the pass's time.
        pass_timing: the sections of the whole pass (`ntt.utils.timing`).
        error: the first line of what failed (None: it succeeded).
        metrics: its metrics.json when its test stage ran or was current.
    """

    name: str
    cfg: DictConfig
    ctx: RunContext | None = None
    lock: RunLock | None = None
    plan: RunPlan | None = None
    done: set[str] = field(default_factory=set)
    test: TestPlan | None = None
    todo: set[int] = field(default_factory=set)
    prototypes: Any = None
    params: Any = None
    boxes: Any = None
    sink: Any = None
    t_test: float = 0.0
    seconds: dict[int, float] = field(default_factory=dict)
    pass_timing: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    metrics: dict[str, Any] | None = None


def run_pipeline(cfg: DictConfig) -> dict[str, Any] | None:
    """Run `cfg.stages` in `cfg.run_dir` (one job); returns the metrics of the test stage if it ran.

    Before any work (and before `config.yaml` is written): the inputs are validated, the run directory is
    locked, and a stage whose upstream artifacts were made for another config is refused. Raises what failed.
    """
    (job,) = run_jobs([cfg], keep_going=False)
    return job.metrics


def run_jobs(cfgs: list[DictConfig], names: list[str] | None = None, *, keep_going: bool = True) -> list[Job]:
    """Run every config (one job each) with one test pass per pass group; returns the jobs.

    Args:
        cfgs: the jobs' composed configs.
        names: how to name them in reports (default `job<i>`).
        keep_going: record a job's failure in `Job.error` and go on with the others (a study); False raises
            it (a single run). `fail_fast=true` in a job's config raises too.
    """
    names = names or [f"job{i}" for i in range(len(cfgs))]
    jobs = [Job(name=n, cfg=c) for n, c in zip(names, cfgs)]
    shared = Shared()
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        try:
            check_config(job.cfg)  # before anything is written
            job.ctx = make_context(job.cfg, shared)
        except Exception as err:  # a config that does not even resolve
            if not _recorded(job, err, keep_going):
                raise
            continue
        groups.setdefault(pass_key(job.ctx), []).append(job)
    if len(jobs) > 1:
        log.info(
            "study: %d job(s) in %d pass group(s) (jobs sharing test images, backbones, proposer and pooling)",
            len(jobs),
            len(groups),
        )
    order = list(groups)
    for gi, key in enumerate(order):
        group = groups[key]
        try:
            _run_group(group, gi, len(order), keep_going, announce=len(jobs) > 1)
        finally:
            for job in group:
                _release(job)
            # drop the backbones no later group uses (models of another size are not kept alive)
            later = {backbone_key(j.ctx) for k in order[gi + 1 :] for j in groups[k]}
            for bk in {backbone_key(j.ctx) for j in group} - later:
                shared.models[bk].clear()
    return jobs


def _recorded(job: Job, err: BaseException, keep_going: bool) -> bool:
    """Record a job's failure and say so; False when it must be raised instead (a single run, `fail_fast`)."""
    if not keep_going or job.cfg.get("fail_fast"):
        return False
    job.error = f"{type(err).__name__}: {err}"
    if isinstance(err, UserError):
        log.error("job %s failed: %s", job.name, err)
    else:
        log.error("job %s failed:\n%s", job.name, "".join(traceback.format_exception(err)))
    return True


def _run_group(group: list[Job], gi: int, n_groups: int, keep_going: bool, announce: bool) -> None:
    for job in group:
        try:
            _open(job, announce)
            for stage in job.plan.before_test:
                _run_stage(job, stage)
            _begin_test(job)
        except Exception as err:
            if not _recorded(job, err, keep_going):
                raise
            _release(job)
    active = [j for j in group if j.error is None and j.test is not None and j.todo]
    if active:
        label = "test" if len(group) == 1 else f"study pass {gi + 1}/{n_groups}"
        test_pass(active, label)
    for job in group:
        if job.error is not None:
            continue
        logger = None
        try:
            if job.test is not None:
                _finish_test(job, shared_by=len(active))
            for stage in job.plan.after_test:
                _run_stage(job, stage)
            logger = _build_logger(job.ctx)
            job.metrics = _close(job.ctx, logger)
        except Exception as err:
            if not _recorded(job, err, keep_going):
                raise
        finally:
            if logger is not None:
                logger.finish()
            _release(job)


def _open(job: Job, announce: bool) -> None:
    """Lock, prepare the dataset, plan, refuse stale upstream artifacts, preflight, write config.yaml."""
    ctx = job.ctx
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:  # one run per directory at a time (ntt/runner/runlock.py)
        job.lock = RunLock(ctx.run_dir)
        job.lock.acquire()
    if announce:
        log.info("study: job %s -> %s", job.name, ctx.run_dir)
    if ctx.random_weights:
        log.warning("RUNNING WITH RANDOM WEIGHTS (%s): %s", ctx.cfg.variant, RANDOM_WEIGHTS_NOTE)
    prepare_dataset(ctx)
    job.plan = plan_run(ctx)
    check_upstream(ctx, job.plan, done=set())
    preflight(ctx, job.plan)
    if ctx.is_main:
        write_text_atomic(ctx.run_dir / "config.yaml", OmegaConf.to_yaml(ctx.cfg, resolve=True))


def _run_stage(job: Job, stage: str) -> None:
    """A memory stage: skipped when current; else run, then its manifest."""
    if _begin_stage(job, stage):
        t0 = time.perf_counter()
        MEMORY_STAGES[stage](job.ctx)
        dist.barrier()
        if job.ctx.is_main:
            mark_stage_done(job.ctx, stage, job.ctx.inputs.get(stage))
        job.done.add(stage)
        log.info("stage %s done in %.1f s", stage, time.perf_counter() - t0)


def _begin_stage(job: Job, stage: str) -> bool:
    """False (and `stage` done) when its artifact is current; else prepare it to run: True."""
    ctx = job.ctx
    why = stage_status(ctx, stage)
    if why is None:
        log.info(
            "stage %s: %s matches the config, skipped (input files unchanged)", stage, STAGE_ARTIFACTS[stage]
        )
        job.done.add(stage)
        return False
    check_upstream(ctx, job.plan, done=job.done, only=stage)
    log.info("stage %s ... (%s)", stage, why)
    manifest = ctx.path(f"stage_{stage}.json")
    if ctx.is_main and manifest.exists():
        manifest.unlink()  # not current: a failure below must not leave an old manifest in place
    dist.barrier()
    return True


def _begin_test(job: Job) -> None:
    """Plan the test stage of a job whose test stage must run: its images still to do, prototypes, settings."""
    if not job.plan.test or not _begin_stage(job, "test"):
        return
    job.t_test = time.perf_counter()
    job.test = plan_test(job.ctx)
    job.todo = set(job.test.todo)
    if job.todo:
        job.prototypes = load_prototypes(job.ctx, job.test.test_ds)
        job.params = inference_params(job.ctx)
        job.boxes = box_source(job.ctx)


def _finish_test(job: Job, shared_by: int) -> None:
    """After the pass: timing, merge + evaluate + manifest (main process; raises when images failed)."""
    ctx = job.ctx
    if job.seconds:
        extra = dict(job.pass_timing)
        if shared_by > 1:
            extra = {
                "study_pass": {
                    "banks": shared_by,
                    "note": "shared per-image work split evenly; sections: the whole pass",
                    **job.pass_timing,
                }
            }
        write_timing(ctx, job.test, list(job.seconds.values()), **extra)
    dist.barrier()
    if ctx.is_main:
        merge_and_evaluate(ctx, job.test)
    dist.barrier()
    job.done.add("test")
    log.info("stage test done in %.1f s", time.perf_counter() - job.t_test)


def _build_logger(ctx: RunContext):
    """The job's metrics logger (`logger` config group), with the config logged."""
    from hydra.utils import instantiate

    logger = instantiate(
        ctx.cfg.logger,
        name=str(ctx.cfg.run_name),
        run_dir=str(ctx.run_dir),
        is_main=ctx.is_main,
        _convert_="all",
    )
    logger.log_config(to_plain(ctx.cfg))
    return logger


def _close(ctx: RunContext, logger) -> dict[str, Any] | None:
    """The test stage's metrics (logged to the job's logger), or None when the job has no test stage."""
    metrics_path = ctx.path(METRICS_FILE)
    if not (metrics_path.exists() and "test" in ctx.cfg.stages):
        return None
    metrics = json.loads(metrics_path.read_text())
    logger.log_metrics(metrics)
    return metrics


def _release(job: Job) -> None:
    """Always, at the end (once): save the file-digest cache, close the shard, unlock."""
    if job.ctx is not None and job.ctx.is_main and job.lock is not None:
        job.ctx.files.save()
    if job.sink is not None:
        job.sink.close()
        job.sink = None
    if job.lock is not None:
        job.lock.release()
        job.lock = None


def preflight(ctx: RunContext, plan: RunPlan) -> None:
    """Validate everything the stages that will run need, before the first one runs (ntt/runner/preflight.py).

    Device; dataset jsons present and parseable with the selected class names; the image records of the
    reference candidates and the evaluated images (file name, sizes); reference masks (a box-only pool is
    refused); enough usable references per class for `shots`; annotations (invalid references are fatal
    when they are used, the others are reported); a non-empty test set; the backbones' checkpoints present
    and matching (the models are built here, strictly, and reused by the stages).
    """
    will_run = plan.will_run
    if not will_run:
        return  # every planned stage is current
    check_device(ctx.device)
    spec = ctx.dataset
    if will_run & {"sample_refs", "fill_memory"}:
        ref_ds = load_split(ctx, "ref")
        candidates = ref_ds.annotated_image_ids
        check_image_records(ref_ds, candidates, f"dataset.ref_json={spec.ref_json}", "reference candidate")
        if "fill_memory" in will_run and not ref_ds.has_masks:
            anns = [a["id"] for a in ref_ds.all_annotations()]
            check_reference_masks(ref_ds.raw, anns, spec.ref_json, spec.ref_image_root, every=True)
        # dataset.sampling.allow_duplicates (the authors' LVIS sampler) pads short classes instead: the
        # sampler warns about each one
        padded = spec.sampling.allow_duplicates
        if "sample_refs" in will_run and not spec.refs_file and ctx.is_main and not padded:
            check_shots(
                ref_ds.raw,
                list(ref_ds.category_ids),
                list(ref_ds.category_names),
                int(ctx.cfg.shots),
                spec.ref_json,
            )
    if "test" in will_run:
        test_ds = load_split(ctx, "test")
        labelled_category_ids(ctx, test_ds)  # matcher.classes: every name one of the run's classes
        ids = test_image_ids(ctx, test_ds)
        check_image_records(test_ds, ids, f"dataset.test_json={spec.test_json}", "evaluated")
        boxes = box_source(ctx)  # proposer=boxes: the boxes file parsed and checked before any stage
        if boxes is not None:
            boxes.check_images([test_ds.image_info(i) for i in ids], log_missing=ctx.is_main)
        if ctx.eval.enabled and ctx.is_main:
            wanted = set(ids)
            anns = [a["id"] for a in test_ds.all_annotations() if a["image_id"] in wanted]
            problems = annotation_problems(test_ds.raw, anns)
            crash = [p for p in problems if "polygon" in p] if "segm" in ctx.eval.iou_types else []
            report_annotations(crash, spec.test_json, fatal=True, what="ground-truth polygons (segm eval)")
            report_annotations(
                [p for p in problems if p not in crash], spec.test_json, fatal=False, what="test annotations"
            )
            if ctx.eval.backend == "lvis":  # the package and LVIS's fields, before any image is segmented
                check_lvis_eval(
                    test_ds.raw, list(test_ds.category_ids), ids, ctx.eval.iou_types, spec.test_json
                )
    needed = (
        ["dinov2"] if "fill_memory" in will_run else []
    )  # every process encodes a share of the references
    if "test" in will_run and images_to_segment(ctx, plan):
        needed = ["sam2", "dinov2"]
    check_checkpoints(ctx.cfg.backbone[w] for w in needed)  # every missing file named at once
    for which in needed:
        build_backbone(ctx, which)
