"""ntt: training-free, reference-based instance segmentation (No Time to Train!)."""

from ntt.utils.identity import register_resolver as _register_resolver

_register_resolver()  # `${ntt.config_id:}` in conf/main.yaml's run_name (light: omegaconf only)

__version__ = "0.1.0"

__all__ = ["Segmenter", "Instances", "MemoryBank", "__version__"]

# The practitioner API and the bank import torch: load them on first use so `import ntt` stays light.
_LAZY = {
    "Segmenter": "ntt.app.segmenter",
    "Instances": "ntt.app.instances",
    "MemoryBank": "ntt.bank",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ntt' has no attribute {name!r}")
