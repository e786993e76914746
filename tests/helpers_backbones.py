"""Shared helpers of the backbone tests (paths, tiny models, synthetic images)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
PARITY = SHARED / "parity"
PARITY_MODELS = PARITY / "models"
CONF_DIR = REPO_ROOT / "conf"
TEST_CONF_DIR = REPO_ROOT / "tests" / "configs"
TINY_SAM2_CONFIG = "sam2_tiny.yaml"  # shipped in ntt/backbones/configs
TINY_DINO = dict(arch="custom", embed_dim=64, depth=2, num_heads=2)


@functools.cache
def tiny_sam2(init_seed: int = 0):
    """The tiny random SAM2 (shared across tests; eval mode, no grad: do not modify it)."""
    from ntt.backbones.sam2 import build_sam2

    return build_sam2(
        name="sam2_tiny_random",
        config=TINY_SAM2_CONFIG,
        checkpoint=None,
        random_init=True,
        init_seed=init_seed,
    )


@functools.cache
def tiny_dinov2(init_seed: int = 0):
    """A tiny random DINOv2 (D=64, 2 blocks)."""
    from ntt.backbones.dinov2 import build_dinov2

    return build_dinov2(
        name="dinov2_tiny_random", checkpoint=None, random_init=True, init_seed=init_seed, **TINY_DINO
    )


def random_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """[batch, 3, size, size] in [0, 1], smooth enough to give non-trivial features."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 16, 16, generator=g)
    return torch.nn.functional.interpolate(
        low, size=(size, size), mode="bilinear", align_corners=False
    ).clamp(0, 1)


def fsod_vfm_parity_sam2(parity_dir: Path):
    """The parity fixture's tiny SAM2 as FSOD-VFM's predictor runs it: ``no_mem_embed`` added, PyTorch's
    default attention kernels (the FSOD-VFM fixtures were made so)."""
    from ntt.backbones.sam2 import build_sam2

    models = parity_dir / "models"
    return build_sam2(
        name="sam2_parity_tiny",
        config=str(models / "sam2_tiny.yaml"),
        checkpoint=str(models / "sam2_tiny.pt"),
        add_no_mem_embed=True,
        exact_attention=False,
    )
