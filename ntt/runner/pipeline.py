"""The four stages as plain functions with file artifacts, run in order by `run_pipeline`.

    sample_refs         -> refs.json                  (method.md §1.2, or a user-given reference set)
    fill_memory         -> memory.pt                  (method.md §3: instance features [C, K, D] + meta)
    postprocess_memory  -> memory_postprocessed.pt    (method.md §4: prototypes; stats only when asked)
    test                -> predictions.json, metrics.json  (method.md §5-6)

Each stage writes `stage_<name>.json`: a key (hash of the config parts the stage depends on and of its
input artifact) and the sha256 of its artifact. A rerun skips a stage whose manifest key and artifact
still match, so an interrupted sweep resumes where it stopped. The test stage also resumes per image:
every finished image is a line in `predictions/rank<r>.jsonl`, and a failing image is recorded and
skipped, never losing the others.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import traceback
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ntt import __version__
from ntt.runner.preflight import annotation_problems, check_device, check_shots, report_annotations
from ntt.runner.reuse import adopt_sibling_artifact, find_sibling_lines, reuse_sibling_lines
from ntt.runner.runlock import RunLock
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
from ntt.utils.files import CACHE_FILE, FileDigests, write_text_atomic
from ntt.utils.identity import config_id, identity_keys, portable_config, setting_id
from ntt.utils.timing import SectionTimer, section, timing

log = logging.getLogger(__name__)

REFS_FILE = "refs.json"
MEMORY_FILE = "memory.pt"
PROTOTYPES_FILE = "memory_postprocessed.pt"
PREDICTIONS_FILE = "predictions.json"
METRICS_FILE = "metrics.json"
RANDOM_WEIGHTS_NOTE = "random weights: these numbers measure plumbing and speed only, never accuracy"


class StageError(UserError, RuntimeError):
    """A stage cannot run: the message says which file or config key and what to do."""


@dataclass
class RunContext:
    """Everything a stage needs, built once from the composed config."""

    cfg: DictConfig
    run_dir: Path
    dataset: DatasetSpec
    proposer: ProposerConfig
    matcher: MatcherConfig
    eval: EvalConfig
    device: str
    rank: int
    world_size: int
    # datasets loaded by `load_split`, kept for the later stages of the same run (COCO train2017's json is
    # ~450 MB: sample_refs and fill_memory should not parse it twice)
    splits: dict[str, Any] = field(default_factory=dict)
    # content digests of input files (size + mtime fast path, cached in the run directory)
    files: FileDigests = field(default_factory=FileDigests)
    # per stage: the files it found through a json, recorded in its manifest (see `mark_stage_done`)
    inputs: dict[str, dict[str, dict[str, str | None]]] = field(default_factory=dict)
    # backbones built by the preflight / the first stage that needs them
    backbones: dict[str, Any] = field(default_factory=dict)
    # how the test loop reads images and writes results (`io` node; never changes a result)
    io: IOConfig = field(default_factory=IOConfig)

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


def make_context(cfg: DictConfig) -> RunContext:
    """Resolve the config into typed parts and the run directory."""
    st = dist.state()
    run_dir = Path(str(cfg.run_dir)).resolve()
    return RunContext(
        cfg=cfg,
        run_dir=run_dir,
        dataset=build_node(cfg.dataset, DatasetSpec),
        proposer=build_node(cfg.proposer, ProposerConfig),
        matcher=build_node(cfg.matcher, MatcherConfig),
        eval=build_node(cfg.eval, EvalConfig),
        device=dist.resolve_device(str(cfg.device)),
        rank=st.process_index,
        world_size=st.num_processes,
        files=FileDigests(run_dir / CACHE_FILE),
        io=build_node(cfg.get("io") or {}, IOConfig),
    )


# --------------------------------------------------------------------------------------------------
# Stage bookkeeping


def write_json_atomic(path: Path, obj: Any, *, indent: int | None = 1) -> None:
    """Write JSON through a temp file + rename (umask file mode): a killed run never leaves half a file."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def _selection(ctx: RunContext) -> dict[str, Any]:
    return {"class_split": ctx.dataset.class_split, "class_names": to_plain(ctx.dataset.class_names)}


def _file_id(ctx: RunContext, path: str | None) -> list[Any] | None:
    """A config-named input file as (name, content digest): path-free, so equal inputs give equal keys."""
    return None if not path else [Path(str(path)).name, ctx.files.sha256(path)]


def _backbone_identity(ctx: RunContext, which: str) -> dict[str, Any]:
    """`backbone.<which>` with its checkpoint path replaced by the checkpoint's name and content digest."""
    node = dict(to_plain(ctx.cfg.backbone[which]))
    if node.get("checkpoint") and not node.get("random_init"):
        node["checkpoint"] = _file_id(ctx, str(node["checkpoint"]))
    return node


def stage_key(ctx: RunContext, stage: str) -> str:
    """Hash of what a stage's artifact depends on: config values, input artifact and input file contents.

    Files named by the config (jsons, refs file, checkpoints) enter by content digest; the files found
    through a json (reference and test images) are recorded in the stage manifest instead (`inputs`).
    No absolute path enters a key, so the same inputs give the same key (and memory bytes) anywhere.
    """
    cfg, spec = ctx.cfg, ctx.dataset
    parts: list[Any] = [stage, __version__]
    if stage == "sample_refs":
        parts += [
            _selection(ctx),
            cfg.shots,
            cfg.seed,
            _file_id(ctx, spec.ref_json),
            _file_id(ctx, spec.refs_file),
            spec.refs_format,
            spec.refs_coco_mode,
        ]
    elif stage == "fill_memory":
        parts += [
            _backbone_identity(ctx, "dinov2"),
            to_plain(cfg.matcher)["memory"],
            spec.exif_orientation,
            _file_id(ctx, spec.ref_json),
            _artifact_sha(ctx, REFS_FILE),
        ]
    elif stage == "postprocess_memory":
        parts += [to_plain(cfg.matcher)["memory"], _artifact_sha(ctx, MEMORY_FILE)]
    elif stage == "test":
        parts += [
            predictions_key(ctx),
            _selection(ctx),
            _file_id(ctx, spec.test_json),
            spec.max_test_images,
            to_plain(spec.test_image_ids),
            cfg.eval,
            [spec.name, cfg.shots, cfg.seed, cfg.variant],  # written into metrics.json
        ]
    else:
        raise KeyError(stage)
    return config_hash(*parts)


def predictions_key(ctx: RunContext) -> str:
    """The settings one image's detections depend on (besides the image itself, see `image_key`).

    Unlike the test stage's key it leaves out which images are evaluated (`dataset.max_test_images`,
    `dataset.test_image_ids`), the test json and how they are scored (`eval`): changing those re-merges and
    re-evaluates the images already done instead of segmenting them again.
    """
    cfg = ctx.cfg
    return config_hash(
        "predictions",
        __version__,
        _backbone_identity(ctx, "sam2"),
        _backbone_identity(ctx, "dinov2"),
        cfg.proposer,
        cfg.matcher,
        ctx.dataset.exif_orientation,
        _artifact_sha(ctx, PROTOTYPES_FILE),
    )


def image_key(settings_key: str, image_sha: str | None, info: dict[str, Any]) -> str:
    """What one test image's result depends on: the settings, the image file's bytes and its json record.

    Args:
        settings_key: `predictions_key` of the run.
        image_sha: sha256 of the image file (None when it is missing).
        info: the json record (`file_name`, `height`, `width`: masks are produced in that frame).
    """
    record = {k: info.get(k) for k in ("file_name", "height", "width")}
    return config_hash("image", settings_key, image_sha, record)


def _artifact_sha(ctx: RunContext, name: str) -> str | None:
    return ctx.files.sha256(ctx.path(name))


def stage_status(ctx: RunContext, stage: str, artifact: str, *, honour_force: bool = True) -> str | None:
    """None when the stage's artifact is current; else why not (for the log and for refusals).

    Current means: `stage_<stage>.json` records the key of the present config and input files, the
    artifact is unchanged, and every input file recorded in the manifest (the images it read) still has
    the same content.
    """
    manifest = ctx.path(f"stage_{stage}.json")
    art = ctx.path(artifact)
    if honour_force and ctx.cfg.get("force"):
        return "force=true"
    if not art.exists():
        return f"{artifact} does not exist"
    if not manifest.exists():
        return f"{manifest.name} does not exist (the stage did not finish)"
    try:
        rec = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return f"{manifest.name} is unreadable"
    if rec.get("key") != stage_key(ctx, stage):
        return "the config or an input file (dataset json, refs file, checkpoint, upstream artifact) changed"
    if rec.get("sha256") != ctx.files.sha256(art):
        return f"{artifact} was modified after the stage wrote it"
    return _inputs_unchanged(ctx, rec)


def mark_stage_done(
    ctx: RunContext, stage: str, artifact: str, inputs: dict[str, dict[str, str | None]] | None = None
) -> None:
    """Write `stage_<stage>.json`: key, artifact digest and the digests of the files found through a json.

    Args:
        ctx: the run.
        stage: stage name.
        artifact: its artifact's file name in the run directory.
        inputs: `{config key of a folder: {file name under it: sha256}}` (reference / test images).
    """
    write_json_atomic(
        ctx.path(f"stage_{stage}.json"),
        {
            "stage": stage,
            "key": stage_key(ctx, stage),
            "artifact": artifact,
            "sha256": ctx.files.sha256(ctx.path(artifact)),
            "inputs": inputs or {},
            "ntt_version": __version__,
        },
    )


# --------------------------------------------------------------------------------------------------
# Datasets


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


# --------------------------------------------------------------------------------------------------
# Stages


def stage_sample_refs(ctx: RunContext) -> Path:
    """Sample K references per class (method.md §1.2) or import a user-given set; write refs.json."""
    from ntt import refs as refs_mod

    out = ctx.path(REFS_FILE)
    if not ctx.is_main:
        return out
    spec = ctx.dataset
    ref_ds = load_split(ctx, "ref")
    shots, seed = int(ctx.cfg.shots), int(ctx.cfg.seed)
    if spec.refs_file:
        source = spec.refs_file
        if not Path(source).exists():
            raise StageError(
                f"dataset.refs_file={source} does not exist: point it at a refs json, a reference "
                "pkl or a COCO json of reference annotations, or set it to null to sample"
            )
        fmt = spec.refs_format
        try:
            if fmt == "auto":
                fmt = "pkl" if source.endswith(".pkl") else _sniff_json_refs(source)
            if fmt == "coco":
                refs = refs_mod.refs_from_coco(
                    json.loads(Path(source).read_text()), ref_ds.category_ids, shots, mode=spec.refs_coco_mode
                )
            else:
                refs = refs_mod.load_refs(source)
        except (ValueError, KeyError, TypeError) as err:  # json errors are ValueErrors
            raise StageError(f"dataset.refs_file={source} ({fmt}): {type(err).__name__}: {err}") from err
        how = f"loaded from {Path(source).name} ({fmt})"
    else:
        try:
            refs = refs_mod.sample_references(ref_ds.raw, list(ref_ds.category_ids), shots, seed)
        except ValueError as err:
            raise StageError(f"{spec.ref_json}: {err}") from err
        how = f"sampled from {Path(spec.ref_json).name} with seed {seed}"
    try:
        refs_mod.validate_refs(refs, ref_ds.raw, list(ref_ds.category_ids), shots)
    except ValueError as err:
        raise StageError(f"{err}\n(references {how})") from err
    # the json's name and content hash, not its absolute path: the same inputs give the same bytes anywhere
    meta = {
        "shots": shots,
        "seed": seed,
        "source": how,
        "ref_json": Path(spec.ref_json).name,
        "ref_json_sha256": ctx.files.sha256(spec.ref_json),
        "category_ids": list(ref_ds.category_ids),
        "category_names": list(ref_ds.category_names),
        "ntt_version": __version__,
    }
    refs_mod.save_refs(out, refs, meta)
    log.info("references %s -> %s", how, out)
    return out


def _sniff_json_refs(path: str) -> str:
    data = json.loads(Path(path).read_text())
    return "coco" if isinstance(data, dict) and "annotations" in data and "images" in data else "refs_json"


def build_backbone(ctx: RunContext, which: str):
    """`backbone.<which>` on this process's device (weights loaded strictly), built once per run.

    The preflight builds the backbones the planned stages need, so a missing or mismatched checkpoint
    is reported before any stage runs, and the stages reuse those models (each checkpoint read once).
    """
    if which not in ctx.backbones:
        from ntt.backbones import build_backbone as build

        ctx.backbones[which] = build(ctx.cfg.backbone[which], device=ctx.device)
    return ctx.backbones[which]


def stage_fill_memory(ctx: RunContext) -> Path:
    """Encode every reference crop with DINOv2 and store per-instance mean features (method.md §3).

    With several processes each encodes a share of the encoder batches and the main process assembles
    and writes the bank (`ntt.runner.memory_shard`): the same bytes as one process.
    """
    from ntt import refs as refs_mod
    from ntt.runner.memory_shard import fill_memory_sharded

    out = ctx.path(MEMORY_FILE)
    ref_ds = load_split(ctx, "ref")
    refs = refs_mod.load_refs(ctx.path(REFS_FILE))
    used = [e.ann_ids[0] for lst in refs.values() for e in lst]
    # on every process (same inputs, same verdict): none goes on to wait for a process that raised here
    report_annotations(
        annotation_problems(ref_ds.raw, used), ctx.dataset.ref_json, fatal=True, what="reference annotations"
    )
    encoder = build_backbone(ctx, "dinov2")
    mem = ctx.matcher.memory
    bank = fill_memory_sharded(
        refs,
        rank=ctx.rank,
        world_size=ctx.world_size,
        dataset_json=ref_ds.raw,
        image_root=ctx.dataset.ref_image_root,
        encoder=encoder,
        class_ids=list(ref_ds.category_ids),
        context_ratio=mem.context_ratio,
        mask_pooling=mem.mask_pooling,
        batch_size=mem.batch_size,
        keep_patch_features=bool(ctx.cfg.trace),
        progress=ctx.is_main,
        shots=int(ctx.cfg.shots),
        seed=int(ctx.cfg.seed),
        encoder_name=str(ctx.cfg.backbone.dinov2.name),
        config_hash=stage_key(ctx, "fill_memory"),
        apply_exif=ctx.dataset.exif_orientation,
    )
    if bank is None:  # not the main process: its share is in the main process's bank
        return out
    if ctx.cfg.trace:
        _save_memory_trace(ctx, bank)
    bank.save(out)
    names = sorted({ref_ds.image_info(e.image_id)["file_name"] for lst in refs.values() for e in lst})
    root = Path(ctx.dataset.ref_image_root)
    ctx.inputs["fill_memory"] = {"dataset.ref_image_root": {n: ctx.files.sha256(root / n) for n in names}}
    log.info(
        "memory bank [C=%d, K=%d, D=%d] -> %s (%.1f kB, %d process(es))",
        *bank.instance_means.shape,
        out,
        out.stat().st_size / 1e3,
        ctx.world_size,
    )
    return out


def _save_memory_trace(ctx: RunContext, bank) -> None:
    import numpy as np

    trace_dir = ctx.path("trace")
    trace_dir.mkdir(exist_ok=True)
    arrays = {"instance_means": bank.instance_means.numpy(), "prototypes": bank.prototypes().numpy()}
    for key in ("mask_weights", "patch_features"):
        val = getattr(bank, key, None)
        if val is not None:
            arrays[key] = val.numpy()
    np.savez(trace_dir / "memory.npz", **arrays)


def stage_postprocess_memory(ctx: RunContext) -> Path:
    """Prototypes from instance means (method.md §4); k-means/PCA/covariance only when asked."""
    from ntt.bank import MemoryBank
    from ntt.memory import postprocess_memory

    out = ctx.path(PROTOTYPES_FILE)
    if not ctx.is_main:
        return out
    mem = ctx.matcher.memory
    bank = MemoryBank.load(ctx.path(MEMORY_FILE), expect=_bank_expectation(ctx))
    bank = postprocess_memory(
        bank, compute_stats=mem.compute_stats, kmeans_k=mem.kmeans_k, n_pca=mem.n_pca, seed=int(ctx.cfg.seed)
    )
    bank.save(out)
    return out


def _bank_expectation(ctx: RunContext) -> dict[str, Any]:
    return {
        "shots": int(ctx.cfg.shots),
        "seed": int(ctx.cfg.seed),
        "encoder": str(ctx.cfg.backbone.dinov2.name),
    }


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
class TestPlan:
    """What the test stage of one run has to do (`plan_test`).

    Attributes:
        test_ds: the test split.
        ids: the evaluated image ids, in order.
        pred_dir: the run's ``predictions/`` folder.
        keys: image id -> the key its per-image line must carry (`image_key`).
        todo: the ids this process segments (not done yet, this process's shard).
    """

    test_ds: Any
    ids: list[int]
    pred_dir: Path
    keys: dict[int, str]
    todo: list[int]


def plan_test(ctx: RunContext, *, shard: bool = True) -> TestPlan:
    """Image keys, sibling reuse and the images still to segment (this process's shard when `shard`)."""
    test_ds = load_split(ctx, "test")
    ids = test_image_ids(ctx, test_ds)
    pred_dir = ctx.path("predictions")
    keys, files = _image_keys(ctx, test_ds, ids)
    ctx.inputs["test"] = {"dataset.test_image_root": files}
    if ctx.is_main:
        pred_dir.mkdir(parents=True, exist_ok=True)
        # settings that only change the evaluation have their own dir: take the images not done here from a
        # sibling's lines with the same keys (the same rule as the preflight's `_images_to_segment`)
        here = _finished_image_ids(pred_dir, keys)
        missing = {i: k for i, k in keys.items() if i not in here}
        if missing:
            reuse_sibling_lines(ctx.run_dir, pred_dir, missing)
    dist.barrier()
    done = _finished_image_ids(pred_dir, keys)
    todo = [i for i in ids if i not in done]
    if shard:
        todo = dist.shard(todo, ctx.rank, ctx.world_size)
    log.info(
        "test: %d images, %d already done, %d for this process (%d/%d)",
        len(ids),
        len(done),
        len(todo),
        ctx.rank,
        ctx.world_size,
    )
    return TestPlan(test_ds, ids, pred_dir, keys, todo)


def inference_params(ctx: RunContext):
    """The run's `ntt.inference.InferenceParams` (proposer + matcher settings)."""
    from ntt.inference import InferenceParams

    return InferenceParams.from_settings(ctx.proposer, ctx.matcher)


def log_expected_time(ctx: RunContext, n_images: int) -> None:
    """Log the expected time of `n_images` images with this run's backbones, grid and device (main)."""
    if not ctx.is_main:
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


def load_prototypes(ctx: RunContext, test_ds):
    """The run's `[C, D]` class prototypes on its device (bank checked against the test set's classes)."""
    from ntt.bank import MemoryBank

    bank = MemoryBank.load(ctx.path(PROTOTYPES_FILE), expect=_bank_expectation(ctx))
    _check_bank_classes(bank, test_ds)
    return bank.prototypes().to(ctx.device)


def image_spec(test_ds, img_id: int):
    """What the image loader needs of one test image: id, file, the json's height and width."""
    from ntt.data.prefetch import ImageSpec

    info = test_ds.image_info(img_id)
    return ImageSpec(
        img_id, str(test_ds.image_path(img_id, check=False)), int(info["height"]), int(info["width"])
    )


def load_images(ctx: RunContext, specs: list):
    """The test images of `specs`, in order, stretched to 1024 and checked against their json records, on
    the run's device: decoded ahead in `io.num_workers` processes (`ntt.data.prefetch`)."""
    from ntt.data.prefetch import prefetch_images

    return prefetch_images(
        specs,
        device=ctx.device,
        num_workers=ctx.io.workers(ctx.device),
        prefetch_factor=ctx.io.prefetch_factor,
        apply_exif=ctx.dataset.exif_orientation,
    )


def result_writer(ctx: RunContext):
    """The test loop's `ntt.runner.writer.ResultWriter` (`io.async_write`, `io.write_queue`, `fail_fast`)."""
    from ntt.runner.writer import ResultWriter

    return ResultWriter(
        async_write=ctx.io.async_write, depth=ctx.io.write_queue, fail_fast=bool(ctx.cfg.get("fail_fast"))
    )


def success_line(
    ctx: RunContext, plan: TestPlan, img_id: int, det, trace, rles: list[dict] | None = None
) -> dict[str, Any]:
    """The per-image JSONL record of a segmented image (and its trace file when tracing); `rles`: the
    detections' mask RLEs when already encoded."""
    from ntt.results import detections_to_coco

    results = detections_to_coco(
        det, img_id, list(plan.test_ds.category_ids), box_plus_one=ctx.matcher.box_plus_one, rles=rles
    )
    if trace is not None:
        _save_image_trace(ctx, img_id, trace)
    return {"image_id": img_id, "key": plan.keys[img_id], "ok": True, "results": results}


def failure_line(ctx: RunContext, plan: TestPlan, img_id: int, exc: BaseException) -> dict[str, Any]:
    """The per-image JSONL record of a failed image (error and traceback; a rerun retries it); called
    while `exc` is being handled."""
    return failure_record(ctx, plan, img_id, f"{type(exc).__name__}: {exc}", traceback.format_exc())


def failure_record(
    ctx: RunContext, plan: TestPlan, img_id: int, error: str, tb: str | None
) -> dict[str, Any]:
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


def write_timing(ctx: RunContext, plan: TestPlan, timings: list[float], **extra: Any) -> None:
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


def finish_test(ctx: RunContext, plan: TestPlan) -> Path:
    """After every process wrote its lines: merge them in image order and evaluate (main process)."""
    dist.barrier()
    out = ctx.path(PREDICTIONS_FILE)
    if ctx.is_main:
        _merge_and_evaluate(ctx, plan.test_ds, plan.ids, plan.pred_dir, plan.keys)
    dist.barrier()
    return out


def stage_test(ctx: RunContext) -> Path:
    """Segment every test image (sharded over processes), merge, evaluate (method.md §5-6)."""
    import torch

    from ntt.inference import infer_image

    plan = plan_test(ctx)
    if plan.todo:
        prototypes = load_prototypes(ctx, plan.test_ds)
        sam2 = build_backbone(ctx, "sam2")
        dino = build_backbone(ctx, "dinov2")
        params = inference_params(ctx)
        log_expected_time(ctx, len(plan.todo))
        shard_file = plan.pred_dir / f"rank{ctx.rank}.jsonl"
        timings: list[float] = []
        timer = SectionTimer(ctx.device) if ctx.io.timing else None
        fail_fast = bool(ctx.cfg.get("fail_fast"))
        specs = [image_spec(plan.test_ds, i) for i in plan.todo]
        from tqdm import tqdm

        images = load_images(ctx, specs)
        first = next(images, None)  # the loader's workers start before the writer's thread
        items = itertools.chain([first] if first is not None else [], images)
        with closing(images), open(shard_file, "a") as sink, result_writer(ctx) as writer, timing(timer):
            for spec, item in tqdm(
                zip(specs, items), total=len(specs), desc="test", disable=not ctx.is_main, unit="img"
            ):
                t0 = time.perf_counter()
                if timer is not None:
                    timer.add("load", item.wait_s)
                if item.error is not None:  # the image could not be read: its failure, the others go on
                    if fail_fast:
                        item.raise_error()
                    with section("write"):
                        writer.write_now(
                            sink, failure_record(ctx, plan, spec.img_id, item.error, item.traceback)
                        )
                else:
                    try:
                        with torch.inference_mode():
                            det, trace = infer_image(
                                item.image,
                                spec.height,
                                spec.width,
                                sam2=sam2,
                                dino=dino,
                                prototypes=prototypes,
                                params=params,
                                trace=bool(ctx.cfg.trace),
                            )
                    except Exception as exc:  # one bad image must not lose the others
                        if fail_fast:
                            raise
                        with section("write"):
                            writer.write_now(sink, failure_line(ctx, plan, spec.img_id, exc))
                    else:
                        with section("write"):  # encoding + writing, or only the hand-off when async
                            writer.submit(
                                sink,
                                partial(success_line, ctx, plan, spec.img_id, det, trace),
                                partial(failure_line, ctx, plan, spec.img_id),
                            )
                        del det, trace
                timings.append(item.wait_s + time.perf_counter() - t0)
            t0 = time.perf_counter()
            with section("write"):
                writer.close()  # the last queued lines
            drain = time.perf_counter() - t0
        write_timing(
            ctx, plan, timings, **loop_timing(ctx, timer, writer, sum(timings) + drain, len(timings))
        )
    return finish_test(ctx, plan)


def _image_keys(ctx: RunContext, test_ds, ids: list[int]) -> tuple[dict[int, str], dict[str, str | None]]:
    """Per evaluated image: the key its result must carry to be reused; and the image files' digests."""
    settings = predictions_key(ctx)
    keys: dict[int, str] = {}
    files: dict[str, str | None] = {}
    for img_id in ids:
        info = test_ds.image_info(img_id)
        sha = ctx.files.sha256(test_ds.image_path(img_id, check=False))
        keys[img_id] = image_key(settings, sha, info)
        files[info["file_name"]] = sha
    return keys, files


def _read_lines(pred_dir: Path, keys: dict[int, str]) -> dict[int, dict]:
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
    if stale:
        log.info("test: %d per-image result(s) of other settings or older inputs ignored", stale)
    return records


def _finished_image_ids(pred_dir: Path, keys: dict[int, str]) -> set[int]:
    if not pred_dir.exists():
        return set()
    return {i for i, r in _read_lines(pred_dir, keys).items() if r["ok"]}


def _check_bank_classes(bank, test_ds) -> None:
    if list(bank.category_ids) != list(test_ds.category_ids):
        raise StageError(
            f"the memory bank holds category ids {list(bank.category_ids)} but the test set selects "
            f"{list(test_ds.category_ids)}: rerun with stages including fill_memory"
        )


def _save_image_trace(ctx: RunContext, img_id: int, trace: dict[str, Any]) -> None:
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


def _merge_and_evaluate(
    ctx: RunContext, test_ds, ids: list[int], pred_dir: Path, keys: dict[int, str]
) -> None:
    records = _read_lines(pred_dir, keys)
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
        from ntt.eval.coco import CocoEvaluator

        evaluator = CocoEvaluator(
            test_ds.raw,
            category_ids=list(test_ds.category_ids),
            image_ids=ids,
            backend=ctx.eval.backend,
            iou_types=tuple(ctx.eval.iou_types),
        )
        evaluator.process(results)
        metrics.update(evaluator.evaluate())
    write_json_atomic(ctx.path(METRICS_FILE), metrics)
    _log_summary(ctx, metrics)
    if failed or missing:
        raise StageError(
            f"{len(failed)} image(s) failed and {len(missing)} are missing (first: "
            f"{(failed + missing)[:5]}); their errors are in {pred_dir}/rank*.jsonl. The other "
            "images are kept: rerun the same command to retry only these."
        )
    mark_stage_done(ctx, "test", PREDICTIONS_FILE, ctx.inputs.get("test"))


def _log_summary(ctx: RunContext, metrics: dict[str, Any]) -> None:
    parts = []
    for iou_type in ("bbox", "segm"):
        if iou_type in metrics:
            m = metrics[iou_type]
            parts.append(f"{iou_type} AP {m['AP']:.4f} AP50 {m['AP50']:.4f} AP75 {m['AP75']:.4f}")
    if parts:
        log.info("metrics (%s): %s", ctx.run_dir, " | ".join(parts))
    if ctx.random_weights:
        log.warning("%s", RANDOM_WEIGHTS_NOTE.upper())


STAGES: dict[str, tuple[Callable[[RunContext], Path], str]] = {
    "sample_refs": (stage_sample_refs, REFS_FILE),
    "fill_memory": (stage_fill_memory, MEMORY_FILE),
    "postprocess_memory": (stage_postprocess_memory, PROTOTYPES_FILE),
    "test": (stage_test, PREDICTIONS_FILE),
}


def run_pipeline(cfg: DictConfig) -> dict[str, Any] | None:
    """Run `cfg.stages` in order in `cfg.run_dir`; returns the metrics of the test stage if it ran.

    Before any work (and before `config.yaml` is written): the inputs are validated, the run directory is
    locked, and a stage whose upstream artifacts were made for another config is refused.
    """
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise StageError(f"stages={list(cfg.stages)}: unknown {unknown}; choose from {list(STAGES)}")
    ctx = make_context(cfg)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    # one run per directory at a time (the main process holds the lock; ntt/runner/runlock.py)
    lock = RunLock(ctx.run_dir) if ctx.is_main else None
    if lock is not None:
        lock.acquire()
    try:
        return _run_stages(ctx)
    finally:
        if lock is not None:
            lock.release()


def _run_stages(ctx: RunContext) -> dict[str, Any] | None:
    logger = open_run(ctx)
    try:
        done: set[str] = set()
        for stage in ctx.cfg.stages:
            if begin_stage(ctx, stage, done):
                t0 = time.perf_counter()
                STAGES[stage][0](ctx)
                end_stage(ctx, stage, done, t0)
        return close_run(ctx, logger)
    finally:
        release_run(ctx, logger)


def open_run(ctx: RunContext, *, with_logger: bool = True):
    """Everything before the first stage: dataset, upstream check, preflight, `config.yaml`; the logger
    (None when not `with_logger`: a study pass builds each run's logger only when that run ends)."""
    if ctx.random_weights:
        log.warning("RUNNING WITH RANDOM WEIGHTS (%s): %s", ctx.cfg.variant, RANDOM_WEIGHTS_NOTE)
    prepare_dataset(ctx)
    adopt_sibling_stages(ctx)
    _check_upstream(ctx, done=set())
    preflight(ctx)
    if ctx.is_main:
        write_text_atomic(ctx.run_dir / "config.yaml", OmegaConf.to_yaml(ctx.cfg, resolve=True))
    return build_logger(ctx) if with_logger else None


def _inputs_unchanged(ctx: RunContext, rec: dict[str, Any]) -> str | None:
    """None when every input file a stage manifest records still has its recorded content; else which not."""
    for cfg_key, files in (rec.get("inputs") or {}).items():
        root = Path(str(OmegaConf.select(ctx.cfg, cfg_key)))
        for name, sha in files.items():
            if ctx.files.sha256(root / name) != sha:
                return f"input file {root / name} changed"
    return None


def adopt_sibling_stages(ctx: RunContext) -> None:
    """Copy the planned memory stages' artifacts from a sibling run directory made under the same stage keys.

    A change that only affects the test stage (e.g. `eval`) gives a new run directory (ntt/utils/identity.py);
    its memory stages would compute the same bytes again. Stages are taken in order, so a reused `refs.json`
    makes the `fill_memory` key match in turn. Not with `force` or `trace` (a traced run writes more files).
    """
    if ctx.cfg.get("force") or ctx.cfg.trace:
        return
    if ctx.is_main:
        for stage in [s for s in STAGES if s != "test" and s in ctx.cfg.stages]:
            artifact = STAGES[stage][1]
            if stage_status(ctx, stage, artifact) is None:
                continue

            def current(sib: Path, rec: dict[str, Any], artifact: str = artifact) -> bool:
                return (
                    rec.get("sha256") == ctx.files.sha256(sib / artifact)
                    and _inputs_unchanged(ctx, rec) is None
                )

            if adopt_sibling_artifact(ctx.run_dir, stage, artifact, stage_key(ctx, stage), current) is None:
                break  # the later stages' keys depend on this artifact
    dist.barrier()


def begin_stage(ctx: RunContext, stage: str, done: set[str]) -> bool:
    """False (and `stage` added to `done`) when its artifact is current; else prepare it to run: True."""
    artifact = STAGES[stage][1]
    why = stage_status(ctx, stage, artifact)
    if why is None:
        log.info("stage %s: %s matches the config, skipped (input files unchanged)", stage, artifact)
        done.add(stage)
        return False
    _check_upstream(ctx, done=done, only=stage)
    log.info("stage %s ... (%s)", stage, why)
    manifest = ctx.path(f"stage_{stage}.json")
    if ctx.is_main and manifest.exists():
        manifest.unlink()  # not current: a failure below must not leave an old manifest in place
    dist.barrier()
    return True


def end_stage(ctx: RunContext, stage: str, done: set[str], t0: float) -> None:
    """After a stage ran: its manifest (test marks itself done only when every image succeeded)."""
    dist.barrier()
    if ctx.is_main and stage != "test":
        mark_stage_done(ctx, stage, STAGES[stage][1], ctx.inputs.get(stage))
    done.add(stage)
    log.info("stage %s done in %.1f s", stage, time.perf_counter() - t0)


def close_run(ctx: RunContext, logger) -> dict[str, Any] | None:
    """The test stage's metrics (logged to the run's logger), or None when the run has no test stage."""
    metrics_path = ctx.path(METRICS_FILE)
    metrics = (
        json.loads(metrics_path.read_text()) if metrics_path.exists() and "test" in ctx.cfg.stages else None
    )
    if metrics is not None:
        logger.log_metrics(metrics)
    return metrics


def release_run(ctx: RunContext, logger) -> None:
    """Always, at the end: save the file-digest cache, close the logger."""
    if ctx.is_main:
        ctx.files.save()
    logger.finish()


def preflight(ctx: RunContext) -> None:
    """Validate everything the stages that will run need, before the first one runs (ntt/runner/preflight.py).

    Device; dataset jsons present and parseable with the selected class names; enough usable references
    per class for `shots`; annotations (invalid references are fatal when they are used, the others are
    reported); a non-empty test set; the backbones' checkpoints present and matching (the models are built
    here, strictly, and reused by the stages).
    """
    names = list(STAGES)
    statuses = {s: stage_status(ctx, s, STAGES[s][1]) for s in ctx.cfg.stages}
    first = next((names.index(s) for s in ctx.cfg.stages if statuses[s] is not None), None)
    if first is None:
        return  # every planned stage is current
    will_run = {s for s in ctx.cfg.stages if names.index(s) >= first}
    check_device(ctx.device)
    spec = ctx.dataset
    if will_run & {"sample_refs", "fill_memory"}:
        ref_ds = load_split(ctx, "ref")
        if "sample_refs" in will_run and not spec.refs_file and ctx.is_main:
            check_shots(
                ref_ds.raw,
                list(ref_ds.category_ids),
                list(ref_ds.category_names),
                int(ctx.cfg.shots),
                spec.ref_json,
            )
    if "test" in will_run:
        test_ds = load_split(ctx, "test")
        ids = test_image_ids(ctx, test_ds)
        if ctx.eval.enabled and ctx.is_main:
            wanted = set(ids)
            anns = [a["id"] for a in test_ds.all_annotations() if a["image_id"] in wanted]
            problems = annotation_problems(test_ds.raw, anns)
            crash = [p for p in problems if "polygon" in p] if "segm" in ctx.eval.iou_types else []
            report_annotations(crash, spec.test_json, fatal=True, what="ground-truth polygons (segm eval)")
            report_annotations(
                [p for p in problems if p not in crash], spec.test_json, fatal=False, what="test annotations"
            )
    if "fill_memory" in will_run:  # every process encodes a share of the references
        build_backbone(ctx, "dinov2")
    if "test" in will_run and _images_to_segment(ctx, will_run, test_ds, ids):
        build_backbone(ctx, "sam2")
        build_backbone(ctx, "dinov2")


def _images_to_segment(ctx: RunContext, will_run: set[str], test_ds, ids: list[int]) -> bool:
    """Whether the test stage may segment an image: False only when the memory is not recomputed and every
    evaluated image already has a result line with its current key (a rerun that only merges and evaluates,
    e.g. after an `eval` change, then needs no model)."""
    if will_run & {"sample_refs", "fill_memory", "postprocess_memory"}:
        return True  # a new bank changes every image key
    pred_dir = ctx.path("predictions")
    keys, _ = _image_keys(ctx, test_ds, ids)
    done = _finished_image_ids(pred_dir, keys)
    if len(done) < len(ids):
        done |= set(find_sibling_lines(ctx.run_dir, {i: k for i, k in keys.items() if i not in done}))
    return len(done) < len(ids)


def _check_upstream(ctx: RunContext, *, done: set[str], only: str | None = None) -> None:
    """Refuse a stage whose input artifacts were made for another config (or are missing).

    For each planned stage (or `only`), every earlier stage that this invocation does not run itself must
    be current for the present config and input files; otherwise the stage would combine old artifacts
    with new settings and report the result under the new config.
    """
    names = list(STAGES)
    planned = list(ctx.cfg.stages)
    for stage in [only] if only else planned:
        for up in names[: names.index(stage)]:
            if up in done or (only is None and up in planned):
                continue
            artifact = STAGES[up][1]
            why = stage_status(ctx, up, artifact, honour_force=False)
            if why is None:
                continue
            if not ctx.path(artifact).exists():
                raise StageError(
                    f"stage {stage} needs {ctx.path(artifact)}, written by stage {up}: add it to "
                    f"`stages` (e.g. stages=[{up},{stage}])"
                )
            chain = ",".join(names[names.index(up) : names.index(stage) + 1])
            raise StageError(
                f"stage {stage} would use {artifact} from {ctx.run_dir}, but it does not match the present "
                f"config ({why}; stage {up} made it).{'' if only else ' Nothing was run; config.yaml is unchanged.'}"
                f" Add the stages that recompute it (stages=[{chain}], or leave `stages` at its default), or use "
                "another run_dir."
            )


def build_logger(ctx: RunContext):
    """The run's metrics logger (`logger` config group), with the config logged."""
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
