"""What one job will do, decided once when it opens: which stages run, which test images are left.

`plan_run` adopts the memory stages a sibling run directory already computed under the
same keys, and records each planned stage's status: the stages from the first one that is not current on
will run (`RunPlan.will_run`: what the preflight checks and which models it builds). `test_images` computes
the test images' keys once and reads the finished result lines once (`TestImages`); `plan_test` turns them
into the images still to segment (`TestPlan`), after copying a sibling's lines made under the same keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ntt.runner.context import RunContext, StageError, load_split
from ntt.runner.keys import STAGE_ARTIFACTS, image_keys, predictions_key, stage_key
from ntt.runner.lines import read_lines
from ntt.runner.reuse import adopt_sibling_artifact, find_sibling_lines, reuse_sibling_lines
from ntt.runner.stages import MEMORY_STAGES, STAGE_NAMES, inputs_unchanged, stage_status
from ntt.utils import dist

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    """The stages of one job in run order and what they will do.

    Attributes:
        before_test: planned stages before `test`, in the order given.
        test: whether `test` is planned.
        after_test: planned stages after `test`, in the order given.
        status: per planned stage, why it must run (None: current, skipped) when the job opened.
        will_run: the planned stages from the first one that was not current on (a stage after a recomputed
            one usually changes too: the preflight checks their inputs and builds their models).
    """

    before_test: list[str]
    test: bool
    after_test: list[str]
    status: dict[str, str | None] = field(default_factory=dict)
    will_run: set[str] = field(default_factory=set)

    @property
    def stages(self) -> list[str]:
        return [*self.before_test, *(["test"] if self.test else []), *self.after_test]


def plan_run(ctx: RunContext) -> RunPlan:
    """Adopt a sibling's current memory stages and decide what will run (`stages` was checked by
    `configcheck.check_config`)."""
    stages = [str(s) for s in ctx.cfg.stages]
    cut = stages.index("test") if "test" in stages else len(stages)
    plan = RunPlan(before_test=stages[:cut], test="test" in stages, after_test=stages[cut + 1 :])
    adopt_sibling_stages(ctx, plan)
    plan.status = {s: stage_status(ctx, s) for s in stages}
    first = next((STAGE_NAMES.index(s) for s in stages if plan.status[s] is not None), None)
    if first is not None:
        plan.will_run = {s for s in stages if STAGE_NAMES.index(s) >= first}
    return plan


def adopt_sibling_stages(ctx: RunContext, plan: RunPlan) -> None:
    """Copy the planned memory stages' artifacts from a sibling run directory made under the same stage keys.

    A change that only affects the test stage (e.g. `eval`) gives a new run directory (ntt/utils/identity.py);
    its memory stages would compute the same bytes again. Stages are taken in order, so a reused `refs.json`
    makes the `fill_memory` key match in turn. Not with `force` or `trace` (a traced run writes more files).
    """
    if ctx.cfg.get("force") or ctx.cfg.trace:
        return
    if ctx.is_main:
        for stage in [s for s in MEMORY_STAGES if s in plan.before_test + plan.after_test]:
            if stage_status(ctx, stage) is None:
                continue

            def current(sib: Path, rec: dict[str, Any], artifact: str = STAGE_ARTIFACTS[stage]) -> bool:
                return (
                    rec.get("sha256") == ctx.files.sha256(sib / artifact)
                    and inputs_unchanged(ctx, rec) is None
                )

            key = stage_key(ctx, stage)
            if adopt_sibling_artifact(ctx.run_dir, stage, STAGE_ARTIFACTS[stage], key, current) is None:
                break  # the later stages' keys depend on this artifact
    dist.barrier()


def check_upstream(ctx: RunContext, plan: RunPlan, *, done: set[str], only: str | None = None) -> None:
    """Refuse a stage whose input artifacts were made for another config (or are missing).

    For each planned stage (or `only`), every earlier stage that this job does not run itself must be
    current for the present config and input files; otherwise the stage would combine old artifacts with new
    settings and report the result under the new config.
    """
    for stage in [only] if only else plan.stages:
        for up in STAGE_NAMES[: STAGE_NAMES.index(stage)]:
            if up in done or (only is None and up in plan.stages):
                continue
            why = stage_status(ctx, up, honour_force=False)
            if why is None:
                continue
            artifact = STAGE_ARTIFACTS[up]
            # `up` is the first stage not current: every stage from it to `stage` must run (each one's
            # artifact is made from the one before), with the planned ones
            needed = set(plan.stages) | set(STAGE_NAMES[STAGE_NAMES.index(up) : STAGE_NAMES.index(stage) + 1])
            chain = ",".join(s for s in STAGE_NAMES if s in needed)
            makers = STAGE_NAMES[STAGE_NAMES.index(up) : STAGE_NAMES.index(stage)]
            todo = f"stages=[{chain}]" + (" (the default)" if chain == ",".join(STAGE_NAMES) else "")
            if not ctx.path(artifact).exists():
                raise StageError(
                    f"stage {stage} needs the artifacts of stage{'s' if len(makers) > 1 else ''} "
                    f"{', '.join(makers)} ({ctx.path(artifact)} is missing): use {todo}, or point run_dir "
                    "at a run that has them"
                )
            raise StageError(
                f"stage {stage} would use {artifact} from {ctx.run_dir}, but it does not match the present "
                f"config ({why}; stage {up} made it).{'' if only else ' Nothing was run; config.yaml is unchanged.'}"
                f" Add the stages that recompute it (stages=[{chain}], or leave `stages` at its default), or "
                "use another run_dir."
            )


# --------------------------------------------------------------------------------------------------
# The test images


def test_image_ids(ctx: RunContext, test_ds) -> list[int]:
    """The evaluated image ids, in dataset order (or the configured explicit order)."""
    spec = ctx.dataset
    ids = list(spec.test_image_ids) if spec.test_image_ids is not None else list(test_ds.image_ids)
    unknown = sorted(set(ids) - set(test_ds.image_ids))
    if unknown:
        raise StageError(f"dataset.test_image_ids has ids that are not in {spec.test_json}: {unknown[:10]}")
    if spec.max_test_images is not None:
        ids = ids[: int(spec.max_test_images)]
    if not ids:
        raise StageError(
            f"the test set is empty: {spec.test_json} has {len(test_ds.image_ids)} image(s) and "
            f"dataset.test_image_ids={spec.test_image_ids}, dataset.max_test_images={spec.max_test_images} "
            "select none. Point dataset.test_json at a json with images."
        )
    return ids


@dataclass
class TestImages:
    """The evaluated test images under the present prediction settings (`test_images`).

    Attributes:
        test_ds: the test split.
        ids: the evaluated image ids, in order.
        keys: image id -> the key its result line must carry (`keys.image_key`).
        files: image file name -> sha256 (the test stage manifest's `inputs`).
        settings: the `predictions_key` these keys were made with.
        records: image id -> its latest line under its key (`lines.read_lines`), read once.
    """

    test_ds: Any
    ids: list[int]
    keys: dict[int, str]
    files: dict[str, str | None]
    settings: str
    records: dict[int, dict]

    def finished(self) -> set[int]:
        """The images with a successful line under their present key."""
        return {i for i, r in self.records.items() if r["ok"]}


def test_images(ctx: RunContext) -> TestImages:
    """The test images' keys and finished lines, computed once per prediction settings (memoised on `ctx`)."""
    settings = predictions_key(ctx)
    cached = ctx.memo.get("test_images")
    if cached is not None and cached.settings == settings:
        return cached
    test_ds = load_split(ctx, "test")
    ids = test_image_ids(ctx, test_ds)
    keys, files = image_keys(ctx, test_ds, ids)
    pred_dir = ctx.path("predictions")
    # the lines of older settings or inputs are said once per job, by the main process
    say = ctx.is_main and cached is None
    records = read_lines(pred_dir, keys, log_stale=say) if pred_dir.exists() else {}
    ctx.memo["test_images"] = TestImages(test_ds, ids, keys, files, settings, records)
    return ctx.memo["test_images"]


def images_to_segment(ctx: RunContext, plan: RunPlan) -> bool:
    """Whether the test stage may segment an image: False only when the memory is not recomputed and every
    evaluated image already has a result line with its present key, here or in a sibling directory (a rerun
    that only merges and evaluates, e.g. after an `eval` change, then needs no model)."""
    if plan.will_run & set(MEMORY_STAGES):
        return True  # a new bank changes every image key
    images = test_images(ctx)
    done = images.finished()
    if len(done) < len(images.ids):
        done |= set(find_sibling_lines(ctx.run_dir, {i: k for i, k in images.keys.items() if i not in done}))
    return len(done) < len(images.ids)


@dataclass
class TestPlan:
    """What the test stage of one job has to do (`plan_test`).

    Attributes:
        test_ds: the test split.
        ids: the evaluated image ids, in order.
        pred_dir: the run's ``predictions/`` folder.
        keys: image id -> the key its per-image line must carry (`keys.image_key`).
        todo: the ids not done yet, in order (all processes: the test pass shards them).
    """

    test_ds: Any
    ids: list[int]
    pred_dir: Path
    keys: dict[int, str]
    todo: list[int]


def plan_test(ctx: RunContext) -> TestPlan:
    """The images still to segment, after taking the missing ones from a sibling's lines with the same keys."""
    images = test_images(ctx)
    pred_dir = ctx.path("predictions")
    ctx.inputs["test"] = {"dataset.test_image_root": images.files}
    reused = 0
    if ctx.is_main:
        pred_dir.mkdir(parents=True, exist_ok=True)
        # settings that only change the evaluation have their own dir: take the images not done here from a
        # sibling's lines with the same keys (the rule of `images_to_segment`)
        missing = {i: k for i, k in images.keys.items() if i not in images.finished()}
        if missing:
            reused = reuse_sibling_lines(ctx.run_dir, pred_dir, missing)
    dist.barrier()
    if reused or not ctx.is_main:  # lines were added (or another process's view): read them again
        images.records = read_lines(pred_dir, images.keys, log_stale=False)
    done = images.finished()
    todo = [i for i in images.ids if i not in done]
    log.info("test: %d images, %d already done, %d to segment", len(images.ids), len(done), len(todo))
    return TestPlan(images.test_ds, images.ids, pred_dir, images.keys, todo)
