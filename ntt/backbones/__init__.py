"""Backbones: SAM2 (proposals) and DINOv2 (semantic features), plus the official checkpoint registry.

The downloader and ``ntt download`` are :mod:`ntt.backbones.download` (not re-exported here: its function
``download`` would shadow the module's name).

Importing this package does not import ``sam2`` or ``dinov2`` (``import sam2`` initialises a global Hydra);
they are imported inside the builders.
"""

from ntt.backbones.checkpoints import (
    OFFICIAL_CHECKPOINTS,
    CheckpointError,
    MissingCheckpointError,
    resolve_checkpoint,
)
from ntt.backbones.dinov2 import DINOv2Encoder, build_dinov2
from ntt.backbones.sam2 import SAM2Backbone, SAM2ImageFeatures, build_sam2


def build_backbone(node, *, device: str):
    """A backbone from its config node (`backbone.sam2` / `backbone.dinov2`), weights loaded strictly.

    The one way every wing builds a model: `hydra.utils.instantiate` of the node's `_target_` builder
    (`build_sam2`, `build_dinov2`) on `device`. Hydra flattens a builder's own error (e.g. the
    missing-checkpoint message with the download command) into a one-line repr; the original is raised.

    Args:
        node: the config node, with `_target_` and the builder's keyword arguments.
        device: `cpu`, `cuda`, `cuda:1`, ... (resolved: see `ntt.utils.dist.resolve_device`).
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, device=device, _convert_="all")
    except InstantiationException as exc:
        if exc.__cause__ is not None:
            raise exc.__cause__ from None
        raise


__all__ = [
    "OFFICIAL_CHECKPOINTS",
    "CheckpointError",
    "DINOv2Encoder",
    "MissingCheckpointError",
    "SAM2Backbone",
    "SAM2ImageFeatures",
    "build_backbone",
    "build_dinov2",
    "build_sam2",
    "resolve_checkpoint",
]
