"""A job's config is refused before anything is written: its keys and types, its stages, its output folders.

`ntt run` checks every job of its command line before Hydra's app makes a directory (`main.check_command_line`
composes them exactly as Hydra will), `ntt study` checks every job of its sweep, and `run_jobs` checks each
job it is given, so a bad value is one `ConfigError` line naming the key and what to do (exit status 2),
with no run directory and no config.yaml left behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ntt.runner.context import StageError
from ntt.runner.stages import STAGE_NAMES
from ntt.utils.config import validate_config
from ntt.utils.errors import ConfigError


def check_config(cfg: Any) -> None:
    """Every key known and typed (`utils.config.validate_config`), known stages, writable output folders.

    Args:
        cfg: a job's composed config; with the `hydra` node, the folders Hydra's app makes are checked too.

    Raises:
        ConfigError: naming the first bad key; `StageError` for an unknown stage.
    """
    settings = validate_config(cfg)
    validate_stages(settings.stages)
    check_box_source(cfg)
    keys = ["run_dir", *(["hydra.run.dir", "hydra.sweep.dir"] if "hydra" in cfg else [])]
    try:
        output_dir = Path(str(cfg.paths.output_dir))
        folders = {key: OmegaConf.select(cfg, key, throw_on_missing=True) for key in keys}
    except OmegaConfBaseException as err:  # e.g. an interpolation that does not resolve
        raise ConfigError(f"{err.full_key or 'run_dir'}: {str(err).splitlines()[0]}") from err
    for key, folder in folders.items():
        check_writable(Path(str(folder)), key, output_dir)


def check_box_source(cfg: Any) -> None:
    """`proposer=boxes` (method.md §5.11) names its boxes: exactly one of `proposer.boxes_json` (an existing
    file) and `proposer.detector`, checked here so a sweep (the FSOD-VFM studies, the NTT-to-FSOD-VFM walk)
    stops before its first job instead of at its first box-prompt job.

    Raises:
        ConfigError: one line naming the key and what to give.
    """
    proposer = cfg.get("proposer") or {}
    if proposer.get("prompts", "grid") != "boxes":
        return
    try:
        boxes_json = OmegaConf.select(cfg, "proposer.boxes_json", throw_on_missing=True)
    except OmegaConfBaseException as err:  # an interpolation that does not resolve
        raise ConfigError(f"proposer.boxes_json: {str(err).splitlines()[0]}") from err
    detector = proposer.get("detector")
    if (boxes_json is None) == (detector is None):
        raise ConfigError(
            "proposer=boxes needs exactly one of proposer.boxes_json=<your detector's boxes json> and "
            "'proposer.detector={_target_: <module.callable>}' (FSOD-VFM's UPN boxes are made outside ntt: "
            "docs/running.md, proposer=boxes)"
        )
    if boxes_json is not None and not Path(str(boxes_json)).is_file():
        raise ConfigError(
            f"proposer.boxes_json={boxes_json} not found: give your detector's boxes for the test images "
            "(a COCO-results json [{image_id, bbox: [x, y, w, h], score}, ...]; FSOD-VFM's UPN boxes are made "
            "outside ntt)"
        )


def validate_stages(stages: list[str]) -> None:
    """`stages` names only known stages (one message naming the unknown ones)."""
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if unknown:
        raise StageError(f"stages={list(stages)}: unknown {unknown}; choose from {STAGE_NAMES}")


def check_writable(folder: Path, key: str, output_dir: Path) -> None:
    """`folder` exists as a writable folder or can be made (its nearest existing parent is writable).

    Args:
        folder: the folder a run will write.
        key: the config key it comes from (named in the message).
        output_dir: `paths.output_dir`, named as the key to change when `folder` lies inside it.
    """
    folder, output_dir = folder.absolute(), output_dir.absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    inside = folder.is_relative_to(output_dir)
    lead = f"paths.output_dir={output_dir}" if inside else f"{key}={folder}"
    what = "paths.output_dir (env NTT_OUTPUT)" if inside else key
    if not existing.is_dir():
        raise ConfigError(
            f"{lead}: cannot make {folder}: {existing} is a file, not a folder. Point {what} at a folder."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{lead}: cannot write {folder}: {existing} is not writable by this user (or is on a read-only "
            f"filesystem). Point {what} at a folder you can write."
        )
