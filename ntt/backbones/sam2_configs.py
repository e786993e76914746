"""SAM2 model configs: where a model yaml is found, and the model built from it without sam2's global Hydra.

``import sam2`` initialises a global Hydra at import time, which breaks a later ``@hydra.main`` app in the
same process (:func:`import_sam2` undoes that); the model yaml is read with OmegaConf and its ``model`` node
instantiated with ``hydra.utils.instantiate``. ntt ships a few model yamls of its own (tiny random models for
tests and smoke runs) in ``ntt/backbones/configs``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from torch import nn

NTT_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def import_sam2() -> None:
    """Import the ``sam2`` package without leaving its global Hydra initialised.

    ``sam2/__init__.py`` calls ``initialize_config_module("sam2")`` when no Hydra is initialised (and does
    nothing inside a running ``@hydra.main`` app). Any ``sam2.*`` import runs it. If that import is what
    initialised Hydra, the global state is cleared again so a later ``@hydra.main`` / ``hydra.initialize``
    in this process still works.
    """
    if "sam2" in sys.modules:
        return
    from hydra.core.global_hydra import GlobalHydra

    was_initialized = GlobalHydra.instance().is_initialized()
    import sam2  # noqa: F401

    if not was_initialized and GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()


def _sam2_package_dir() -> Path:
    spec = importlib.util.find_spec("sam2")  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The `sam2` package is not installed (SAM2_BUILD_CUDA=0 pip install --no-build-isolation --no-deps "
            "sam2==1.1.0; see docs/install.md)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_sam2_configs() -> list[str]:
    """The model configs shipped by the installed ``sam2`` package, e.g. ``sam2.1/sam2.1_hiera_l.yaml``."""
    root = _sam2_package_dir() / "configs"
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.glob("*/*.yaml")
        if p.parent.name in ("sam2", "sam2.1") and "training" not in p.parent.name
    )


def resolve_sam2_config(config: str | Path) -> Path:
    """Find a SAM2 model yaml.

    Looked up in this order: an existing file path; a yaml shipped with ntt
    (``ntt/backbones/configs/<config>``); a config of the ``sam2`` package, given as
    ``sam2/sam2_hiera_l.yaml``, ``configs/sam2.1/sam2.1_hiera_t.yaml`` or ``sam2_hiera_l.yaml``.
    """
    config = str(config)
    path = Path(config).expanduser()
    if path.is_file():
        return path
    candidates = [NTT_CONFIG_DIR / config]
    try:
        pkg = _sam2_package_dir()
        rel = config[len("configs/") :] if config.startswith("configs/") else config
        candidates += [pkg / "configs" / rel, pkg / rel]
    except ImportError:
        pkg = None
    for c in candidates:
        if c.is_file():
            return c
    known = [p.name for p in NTT_CONFIG_DIR.glob("*.yaml")] + (packaged_sam2_configs() if pkg else [])
    raise FileNotFoundError(
        f"SAM2 config '{config}' not found (looked for the file {path.resolve()}, in {NTT_CONFIG_DIR} and in the "
        f"sam2 package configs). Known configs: {', '.join(known)}"
    )


def instantiate_sam2(config_path: Path) -> nn.Module:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(config_path)
    if "model" not in cfg:
        raise ValueError(f"SAM2 config {config_path} has no `model` node (not a sam2 model config)")
    OmegaConf.resolve(cfg)
    import_sam2()
    return instantiate(cfg.model, _recursive_=True)


__all__ = [
    "import_sam2",
    "instantiate_sam2",
    "packaged_sam2_configs",
    "resolve_sam2_config",
]
