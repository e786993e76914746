"""Validate a run before computing anything: device, dataset files, classes, shots, image records,
annotations, reference masks, weights.

Everything here is cheap next to a stage, and every failure is a `UserError` naming the config key, file,
image id or annotation id, so a typo costs seconds rather than a finished stage (docs/bad_inputs.md lists
every check with its message and test).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

from ntt.utils.errors import UserError

log = logging.getLogger(__name__)

MAX_LISTED = 10


class PreflightError(UserError):
    """A check before the first stage failed."""


def check_device(device: str) -> None:
    """The configured device exists on this machine.

    Args:
        device: the resolved device string (`cpu`, `cuda`, `cuda:1`, `mps`).

    Raises:
        PreflightError: naming `device=` and what to use instead.
    """
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise PreflightError(
                f"device={device} but this machine has no usable CUDA device (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda}): use device=cpu, or device=auto to pick what exists"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise PreflightError(
                f"device={device} but only {torch.cuda.device_count()} CUDA device(s) exist "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    elif kind == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise PreflightError(f"device={device} but MPS is not available here: use device=cpu")
    elif kind != "cpu":
        try:
            torch.device(device)
        except (RuntimeError, ValueError) as err:
            raise PreflightError(f"device={device} is not a valid torch device: {err}") from err


def annotation_problems(coco: dict, ann_ids: Iterable[int] | None = None) -> list[str]:
    """Problems of COCO annotations that would crash or silently spoil a stage.

    Checked: an explicit `area` of 0, a `segmentation` list with an empty or too short polygon
    (e.g. `[[]]`, pycocotools' "input type is not supported"), an RLE whose `size` is not the image's,
    a missing or degenerate `bbox` (w or h <= 0), a box outside the image (more than one pixel).

    Args:
        coco: the parsed json.
        ann_ids: check only these annotations (default: all).

    Returns:
        One line per problem: `image <id> annotation <id>: <what>`.
    """
    images = {im.get("id"): im for im in coco.get("images", [])}
    wanted = None if ann_ids is None else {int(a) for a in ann_ids}
    problems: list[str] = []
    for ann in coco.get("annotations", []):
        if wanted is not None and ann.get("id") not in wanted:
            continue
        where = f"image {ann.get('image_id')} annotation {ann.get('id')}"
        im = images.get(ann.get("image_id"), {})
        h, w = im.get("height"), im.get("width")
        if ann.get("area") is not None and float(ann["area"]) <= 0:
            problems.append(f"{where}: area is {ann['area']}")
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            bad = [p for p in seg if not (isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0)]
            if not seg or bad:
                problems.append(
                    f"{where}: empty or degenerate polygon(s) {str(bad or seg)[:60]} (a polygon needs >= 3 points)"
                )
        elif isinstance(seg, dict):
            size = seg.get("size")
            if h is not None and w is not None and size is not None and list(size) != [int(h), int(w)]:
                problems.append(
                    f"{where}: RLE size {list(size)} is not the image's [height, width] [{h}, {w}]"
                )
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            problems.append(f"{where}: missing or malformed bbox {bbox!r}")
            continue
        x, y, bw, bh = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, bw, bh)) or bw <= 0 or bh <= 0:
            problems.append(f"{where}: empty bbox {bbox} (width and height must be > 0)")
        elif (
            h is not None
            and w is not None
            and (x < -1 or y < -1 or x + bw > float(w) + 1 or y + bh > float(h) + 1)
        ):
            problems.append(f"{where}: bbox {bbox} lies outside the {w}x{h} image")
    return problems


def report_annotations(problems: list[str], source: str, *, fatal: bool, what: str) -> None:
    """Raise (fatal) or warn about annotation problems, listing the first few.

    Args:
        problems: lines from `annotation_problems`.
        source: the json file (named in the message).
        fatal: raise a `PreflightError` instead of warning.
        what: which annotations these are (e.g. "reference annotations").
    """
    if not problems:
        return
    shown = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    msg = f"{len(problems)} invalid {what} in {source}:\n  {shown}{more}"
    if fatal:
        raise PreflightError(msg + "\nFix or remove these annotations.")
    log.warning("%s\n(they are kept as they are; fix them if results look wrong)", msg)


def usable_references_per_class(coco: dict, category_ids: Iterable[int]) -> dict[int, int]:
    """Per class, how many distinct images hold a reference the sampler accepts (docs/method.md §1.2).

    Args:
        coco: the reference-pool json.
        category_ids: the selected classes.
    """
    from ntt.refs import is_valid_annotation

    images = {im.get("id"): im for im in coco.get("images", [])}
    per_class: dict[int, set[Any]] = {int(c): set() for c in category_ids}
    for ann in coco.get("annotations", []):
        cat = ann.get("category_id")
        if cat not in per_class or ann.get("isimpossible") == 1 or "bbox" not in ann:
            continue
        im = images.get(ann.get("image_id"))
        if im is not None and is_valid_annotation(ann, im.get("width", 0), im.get("height", 0)):
            per_class[cat].add(ann["image_id"])
    return {c: len(v) for c, v in per_class.items()}


def check_shots(coco: dict, category_ids: list[int], names: list[str], shots: int, source: str) -> None:
    """Every selected class has at least `shots` usable references (all short classes listed at once).

    Raises:
        PreflightError: naming each class, how many it has and what to do.
    """
    counts = usable_references_per_class(coco, category_ids)
    short = [(c, n, counts[c]) for c, n in zip(category_ids, names, strict=True) if counts[c] < shots]
    if short:
        lines = "\n  ".join(f"class {c} ({n}): {k} usable" for c, n, k in short)
        raise PreflightError(
            f"shots={shots} but {len(short)} class(es) of {source} have fewer usable references (not crowd, "
            f"box >= 32x32 and >= 10 px from the border, one per image):\n  {lines}\n"
            f"Lower `shots` (at most {min(k for _, _, k in short)}), drop these classes "
            "(dataset.class_names), or give a refs file (dataset.refs_file)."
        )


def check_image_records(dataset: Any, image_ids: Iterable[int], where: str, what: str) -> None:
    """Every image record a stage will read has a file name and whole positive sizes (all listed at once).

    Args:
        dataset: the `CocoDataset` of the json.
        image_ids: the records to check.
        where: the json's config key and value (`dataset.test_json=<path>`), named in the message.
        what: which images these are (e.g. "evaluated").

    Raises:
        PreflightError: naming the json, each record (image id, file) and what to add.
    """
    from ntt.data.coco import IMAGE_RECORD_ADVICE

    problems = dataset.image_problems(image_ids)
    if problems:
        shown = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise PreflightError(
            f"{where}: {len(problems)} {what} image record(s) cannot be used:\n  {shown}{more}\n"
            f"Image sizes come from the json, never from the file: {IMAGE_RECORD_ADVICE}."
        )


def check_reference_masks(
    coco: dict, ann_ids: Iterable[int], ref_json: str, image_root: str, *, every: bool
) -> None:
    """The references have masks: the memory is built from masks, and boxes alone are refused with the two
    commands that make masks from them.

    Args:
        coco: the reference-pool json.
        ann_ids: the reference annotations (used, or candidates).
        ref_json: `dataset.ref_json` (named in the message).
        image_root: `dataset.ref_image_root` (named in the commands).
        every: refuse only when none of `ann_ids` has a mask (candidates before sampling) instead of when one
            lacks it (the references that will be encoded).
    """
    from ntt.data.coco import has_segmentation

    wanted = {int(a) for a in ann_ids}
    anns = [a for a in coco.get("annotations", []) if a.get("id") in wanted]
    bare = [a for a in anns if not has_segmentation(a)]
    if not bare or (every and len(bare) < len(anns)):
        return
    first = ", ".join(f"image {a.get('image_id')} annotation {a.get('id')}" for a in bare[:3])
    raise PreflightError(
        f"{len(bare)} reference annotation(s) of {ref_json} have no mask ('segmentation'; {first}"
        f"{', ...' if len(bare) > 3 else ''}): the memory is built from reference masks. Make masks from "
        f"the boxes with `ntt prepare masks {ref_json} {image_root}` (SAM masks, as the authors made them) "
        "and point dataset.ref_json at the *_with_segm.json it writes, or segment your images from these box "
        f"references with `ntt segment --refs {ref_json} --ref-images {image_root} --images <folder> --out "
        "<folder>`."
    )


def check_lvis_eval(gt: dict, category_ids: list[int], image_ids: list[int], iou_types, source: str) -> None:
    """`eval.backend=lvis` can run: the `lvis` package is installed and the test json has LVIS's fields.

    Raises:
        PreflightError: naming the json and what is missing (or how to install the package).
    """
    from ntt.eval.lvis import LvisEvaluator

    try:
        LvisEvaluator(gt, category_ids=category_ids, image_ids=image_ids, iou_types=tuple(iou_types))
    except (ImportError, ValueError) as err:
        raise PreflightError(f"dataset.test_json={source} with eval.backend=lvis: {err}") from err
