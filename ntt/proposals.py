"""SAM2 point-grid proposals (method.md §5.2): grid prompts, best-of-3 selection, IoU filter.

The SAM2 backbone is used through ``decode(feats, *, image_index, points, point_labels)`` (see
``ntt.backbones.sam2``), so tests can pass any object with that method. When it also has
``prepare_decoder`` and ``decode_best`` (``SAM2Backbone``), the decoder's prompt-independent state is
computed once per image and only the chosen output's logits are materialised (same numbers).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Proposals", "point_grid", "select_best_multimask", "generate_proposals"]

log = logging.getLogger(__name__)


@dataclass
class Proposals:
    """Proposals of one image that passed the predicted-IoU filter, in grid order.

    Box-prompt proposals (``ntt.boxproposals``, method.md §5.11) use the same layout with boxes as prompts:
    ``points`` / ``grid_points`` are ``[n, 4]`` / ``[G, 4]`` xyxy boxes and ``grid_best_index`` is 0 (the
    single-mask output) or 1..3 (SAM2's stability fallback).

    Attributes:
        logits: ``[n, 256, 256]`` low-res mask logits of the chosen multimask output.
        pred_ious: ``[n]`` predicted IoU of the chosen output (NMS ranking key).
        points: ``[n, 2]`` (x, y) prompt of each proposal in the 1024 frame.
        grid_index: ``[n]`` int64 row of each proposal in the grid.
        grid_points: ``[G, 2]`` all prompts, in decoder order.
        grid_ious_all: ``[G, 4]`` predicted IoUs of all 4 decoder outputs per prompt.
        grid_best_index: ``[G]`` int64 chosen output index (1..3) per prompt.
        grid_pred_ious: ``[G]`` predicted IoU of the chosen output per prompt.
    """

    logits: Tensor
    pred_ious: Tensor
    points: Tensor
    grid_index: Tensor
    grid_points: Tensor
    grid_ious_all: Tensor
    grid_best_index: Tensor
    grid_pred_ious: Tensor

    def __len__(self) -> int:
        return int(self.pred_ious.shape[0])


def point_grid(points_per_side: int, image_size: int = 1024) -> Tensor:
    """The reference's border-inclusive prompt grid in the ``image_size`` frame.

    Coordinates are ``v = linspace(0, image_size - 1, P) + 0.5`` computed in float32 with ``torch.linspace`` on
    CPU (bit-identical to the parity fixture; numpy/float64 differs in the last bit for some values). Prompt
    ``k`` is ``(x = v[k // P], y = v[k % P])``.

    Args:
        points_per_side: grid side ``P`` (``P * P`` prompts); ``P = 1`` gives the single point ``(0.5, 0.5)``.
        image_size: side of the square SAM input frame.

    Returns:
        ``[P * P, 2]`` float32 (x, y) on CPU.
    """
    if points_per_side < 1:
        raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
    v = torch.linspace(0, image_size - 1, points_per_side, dtype=torch.float32) + 0.5
    xs = v.repeat_interleave(points_per_side)
    ys = v.repeat(points_per_side)
    return torch.stack([xs, ys], dim=1)


def select_best_multimask(logits: Tensor, ious: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Best of the three multimask outputs (indices 1..3) by predicted IoU; output 0 is never used.

    Args:
        logits: ``[P, 4, h, w]`` decoder logits.
        ious: ``[P, 4]`` predicted IoUs.

    Returns:
        ``(logits [P, h, w], ious [P], index [P])`` with ``index = 1 + argmax(ious[:, 1:])`` (ties: first).
    """
    index = 1 + torch.argmax(ious[:, 1:], dim=1)
    rows = torch.arange(ious.shape[0], device=ious.device)
    return logits[rows, index], ious[rows, index], index


def _infer_device(sam2, feats) -> torch.device:
    embed = getattr(feats, "image_embed", None)
    if isinstance(embed, Tensor):
        return embed.device
    if isinstance(feats, Tensor):
        return feats.device
    params = getattr(sam2, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def generate_proposals(
    sam2,
    feats,
    *,
    points_per_side: int = 32,
    points_batch_size: int = 256,
    iou_thr: float = 0.4,
    image_size: int = 1024,
    image_index: int = 0,
    keep_all: bool = False,
    device: torch.device | str | None = None,
) -> Proposals:
    """Decode every grid prompt (single positive point), keep the best multimask output, filter by IoU.

    Prompts are decoded in ``ceil(G / points_batch_size)`` batches (the reference's floor division silently
    dropped a remainder; method.md §9.2 item 4). Per batch only the chosen 256x256 logits of the prompts
    passing the filter are kept, so peak memory is one decoder call (``SAM2Backbone.decoder_chunk`` prompts)
    plus one batch of chosen logits ``[b, 256, 256]`` plus the kept proposals.

    Args:
        sam2: object with ``decode(feats, *, image_index, points [b, 1, 2], point_labels [b, 1])``
            returning ``(logits [b, 4, h, w], ious [b, 4])``.
        feats: image features from ``sam2.encode_image``.
        points_per_side: grid side ``P``.
        points_batch_size: prompts per decoder call.
        iou_thr: keep proposals whose predicted IoU is strictly greater than this.
        image_size: SAM input side (prompt frame).
        image_index: which image of a batched ``feats`` to decode.
        keep_all: skip the IoU filter (debugging / analysis); default applies it as the reference.
        device: device of the prompts; inferred from ``feats`` / ``sam2`` when None.

    Returns:
        A :class:`Proposals`; empty tensors (``n = 0``) when no prompt passes.
    """
    if points_batch_size < 1:
        raise ValueError(f"points_batch_size must be >= 1, got {points_batch_size}")
    dev = torch.device(device) if device is not None else _infer_device(sam2, feats)
    grid = point_grid(points_per_side, image_size).to(dev)
    g = grid.shape[0]
    n_batches = math.ceil(g / points_batch_size)
    kept_logits, kept_ious, kept_index = [], [], []
    all_ious, all_best = [], []
    fast = callable(getattr(sam2, "decode_best", None)) and callable(getattr(sam2, "prepare_decoder", None))
    cache = sam2.prepare_decoder(feats, image_index) if fast else None
    for b in range(n_batches):
        pts = grid[b * points_batch_size : (b + 1) * points_batch_size]
        labels = torch.ones(pts.shape[0], 1, dtype=torch.int64, device=dev)
        if fast:
            best_logits, ious4, best_idx = sam2.decode_best(
                feats, image_index=image_index, points=pts[:, None, :], point_labels=labels, cache=cache
            )
            best_ious = ious4[torch.arange(ious4.shape[0], device=ious4.device), best_idx]
        else:
            logits4, ious4 = sam2.decode(
                feats, image_index=image_index, points=pts[:, None, :], point_labels=labels
            )
            best_logits, best_ious, best_idx = select_best_multimask(logits4, ious4)
            del logits4  # the largest tensor of the loop: drop it before the next decode
        all_ious.append(ious4)
        all_best.append(best_idx)
        sel = torch.ones_like(best_ious, dtype=torch.bool) if keep_all else best_ious > iou_thr
        idx = torch.nonzero(sel, as_tuple=True)[0]
        kept_logits.append(best_logits if keep_all or len(idx) == len(best_ious) else best_logits[idx])
        kept_ious.append(best_ious[idx])
        kept_index.append(idx + b * points_batch_size)
        del best_logits
    grid_ious_all = torch.cat(all_ious)
    grid_best = torch.cat(all_best)
    rows = torch.arange(g, device=grid_ious_all.device)
    grid_index = torch.cat(kept_index)
    props = Proposals(
        logits=kept_logits[0] if len(kept_logits) == 1 else torch.cat(kept_logits),
        pred_ious=torch.cat(kept_ious),
        points=grid[grid_index.to(grid.device)],
        grid_index=grid_index,
        grid_points=grid,
        grid_ious_all=grid_ious_all,
        grid_best_index=grid_best,
        grid_pred_ious=grid_ious_all[rows, grid_best],
    )
    log.debug("proposals: %d of %d prompts pass iou_thr %.3f", len(props), g, iou_thr)
    return props
