"""SAM2 and DINOv2 with RANDOM weights, built from ``conf/backbone/{sam2,dinov2}/<option>.yaml``.

The measurements time the real kernels on the real shapes without any checkpoint: random weights run the
same code as trained ones, so their timings transfer; their outputs mean nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def option_kwargs(group: str, option: str) -> dict[str, Any]:
    """Builder kwargs of ``conf/backbone/<group>/<option>.yaml`` with random init forced (no checkpoint).

    Args:
        group: ``sam2`` or ``dinov2``.
        option: the yaml's stem, e.g. ``sam2_hiera_l``, ``vitl14``, ``tiny_random``.
    """
    from omegaconf import OmegaConf

    from ntt.utils.compose import conf_path

    folder = Path(str(conf_path())) / "backbone" / group
    path = folder / f"{option}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise SystemExit(f"unknown --{group} option {option!r}; known: {', '.join(known) or '(no conf dir)'}")
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    node.pop("_target_", None)
    node.update(checkpoint=None, random_init=True)  # never loads weights (`${paths...}` stays unresolved)
    return node


def build_models(sam2_option: str, dinov2_option: str, device: torch.device):
    """Random-init SAM2 and DINOv2 from their config options.

    Returns:
        ``(sam2, dinov2, sam2_kwargs, dinov2_kwargs)``: the backbones and the builder kwargs they came from.
    """
    from ntt.backbones.dinov2 import build_dinov2
    from ntt.backbones.sam2 import build_sam2

    sam2_kw = option_kwargs("sam2", sam2_option)
    dino_kw = option_kwargs("dinov2", dinov2_option)
    sam2 = build_sam2(**sam2_kw, device=device)
    dino = build_dinov2(**dino_kw, device=device)
    return sam2, dino, sam2_kw, dino_kw
