"""Box-prompt proposals (method.md §5.11): an external detector's boxes, each decoded by SAM2 as a box prompt.

FSOD-VFM's front end (github Intellindust-AI-Lab/FSOD-VFM, commit f5559b6, ``metric.py``
``generate_coco_style_predictions_upn``) replaces the point grid of §5.2 with a class-agnostic detector (UPN):
its boxes are sorted by score, cut to the top 100, clipped to the image and decoded by SAM2 as box prompts
(``multimask_output=False``, 32 boxes per call). UPN needs a compiled CUDA op, so ntt reads the boxes from a
file (any detector's output in the COCO results layout) or asks a Python callable named in the config
(:class:`BoxSource`). The proposals come out in the point grid's :class:`ntt.proposals.Proposals` layout, so
every later stage (§5.3-5.8) runs unchanged; a box's detector score only orders and selects the boxes.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ntt.proposals import Proposals
from ntt.utils.errors import UserError

__all__ = [
    "BoxSource",
    "BoxesError",
    "ImageBoxes",
    "boxes_to_frame",
    "choose_single_output",
    "generate_box_proposals",
    "load_boxes_json",
    "select_boxes",
    "with_prompt_boxes",
]

log = logging.getLogger(__name__)

# SAM2's build_sam2(apply_postprocessing=True), which FSOD-VFM uses: the single-mask output falls back to the
# best multimask output when its stability score (IoU of logits > +delta and > -delta) is below the threshold
STABILITY_DELTA = 0.05
STABILITY_THRESH = 0.98


class BoxesError(UserError, ValueError):
    """A boxes file (or a detector's answer) that cannot be used: one line naming the file and the entry."""


@dataclass(frozen=True)
class ImageBoxes:
    """The boxes of one image, in image pixels.

    Attributes:
        boxes: ``[n, 4]`` float64 ``x1, y1, x2, y2``.
        scores: ``[n]`` float64 detector scores (only order and select the boxes).
    """

    boxes: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


EMPTY = ImageBoxes(np.zeros((0, 4)), np.zeros(0))


def _entry_box(entry: Any, where: str, box_format: str) -> tuple[list[float], float]:
    if not isinstance(entry, dict):
        raise BoxesError(f"{where}: expected an object with bbox and score, got {type(entry).__name__}")
    box, score = entry.get("bbox"), entry.get("score")
    if (
        not isinstance(box, (list, tuple))
        or len(box) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
    ):
        raise BoxesError(
            f"{where}: bbox must be 4 finite numbers [{box_format_words(box_format)}], got {box!r}"
        )
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
        raise BoxesError(f"{where}: score must be a finite number, got {score!r}")
    x, y, a, b = (float(v) for v in box)
    xyxy = [x, y, x + a, y + b] if box_format == "xywh" else [x, y, a, b]
    if xyxy[2] < xyxy[0] or xyxy[3] < xyxy[1]:
        raise BoxesError(
            f"{where}: bbox {list(box)} has a negative width or height (boxes are [{box_format_words(box_format)}]"
            f"; set proposer.box_format if yours are the other layout)"
        )
    return xyxy, float(score)


def box_format_words(box_format: str) -> str:
    return "x, y, width, height" if box_format == "xywh" else "x1, y1, x2, y2"


def load_boxes_json(
    path: str | Path, *, key: str = "image_id", box_format: str = "xywh"
) -> dict[Any, ImageBoxes]:
    """Per-image boxes of a COCO-results-style json: ``[{"image_id": 1, "bbox": [x, y, w, h], "score": s}, ...]``.

    Any detector's output in that layout works (``category_id`` and other keys are ignored). Entries keep
    their file order within an image (ties of equal scores are broken by it, as FSOD-VFM's stable sort).

    Args:
        path: the json file.
        key: ``image_id`` (COCO ids of the test json) or ``file_name`` (the test json's ``file_name``).
        box_format: ``xywh`` (COCO results) or ``xyxy``.

    Raises:
        BoxesError: missing or unparseable file, not a list, an entry without its key, a malformed bbox or
            score (the message names the file and the entry's index).
    """
    where = f"proposer.boxes_json={path}"
    p = Path(path)
    if not p.is_file():
        raise BoxesError(f"{where} not found: give the json of your detector's boxes (COCO results layout)")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BoxesError(f"{where} is not valid json: {err}") from err
    if not isinstance(data, list):
        raise BoxesError(
            f"{where}: expected a list of {{{key}, bbox, score}} entries, got {type(data).__name__}"
        )
    grouped: dict[Any, tuple[list, list]] = {}
    for i, entry in enumerate(data):
        ident = entry.get(key) if isinstance(entry, dict) else None
        if ident is None:
            raise BoxesError(f"{where}: entry {i} has no {key} (proposer.boxes_key={key}): {_short(entry)}")
        want, words = (int, "a whole number") if key == "image_id" else (str, "a string")
        if isinstance(ident, bool) or not isinstance(ident, want):
            raise BoxesError(f"{where}: entry {i}: {key} must be {words}, got {ident!r}")
        xyxy, score = _entry_box(entry, f"{where}: entry {i} ({key} {ident!r})", box_format)
        boxes, scores = grouped.setdefault(ident, ([], []))
        boxes.append(xyxy)
        scores.append(score)
    return {
        k: ImageBoxes(np.asarray(b, dtype=np.float64).reshape(-1, 4), np.asarray(s, dtype=np.float64))
        for k, (b, s) in grouped.items()
    }


def _short(entry: Any) -> str:
    text = json.dumps(entry, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def select_boxes(
    found: ImageBoxes,
    *,
    width: int,
    height: int,
    top_k: int | None = 100,
    score_thr: float = 0.0,
    clip: bool = True,
) -> ImageBoxes:
    """FSOD-VFM's box selection: score threshold, sort by score, top-k, clip to the image, drop empty boxes.

    In FSOD-VFM's order: UPN keeps ``score >= min_score``; then a stable sort by score (descending) and the
    first 100; then each box is clipped, ``x = max(0, min(x, W))`` (no rounding), and dropped unless
    ``x2 > x1 and y2 > y1``, so an image can keep fewer than ``top_k`` boxes.

    Args:
        found: the image's boxes (image pixels, xyxy).
        width: image width ``W`` (the json's).
        height: image height ``H``.
        top_k: boxes kept after sorting (FSOD-VFM: 100); None = all.
        score_thr: keep boxes with ``score >= score_thr``.
        clip: clip to ``[0, W] x [0, H]`` (FSOD-VFM); false keeps boxes as given (empty ones still dropped).

    Returns:
        The selected boxes (scores aligned with them).
    """
    keep = found.scores >= score_thr
    boxes, scores = found.boxes[keep], found.scores[keep]
    order = np.argsort(-scores, kind="stable")  # = Python's sort(reverse=True): ties keep the file order
    if top_k is not None:
        order = order[:top_k]
    boxes, scores = boxes[order], scores[order]
    if clip:
        limits = np.array([width, height, width, height], dtype=np.float64)
        boxes = np.maximum(0.0, np.minimum(boxes, limits))
    ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return ImageBoxes(boxes[ok], scores[ok])


def boxes_to_frame(boxes: np.ndarray, *, width: int, height: int, size: int = 1024) -> Tensor:
    """Image-pixel boxes -> the SAM input frame as ``SAM2ImagePredictor.predict`` computes it.

    float32 first, then ``x / W * size`` and ``y / H * size`` (``SAM2Transforms.transform_coords``), so the
    prompts are bit-identical to FSOD-VFM's.

    Args:
        boxes: ``[n, 4]`` xyxy in image pixels.
        width: image width ``W``.
        height: image height ``H``.
        size: SAM input side.

    Returns:
        ``[n, 4]`` float32 xyxy in the ``size`` frame (CPU).
    """
    t = torch.as_tensor(np.asarray(boxes, dtype=np.float64), dtype=torch.float32).reshape(-1, 2, 2).clone()
    t[..., 0] = t[..., 0] / width
    t[..., 1] = t[..., 1] / height
    return (t * size).reshape(-1, 4)


def with_prompt_boxes(det, grid_index: Tensor, boxes: np.ndarray):
    """Detections whose boxes are their proposals' prompt boxes (``matcher.output_box=prompt``, method.md
    §5.14): FSOD-VFM's COCO ``bbox`` is the clipped box it prompted SAM2 with, not the mask's extent.

    Args:
        det: ``ntt.postprocess.Detections`` of one image.
        grid_index: ``[n]`` the proposals' rows among the image's boxes (``Proposals.grid_index``).
        boxes: ``[G, 4]`` the image's selected boxes (image pixels, xyxy, float64: :func:`select_boxes`).

    Returns:
        A copy of ``det`` with ``boxes_xyxy`` the ``[F, 4]`` float64 prompt boxes (on the CPU).
    """
    import dataclasses

    rows = grid_index.cpu()[det.proposal_index.cpu()].numpy()
    chosen = torch.from_numpy(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[rows].copy())
    return dataclasses.replace(det, boxes_xyxy=chosen)


def choose_single_output(
    logits: Tensor, ious: Tensor, *, stability_fallback: bool, decoder_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The mask a box prompt gives with ``multimask_output=False``.

    Output 0 (the single-mask token); with ``stability_fallback`` (SAM2's ``dynamic_multimask_via_stability``,
    on in FSOD-VFM's ``build_sam2(..., apply_postprocessing=True)``) the best of outputs 1..3 by predicted IoU
    replaces it when its stability score ``#(l > 0.05) / #(l > -0.05)`` (1 when nothing is > -0.05) is
    below 0.98.

    Args:
        logits: ``[b, 4, h, w]`` decoder logits.
        ious: ``[b, 4]`` predicted IoUs.
        stability_fallback: apply the fallback.
        decoder_dtype: the dtype the decoder computed ``logits`` in, when lower than float32 (``bfloat16``
            under FSOD-VFM's autocast): SAM2 compares them with ``±0.05`` in that dtype, i.e. with ``±0.05``
            rounded to it (``0.050048828125`` in bfloat16), so a logit equal to that value is not counted.
            None: float32.

    Returns:
        ``(logits [b, h, w], ious [b], index [b])`` of the chosen outputs.
    """
    index = torch.zeros(ious.shape[0], dtype=torch.int64, device=ious.device)
    if stability_fallback:
        delta = STABILITY_DELTA
        if decoder_dtype is not None:
            delta = float(torch.tensor(STABILITY_DELTA, dtype=decoder_dtype))
        flat = logits[:, 0].flatten(1)
        area_i = torch.sum(flat > delta, dim=-1).float()
        area_u = torch.sum(flat > -delta, dim=-1).float()
        stability = torch.where(area_u > 0, area_i / area_u, 1.0)
        best = 1 + torch.argmax(ious[:, 1:], dim=-1)
        index = torch.where(stability >= STABILITY_THRESH, index, best)
    rows = torch.arange(ious.shape[0], device=ious.device)
    return logits[rows, index], ious[rows, index], index


def generate_box_proposals(
    sam2,
    feats,
    boxes: Tensor,
    *,
    batch_size: int = 32,
    stability_fallback: bool = True,
    iou_thr: float | None = None,
    image_index: int = 0,
) -> Proposals:
    """Decode each box prompt (one mask per box), optionally filter by predicted IoU.

    Args:
        sam2: object with ``decode(feats, *, image_index, boxes [b, 4])`` returning
            ``(logits [b, 4, h, w], ious [b, 4])`` (``ntt.backbones.sam2.SAM2Backbone``).
        feats: image features from ``sam2.encode_image``.
        boxes: ``[G, 4]`` xyxy in the SAM input frame (:func:`boxes_to_frame`), in proposal order.
        batch_size: boxes per decoder call (FSOD-VFM: 32); the numbers do not depend on it.
        stability_fallback: see :func:`choose_single_output` (FSOD-VFM: true).
        iou_thr: keep proposals whose predicted IoU is strictly greater; None keeps all (FSOD-VFM).
        image_index: which image of a batched ``feats``.

    Returns:
        :class:`~ntt.proposals.Proposals` with the boxes as prompts: ``grid_points`` / ``points`` are
        ``[G, 4]`` / ``[n, 4]`` boxes, ``grid_best_index`` the chosen output (0, or 1..3 on a fallback).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = feats.image_embed.device if hasattr(feats, "image_embed") else torch.device("cpu")
    boxes = boxes.to(dev, torch.float32)
    g = boxes.shape[0]
    logits_out, ious_all, chosen = [], [], []
    for start in range(0, g, batch_size):
        logits4, ious4 = sam2.decode(feats, image_index=image_index, boxes=boxes[start : start + batch_size])
        best_logits, _, index = choose_single_output(logits4, ious4, stability_fallback=stability_fallback)
        del logits4
        logits_out.append(best_logits)
        ious_all.append(ious4)
        chosen.append(index)
    if g:
        logits = torch.cat(logits_out)
        ious4 = torch.cat(ious_all)
        index = torch.cat(chosen)
    else:
        side = int(getattr(sam2, "image_size", 1024)) // 4
        logits = torch.zeros((0, side, side), device=dev)
        ious4 = torch.zeros((0, 4), device=dev)
        index = torch.zeros(0, dtype=torch.int64, device=dev)
    pred = ious4[torch.arange(g, device=dev), index]
    kept = torch.arange(g, device=dev) if iou_thr is None else torch.nonzero(pred > iou_thr, as_tuple=True)[0]
    props = Proposals(
        logits=logits if len(kept) == g else logits[kept],
        pred_ious=pred[kept],
        points=boxes[kept],
        grid_index=kept,
        grid_points=boxes,
        grid_ious_all=ious4,
        grid_best_index=index,
        grid_pred_ious=pred,
    )
    log.debug("box proposals: %d of %d boxes kept", len(props), g)
    return props


class BoxSource:
    """Where an image's boxes come from: a boxes json (``proposer.boxes_json``) or a detector callable
    (``proposer.detector``), then FSOD-VFM's selection (:func:`select_boxes`).

    A detector is the object ``hydra.utils.instantiate(proposer.detector)`` returns (a class instance, or a
    function with ``_partial_: true``), called once per image as
    ``detector(image, image_id=<int>, file_name=<str>)`` with ``image`` the RGB ``PIL.Image`` at its stored
    size; it returns ``(boxes, scores)``: ``[n, 4]`` xyxy image pixels and ``[n]`` scores (anything
    ``numpy.asarray`` takes; ``n = 0`` is fine).

    Args:
        boxes_json: the boxes file (COCO results layout), or None with a detector.
        detector: the detector's config node (``_target_`` + its arguments), or None with a file.
        boxes_key: ``image_id`` or ``file_name``: how the file's entries name their image.
        box_format: ``xywh`` (COCO results) or ``xyxy``: the file's box layout (a detector returns xyxy).
        top_k: boxes kept per image after sorting by score (FSOD-VFM: 100); None = all.
        score_thr: keep boxes with ``score >= score_thr``.
        clip: clip the boxes to the image (FSOD-VFM).
    """

    def __init__(
        self,
        *,
        boxes_json: str | None = None,
        detector: dict | None = None,
        boxes_key: str = "image_id",
        box_format: str = "xywh",
        top_k: int | None = 100,
        score_thr: float = 0.0,
        clip: bool = True,
    ):
        if (boxes_json is None) == (detector is None):
            raise BoxesError(
                "proposer=boxes needs exactly one of proposer.boxes_json=<your detector's boxes json> and "
                "'proposer.detector={_target_: <module.callable>}'"
            )
        self.boxes_json = boxes_json
        self.boxes_key = boxes_key
        self.box_format = box_format
        self.selection = {"top_k": top_k, "score_thr": score_thr, "clip": clip}
        self._table = (
            load_boxes_json(boxes_json, key=boxes_key, box_format=box_format) if boxes_json else None
        )
        self._detector = None
        if detector is not None:
            from hydra.utils import instantiate

            try:
                self._detector = instantiate(detector)
            except Exception as err:  # an import error, a bad argument: the user's target
                target = dict(detector).get("_target_")
                raise BoxesError(f"proposer.detector._target_={target}: cannot build it: {err}") from err
            if not callable(self._detector):
                raise BoxesError(
                    f"proposer.detector._target_={dict(detector).get('_target_')} built a "
                    f"{type(self._detector).__name__}, which is not callable (a function needs `_partial_: true`)"
                )

    @classmethod
    def from_config(cls, proposer) -> BoxSource:
        """The box source of a ``ntt.utils.config.ProposerConfig`` with ``prompts=boxes``."""
        return cls(
            boxes_json=proposer.boxes_json,
            detector=proposer.detector,
            boxes_key=proposer.boxes_key,
            box_format=proposer.box_format,
            top_k=proposer.top_k,
            score_thr=proposer.score_thr,
            clip=proposer.clip,
        )

    def check_images(self, records: list[dict], *, log_missing: bool = True) -> int:
        """Log how many of the evaluated images have no box in the file; refuse a file that names none of them.

        Args:
            records: the test json's image records (``id``, ``file_name``).
            log_missing: log the images without boxes (one process of several says it).

        Returns:
            The number of images without boxes (they get no detections).

        Raises:
            BoxesError: the file has boxes but none for any evaluated image (the wrong file or ``boxes_key``).
        """
        if self._table is None or not records:
            return 0
        key = "id" if self.boxes_key == "image_id" else "file_name"
        missing = [r for r in records if r.get(key) not in self._table]
        if len(missing) == len(records) and self._table:
            sample = ", ".join(repr(k) for k in list(self._table)[:3])
            raise BoxesError(
                f"proposer.boxes_json={self.boxes_json}: none of the {len(records)} evaluated images has boxes "
                f"in it (its {self.boxes_key}s start {sample}; the test json's {key}s start "
                f"{', '.join(repr(r.get(key)) for r in records[:3])}): the wrong file, or set "
                f"proposer.boxes_key={'file_name' if self.boxes_key == 'image_id' else 'image_id'}"
            )
        if missing and log_missing:
            log.warning(
                "proposer.boxes_json=%s has no boxes for %d of %d evaluated image(s) (e.g. %s %r): they get "
                "no detections",
                self.boxes_json,
                len(missing),
                len(records),
                self.boxes_key,
                missing[0].get(key),
            )
        return len(missing)

    def boxes_for(
        self,
        *,
        image_id: int,
        file_name: str,
        width: int,
        height: int,
        image_path=None,
        apply_exif: bool = False,
    ) -> ImageBoxes:
        """The selected boxes of one image (image pixels, xyxy, in proposal order); empty when it has none.

        Args:
            image_id: the test json's id.
            file_name: the test json's ``file_name``.
            width: the json's width.
            height: the json's height.
            image_path: the image file (read only for a detector).
            apply_exif: rotate the image the detector sees by its EXIF orientation (``dataset.exif_orientation``).
        """
        if self._table is not None:
            found = self._table.get(image_id if self.boxes_key == "image_id" else file_name, EMPTY)
        else:
            found = self._detect(image_id, file_name, image_path, apply_exif)
        return select_boxes(found, width=width, height=height, **self.selection)

    def _detect(self, image_id: int, file_name: str, image_path, apply_exif: bool) -> ImageBoxes:
        from ntt.data.images import read_image_rgb

        image = read_image_rgb(image_path, apply_exif=apply_exif)
        where = f"proposer.detector on image {image_id} ({file_name})"
        try:
            boxes, scores = self._detector(image, image_id=image_id, file_name=file_name)
            boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
            scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise BoxesError(
                f"{where}: expected (boxes [n, 4] xyxy, scores [n]), got an error: {err}"
            ) from err
        if len(boxes) != len(scores) or not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise BoxesError(
                f"{where}: {len(boxes)} boxes and {len(scores)} scores (must be as many, all finite numbers)"
            )
        return ImageBoxes(boxes, scores)
