"""The memory stages as plain functions with file artifacts, and the manifests that make a stage resumable.

    sample_refs         -> refs.json                  (method.md §1.2, or a user-given reference set)
    fill_memory         -> memory.pt                  (method.md §3: instance features [C, K, D] + meta)
    postprocess_memory  -> memory_postprocessed.pt    (method.md §4: the bank the test stage reads)
    test                -> predictions.json, metrics.json  (method.md §5-6: ntt.runner.testloop + lines)

Each stage writes `stage_<name>.json`: its key (`keys.stage_key`), the sha256 of its artifact and the digests
of the files it found through a json (`inputs`). A stage is current, and skipped, when the manifest records
the present key, the artifact is unchanged and every recorded input file still has the same content.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ntt import __version__
from ntt.runner.context import RunContext, StageError, build_backbone, load_split
from ntt.runner.keys import MEMORY_FILE, PROTOTYPES_FILE, REFS_FILE, STAGE_ARTIFACTS, stage_key
from ntt.runner.preflight import annotation_problems, check_reference_masks, report_annotations
from ntt.utils.config import SamplingSpec
from ntt.utils.files import write_json_atomic

log = logging.getLogger(__name__)


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
                refs = refs_mod.refs_from_coco(source, ref_ds.category_ids, shots, mode=spec.refs_coco_mode)
            else:
                refs = refs_mod.load_refs(source)
        except (ValueError, KeyError, TypeError) as err:  # json errors are ValueErrors
            raise StageError(f"dataset.refs_file={source} ({fmt}): {type(err).__name__}: {err}") from err
        how = f"loaded from {Path(source).name} ({fmt})"
    else:
        selected = list(ref_ds.category_ids)
        # all_classes: the authors' LVIS draw over every class; the selected ones are kept below
        drawn = [int(c["id"]) for c in ref_ds.raw["categories"]] if spec.sampling.all_classes else selected
        try:
            refs = refs_mod.sample_references(
                ref_ds.raw,
                drawn,
                shots,
                seed,
                allow_invalid=spec.sampling.allow_invalid,
                allow_duplicates=spec.sampling.allow_duplicates,
                remove_impossible=spec.sampling.remove_impossible,
            )
            keep = set(selected)
            refs = {c: lst for c, lst in refs.items() if c in keep}
        except ValueError as err:
            raise StageError(f"{spec.ref_json}: {err} (config keys: dataset.sampling.*)") from err
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
    if not spec.refs_file and spec.sampling != SamplingSpec():  # only then: default refs.json bytes unchanged
        meta["sampling"] = dataclasses.asdict(spec.sampling)
    refs_mod.save_refs(out, refs, meta)
    log.info("references %s -> %s", how, out)
    return out


def _sniff_json_refs(path: str) -> str:
    data = json.loads(Path(path).read_text())
    return "coco" if isinstance(data, dict) and "annotations" in data and "images" in data else "refs_json"


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
    check_reference_masks(ref_ds.raw, used, ctx.dataset.ref_json, ctx.dataset.ref_image_root, every=False)
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
        semantics=None if ctx.matcher.semantics.is_default else ctx.matcher.semantics,
        mask_model=build_backbone(ctx, "sam2")
        if ctx.matcher.semantics.reference_masks == "sam2_box"
        else None,
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
    """The bank the test stage reads (method.md §4: prototypes are computed from it on demand)."""
    from ntt.bank import MemoryBank
    from ntt.fill import postprocess_memory

    out = ctx.path(PROTOTYPES_FILE)
    if not ctx.is_main:
        return out
    bank = MemoryBank.load(ctx.path(MEMORY_FILE), expect=bank_expectation(ctx))
    bank = postprocess_memory(bank)
    bank.save(out)
    return out


def bank_expectation(ctx: RunContext) -> dict[str, Any]:
    """What a memory file of this run must record (`MemoryBank.load(expect=...)`)."""
    return {
        "shots": int(ctx.cfg.shots),
        "seed": int(ctx.cfg.seed),
        "encoder": str(ctx.cfg.backbone.dinov2.name),
    }


# the memory stages in run order (the test stage is the test loop: ntt.runner.testloop)
MEMORY_STAGES: dict[str, Callable[[RunContext], Path]] = {
    "sample_refs": stage_sample_refs,
    "fill_memory": stage_fill_memory,
    "postprocess_memory": stage_postprocess_memory,
}
STAGE_NAMES = [*MEMORY_STAGES, "test"]


# --------------------------------------------------------------------------------------------------
# Manifests


def stage_status(ctx: RunContext, stage: str, *, honour_force: bool = True) -> str | None:
    """None when the stage's artifact is current; else why not (for the log and for refusals).

    Current means: `stage_<stage>.json` records the key of the present config and input files, the
    artifact is unchanged, and every input file recorded in the manifest (the images it read) still has
    the same content.
    """
    artifact = STAGE_ARTIFACTS[stage]
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
    return inputs_unchanged(ctx, rec)


def mark_stage_done(
    ctx: RunContext, stage: str, inputs: dict[str, dict[str, str | None]] | None = None
) -> None:
    """Write `stage_<stage>.json`: key, artifact digest and the digests of the files found through a json.

    Args:
        ctx: the run.
        stage: stage name (its artifact: `keys.STAGE_ARTIFACTS`).
        inputs: `{config key of a folder: {file name under it: sha256}}` (reference / test images).
    """
    artifact = STAGE_ARTIFACTS[stage]
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


def inputs_unchanged(ctx: RunContext, rec: dict[str, Any]) -> str | None:
    """None when every input file a stage manifest records still has its recorded content; else which not."""
    for cfg_key, files in (rec.get("inputs") or {}).items():
        root = Path(str(OmegaConf.select(ctx.cfg, cfg_key)))
        for name, sha in files.items():
            if ctx.files.sha256(root / name) != sha:
                return f"input file {root / name} changed"
    return None
