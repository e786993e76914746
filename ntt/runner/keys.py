"""Every hash key of a run, in one place, and what each one decides.

| key | identifies | made of | kept in |
|---|---|---|---|
| `config_id` (ntt.utils.identity) | a result: the run directory's suffix | every config value that can change a detection or a metric | the run dir name, metrics.json |
| `setting_id` (ntt.utils.identity) | a setting across shots and seeds | `config_id`'s values minus dataset files/classes, shots, seed | metrics.json, `ntt summarize` groups |
| `stage_key` | a stage's artifact (refs.json, memory.pt, memory_postprocessed.pt, predictions.json) | the config parts the stage reads + the content of its input artifact and config-named files | `stage_<name>.json` |
| `predictions_key` | the settings one image's detections depend on | both backbones (checkpoints by content), proposer (its boxes file by content), matcher, EXIF handling, the prototypes file | inside every `image_key` |
| `image_key` | one test image's result line | `predictions_key` + the image file's bytes + its json record | each line of `predictions/rank<r>.jsonl` |
| `pass_key` | the memory-independent per-image work jobs can share | test images, both backbones, proposer, pooling, device | in memory: `ntt study`'s pass groups |
| `backbone_key` / `split_key` (ntt.runner.context) | built models / parsed jsons shared by the jobs of one process | backbone nodes + device / the dataset node | in memory (`context.Shared`) |

No absolute path enters a key that is written to disk: files enter by name and content digest, so the same
inputs give the same keys (and bytes) on any machine.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ntt import __version__
from ntt.runner.context import RunContext
from ntt.utils.config import SamplingSpec, config_hash, to_plain
from ntt.utils.identity import backbone_identity, drop_inert_keys, drop_inert_matcher

# the artifact of each stage, in run order (ntt.runner.stages runs them)
REFS_FILE = "refs.json"
MEMORY_FILE = "memory.pt"
PROTOTYPES_FILE = "memory_postprocessed.pt"
PREDICTIONS_FILE = "predictions.json"
METRICS_FILE = "metrics.json"
STAGE_ARTIFACTS = {
    "sample_refs": REFS_FILE,
    "fill_memory": MEMORY_FILE,
    "postprocess_memory": PROTOTYPES_FILE,
    "test": PREDICTIONS_FILE,
}


def _selection(ctx: RunContext) -> dict[str, Any]:
    return {"class_split": ctx.dataset.class_split, "class_names": to_plain(ctx.dataset.class_names)}


def _file_id(ctx: RunContext, path: str | None) -> list[Any] | None:
    """A config-named input file as (name, content digest): path-free, so equal inputs give equal keys."""
    return None if not path else [Path(str(path)).name, ctx.files.sha256(path)]


def _backbone_identity(ctx: RunContext, which: str) -> dict[str, Any]:
    """`backbone.<which>` with its checkpoint path replaced by the checkpoint's name and content digest."""
    return backbone_identity(ctx.cfg.backbone[which], ctx.files.sha256, which=which)


def _proposer_identity(ctx: RunContext) -> Any:
    """`proposer`, with a boxes file (`proposer=boxes`, method.md §5.11) replaced by its name and content
    digest; the grid options' node exactly as before (their keys unchanged; a `boxes_json` the point grid does
    not read is left out, as in the config id: `identity.INERT_UNLESS`)."""
    plain = dict(drop_inert_keys({"proposer": to_plain(ctx.cfg.proposer)})["proposer"])
    if plain.get("boxes_json"):
        plain["boxes_json"] = _file_id(ctx, str(plain["boxes_json"]))
    return plain


def _semantics(ctx: RunContext) -> list[Any]:
    """`matcher.semantics` (method.md §3.4, §5.13) for the memory stages' keys, only when a key differs
    from NTT's: the runs with NTT's semantics keep their stage keys."""
    sem = ctx.matcher.semantics
    if sem.is_default:
        return []
    # keys added later enter only when not at their default (identity.INERT_DEFAULTS): same keys as before
    plain = drop_inert_matcher({"semantics": dataclasses.asdict(sem)})["semantics"]
    if sem.reference_masks == "sam2_box":  # the reference masks come from SAM2 (by checkpoint content)
        return [plain, _backbone_identity(ctx, "sam2")]
    return [plain]


def artifact_sha(ctx: RunContext, name: str) -> str | None:
    """sha256 of a run-directory artifact (None when it does not exist)."""
    return ctx.files.sha256(ctx.path(name))


def stage_key(ctx: RunContext, stage: str) -> str:
    """Hash of what a stage's artifact depends on: config values, input artifact and input file contents.

    Files named by the config (jsons, refs file, checkpoints) enter by content digest; the files found
    through a json (reference and test images) are recorded in the stage manifest instead (`inputs`).
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
        if spec.sampling != SamplingSpec():  # only then: the default settings keep their stage keys
            parts.append(dataclasses.asdict(spec.sampling))
    elif stage == "fill_memory":
        parts += [
            _backbone_identity(ctx, "dinov2"),
            to_plain(cfg.matcher)["memory"],
            spec.exif_orientation,
            _file_id(ctx, spec.ref_json),
            artifact_sha(ctx, REFS_FILE),
        ]
        parts += _semantics(ctx)
    elif stage == "postprocess_memory":
        parts += [to_plain(cfg.matcher)["memory"], artifact_sha(ctx, MEMORY_FILE)]
        parts += _semantics(ctx)
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
        _proposer_identity(ctx),
        drop_inert_matcher(to_plain(cfg.matcher)),  # keys added later enter only when not at their default
        ctx.dataset.exif_orientation,
        artifact_sha(ctx, PROTOTYPES_FILE),
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


def image_keys(ctx: RunContext, test_ds, ids: list[int]) -> tuple[dict[int, str], dict[str, str | None]]:
    """Per evaluated image: the key its result line must carry to be reused; and the image files' digests
    by file name (the test stage's manifest `inputs`)."""
    settings = predictions_key(ctx)
    keys: dict[int, str] = {}
    files: dict[str, str | None] = {}
    for img_id in ids:
        info = test_ds.image_info(img_id)
        sha = ctx.files.sha256(test_ds.image_path(img_id, check=False))
        keys[img_id] = image_key(settings, sha, info)
        files[info["file_name"]] = sha
    return keys, files


def pass_key(ctx: RunContext) -> str:
    """What the memory-independent per-image work depends on: jobs with equal keys share one test pass.

    Test images (json, folder, EXIF handling), both backbones, the proposer, the pooling and the device.
    """
    spec = ctx.dataset
    return config_hash(
        "study_pass",
        to_plain(ctx.cfg.backbone.sam2),
        to_plain(ctx.cfg.backbone.dinov2),
        to_plain(ctx.cfg.proposer),
        str(ctx.matcher.pooling),
        *_semantics(ctx),  # the encoder input and pooling change the shared per-image work
        str(Path(spec.test_json).resolve()),
        str(Path(spec.test_image_root).resolve()),
        bool(spec.exif_orientation),
        str(ctx.device),
    )
