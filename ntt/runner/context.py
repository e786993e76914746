"""What every stage of a run needs, built once from the composed config: the run's context.

A `RunContext` holds the typed config nodes, the run directory, this process's rank and device, and what is
shared with the other jobs of a study in the same process (`Shared`: the parsed dataset jsons, the built
backbones and the file digests), so a 60-job study parses COCO's json and builds each model once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ntt.utils import dist
from ntt.utils.config import (
    DatasetSpec,
    EvalConfig,
    IOConfig,
    MatcherConfig,
    ProposerConfig,
    build_node,
    config_hash,
    to_plain,
)
from ntt.utils.errors import UserError
from ntt.utils.files import CACHE_FILE, FileDigests

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_NOTE = "random weights: these numbers measure plumbing and speed only, never accuracy"


class StageError(UserError, RuntimeError):
    """A stage cannot run: the message says which file or config key and what to do."""


@dataclass
class Shared:
    """What the jobs of one process share (`ntt study`): keyed so that only equal settings share.

    Attributes:
        digests: file sha256s by path (size + mtime rules of `FileDigests`).
        splits: per `keys.split_key`, the parsed reference pool / test set by `ref` / `test`.
        models: per `keys.backbone_key`, the built backbones by `sam2` / `dinov2`.
    """

    digests: dict = field(default_factory=dict)
    splits: dict[str, dict] = field(default_factory=dict)
    models: dict[str, dict] = field(default_factory=dict)


@dataclass
class RunContext:
    """Everything a stage needs, built once from the composed config (`make_context`)."""

    cfg: DictConfig
    run_dir: Path
    dataset: DatasetSpec
    proposer: ProposerConfig
    matcher: MatcherConfig
    eval: EvalConfig
    device: str
    rank: int
    world_size: int
    # datasets loaded by `load_split`, kept for the later stages (COCO train2017's json is ~450 MB: sample_refs
    # and fill_memory must not parse it twice); shared between the jobs of a study with the same dataset node
    splits: dict[str, Any] = field(default_factory=dict)
    # content digests of input files (size + mtime fast path, cached in the run directory)
    files: FileDigests = field(default_factory=FileDigests)
    # per stage: the files it found through a json, recorded in its manifest (`stages.mark_stage_done`)
    inputs: dict[str, dict[str, dict[str, str | None]]] = field(default_factory=dict)
    # backbones built by the preflight / the first stage that needs them (shared like `splits`)
    backbones: dict[str, Any] = field(default_factory=dict)
    # how the test loop reads images and writes results (`io` node; never changes a result)
    io: IOConfig = field(default_factory=IOConfig)
    # values computed once per job (ntt.runner.plan.test_images)
    memo: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def path(self, name: str) -> Path:
        return self.run_dir / name

    @property
    def random_weights(self) -> bool:
        return bool(self.cfg.backbone.sam2.get("random_init")) or bool(
            self.cfg.backbone.dinov2.get("random_init")
        )


def make_context(cfg: DictConfig, shared: Shared | None = None) -> RunContext:
    """Resolve the config into typed parts and the run directory (a bad value is a `ConfigError`).

    Args:
        cfg: the composed config of one job.
        shared: the process's shared state (`ntt study`); None for a context of its own.
    """
    st = dist.state()
    run_dir = Path(str(cfg.run_dir)).resolve()
    shared = shared if shared is not None else Shared()
    ctx = RunContext(
        cfg=cfg,
        run_dir=run_dir,
        dataset=build_node(cfg.dataset, DatasetSpec),
        proposer=build_node(cfg.proposer, ProposerConfig),
        matcher=build_node(cfg.matcher, MatcherConfig),
        eval=build_node(cfg.eval, EvalConfig),
        device=dist.resolve_device(str(cfg.device)),
        rank=st.process_index,
        world_size=st.num_processes,
        files=FileDigests(run_dir / CACHE_FILE, shared=shared.digests),
        io=build_node(cfg.get("io") or {}, IOConfig),
    )
    ctx.splits = shared.splits.setdefault(split_key(ctx), {})
    ctx.backbones = shared.models.setdefault(backbone_key(ctx), {})
    return ctx


def backbone_key(ctx: RunContext) -> str:
    """Jobs with equal keys use the same built backbones (in one process)."""
    return config_hash(to_plain(ctx.cfg.backbone.sam2), to_plain(ctx.cfg.backbone.dinov2), str(ctx.device))


def split_key(ctx: RunContext) -> str:
    """Jobs with equal keys use the same parsed dataset jsons (in one process)."""
    return config_hash(to_plain(ctx.cfg.dataset))


def prepare_dataset(ctx: RunContext) -> None:
    """Generate a synthetic dataset on first use (main process), then let every process go on."""
    spec = ctx.dataset
    if spec.synthetic is not None and ctx.is_main:
        root = Path(spec.root or Path(spec.ref_json).parent)
        if not (Path(spec.ref_json).exists() and Path(spec.test_json).exists()):
            from ntt.data.synthetic import generate_synthetic_dataset

            log.info("generating the synthetic dataset in %s", root)
            generate_synthetic_dataset(root, **dict(spec.synthetic))
    dist.barrier()


def load_split(ctx: RunContext, which: str):
    """The reference pool (`ref`) or the test set (`test`) as a CocoDataset with the run's classes."""
    from ntt.data.coco import CocoDataset

    if which in ctx.splits:
        return ctx.splits[which]
    spec = ctx.dataset
    key = "ref_json" if which == "ref" else "test_json"
    json_file, root = (
        (spec.ref_json, spec.ref_image_root) if which == "ref" else (spec.test_json, spec.test_image_root)
    )
    if not Path(json_file).is_file():
        raise StageError(
            f"dataset.{key}={json_file} not found (dataset={spec.name}, relative paths start at the working "
            f"directory {Path.cwd()}). Put the data there, or point `paths.data` (env NTT_DATA), "
            f"`dataset.root` or `dataset.{key}` at it."
        )
    try:
        ctx.splits[which] = CocoDataset(
            json_file, root, class_names=spec.class_names, class_split=spec.class_split
        )
    except (ValueError, KeyError, TypeError) as err:  # malformed json, unknown class names, duplicate ids
        raise StageError(f"dataset.{key}: {err}") from err
    return ctx.splits[which]


def build_backbone(ctx: RunContext, which: str):
    """`backbone.<which>` on this process's device (weights loaded strictly), built once per run.

    The preflight builds the backbones the planned stages need, so a missing or mismatched checkpoint
    is reported before any stage runs, and the stages reuse those models (each checkpoint read once).
    """
    if which not in ctx.backbones:
        from ntt.backbones import build_backbone as build

        ctx.backbones[which] = build(ctx.cfg.backbone[which], device=ctx.device)
    return ctx.backbones[which]


def box_source(ctx: RunContext):
    """The job's source of box prompts (`proposer=boxes`, method.md §5.11; its file parsed once), else None."""
    if ctx.proposer.prompts != "boxes":
        return None
    if "box_source" not in ctx.memo:
        from ntt.boxproposals import BoxSource

        ctx.memo["box_source"] = BoxSource.from_config(ctx.proposer)
    return ctx.memo["box_source"]


def labelled_category_ids(ctx: RunContext, test_ds) -> list[int]:
    """The category ids the test stage labels with and evaluates: ``matcher.classes`` (by name, in the test
    set's order) or every class of the test set.

    Raises:
        ConfigError: a name that is not one of the run's classes (one line, with the close names).
    """
    import difflib

    from ntt.utils.errors import ConfigError

    names = ctx.matcher.classes
    if names is None:
        return list(test_ds.category_ids)
    known = [str(n) for n in test_ds.category_names]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6)
            raise ConfigError(
                f"matcher.classes: no class {name!r} among the run's {len(known)} classes"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + (
                    f"; they are: {', '.join(known)}"
                    if len(known) <= 30
                    else "; see dataset.class_split / json"
                )
            )
    wanted = set(names)
    return [int(c) for c, n in zip(test_ds.category_ids, known) if n in wanted]


def inference_params(ctx: RunContext):
    """The run's `ntt.inference.InferenceParams` (proposer + matcher settings)."""
    from ntt.inference import InferenceParams

    return InferenceParams.from_settings(ctx.proposer, ctx.matcher)


def log_expected_time(ctx: RunContext, n_images: int) -> None:
    """Log the expected time of `n_images` images with this run's backbones, grid and device (main)."""
    if not ctx.is_main or ctx.proposer.prompts != "grid":  # the estimate knows the point grid only
        return
    from ntt.utils.speed import expected_time_message

    log.info(
        "test: %s",
        expected_time_message(
            sam2=str(ctx.cfg.backbone.sam2.name),
            dinov2=str(ctx.cfg.backbone.dinov2.name),
            points_per_side=ctx.proposer.points_per_side,
            device=str(ctx.device),
            n_images=n_images,
            cpu_hint="proposer=cpu_fast",
        ),
    )
