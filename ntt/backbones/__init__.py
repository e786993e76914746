"""Backbones: SAM2 (proposals) and DINOv2 (semantic features), plus the official checkpoint registry.

Importing this package does not import ``sam2`` or ``dinov2`` (``import sam2`` initialises a global Hydra);
they are imported inside the builders.
"""

from ntt.backbones.checkpoints import (
    OFFICIAL_CHECKPOINTS,
    CheckpointError,
    ChecksumMismatchError,
    DownloadError,
    MissingCheckpointError,
    download,
    download_main,
    resolve_checkpoint,
)
from ntt.backbones.dinov2 import DINOv2Encoder, build_dinov2
from ntt.backbones.sam2 import SAM2Backbone, SAM2ImageFeatures, build_sam2

__all__ = [
    "OFFICIAL_CHECKPOINTS",
    "CheckpointError",
    "ChecksumMismatchError",
    "DINOv2Encoder",
    "DownloadError",
    "MissingCheckpointError",
    "SAM2Backbone",
    "SAM2ImageFeatures",
    "build_dinov2",
    "build_sam2",
    "download",
    "download_main",
    "resolve_checkpoint",
]
