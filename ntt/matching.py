"""Mask embeddings (pooling of upsampled DINOv2 features) and cosine classification (method.md §5.3-5.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["upsample_features", "interpolation_matrix", "mask_embeddings", "classify", "top1"]

POOLING_METHODS = ("dense", "adjoint")


def upsample_features(feats: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly upsample a feature grid as the reference does (align_corners False, antialias True).

    Args:
        feats: ``[h, w, D]`` patch-feature grid.
        size: output ``(H, W)``.

    Returns:
        ``[H, W, D]`` upsampled features (a permuted view of a ``[D, H, W]`` tensor).
    """
    x = feats.permute(2, 0, 1)[None]
    up = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return up[0].permute(1, 2, 0)


def interpolation_matrix(n_in: int, n_out: int, *, device=None, dtype=torch.float32) -> Tensor:
    """1-D weights of the same interpolation as :func:`upsample_features` along one axis.

    Obtained by interpolating the identity basis with the very same ``F.interpolate`` call (the bilinear
    antialiased kernel is separable and the untouched axis is resized 2 -> 2, an identity), so the matrix holds the
    exact weights torch uses.

    Args:
        n_in: input length.
        n_out: output length.
        device: device of the result.
        dtype: dtype of the result.

    Returns:
        ``[n_out, n_in]`` matrix ``U`` with ``up = U @ x`` along that axis.
    """
    # The untouched axis has length 2, not 1: torch's antialiased kernel mishandles a length-1 axis (it returned
    # a constant column in torch 2.13), while 2 -> 2 is an exact identity.
    eye = torch.eye(n_in, device=device, dtype=dtype)[:, None, :, None].expand(n_in, 1, n_in, 2).contiguous()
    cols = F.interpolate(eye, size=(n_out, 2), mode="bilinear", align_corners=False, antialias=True)
    return cols[:, 0, :, 0].T.contiguous()


def _normalize_rows(pooled: Tensor) -> Tensor:
    # F.normalize = x / max(||x||, eps): a 0/0 pooled row (empty mask) stays NaN, as in the reference.
    return F.normalize(pooled, dim=-1)


def mask_embeddings(masks: Tensor, feats: Tensor, *, method: str = "dense", chunk_size: int = 128) -> Tensor:
    """L2-normalised mean of the upsampled features over each mask's pixels.

    ``dense`` is the reference computation: ``F_up`` = features upsampled to the mask resolution, then
    ``(B @ F_up) / sum(B)``. ``adjoint`` is the same linear map evaluated in the other order
    (method.md §10 item 3): the mask is pulled back to the patch grid with the transposed 1-D
    interpolation matrices, ``Uy^T B Ux`` (``[h, w]``), and then contracted with the ``[h, w, D]`` grid.
    It never materialises ``F_up`` and agrees with ``dense`` up to float rounding (~1e-7).

    Args:
        masks: ``[n, R, R']`` bool masks (``logits > 0`` at 256x256).
        feats: ``[h, w, D]`` feature grid.
        method: ``"dense"`` (parity, default) or ``"adjoint"`` (exact, much cheaper).
        chunk_size: masks per matmul (bounds the float copy of the masks).

    Returns:
        ``[n, D]`` float32 embeddings; rows of empty masks are NaN (parity; they are dropped later by the
        ``score > 0`` filter).
    """
    if method not in POOLING_METHODS:
        raise ValueError(f"unknown pooling method {method!r}; expected one of {POOLING_METHODS}")
    n, rh, rw = masks.shape
    h, w, d = feats.shape
    feats = feats.float()
    out = torch.empty(n, d, dtype=torch.float32, device=feats.device)
    if n == 0:
        return out
    if method == "dense":
        f_up = upsample_features(feats, (rh, rw)).reshape(rh * rw, d)
        for s in range(0, n, chunk_size):
            b = masks[s : s + chunk_size].reshape(-1, rh * rw).to(feats.device, torch.float32)
            pooled = (b @ f_up) / b.sum(dim=1, keepdim=True)
            out[s : s + chunk_size] = _normalize_rows(pooled)
        return out
    uy = interpolation_matrix(h, rh, device=feats.device)  # [rh, h]
    ux = interpolation_matrix(w, rw, device=feats.device)  # [rw, w]
    flat = feats.reshape(h * w, d)
    for s in range(0, n, chunk_size):
        b = masks[s : s + chunk_size].to(feats.device, torch.float32)
        weights = uy.T @ b @ ux  # [c, h, w]: adjoint of the upsampling applied to the masks
        pooled = (weights.reshape(-1, h * w) @ flat) / b.sum(dim=(1, 2))[:, None]
        out[s : s + chunk_size] = _normalize_rows(pooled)
    return out


def classify(embeddings: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Clamped cosine to each class prototype and top-1 class with ``torch.topk(k=1)`` semantics.

    The label is the first index of the row maximum, except that a NaN anywhere in the row wins (first NaN),
    exactly as ``topk`` orders NaN above every number (method.md §12b item 1). Implemented explicitly so the
    result does not depend on the device's topk kernel: CUDA's ``topk(k=1)`` returns the first of tied maxima,
    and so does the CPU kernel for up to 3 columns (the fixture), but the CPU kernel for 4 or more columns
    does not (``topk([[0, 0, 0, 0, 0]], 1)`` gives index 2 with torch 2.13). In practice ties only occur in rows
    whose cosines are all clamped to 0; such proposals still take part in the class-aware NMS with their
    label, and leave at the ``score > 0`` filter.

    Args:
        embeddings: ``[n, D]`` L2-normalised mask embeddings (NaN rows allowed).
        prototypes: ``[C, D]`` L2-normalised class prototypes.

    Returns:
        ``(sim [n, C] = clamp(e @ P^T, min=0), labels [n] int64, scores [n])``.
    """
    sim = (embeddings @ prototypes.T).clamp(min=0)
    labels, scores = top1(sim)
    return sim, labels, scores


def top1(sim: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise ``torch.topk(k=1)`` as specified: first NaN if the row has one, else the first maximum.

    Args:
        sim: ``[n, C]`` scores.

    Returns:
        ``(labels [n] int64, values [n])``.
    """
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        return torch.zeros(sim.shape[0], dtype=torch.int64, device=sim.device), sim.new_zeros(sim.shape[0])
    isnan = sim.isnan()
    has_nan = isnan.any(dim=1)
    first_nan = isnan.to(torch.uint8).argmax(dim=1)  # argmax returns the first maximal index
    best = sim.masked_fill(isnan, float("-inf")).argmax(dim=1)
    labels = torch.where(has_nan, first_nan, best)
    return labels, sim.gather(1, labels[:, None])[:, 0]
