"""FSOD-VFM's graph-diffusion re-scoring (method.md §5.12): ``matcher.merge=diffusion``.

FSOD-VFM (ICLR 2026, ``metric.py::graph_diffusion_ios`` and its caller, commit f5559b6) replaces NTT's
semantic soft merging (§5.7) by a random walk on the "intersection over self" graph of each class:

``A_ij = |m_i & m_j| / |m_i|`` for ``j < i`` (masks in ranking order, binarised on a coarse grid),
``p_i = max_j A_ij``, ``pi <- alpha P pi + (1 - alpha) p`` from ``pi = 1/n`` for at most ``steps`` steps
(stop when ``||pi - pi_old|| < tol``), then ``score_i * max(0, 1 - pi_i) ** lamb`` and the top ``num_out``.

Every step is written as FSOD-VFM writes it (float32, the same torch operations in the same order), so on
the same device the numbers are bit-identical (tests/test_diffusion.py against their own code's outputs).
Each quirk is a :class:`ntt.utils.config.DiffusionConfig` flag whose default reproduces it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ntt.utils.config import DiffusionConfig

__all__ = [
    "FSOD_VFM_INPUT_SIZE",
    "FSOD_VFM_PATCH",
    "decay_scores",
    "diffuse_class",
    "diffusion_merge",
    "fsod_vfm_grid",
    "graph_diffusion",
    "grid_masks",
    "resize_masks_linear",
]

# FSOD-VFM's DINOv2 input (support_util.get_dinov2_features): the image resized, aspect kept, to a long side of
# 630 px, then squared by its transform's Resize((dinov2_image_size,) * 2), main.py's default 630 (method.md §5.13)
FSOD_VFM_INPUT_SIZE = 630
FSOD_VFM_PATCH = 14
# Row sums above this are "valid" in FSOD-VFM's (no-op) normalisation; the fix divides by them.
_VALID_ROW_SUM = 1e-10


def fsod_vfm_grid(height: int, width: int) -> tuple[int, int]:
    """FSOD-VFM's DINOv2 patch grid ``(rows, cols)``: 45x45 whatever the image size.

    Its `get_dinov2_features` resizes the image to a long side of 630 (`resize_with_aspect_ratio`), then its
    transform resizes that to ``(dinov2_image_size, dinov2_image_size)`` (main.py default 630; no run script
    changes it): the feature map, and so the masks the walk compares (`masks_for_ios`), is 630 / 14 = 45 square.

    Args:
        height: image height (not read: the grid is square and fixed; kept for the call sites' symmetry).
        width: image width (not read).
    """
    side = FSOD_VFM_INPUT_SIZE // FSOD_VFM_PATCH
    return side, side


def _linear_taps(n_in: int, n_out: int, *, clamp_weights: bool) -> tuple[list[int], list[int], list, list]:
    """Bilinear taps along one axis as OpenCV's INTER_LINEAR lays them out: source rows/cols and weights.

    Source position ``f = (d + 0.5) * scale - 0.5`` with ``scale = 1 / (n_out / n_in)``, ``s = floor(f)``,
    weights ``(1 - (f - s), f - s)`` rounded to float32. The position stays in double: OpenCV's own loop
    rounds it to float first, but the opencv-python wheels resize float images through IPP, whose results
    this matches within one float32 ulp (tests/test_diffusion.py). Along x, out-of-range taps are clamped to
    the border with weights ``(1, 0)``; along y the row indices are clipped and the weights kept
    (``clamp_weights`` False), as in OpenCV.
    """
    import numpy as np

    scale = 1.0 / (n_out / n_in)
    i0, i1, w0, w1 = [], [], [], []
    for d in range(n_out):
        f = (d + 0.5) * scale - 0.5
        s = math.floor(f)
        frac = f - s
        if clamp_weights and s < 0:
            frac, s = 0.0, 0
        if clamp_weights and s >= n_in - 1:
            frac, s = 0.0, n_in - 1
        i0.append(min(max(s, 0), n_in - 1))
        i1.append(min(max(s + 1, 0), n_in - 1))
        w0.append(float(np.float32(1.0 - frac)))
        w1.append(float(np.float32(frac)))
    return i0, i1, w0, w1


def resize_masks_linear(masks: Tensor, size: tuple[int, int], *, threshold: float = 0.5) -> Tensor:
    """Binary masks resized as FSOD-VFM does: ``cv2.resize(m.astype(float32), (w, h)) > 0.5``.

    Bilinear (OpenCV's INTER_LINEAR layout, :func:`_linear_taps`), horizontal pass then vertical, in float64
    and rounded once to float32 before the threshold; written in torch, so it runs where the masks are.
    Equal to cv2 4.14 (opencv-python wheels, IPP on) pixel for pixel on every fixture case; the interpolated
    values agree within one float32 ulp, so only a value within ~1e-7 of 0.5 could fall the other way.

    Args:
        masks: ``[m, H, W]`` bool (or 0/1) masks.
        size: output ``(h, w)``.
        threshold: a pixel is in the mask when its interpolated value is strictly greater.

    Returns:
        ``[m, h, w]`` bool masks.
    """
    _, height, width = masks.shape
    h, w = int(size[0]), int(size[1])
    if (h, w) == (height, width):  # cv2.resize copies when the size does not change
        return masks.to(torch.float32) > threshold
    dev = masks.device
    xi0, xi1, xw0, xw1 = _linear_taps(width, w, clamp_weights=True)
    yi0, yi1, yw0, yw1 = _linear_taps(height, h, clamp_weights=False)

    def t(v, dtype=torch.int64):
        return torch.tensor(v, dtype=dtype, device=dev)

    # gather the two source columns first: the float64 buffers are [m, H, w], never [m, H, W]
    left, right = masks[:, :, t(xi0)].to(torch.float64), masks[:, :, t(xi1)].to(torch.float64)
    rows = left * t(xw0, torch.float64) + right * t(xw1, torch.float64)
    b0, b1 = t(yw0, torch.float64)[:, None], t(yw1, torch.float64)[:, None]
    out = rows[:, t(yi0), :] * b0 + rows[:, t(yi1), :] * b1
    return out.to(torch.float32) > threshold


def diffuse_class(masks: Tensor, settings: DiffusionConfig) -> Tensor:
    """The random walk of one class: ``pi`` of its ``[n, K]`` float32 0/1 masks, given in ranking order.

    FSOD-VFM's per-class body, operation for operation (float32; the intersection counts of 0/1 masks are
    exact integers below 2**24 pixels).

    Args:
        masks: ``[n, K]`` float32 flattened 0/1 masks of one class.
        settings: the diffusion settings.

    Returns:
        ``[n]`` float32 stationary scores ``pi``.
    """
    n_cat = masks.shape[0]
    pos_num = masks.sum(dim=-1).to(dtype=torch.float32)
    pos_num = torch.clamp(pos_num, min=1e-6)  # an empty mask: row of zeros, never NaN
    inter_num = masks @ masks.t()
    inter_num.fill_diagonal_(0.0)
    if settings.lower_triangle:  # FSOD-VFM rank_score=True: a mask is covered only by those ranked above it
        inter_num = torch.tril(inter_num, diagonal=0)
    iou_matrix = inter_num / pos_num[:, None]
    personal_vector = iou_matrix.max(dim=-1)[0]
    if settings.row_normalize:  # the fix: P row-stochastic where a row has mass (FSOD-VFM divides by True)
        row_sums = iou_matrix.sum(dim=1)
        valid = row_sums > _VALID_ROW_SUM
        trans = torch.where(valid[:, None], iou_matrix / torch.where(valid, row_sums, 1.0)[:, None], 0.0)
    else:
        trans = iou_matrix  # FSOD-VFM: P[idx] = A[idx] / valid_rows[idx] = A[idx] / 1.0
    if settings.solver == "solve":
        return _fixed_point(trans, personal_vector, settings.alpha)
    alpha = settings.alpha
    pi = torch.ones(n_cat, device=trans.device, dtype=trans.dtype) / n_cat
    for _ in range(settings.steps):
        pi_old = pi.clone()
        pi = alpha * (trans @ pi) + (1 - alpha) * personal_vector
        if torch.norm(pi - pi_old) < settings.tol:
            break
    return pi


def _fixed_point(trans: Tensor, personal: Tensor, alpha: float) -> Tensor:
    """``pi = (I - alpha P)^-1 (1 - alpha) p`` by one triangular solve (float64, rounded to float32).

    ``P`` is strictly lower triangular (config checks ``lower_triangle``), hence nilpotent: the iteration
    reaches this point exactly after at most ``n`` steps; FSOD-VFM stops earlier at ``tol`` or ``steps``.
    """
    n = trans.shape[0]
    lhs = torch.eye(n, dtype=torch.float64, device=trans.device) - alpha * trans.double()
    rhs = ((1 - alpha) * personal.double())[:, None]
    return torch.linalg.solve_triangular(lhs, rhs, upper=False)[:, 0].float()


def graph_diffusion(masks: Tensor, labels: Tensor, settings: DiffusionConfig) -> Tensor:
    """``pi`` of every mask, each class diffused on its own (FSOD-VFM's ``graph_diffusion_ios``).

    Quirk kept (method.md §5.12): a single mask in the whole image gets 0 without a step (the walk would
    give 0 too for ``steps >= 1``, which the config requires).

    Args:
        masks: ``[P, ...]`` 0/1 (or bool) masks on one grid, in ranking order.
        labels: ``[P]`` class indices.
        settings: the diffusion settings.

    Returns:
        ``[P]`` float32.
    """
    n_masks = masks.shape[0]
    flat = masks.reshape(n_masks, -1).to(dtype=torch.float32)
    rw_ios = torch.zeros((n_masks,), device=masks.device, dtype=torch.float32)
    if n_masks == 1:
        return rw_ios
    for c in torch.unique(labels).tolist():  # classes are independent: their order does not matter
        sel = labels == c
        rw_ios[sel] += diffuse_class(flat[sel], settings)
    return rw_ios


def decay_scores(scores: Tensor, pi: Tensor, lamb: float) -> Tensor:
    """``score * max(0, 1 - pi) ** lamb`` in float32, as FSOD-VFM's per-item loop.

    For ``lamb = 0.5`` (its setting) torch computes the power as a square root, correctly rounded in both
    FSOD-VFM's per-item call and this vectorised one: bit-identical. Other exponents may differ by one ulp
    (vectorised ``pow`` vs the scalar one).

    Args:
        scores: ``[P]`` float32 classification scores.
        pi: ``[P]`` float32 diffusion scores.
        lamb: the decay exponent.
    """
    return scores.float() * torch.pow(torch.clamp(1 - pi, min=0.0), lamb)


def grid_masks(
    full_masks,
    lowres_masks,
    n: int,
    settings: DiffusionConfig,
    *,
    height: int,
    width: int,
    dino_grid: tuple[int, int] | None,
    block: int = 16,
) -> Tensor:
    """The masks the graph is built on (``settings.grid``), ``[n, h, w]`` bool.

    Args:
        full_masks: ``rows -> [m, H, W]`` bool full-resolution masks of these of the ``n`` detections.
        lowres_masks: ``rows -> [m, 256, 256]`` bool low-res masks of these detections (``grid=lowres``).
        n: number of detections.
        settings: the diffusion settings.
        height: image (annotation) height ``H``.
        width: image width ``W``.
        dino_grid: ``(rows, cols)`` of the run's DINOv2 patch grid (``grid=dino``).
        block: full-resolution masks produced at once (bounds the ``[block, H, W]`` float buffers).
    """
    if settings.grid == "lowres":
        return lowres_masks(torch.arange(n)).bool()
    if settings.grid == "dino":
        if dino_grid is None:
            raise ValueError("matcher.diffusion.grid=dino needs the DINOv2 grid size of the image")
        size = (int(dino_grid[0]), int(dino_grid[1]))
    else:
        size = fsod_vfm_grid(height, width)
    blocks = [
        resize_masks_linear(full_masks(torch.arange(s, min(n, s + block))), size) for s in range(0, n, block)
    ]
    return torch.cat(blocks) if blocks else torch.zeros(0, *size, dtype=torch.bool)


def diffusion_merge(
    full_masks,
    lowres_masks,
    labels: Tensor,
    scores: Tensor,
    settings: DiffusionConfig,
    *,
    height: int,
    width: int,
    dino_grid: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """FSOD-VFM's re-scoring of one image's detections, given in the proposer's order (method.md §5.12).

    Args:
        full_masks: ``rows -> [m, H, W]`` bool full-resolution masks of these detections.
        lowres_masks: ``rows -> [m, 256, 256]`` bool low-res masks of these detections.
        labels: ``[n]`` class indices.
        scores: ``[n]`` float32 classification scores.
        settings: the diffusion settings.
        height: image (annotation) height.
        width: image width.
        dino_grid: the run's DINOv2 grid ``(rows, cols)`` (for ``grid=dino``).

    Returns:
        ``(pi [n] float32, decayed scores [n] float32)`` in the given order.
    """
    n = labels.shape[0]
    if n == 0:
        return scores.new_zeros(0), scores.new_zeros(0)
    if settings.order == "score":
        perm = torch.sort(scores, descending=True, stable=True).indices
    else:
        perm = torch.arange(n, device=labels.device)

    def ranked(producer):  # rows in ranking order -> the producer's rows
        return lambda rows: producer(perm[rows.to(perm.device)])

    masks = grid_masks(
        ranked(full_masks), ranked(lowres_masks), n, settings, height=height, width=width, dino_grid=dino_grid
    )
    pi = torch.empty(n, dtype=torch.float32, device=labels.device)
    pi[perm] = graph_diffusion(masks, labels[perm], settings).to(labels.device)
    return pi, decay_scores(scores, pi, settings.lamb)
