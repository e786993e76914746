"""Typed views of the config groups, config hashing, and the one config composer.

Every non-backbone group (`dataset`, `proposer`, `matcher`, `eval`) names one of the dataclasses below as its
`_target_`, and the top level of a run is `RunSettings`: `build_node` checks each key's type against these
signatures and names an unknown key with the closest valid one, so a typo or a wrong type fails loudly with
one line (a `ConfigError`) instead of being ignored or crashing a stage. `compose` turns Hydra's own
composition errors (an unknown option or key, an override it cannot parse) into such one-line errors too.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ntt.utils.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingSpec:
    """How `sample_refs` draws the references when a class has too few usable ones (method.md §1.2).

    The defaults are the authors' COCO/VOC settings (a short class is an error); `conf/dataset/lvis.yaml`
    selects their LVIS settings (scripts/lvis_pipeline.sh, `few_shot_sampling.py --dataset lvis`: all four
    flipped).

    Args:
        allow_invalid: a class with no valid instance (crowd, smaller than 32x32, within 10 px of a border)
            falls back to its first K invalid ones, in shuffled order.
        allow_duplicates: a class with fewer than K entries is padded by repeating its entries in order
            (entry i of the padded list is entry i mod count); false: such a class is an error.
        remove_impossible: skip annotations with `isimpossible == 1` where that key exists (the authors'
            `remove_bad`: true for COCO/VOC, false for LVIS).
        all_classes: draw over every category of the reference json, then keep the selected classes (the
            authors' LVIS script samples all 1203 classes whatever the split, so a subset's references come
            from that one draw); false: draw over the selected classes only (COCO/VOC).
    """

    allow_invalid: bool = False
    allow_duplicates: bool = False
    remove_impossible: bool = True
    all_classes: bool = False


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
        sampling: the reference sampler's fallbacks, see `SamplingSpec` (absent: the COCO/VOC settings).
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
    sampling: SamplingSpec = field(default_factory=SamplingSpec)


@dataclass(frozen=True)
class ProposerConfig:
    """SAM2 proposals: a point grid (method.md §5.2, the paper) or an external detector's boxes decoded as box
    prompts (method.md §5.11, FSOD-VFM's front end; `conf/proposer/boxes.yaml`).

    The box keys are absent from the grid options' files, so the grid settings' run ids are unchanged.

    Args:
        points_per_side: grid side P; P*P single positive point prompts (paper: 32). Not read by `boxes`.
        points_batch_size: prompts decoded per batch (reference: 256; FSOD-VFM's boxes: 32); the last batch
            may be smaller (the reference silently drops the remainder, method.md §9.2 item 4; we never drop
            prompts).
        iou_thr: keep proposals whose predicted IoU is strictly greater (paper: 0.4); null keeps every
            proposal (FSOD-VFM's boxes).
        prompts: `grid` (the point grid) or `boxes` (box prompts from `boxes_json` or `detector`).
        boxes_json: boxes: a COCO-results-style json `[{image_id, bbox, score}, ...]` (any detector's
            output); an input file: its content digest enters the run's keys (ntt/runner/keys.py).
        boxes_key: boxes: `image_id` or `file_name`: how the file's entries name their test image.
        box_format: boxes: `xywh` (COCO results) or `xyxy`: the file's bbox layout.
        detector: boxes: instead of a file, a callable named by `_target_` (+ its arguments), called per
            image (`ntt.boxproposals.BoxSource`).
        top_k: boxes: boxes kept per image after sorting by score (FSOD-VFM: 100); null = all.
        score_thr: boxes: keep boxes with score >= this (FSOD-VFM's UPN: 0.01).
        clip: boxes: clip boxes to the image, dropping those left empty (FSOD-VFM: true).
        stability_fallback: boxes: SAM2's dynamic multimask fallback of `build_sam2(apply_postprocessing=True)`
            (FSOD-VFM: true); false always takes the single-mask output.
    """

    points_per_side: int = 32
    points_batch_size: int = 256
    iou_thr: float | None = 0.4
    prompts: str = "grid"
    boxes_json: str | None = None
    boxes_key: str = "image_id"
    box_format: str = "xywh"
    detector: dict[str, Any] | None = None
    top_k: int | None = 100
    score_thr: float = 0.0
    clip: bool = True
    stability_fallback: bool = True

    def __post_init__(self) -> None:
        choices = {"prompts": ("grid", "boxes"), "boxes_key": ("image_id", "file_name"),
                   "box_format": ("xywh", "xyxy")}  # fmt: skip
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"proposer.{key}={getattr(self, key)}: use one of {', '.join(allowed)}")
        if self.prompts == "grid" and self.iou_thr is None:
            raise ValueError("proposer.iou_thr=null: the point grid needs a number (paper: 0.4)")
        # boxes_json / detector: exactly one, checked by the preflight (ntt.boxproposals.BoxSource), so the
        # option itself composes and validates like every other
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"proposer.top_k={self.top_k}: use a number of boxes >= 1, or null for all")


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


ENCODER_INPUTS = ("square", "long_side")
REFERENCE_VIEWS = ("context_crop", "whole_image")
REFERENCE_MASKS = ("annotation", "sam2_box")
REFERENCE_MASK_PRECISIONS = ("float32", "bfloat16")
PROPOSAL_POOLINGS = ("upsampled", "grid_mask")
SCORINGS = ("clamped_cosine", "cosine")


@dataclass(frozen=True)
class SemanticsConfig:
    """How images become DINOv2 features, masks become vectors and vectors become scores (method.md §3.4,
    §5.13). The defaults are NTT's; `conf/matcher/fsod_vfm.yaml` sets FSOD-VFM's (support_util.py and
    metric.py at commit f5559b6). Each key can be swept on its own.

    Args:
        encoder_input: `square` = NTT: the target (1024x1024 stretched) resized bicubic to the encoder's
            `img_size`; `long_side` = FSOD-VFM: the original image, PIL bicubic to a long side of `long_side`
            (aspect kept, sides floored to the patch), then PIL bicubic to `input_size` x `input_size`.
        long_side: FSOD-VFM's first resize (630).
        input_size: FSOD-VFM's transform `Resize((input_size, input_size))` (main.py: 630 -> a 45x45 grid).
        final_norm: DINOv2 tokens after the final LayerNorm (NTT); false = before it (FSOD-VFM's
            `get_intermediate_layers(norm=False)`).
        references: `context_crop` = NTT's square crop around the box with context (method.md §3.1);
            `whole_image` = FSOD-VFM: the whole reference image through `encoder_input`, its mask resized to
            the grid as cv2 INTER_LINEAR > 0.5, masked mean; prototypes in FSOD-VFM's arithmetic.
        reference_masks: with `whole_image`: `annotation` = the reference's annotated mask (ntt's references
            carry masks); `sam2_box` = FSOD-VFM: SAM2's single-mask output for the reference's box (the box
            decoding of method.md §5.11, on the run's SAM2).
        reference_mask_precision: with `sam2_box`: `float32` (ntt) or `bfloat16` = FSOD-VFM: SAM2 encodes the
            reference image and decodes its box under `torch.autocast(bfloat16)`, one box per call
            (`support_util.extract_masks_from_support`).
        proposal_pooling: `upsampled` = NTT: the features upsampled to SAM's 256x256 mask (`pooling`);
            `grid_mask` = FSOD-VFM: the full-resolution mask resized to the grid as cv2 INTER_LINEAR > 0.5,
            `normalize(sum / (count + 1e-7), eps=1e-2)`.
        scoring: `clamped_cosine` = NTT: cosine clamped at 0, first maximum; `cosine` = FSOD-VFM: unclamped
            cosine, `torch.max`.
        sam_iou_decay: multiply the score by `sigmoid(20 * (predicted IoU - 0.45))` (later NTT code, off).
    """

    encoder_input: str = "square"
    long_side: int = 630
    input_size: int = 630
    final_norm: bool = True
    references: str = "context_crop"
    reference_masks: str = "annotation"
    reference_mask_precision: str = "float32"
    proposal_pooling: str = "upsampled"
    scoring: str = "clamped_cosine"
    sam_iou_decay: bool = False

    def __post_init__(self) -> None:
        where = "matcher.semantics"
        for key, choices in (
            ("encoder_input", ENCODER_INPUTS),
            ("references", REFERENCE_VIEWS),
            ("reference_masks", REFERENCE_MASKS),
            ("reference_mask_precision", REFERENCE_MASK_PRECISIONS),
            ("proposal_pooling", PROPOSAL_POOLINGS),
            ("scoring", SCORINGS),
        ):
            if getattr(self, key) not in choices:
                raise ValueError(f"{where}.{key}={getattr(self, key)}: choose one of {', '.join(choices)}")
        if self.reference_masks == "sam2_box" and self.references != "whole_image":
            raise ValueError(f"{where}.reference_masks=sam2_box needs {where}.references=whole_image")
        if self.reference_mask_precision != "float32" and self.reference_masks != "sam2_box":
            raise ValueError(
                f"{where}.reference_mask_precision={self.reference_mask_precision} is read only with "
                f"{where}.reference_masks=sam2_box (the annotated masks are not decoded): set both, or neither"
            )
        for key in ("long_side", "input_size"):
            if getattr(self, key) < 14:
                raise ValueError(f"{where}.{key}={getattr(self, key)}: use a size of at least one patch (14)")

    @property
    def is_default(self) -> bool:
        """Whether every key has NTT's value (then the run's keys and bytes are NTT's)."""
        return self == SemanticsConfig()


MERGE_METHODS = ("soft", "diffusion", "none")
SCORE_FILTERS = ("positive", "none")
OUTPUT_BOXES = ("mask", "prompt")
DIFFUSION_GRIDS = ("fsod_vfm", "dino", "lowres")
DIFFUSION_ORDERS = ("proposal", "score")
DIFFUSION_SOLVERS = ("iterate", "solve")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value}: choose one of {', '.join(choices)}")


@dataclass(frozen=True)
class DiffusionConfig:
    """FSOD-VFM's graph-diffusion re-scoring, read when `matcher.merge=diffusion` (method.md §5.12).

    The defaults reproduce FSOD-VFM (metric.py at commit f5559b6, its run scripts' `--alp 0.3 --lamb 0.5
    --diffusion_steps 30`); each quirk is a flag whose other value is the fix.

    Args:
        alpha: weight of the walk against the personal vector, `pi <- alpha P pi + (1 - alpha) p` (0.3).
        lamb: decay exponent, `score * max(0, 1 - pi) ** lamb` (0.5).
        steps: at most this many walk steps (30).
        tol: stop when the L2 norm of a step's change is below this (1e-6).
        grid: where the masks are compared: `fsod_vfm` = FSOD-VFM's DINOv2 grid (45x45: the image at a long side
            of 630 px, then squared to 630x630 by its transform, in 14-px patches), each full-resolution mask resized as cv2 INTER_LINEAR and
            thresholded > 0.5 (parity); `dino` = the same resize onto the run's DINOv2 patch grid; `lowres` =
            SAM's 256x256 masks.
        order: ranking order of `A`'s lower triangle: `proposal` = the proposer's confidence (FSOD-VFM:
            its proposals' order; ntt: the NMS order, SAM's predicted IoU); `score` = the classification score.
        lower_triangle: FSOD-VFM's `rank_score=True`: a mask is covered only by masks ranked above it;
            false = by every other mask of its class.
        row_normalize: fix: divide each row of `A` by its sum (a random walk); FSOD-VFM's normalisation
            divides by a boolean, i.e. by 1 (false, parity).
        solver: `iterate` = FSOD-VFM's loop (parity); `solve` = the walk's fixed point by one triangular
            solve (needs `lower_triangle`; equal to the loop within its `tol`, method.md §5.12).
    """

    alpha: float = 0.3
    lamb: float = 0.5
    steps: int = 30
    tol: float = 1e-6
    grid: str = "fsod_vfm"
    order: str = "proposal"
    lower_triangle: bool = True
    row_normalize: bool = False
    solver: str = "iterate"

    def __post_init__(self) -> None:
        where = "matcher.diffusion"
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"{where}.alpha={self.alpha}: use a weight in [0, 1)")
        if self.lamb < 0:
            raise ValueError(f"{where}.lamb={self.lamb}: use an exponent >= 0")
        if self.steps < 1:
            raise ValueError(f"{where}.steps={self.steps}: use a number of steps >= 1")
        if self.tol < 0:
            raise ValueError(f"{where}.tol={self.tol}: use a tolerance >= 0")
        _check_choice(f"{where}.grid", self.grid, DIFFUSION_GRIDS)
        _check_choice(f"{where}.order", self.order, DIFFUSION_ORDERS)
        _check_choice(f"{where}.solver", self.solver, DIFFUSION_SOLVERS)
        if self.solver == "solve" and not self.lower_triangle:
            raise ValueError(
                f"{where}.solver=solve needs {where}.lower_triangle=true (the one-solve fixed point is exact "
                "only for a triangular matrix); use solver=iterate"
            )


@dataclass(frozen=True)
class MatcherConfig:
    """Labelling, de-duplication and output (method.md §5.3-5.8).

    Args:
        memory: reference encoding, see `MemoryConfig`.
        pooling: `dense` = average of bilinearly upsampled features over the mask (parity);
            `adjoint` = the same sum computed through the adjoint of bilinear upsampling (exact up to
            float rounding, ~50x fewer FLOPs, method.md §10 item 3).
        nms_thr: class-aware box NMS IoU threshold on 256-res boxes ranked by predicted IoU (0.5); null = no
            NMS: every proposal stays, in the proposer's order (FSOD-VFM, method.md §5.14).
        num_out: detections per image (100).
        nms_cap_factor: NMS keeps at most `num_out * nms_cap_factor` proposals (8).
        drop_empty_masks: fix of method.md §12b item 3: drop masks that vanish at full resolution
            (the reference outputs them with a NaN score). Off for parity.
        box_plus_one: fix of method.md §9.1 item 7: COCO box width/height = extent + 1. Off for parity.
        semantics: encoder input, pooling and scoring, see `SemanticsConfig` (NTT's by default; absent from
            `matcher=paper`, so the paper runs keep their ids).
        merge: how overlapping detections of a class are re-scored before the top `num_out`: `soft` = NTT's
            semantic soft merging (method.md §5.7, parity); `diffusion` = FSOD-VFM's graph diffusion
            (method.md §5.12, settings in `diffusion`); `none` = no re-scoring.
        diffusion: FSOD-VFM's settings, see `DiffusionConfig` (read only when `merge=diffusion`).
        score_filter: which proposals go on after the NMS: `positive` = those with `score > 0` (NTT, method.md
            §5.5 item 4, parity: a NaN score leaves too); `none` = all of them (FSOD-VFM, method.md §5.14).
        output_box: the COCO `bbox` of a detection: `mask` = its mask's extent (NTT, method.md §5.8);
            `prompt` = its clipped prompt box, as floats (FSOD-VFM, method.md §5.14; needs `proposer=boxes`).
        classes: label with these classes of the bank only (names; null = every class): the test stage
            uses the same references and bank and keeps only these classes' prototypes, so its detections
            are those of a bank holding only them; evaluation covers only them. `ntt run` / `ntt study`
            (the segmenter takes `predict(classes=...)` / `ntt segment --classes`).
    """

    memory: MemoryConfig = field(default_factory=MemoryConfig)
    pooling: str = "dense"
    nms_thr: float | None = 0.5
    num_out: int = 100
    nms_cap_factor: int = 8
    drop_empty_masks: bool = False
    box_plus_one: bool = False
    semantics: SemanticsConfig = field(default_factory=SemanticsConfig)
    merge: str = "soft"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    score_filter: str = "positive"
    output_box: str = "mask"
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Hydra passes nested nodes as dicts when the target is a dataclass built by hand.
        if isinstance(self.memory, dict):
            object.__setattr__(self, "memory", MemoryConfig(**self.memory))
        if isinstance(self.semantics, dict):
            object.__setattr__(self, "semantics", SemanticsConfig(**self.semantics))
        if isinstance(self.diffusion, dict):
            object.__setattr__(self, "diffusion", DiffusionConfig(**self.diffusion))
        _check_choice("matcher.merge", self.merge, MERGE_METHODS)
        _check_choice("matcher.score_filter", self.score_filter, SCORE_FILTERS)
        _check_choice("matcher.output_box", self.output_box, OUTPUT_BOXES)
        if self.classes is not None and not self.classes:
            raise ValueError("matcher.classes=[]: give at least one class name, or null for every class")


@dataclass(frozen=True)
class EvalConfig:
    """COCO evaluation of the test stage (method.md §6).

    Args:
        enabled: run COCOeval after prediction (off for unlabelled image folders).
        backend: `pycocotools` (reference), `faster_coco_eval` (same numbers, faster) or `lvis` (the
            official LVIS metric through the `lvis` package: federated, maxDets 300, APr/APc/APf;
            method.md §6.1).
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


@dataclass(frozen=True)
class RunSettings:
    """The top-level values of a run's config (conf/main.yaml): its factors and how it runs.

    Args:
        shots: K, references per class (>= 1).
        seed: the reference-sampling seed.
        variant: free label of a deviation from parity (part of the run directory).
        study_name: the study a run belongs to (W&B group, `ntt summarize --study`).
        stages: the stages to run, in order.
        force: recompute every stage even if its artifact matches.
        device: `auto`, `cpu`, `cuda`, `cuda:<i>` or `mps`.
        trace: save per-image intermediates for parity checks.
        fail_fast: stop on the first image that fails.
    """

    shots: int
    seed: int
    variant: str
    study_name: str
    stages: list[str]
    force: bool
    device: str
    trace: bool
    fail_fast: bool

    def __post_init__(self) -> None:
        if self.shots < 1:
            raise ValueError(f"shots={self.shots}: use a number of references per class >= 1")


# the top-level keys that are not `RunSettings` values: config groups and what conf/main.yaml derives
CONFIG_NODES = (
    "paths",
    "dataset",
    "backbone",
    "proposer",
    "matcher",
    "eval",
    "logger",
    "io",
    "run_name",
    "run_dir",
)
# where each typed node sits in the config (named in error messages)
NODE_KEYS = {
    RunSettings: "",
    DatasetSpec: "dataset",
    SamplingSpec: "dataset.sampling",
    ProposerConfig: "proposer",
    MatcherConfig: "matcher",
    MemoryConfig: "matcher.memory",
    SemanticsConfig: "matcher.semantics",
    DiffusionConfig: "matcher.diffusion",
    EvalConfig: "eval",
    IOConfig: "io",
}


def to_plain(cfg: Any) -> Any:
    """Resolve an OmegaConf node (or pass through plain data) to JSON-able Python objects."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def build_node(node: Any, cls: type, **overrides: Any) -> Any:
    """Build one of the dataclasses above from its config node (dropping `_target_`).

    Every key must be a field of `cls` and every value of the field's type (an int is a float, a list a
    tuple; a nested dataclass node is built in turn); `__post_init__` checks the rest.

    Raises:
        ConfigError: one line naming the key (`matcher.nms_thr=abc: expected a number`), an unknown key
            with the closest valid one, a missing key, or what `__post_init__` refused.
    """
    where = NODE_KEYS.get(cls, cls.__name__)
    from omegaconf.errors import OmegaConfBaseException

    try:
        data = dict(to_plain(node) or {})
    except OmegaConfBaseException as err:  # an interpolation that does not resolve, a missing value (`???`)
        raise ConfigError(f"{where or 'config'}: {first_line(err)}") from err
    data.pop("_target_", None)
    data.update(overrides)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            dotted = _dotted(where, key)
            raise ConfigError(unknown_key_message(f"{dotted}={_show(data[key])}", dotted))
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and _required(f)]
    if missing:
        raise ConfigError(f"{where or 'config'}: missing key(s) {', '.join(missing)}")
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            data[key] = build_node(value, hint)
        elif not _fits(value, hint):
            raise ConfigError(f"{_dotted(where, key)}={_show(value)}: expected {_describe(hint)}")
    if cls is EvalConfig and "iou_types" in data:
        data["iou_types"] = tuple(data["iou_types"])
    try:
        return cls(**data)
    except ConfigError:
        raise
    except ValueError as err:  # a value check in __post_init__: the user's to fix, one message, exit 2
        raise ConfigError(str(err)) from err


def validate_config(cfg: Any) -> RunSettings:
    """Check a composed run config: no unknown top-level key, every typed node and top-level value typed.

    Args:
        cfg: the composed config (with or without the `hydra` node).

    Returns:
        Its top-level values.

    Raises:
        ConfigError: naming the first bad key (an unknown key with the closest valid one).
    """
    names = [f.name for f in dataclasses.fields(RunSettings)]
    for key in cfg:
        if key not in (*names, *CONFIG_NODES, "hydra"):
            raise ConfigError(unknown_key_message(f"{key}={_show(cfg.get(key))}", key))
    settings = build_node({k: to_plain(cfg[k]) for k in names if k in cfg}, RunSettings)
    built = {cls: build_node(cfg.get(NODE_KEYS[cls]) or {}, cls) for cls in (DatasetSpec, ProposerConfig, MatcherConfig, EvalConfig, IOConfig)}  # fmt: skip
    if built[MatcherConfig].output_box == "prompt" and built[ProposerConfig].prompts != "boxes":
        raise ConfigError(
            "matcher.output_box=prompt needs proposer=boxes (a detection's prompt box); with the point grid "
            "use matcher.output_box=mask"
        )
    return settings


def unknown_key_message(line: str, full_key: str) -> str:
    """`<line>: `<key>` is not a config key (did you mean <closest>?)`, with the valid keys of a typed node.

    Args:
        line: the override (or key=value) at fault.
        full_key: its dotted key.
    """
    where, _, key = full_key.rpartition(".")
    nodes = {v: k for k, v in NODE_KEYS.items()}
    known = [f.name for f in dataclasses.fields(nodes[where])] if where in nodes else []
    if where and key in known:  # a valid key with a default that this option's yaml does not write
        return f"{line}: the chosen `{where}` option does not set `{full_key}`: add it with `+{line.lstrip('+')}`"
    if not where:
        known += CONFIG_NODES
    listed = f"; the {f'keys of {where}' if where else 'top-level keys'}: {', '.join(known)}" if known else ""
    return f"{line}: `{full_key}` is not a config key{_did_you_mean(key, known, where)}{listed}"


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _dotted(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _did_you_mean(key: str, names: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f" (did you mean {_dotted(where, close[0])}?)" if close else ""


def _show(value: Any) -> str:
    """A value as it would be written on the command line."""
    if isinstance(value, str):
        return value
    return json.dumps(to_plain(value), default=str).replace('"', "")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a plain config value has the type of a dataclass field (as far as configs go)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        arms = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(_fits(v, arms[0]) for v in value if arms)
    if origin is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    """A field type in words (`a whole number`, `a list of strings or null`)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in typing.get_args(hint))
    if origin in (list, tuple):
        arms = [a for a in typing.get_args(hint) if a is not Ellipsis]
        inner = _describe(arms[0]) if arms else "values"
        return "a list of " + inner.replace("a whole number", "whole numbers").replace("a string", "strings")
    words = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
    if hint is type(None):
        return "null"
    if origin is dict or dataclasses.is_dataclass(hint):
        return "a group of keys"
    return words.get(hint, str(hint))


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def config_hash(*parts: Any) -> str:
    """Stable short hash of JSON-able config parts (key order does not matter)."""
    blob = json.dumps([to_plain(p) for p in parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
