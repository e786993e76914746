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

The step is resumable: each finished image is a line in ``<output>.partial.jsonl``; a rerun skips them
(if the input json, the mask model and the contour tracer are unchanged) and an image that fails is
recorded and retried on the next run, never losing the others. The output json records what made the masks under
``"ntt_masks"`` (model, checkpoint, contour backend, source json and its sha256).
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ntt.prepare.contours import BACKENDS, external_contours, opencv_available
from ntt.utils.errors import UserError
from ntt.utils.files import sha256_file, write_text_atomic

log = logging.getLogger(__name__)


class PrepareError(UserError, RuntimeError):
    """Data preparation cannot go on: the message names the file and what to do."""


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
        overwrite: redo an output that already exists (default: keep it, as the authors' script does).

    Returns:
        The output path.

    Raises:
        PrepareError: missing input, or some images failed (they are listed; the others are kept in the
            partial file and a rerun retries only the failed ones).
    """
    from tqdm import tqdm

    input_json, image_dir = Path(input_json), Path(image_dir)
    out = Path(output_json) if output_json is not None else with_segm_path(input_json)
    if out.exists() and not overwrite:
        log.info("%s exists: kept (pass --overwrite to redo it)", out)
        return out
    if not input_json.is_file():
        raise PrepareError(f"box annotations not found: {input_json}")
    if not image_dir.is_dir():
        raise PrepareError(f"image folder not found: {image_dir} (the images of {input_json.name})")
    if contour_backend not in BACKENDS:
        raise PrepareError(f"contour backend {contour_backend!r} is not one of {BACKENDS}")
    data = json.loads(input_json.read_text())
    source_sha = sha256_file(input_json)
    contours = (
        "opencv"
        if contour_backend == "opencv" or (contour_backend == "auto" and opencv_available())
        else "python"
    )
    # the tracer is part of what made the stored polygons: a resume with another one starts afresh, so the
    # recorded "contours" is true of every polygon
    header = {"source_sha256": source_sha, "model": masker.info, "contours": contours}
    by_image: dict[int, list[dict]] = {}
    for ann in data.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann)
    image_ids = {im["id"] for im in data["images"]}
    orphans = [a["id"] for a in data.get("annotations", []) if a["image_id"] not in image_ids]
    if orphans:
        log.warning(
            "%s: %d annotations refer to no image (left as they are): %s",
            input_json,
            len(orphans),
            orphans[:5],
        )
    done = _read_partial(out, header)
    todo = [im for im in data["images"] if im["id"] in by_image and im["id"] not in done]
    log.info(
        "masks for %s with %s: %d images with boxes, %d done, %d to do",
        input_json.name, masker.info["model"], sum(1 for im in data["images"] if im["id"] in by_image), len(done), len(todo),
    )  # fmt: skip
    partial = _partial_path(out)
    failed: dict[int, str] = {}
    with open(partial, "a") as sink:
        if partial.stat().st_size == 0:
            sink.write(json.dumps({"header": header}) + "\n")
        for im in tqdm(todo, desc=f"masks {input_json.name}", unit="img", disable=not progress):
            anns = by_image[im["id"]]
            try:
                masks = masker(
                    image_dir / im["file_name"],
                    [a["bbox"] for a in anns],
                    int(im["height"]),
                    int(im["width"]),
                )
                if masks.shape != (len(anns), int(im["height"]), int(im["width"])):
                    raise PrepareError(
                        f"mask model returned {masks.shape} for {len(anns)} boxes on a {im['height']}x{im['width']} image"
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
                log.error("image %s (%s) failed: %s", im["id"], im["file_name"], exc)
                failed[im["id"]] = f"{type(exc).__name__}: {exc}"
                line = {
                    "image_id": im["id"],
                    "ok": False,
                    "error": failed[im["id"]],
                    "traceback": traceback.format_exc(),
                }
            sink.write(json.dumps(line) + "\n")
            sink.flush()
    if failed:
        raise PrepareError(
            f"{len(failed)} image(s) of {input_json} failed (first: {list(failed.items())[:3]}); the others are kept "
            f"in {partial}: rerun the same command to retry only these"
        )
    done = _read_partial(out, header)
    for ann in data.get("annotations", []):
        rec = done.get(ann["image_id"], {}).get(str(ann["id"]))
        if rec is not None:
            ann["segmentation"] = rec["segmentation"]
            ann["area"] = rec["area"]
    with_anns = [im for im in data["images"] if im["id"] in by_image]
    data["images"] = with_anns + [im for im in data["images"] if im["id"] not in by_image]
    data["ntt_masks"] = {
        **masker.info,
        "contours": contours,
        "source_json": input_json.name,
        "source_sha256": source_sha,
        "created": time.strftime("%Y-%m-%d"),
    }
    write_text_atomic(out, json.dumps(data))
    partial.unlink()
    log.info("wrote %s (%d annotations with masks)", out, sum(len(v) for v in done.values()))
    return out


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.jsonl")


def _read_partial(out: Path, header: dict[str, Any]) -> dict[int, dict]:
    """Finished images of an interrupted run (image id -> ann id -> record); stale files are set aside."""
    partial = _partial_path(out)
    if not partial.exists():
        return {}
    done: dict[int, dict] = {}
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
