"""Typed views of the config groups, run-directory naming and config hashing.

Every non-backbone group (`dataset`, `proposer`, `matcher`, `eval`, `logger`) names one of the
dataclasses below as its `_target_`, so the compose-all test can bind each yaml to a real signature and a
typo in a key fails loudly instead of being ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from ntt.utils.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSpec:
    """Where the reference pool and the test set live, and which classes are in memory.

    Args:
        name: short name used in run directories and tables (e.g. `coco_fewshot`).
        root: the dataset's folder; the other paths are usually written relative to it.
        ref_json: COCO json of the reference pool (sampled from unless `refs_file` is given).
        ref_image_root: folder holding the reference pool's images (`file_name` is relative to it).
        test_json: COCO json of the evaluation images (ground truth for COCOeval).
        test_image_root: folder holding the test images.
        class_split: key of `ntt.data.splits.CLASS_SPLITS` (wins over `class_names`, as in the reference).
        class_names: explicit list of category names, used when `class_split` is null.
        refs_file: a user-given reference set instead of sampling: our refs json, the reference
            code's pkl layout, or a COCO json of reference annotations (see `refs_format`).
        refs_format: `auto` (by extension/content), `refs_json`, `pkl` or `coco`.
        refs_coco_mode: for `refs_format=coco`: `reference_pkl` reproduces the authors' `coco_to_pkl`
            (first instance repeated, method.md §1.6, parity), `per_annotation` is the fix.
        test_image_ids: evaluate on these image ids only, in this order (null = all).
        max_test_images: evaluate on the first N test images only (null = all); for smoke runs.
        exif_orientation: rotate images by their EXIF Orientation tag before use (false for the
            benchmark datasets: the reference ignores it and their annotations are in the stored frame;
            a run that ignores a rotation says so once per image).
        synthetic: parameters of `ntt.data.synthetic.generate_synthetic_dataset` when the dataset is
            generated on first use (null for real datasets).
    """

    name: str
    ref_json: str
    ref_image_root: str
    test_json: str
    test_image_root: str
    root: str | None = None
    class_split: str | None = None
    class_names: list[str] | None = None
    refs_file: str | None = None
    refs_format: str = "auto"
    refs_coco_mode: str = "reference_pkl"
    test_image_ids: list[int] | None = None
    max_test_images: int | None = None
    exif_orientation: bool = False
    synthetic: dict[str, Any] | None = None


@dataclass(frozen=True)
class ProposerConfig:
    """SAM2 point-grid proposals (method.md §5.2).

    Args:
        points_per_side: grid side P; P*P single positive point prompts (paper: 32).
        points_batch_size: prompts decoded per batch (reference: 256); the last batch may be smaller
            (the reference silently drops the remainder, method.md §9.2 item 4; we never drop prompts).
        iou_thr: keep proposals whose predicted IoU is strictly greater (paper: 0.4).
    """

    points_per_side: int = 32
    points_batch_size: int = 256
    iou_thr: float = 0.4


@dataclass(frozen=True)
class MemoryConfig:
    """How references become prototypes (method.md §3-4).

    Args:
        context_ratio: square context crop side = max(w, h) * (1 + ratio) (reference config: 0.2).
        mask_pooling: `nearest` = soft mask value at each patch's top-left pixel (parity);
            `area` = mean of the mask over each patch (fix of method.md §9.1 item 2).
        batch_size: reference crops per encoder forward.
    """

    context_ratio: float = 0.2
    mask_pooling: str = "nearest"
    batch_size: int = 8


@dataclass(frozen=True)
class MatcherConfig:
    """Labelling, de-duplication and output (method.md §5.3-5.8).

    Args:
        memory: reference encoding, see `MemoryConfig`.
        pooling: `dense` = average of bilinearly upsampled features over the mask (parity);
            `adjoint` = the same sum computed through the adjoint of bilinear upsampling (exact up to
            float rounding, ~50x fewer FLOPs, method.md §10 item 3).
        nms_thr: class-aware box NMS IoU threshold on 256-res boxes ranked by predicted IoU (0.5).
        num_out: detections per image (100).
        nms_cap_factor: NMS keeps at most `num_out * nms_cap_factor` proposals (8).
        drop_empty_masks: fix of method.md §12b item 3: drop masks that vanish at full resolution
            (the reference outputs them with a NaN score). Off for parity.
        box_plus_one: fix of method.md §9.1 item 7: COCO box width/height = extent + 1. Off for parity.
    """

    memory: MemoryConfig = field(default_factory=MemoryConfig)
    pooling: str = "dense"
    nms_thr: float = 0.5
    num_out: int = 100
    nms_cap_factor: int = 8
    drop_empty_masks: bool = False
    box_plus_one: bool = False

    def __post_init__(self) -> None:
        # Hydra passes nested nodes as dicts when the target is a dataclass built by hand.
        if isinstance(self.memory, dict):
            object.__setattr__(self, "memory", MemoryConfig(**self.memory))


@dataclass(frozen=True)
class EvalConfig:
    """COCO evaluation of the test stage (method.md §6).

    Args:
        enabled: run COCOeval after prediction (off for unlabelled image folders).
        backend: `pycocotools` (reference) or `faster_coco_eval` (same numbers, faster).
        iou_types: any of `bbox`, `segm`.
    """

    enabled: bool = True
    backend: str = "pycocotools"
    iou_types: tuple[str, ...] = ("bbox", "segm")


def resolve_num_workers(num_workers: int | str, device: str) -> int:
    """``io.num_workers`` as a number: ``auto`` is 2 on CUDA and 0 on CPU (see conf/main.yaml for why).

    Args:
        num_workers: ``auto`` or a count >= 0.
        device: the run's device.
    """
    if num_workers == "auto":
        return 2 if str(device).startswith("cuda") else 0
    try:
        n = int(num_workers)
    except (TypeError, ValueError):
        n = -1
    if n < 0:
        raise ValueError(f"io.num_workers={num_workers!r}: use `auto` or a number of processes >= 0")
    return n


@dataclass(frozen=True)
class IOConfig:
    """How the test loops read images and write results (`io` node); never changes a result.

    Args:
        num_workers: DataLoader worker processes decoding and resizing the next test images while the
            models run (`auto`: 2 on CUDA, 0 on CPU; 0 = in the loop's process).
        prefetch_factor: images each worker keeps ready.
        async_write: RLE-encode and append the per-image result lines in a background thread, in image
            order (false: in the loop).
        write_queue: finished images waiting for the writer at most (bounds the memory they hold).
        timing: per-section seconds per image in `predictions/timing_rank<r>.json` (on CUDA the sections
            synchronise the device).
    """

    num_workers: int | str = "auto"
    prefetch_factor: int = 2
    async_write: bool = True
    write_queue: int = 2
    timing: bool = True

    def __post_init__(self) -> None:
        resolve_num_workers(self.num_workers, "cpu")  # `auto` or a count >= 0, checked before any stage runs
        if int(self.prefetch_factor) < 1:
            raise ValueError(f"io.prefetch_factor={self.prefetch_factor}: use a number of images >= 1")
        if int(self.write_queue) < 1:
            raise ValueError(f"io.write_queue={self.write_queue}: use a number of images >= 1")

    def workers(self, device: str) -> int:
        """`num_workers` as a number for this device."""
        return resolve_num_workers(self.num_workers, device)


def to_plain(cfg: Any) -> Any:
    """Resolve an OmegaConf node (or pass through plain data) to JSON-able Python objects."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def build_node(node: Any, cls: type, **overrides: Any) -> Any:
    """Build one of the dataclasses above from its config node (dropping `_target_`)."""
    data = dict(to_plain(node) or {})
    data.pop("_target_", None)
    data.update(overrides)
    if cls is EvalConfig and "iou_types" in data:
        data["iou_types"] = tuple(data["iou_types"])
    try:
        return cls(**data)
    except ConfigError:
        raise
    except ValueError as err:  # a value check in __post_init__: the user's to fix, one message, exit 2
        raise ConfigError(str(err)) from err


def config_hash(*parts: Any) -> str:
    """Stable short hash of JSON-able config parts (key order does not matter)."""
    blob = json.dumps([to_plain(p) for p in parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Composition: the one way to build a config outside `ntt run`'s own Hydra app

CONF_PACKAGE = "ntt.conf"  # `conf/` of the repository, shipped in the wheel as package data


def conf_path() -> Any:
    """The config root as a file-system path (a `Traversable` of the installed package `ntt.conf`)."""
    from importlib.resources import files

    return files(CONF_PACKAGE)


def compose(
    overrides: Any = (),
    *,
    return_hydra_config: bool = False,
    job_name: str = "ntt",
    config_name: str = "main",
):
    """Compose `conf/main.yaml` (+ the `experiments/` root) with Hydra's compose API, from any folder.

    Args:
        overrides: Hydra overrides, as on the `ntt run` line (`dataset=synthetic`, `shots=3`, ...).
        return_hydra_config: also return the `hydra` node (sweeper params, launcher).
        job_name: Hydra's job name.
        config_name: the primary config.

    Returns:
        The composed `DictConfig`.
    """
    return compose_all(
        [overrides], return_hydra_config=return_hydra_config, job_name=job_name, config_name=config_name
    )[0]


def compose_all(
    override_lists: Any,
    *,
    return_hydra_config: bool = False,
    job_name: str = "ntt",
    config_name: str = "main",
) -> list:
    """`compose` of several override lists in one Hydra initialisation (the jobs of a sweep).

    The caller's Hydra state (a running app, a test's `initialize`) is kept: this composes in a clean
    global Hydra and restores the previous one.

    Args:
        override_lists: one list of overrides per config.
        return_hydra_config: also return the `hydra` node.
        job_name: Hydra's job name.
        config_name: the primary config.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from ntt.utils.identity import register_resolver

    register_resolver()
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONF_PACKAGE, version_base="1.3", job_name=job_name):
            return [
                hydra_compose(
                    config_name=config_name, overrides=list(ov), return_hydra_config=return_hydra_config
                )
                for ov in override_lists
            ]
    finally:
        restore_gh_from_backup(backup)
