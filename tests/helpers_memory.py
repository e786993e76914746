"""A fake stride-14 encoder and a two-image toy reference dataset for the memory tests (no model weights)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class FakeEncoder(torch.nn.Module):
    """A fixed random stride-14 conv: [B, 3, S, S] -> [B, S/14, S/14, D]."""

    def __init__(self, img_size=56, dim=8):
        super().__init__()
        self.img_size, self.patch_size, self.embed_dim = img_size, 14, dim
        self.grid_size = img_size // 14
        self.conv = torch.nn.Conv2d(3, dim, 14, 14)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.05)
            self.conv.bias.copy_(torch.randn(dim, generator=g))
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.conv(x).permute(0, 2, 3, 1)


def toy_dataset(tmp_path):
    """Two random images in ``tmp_path`` and five rectangle annotations of classes 4 and 2 (COCO dict)."""
    rng = np.random.default_rng(0)
    images = []
    for i, (w, h) in enumerate([(80, 60), (70, 90)]):
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})

    def rect(ann_id, cat, img, x, y, w, h):
        poly = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        return {"id": ann_id, "image_id": img, "category_id": cat, "bbox": [x, y, w, h], "segmentation": poly}

    anns = [
        rect(1, 4, 0, 10, 10, 30, 20),
        rect(2, 4, 1, 15, 20, 40, 50),
        rect(3, 2, 0, 40.5, 5.5, 30, 40),
        rect(4, 2, 1, 5, 5, 20, 20),
        rect(5, 2, 1, 30, 60, 2.0, 25),  # 2 px wide, centred in its crop: missed by a 3x3 "nearest" grid
    ]
    cats = [{"id": 4, "name": "four"}, {"id": 2, "name": "two"}]
    return {"images": images, "annotations": anns, "categories": cats}


def fixture_reference_jobs(fx, image, mask_of):
    """The ``ntt.memory.ReferenceJob``s of an FSOD-VFM fixture's reference boxes (``ref_classes``,
    ``ref_boxes_xywh``), in the memory stage's encoding order (class ascending, then slot), all on ``image``.

    Args:
        fx: the fixture's arrays.
        image: the reference image, ``[3, H, W]`` float32.
        mask_of: reference index -> its ``[H, W]`` mask (ignored by ``reference_masks=sam2_box``).
    """
    from ntt.memory import ReferenceJob

    classes = fx["ref_classes"].tolist()
    slots = [classes[:i].count(c) for i, c in enumerate(classes)]
    order = sorted(range(len(classes)), key=lambda i: (classes[i], slots[i]))
    return [
        ReferenceJob(
            classes[i],
            slots[i],
            f"ref {i}",
            {"i": i},
            lambda i=i: (image, mask_of(i), fx["ref_boxes_xywh"][i].tolist()),
        )  # fmt: skip
        for i in order
    ]
