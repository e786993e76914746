"""Box annotations -> instance masks (docs/method.md §1.5): the step that makes `*_with_segm.json`.

Benchmarks with boxes only (PASCAL VOC, the CD-FSOD sets) get pseudo instance masks from a promptable
segmenter, exactly as the authors made them:

* per image, every annotation's box (``iscrowd`` ones included) is a box prompt, in one batched call;
* one mask per box (``multimask_output=False``), binarised (logit > 0) at the image's full resolution;
* each mask becomes COCO polygons through its *outer* contours (``cv2.findContours`` RETR_EXTERNAL +
  CHAIN_APPROX_SIMPLE, or the exact port in :mod:`ntt.prepare.contours`): holes are lost, contours of
  <= 2 points are dropped, and when nothing survives the box rectangle is the polygon;
* ``area`` becomes the mask's pixel count (even when the rectangle was used);
* images without annotations are kept, moved to the end of the image list; all other keys are kept.

The mask models are :mod:`ntt.prepare.mask_models` (SAM ViT-H as the authors ran it, or an ntt SAM2
backbone).

Before any model is built, :func:`plan_masks` checks the json (its records) and its images (there, readable,
of the json's size): bad input stops the command with one line and nothing written. The step is
resumable: each finished image is a line in ``<output>.partial.jsonl``; a rerun skips them (if the input
json, the mask model and the contour tracer are unchanged) and an image that fails is recorded and retried
on the next run, never losing the others. Outputs are moved into place only when all are made
(:mod:`ntt.prepare.outputs`). The output json records what made the masks under ``"ntt_masks"`` (model,
checkpoint, contour backend, source json and its sha256). An existing output is kept when that sha256 is
the present box json's, and made again, with a warning, when the box json changed since: keeping it would
pair the benchmark's boxes with masks of other boxes, silently. One without the record (made elsewhere,
e.g. the authors' files) is kept; ``--overwrite`` redoes any.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ntt.prepare.contours import BACKENDS, external_contours, opencv_available
from ntt.prepare.errors import PrepareError
from ntt.prepare.inputs import BOX_JSON_FIX, check_coco_records, check_images, read_coco_json
from ntt.prepare.outputs import StagedOutputs
from ntt.utils.files import sha256_file

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Masks -> COCO polygons


def mask_to_polygons(mask: np.ndarray, bbox: Sequence[float], contour_backend: str = "auto") -> list[list]:
    """COCO polygons of a binary mask from its outer contours, the authors' way.

    Args:
        mask: [H, W] binary mask at the image's resolution.
        bbox: the annotation's COCO box [x, y, w, h] (the fallback polygon when no contour survives).
        contour_backend: ``auto``, ``opencv`` or ``python`` (see :mod:`ntt.prepare.contours`).

    Returns:
        A list of flat [x0, y0, x1, y1, ...] integer polygons; contours with <= 2 points are dropped and
        the box rectangle [x, y, x+w, y, x+w, y+h, x, y+h] is returned when none is left.
    """
    polygons = []
    for contour in external_contours(mask, contour_backend):
        flat = contour.reshape(-1).tolist()
        if len(flat) > 4:  # more than two points
            polygons.append(flat)
    if not polygons:
        x, y, w, h = bbox
        polygons = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return polygons


# --------------------------------------------------------------------------------------------------
# A whole json


def with_segm_path(input_json: str | Path) -> Path:
    """``x.json`` -> ``x_with_segm.json`` (the authors' naming)."""
    p = Path(input_json)
    return p.with_name(p.stem + "_with_segm.json")


@dataclass
class MaskJob:
    """One checked box json to give masks: :func:`plan_masks` makes it, :func:`make_masks` runs it."""

    box_json: Path
    data: dict
    source_sha256: str
    image_files: dict[Any, Path]  # image id -> file, for the images with boxes
    output: Path

    @property
    def partial(self) -> Path:
        """The resume file: one line per finished (or failed) image."""
        return self.output.with_name(self.output.name + ".partial.jsonl")


def plan_masks(
    box_json: str | Path,
    images: str | Path | Mapping[str, Path],
    *,
    data: dict | None = None,
    output_json: str | Path | None = None,
    overwrite: bool = False,
    fix: str = BOX_JSON_FIX,
) -> MaskJob | None:
    """Check a box json and its images; the job of giving it masks, or None when its output is up to date.

    Args:
        box_json: the COCO json with boxes (its name is recorded in the output).
        images: the folder its ``file_name`` values are relative to (every image with boxes is checked:
            there, readable, of the json's size), or a map ``file_name -> file`` of images the caller has
            checked (VOC checks its JPEGs against the xml sizes while converting).
        data: the json's content when it is not on disk yet (VOC makes its box jsons in the same command);
            default: read ``box_json``.
        output_json: default ``<box_json stem>_with_segm.json`` beside it.
        overwrite: redo an output that is up to date.
        fix: what to do when the json is broken (default: how a box json must look).
    """
    box_json = Path(box_json)
    output = Path(output_json) if output_json is not None else with_segm_path(box_json)
    if data is None:
        data = read_coco_json(box_json, fix=fix)
        source_sha = sha256_file(box_json)
    else:
        source_sha = hashlib.sha256(json.dumps(data).encode("utf-8")).hexdigest()
    check_coco_records(data, box_json, fix=fix)
    with_boxes = {a["image_id"] for a in data.get("annotations", [])}
    records = [im for im in data["images"] if im["id"] in with_boxes]
    if isinstance(images, Mapping):
        files = {im["id"]: Path(images[im["file_name"]]) for im in records}
    else:
        folder = Path(images)
        if not folder.is_dir():
            raise PrepareError(
                f"image folder {folder} not found (the images of {box_json}): give the folder its file_name "
                "values are relative to"
            )
        files = {im["id"]: folder / im["file_name"] for im in records}
        check_images(
            (
                (files[im["id"]], im["width"], im["height"], f"{box_json} (image id {im['id']})")
                for im in records
            ),
            fix_missing=f"put them into {folder} (the folder the file_name values of {box_json.name} are "
            "relative to), or give the right folder",
            fix_size=f"fix width/height in {box_json.name} (or replace the image)",
            fix_unreadable="replace them with the image files (a copy cut short or of another format?)",
        )
    if not overwrite and _up_to_date(output, box_json, source_sha):
        return None
    return MaskJob(box_json, data, source_sha, files, output)


def _up_to_date(output: Path, box_json: Path, source_sha: str) -> bool:
    """Whether an existing output stays (see the module docstring); logs the decision."""
    if not output.exists():
        return False
    try:
        with open(output, "rb") as f:
            record = json.load(f).get("ntt_masks") or {}
        recorded = record.get("source_sha256")
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("%s cannot be read (%s): it is made again", output, exc)
        return False
    if recorded is None:
        log.info("%s records no box json (not made by ntt prepare): kept (--overwrite redoes it)", output)
        return True
    if recorded == source_sha:
        log.info("%s is up to date with %s: kept (--overwrite redoes it)", output, box_json.name)
        return True
    log.warning(
        "%s was made from another version of %s (sha256 %s..., now %s...): its masks are made again, as the "
        "old ones belong to other boxes",
        output, box_json.name, str(recorded)[:12], source_sha[:12],
    )  # fmt: skip
    return False


def make_masks(
    jobs: list[MaskJob | None],
    make_masker: Callable[[], Any],
    staged: StagedOutputs,
    *,
    contour_backend: str = "auto",
    progress: bool = True,
) -> None:
    """Give every planned job its masks and stage its output (moved into place by ``staged.commit()``).

    Args:
        jobs: from :func:`plan_masks` (None entries, outputs that are up to date, are skipped).
        make_masker: builds the mask model (called only when there is work, after every input was checked):
            a callable ``(image_path, boxes_xywh, height, width) -> [N, H, W] bool`` with an ``info`` dict
            (see :func:`ntt.prepare.mask_models.build_masker`).
        staged: where the outputs go; the jobs' partial files are removed by its commit.
        contour_backend: ``auto`` / ``opencv`` / ``python`` (identical polygons).
        progress: tqdm bar over images.

    Raises:
        PrepareError: some images failed (the first is named; the others are kept in the partial files and
            a rerun retries only the failed ones).
    """
    if contour_backend not in BACKENDS:
        raise PrepareError(f"contour backend {contour_backend!r} is not one of {BACKENDS}")
    jobs = [job for job in jobs if job is not None]
    if not jobs:
        return
    masker = make_masker()
    contours = (
        "opencv"
        if contour_backend == "opencv" or (contour_backend == "auto" and opencv_available())
        else "python"
    )
    failures = []
    for job in jobs:
        done, failed = _run_job(job, masker, contours, contour_backend, progress)
        if failed:
            failures.append((job, failed))
            continue
        staged.add(job.output, json.dumps(_with_masks(job, done, masker.info, contours)))
        staged.remove_after_commit(job.partial)
    if failures:
        first, failed = failures[0]
        image_id, error = next(iter(failed.items()))
        n = sum(len(f) for _, f in failures)
        kept = ", ".join(str(job.partial) for job, _ in failures)
        raise PrepareError(
            f"{n} image(s) failed in the mask step, e.g. {first.image_files[image_id]} (image {image_id} of "
            f"{first.box_json}): {error}; the finished images are kept in {kept}: fix what the error names, then "
            "rerun the same command (only the failed images are redone)"
        )


def add_masks(
    input_json: str | Path,
    image_dir: str | Path,
    masker,
    *,
    output_json: str | Path | None = None,
    contour_backend: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Give every annotation of a box json a mask from `masker`; write ``*_with_segm.json``.

    Args:
        input_json: COCO json with boxes.
        image_dir: folder the json's ``file_name`` values are relative to.
        masker: a callable ``(image_path, boxes_xywh, height, width) -> [N, H, W] bool`` with an ``info``
            dict (see :func:`ntt.prepare.mask_models.build_masker`).
        output_json: default: ``<input stem>_with_segm.json`` beside the input.
        contour_backend: ``auto`` / ``opencv`` / ``python`` (identical polygons).
        progress: tqdm bar over images.
        overwrite: redo an output that is up to date (see the module docstring).

    Returns:
        The output path.

    Raises:
        PrepareError: a bad json or image (nothing done), or some images failed (they are listed; the
            others are kept in the partial file and a rerun retries only the failed ones).
    """
    job = plan_masks(input_json, image_dir, output_json=output_json, overwrite=overwrite)
    if job is None:
        return Path(output_json) if output_json is not None else with_segm_path(input_json)
    with StagedOutputs() as staged:
        make_masks([job], lambda: masker, staged, contour_backend=contour_backend, progress=progress)
        staged.commit()
    return job.output


def _run_job(
    job: MaskJob, masker, contours: str, contour_backend: str, progress: bool
) -> tuple[dict[Any, dict], dict[Any, str]]:
    """Masks for the images of one job not done yet: (finished image id -> records, failed id -> error)."""
    from tqdm import tqdm

    data, name = job.data, job.box_json.name
    # the tracer is part of what made the stored polygons: a resume with another one starts afresh, so the
    # recorded "contours" is true of every polygon
    header = {"source_sha256": job.source_sha256, "model": masker.info, "contours": contours}
    by_image: dict[Any, list[dict]] = {}
    for ann in data.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann)
    image_ids = {im["id"] for im in data["images"]}
    orphans = [a["id"] for a in data.get("annotations", []) if a["image_id"] not in image_ids]
    if orphans:
        log.warning(
            "%s: %d annotations refer to no image (left as they are): %s",
            job.box_json,
            len(orphans),
            orphans[:5],
        )
    done = _read_partial(job.partial, header)
    todo = [im for im in data["images"] if im["id"] in by_image and im["id"] not in done]
    log.info(
        "masks for %s with %s: %d images with boxes, %d done, %d to do",
        name, masker.info["model"], sum(1 for im in data["images"] if im["id"] in by_image), len(done), len(todo),
    )  # fmt: skip
    failed: dict[Any, str] = {}
    try:
        job.partial.parent.mkdir(parents=True, exist_ok=True)
        sink = open(job.partial, "a")
    except OSError as exc:
        raise PrepareError(
            f"cannot write {job.partial}: {exc.strerror}: fix the folder's permissions"
        ) from exc
    with sink:
        if job.partial.stat().st_size == 0:
            sink.write(json.dumps({"header": header}) + "\n")
        for im in tqdm(todo, desc=f"masks {name}", unit="img", disable=not progress):
            anns = by_image[im["id"]]
            size = (int(im["height"]), int(im["width"]))
            try:
                masks = masker(job.image_files[im["id"]], [a["bbox"] for a in anns], *size)
                if masks.shape != (len(anns), *size):
                    raise PrepareError(
                        f"the mask model made {masks.shape[1]}x{masks.shape[2]} masks (height x width) but the json "
                        f"says height={size[0]} width={size[1]}: the decoded image has another size (EXIF rotation?)"
                    )
                record = {
                    str(a["id"]): {
                        "segmentation": mask_to_polygons(m, a["bbox"], contour_backend),
                        "area": float(m.sum()),
                    }
                    for a, m in zip(anns, masks)
                }
                line = {"image_id": im["id"], "ok": True, "anns": record}
            except Exception as exc:  # one bad image must not lose the others
                log.warning(
                    "image %s (%s) failed: %s (recorded; a rerun retries it)", im["id"], im["file_name"], exc
                )
                failed[im["id"]] = f"{type(exc).__name__}: {exc}"
                line = {
                    "image_id": im["id"],
                    "ok": False,
                    "error": failed[im["id"]],
                    "traceback": traceback.format_exc(),
                }
            sink.write(json.dumps(line) + "\n")
            sink.flush()
    return (done if failed else _read_partial(job.partial, header)), failed


def _with_masks(job: MaskJob, done: dict[Any, dict], info: dict, contours: str) -> dict:
    """The output json: the box json with each annotation's polygons and area, images with boxes first."""
    data = job.data
    for ann in data.get("annotations", []):
        rec = done.get(ann["image_id"], {}).get(str(ann["id"]))
        if rec is not None:
            ann["segmentation"] = rec["segmentation"]
            ann["area"] = rec["area"]
    with_anns = {ann["image_id"] for ann in data.get("annotations", [])}
    images = data["images"]
    data["images"] = [im for im in images if im["id"] in with_anns] + [
        im for im in images if im["id"] not in with_anns
    ]
    data["ntt_masks"] = {
        **info,
        "contours": contours,
        "source_json": job.box_json.name,
        "source_sha256": job.source_sha256,
        "created": time.strftime("%Y-%m-%d"),
    }
    log.info("%s: %d annotations with masks", job.output, sum(len(v) for v in done.values()))
    return data


def _read_partial(partial: Path, header: dict[str, Any]) -> dict[Any, dict]:
    """Finished images of an interrupted run (image id -> ann id -> record); stale files are set aside."""
    if not partial.exists():
        return {}
    done: dict[Any, dict] = {}
    with open(partial) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    try:
        first = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        first = {}
    if first.get("header") != json.loads(json.dumps(header)):
        stale = partial.with_name(partial.name + f".stale-{int(time.time())}")
        log.warning("%s was made from another input or model: moved to %s", partial, stale)
        partial.rename(stale)
        return {}
    for raw in lines[1:]:
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:  # a line cut by a kill: that image is simply redone
            continue
        if rec.get("ok"):
            done[rec["image_id"]] = rec["anns"]
        else:
            done.pop(rec["image_id"], None)
    return done
