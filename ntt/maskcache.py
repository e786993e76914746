"""Full-resolution masks and RLEs of one image's proposals, computed once for every memory bank.

In a study pass (ntt/runner/study.py) every bank post-processes the same proposals of an image: NMS and the soft
merging pick different subsets, but a proposal's full-resolution mask (method.md §5.6) and its RLE are the
same in every bank. Upsampling is per mask (`ntt.postprocess.resize_masks_to_image`), so a cached mask is
bit-identical to one computed for a bank alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ntt.postprocess import resize_masks_to_image
from ntt.results import encode_masks_rle

__all__ = ["ProposalMasks"]


class ProposalMasks:
    """Lazily upsampled, cached full-resolution masks (and RLEs) of an image's proposals.

    Args:
        logits: ``[n, 256, 256]`` low-res logits of the proposals.
        height: image height ``H``.
        width: image width ``W``.
        max_bytes: masks are kept while their total stays below this (``H * W`` bytes each); beyond it they
            are recomputed when asked again (same bits), so memory stays bounded on huge images.
        chunk_size: masks upsampled at once.
    """

    def __init__(
        self, logits: Tensor, height: int, width: int, *, max_bytes: int = 1 << 30, chunk_size: int = 32
    ) -> None:
        self.logits = logits
        self.height, self.width = int(height), int(width)
        self.chunk_size = chunk_size
        self.capacity = max(0, int(max_bytes) // max(1, self.height * self.width))
        self._masks: dict[int, Tensor] = {}
        self._rles: dict[int, dict] = {}

    def __call__(self, rows: Tensor) -> Tensor:
        """``[m, H, W]`` bool masks of these proposal rows (as ``resize_masks_to_image(logits[rows])``)."""
        ids = [int(i) for i in rows.tolist()]
        missing = sorted({i for i in ids if i not in self._masks})
        fresh: dict[int, Tensor] = {}
        if missing:
            up = resize_masks_to_image(
                self.logits[torch.tensor(missing, device=self.logits.device)],
                self.height,
                self.width,
                chunk_size=self.chunk_size,
            )
            keep_all = len(self._masks) + len(missing) <= self.capacity
            for k, i in enumerate(missing):
                if len(self._masks) < self.capacity:
                    # a view would keep the whole batch `up` alive, beyond max_bytes: copy unless all is kept
                    self._masks[i] = up[k] if keep_all else up[k].clone()
                else:
                    fresh[i] = up[k]
        out = torch.empty(len(ids), self.height, self.width, dtype=torch.bool, device=self.logits.device)
        for k, i in enumerate(ids):
            out[k] = self._masks[i] if i in self._masks else fresh[i]
        return out

    def rles(self, rows: Tensor, masks: Tensor) -> list[dict]:
        """COCO RLEs of these proposal rows, given their masks (encoded once per proposal)."""
        ids = [int(i) for i in rows.tolist()]
        missing = [k for k, i in enumerate(ids) if i not in self._rles]
        if missing:
            for k, rle in zip(missing, encode_masks_rle(masks[missing])):
                self._rles[ids[k]] = rle
        return [self._rles[i] for i in ids]
