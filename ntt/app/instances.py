"""The detections of one image from the practitioner API (``Segmenter.predict``): masks, boxes, scores,
labels, with COCO export, per-class counts, an overlay picture and supervision's ``Detections``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ntt.data.images import read_image

__all__ = ["Instances"]


@dataclass
class Instances:
    """The detections of one image, best first.

    Args:
        masks: ``[N, H, W]`` bool masks (CPU); None when predicted with ``outputs="boxes"``.
        boxes: ``[N, 4]`` float32 ``x1, y1, x2, y2`` inclusive pixel extents of the masks.
        scores: ``[N]`` semantic scores (after soft merging).
        labels: ``[N]`` int64 class indices into ``names``.
        names: the segmenter's class names (index = label).
        category_ids: the segmenter's category ids (index = label).
        height: image height.
        width: image width.
        path: the image file, when predicted from one.
        image: the RGB ``PIL.Image`` that was segmented (for :meth:`overlay`).
        box_plus_one: COCO box width/height convention of :meth:`to_coco` (``matcher.box_plus_one``).
    """

    masks: torch.Tensor | None
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    names: list[str]
    category_ids: list[int]
    height: int
    width: int
    path: str | None = None
    image: Any = field(default=None, repr=False)
    box_plus_one: bool = False

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def class_names(self) -> list[str]:
        """The class name of each detection."""
        return [self.names[int(i)] for i in self.labels]

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO result dicts (RLE masks, xywh boxes), exactly as the benchmark writes them; without masks
        (``outputs="boxes"``) the same dicts less ``segmentation`` (bbox results).

        Args:
            image_id: the image id to record.
        """
        from types import SimpleNamespace

        from ntt.results import detections_to_coco

        det = SimpleNamespace(masks=self.masks, boxes_xyxy=self.boxes, scores=self.scores, labels=self.labels)
        if self.masks is not None:
            return detections_to_coco(det, image_id, self.category_ids, box_plus_one=self.box_plus_one)
        rows = detections_to_coco(
            det, image_id, self.category_ids, box_plus_one=self.box_plus_one, rles=[{}] * len(self)
        )
        for row in rows:
            del row["segmentation"]
        return rows

    def counts(self, score_thr: float = 0.0) -> dict[str, int]:
        """Detections per class scoring at least ``score_thr``: every class of the segmenter, in label order
        (zeros included; a NaN score, parity's empty mask, never counts).

        Args:
            score_thr: count detections with ``score >= score_thr``.
        """
        counted = self.labels[self.scores >= score_thr]
        per_label = torch.bincount(counted, minlength=len(self.names)).tolist()
        return dict(zip(self.names, per_label))

    def to_supervision(self):
        """supervision's ``sv.Detections`` of these detections (needs ``pip install 'ntt[supervision]'``).

        ``xyxy`` are the boxes as float32 (inclusive pixel extents of the masks, as supervision's own
        ``mask_to_xyxy``), ``mask`` the ``[N, H, W]`` bool masks (None with ``outputs="boxes"``),
        ``confidence`` the scores, ``class_id`` the labels (indices into ``names``) and
        ``data["class_name"]`` the class names.
        """
        try:
            import supervision as sv
        except ImportError as err:
            raise ImportError(
                "Instances.to_supervision needs the supervision package: pip install 'ntt[supervision]'"
            ) from err
        import numpy as np

        return sv.Detections(
            xyxy=self.boxes.detach().cpu().numpy().astype(np.float32).reshape(-1, 4),
            mask=None if self.masks is None else self.masks.detach().cpu().numpy().astype(bool),
            confidence=self.scores.detach().cpu().numpy().astype(np.float32),
            class_id=self.labels.detach().cpu().numpy().astype(int),
            data={"class_name": np.array(self.class_names, dtype=str)},
        )

    def overlay(self, image=None, *, score_thr: float = 0.0, max_instances: int | None = 50):
        """An RGB ``PIL.Image`` of the image with the detections drawn (``ntt.app.visualize.draw_instances``).

        Args:
            image: the image to draw on (default: the one that was segmented).
            score_thr: draw detections scoring at least this.
            max_instances: draw at most this many (best first); None = all.
        """
        from ntt.app.visualize import draw_instances

        base = image if image is not None else self.image
        if base is None and self.path is not None:
            base = self.path
        if base is None:
            raise ValueError("Instances.overlay: no image kept; pass the image")
        pil, _ = read_image(base)
        return draw_instances(
            pil,
            self.masks,
            self.boxes,
            self.labels,
            self.scores,
            self.names,
            score_thr=score_thr,
            max_instances=max_instances,
        )
