"""The install is what the README promises: CPU torch without CUDA wheels, the pinned stack importable."""

from __future__ import annotations

import importlib.metadata as md
import re

import pytest
import torch


def _installed() -> dict[str, str]:
    return {(d.metadata["Name"] or "").lower(): d.version for d in md.distributions()}


def test_cpu_install_pulled_no_nvidia_or_triton_packages():
    if torch.cuda.is_available() or "+cpu" not in torch.__version__:
        pytest.skip(f"not a CPU torch build ({torch.__version__}): CUDA packages are expected there")
    bad = sorted(n for n in _installed() if re.match(r"(nvidia-|triton)", n))
    assert not bad, f"a CPU install pulled CUDA packages: {bad} (some dependency asked for an unpinned torch)"


def test_no_torchvision_dependency():
    requires = md.requires("ntt") or []
    assert not [r for r in requires if r.lower().startswith("torchvision")]


def test_pinned_stack_versions():
    have = _installed()
    assert have["sam2"] == "1.1.0"
    assert have["dinov2"] == "0.0.1.dev2"
    assert have["hydra-core"].startswith("1.3.")
    assert have["omegaconf"].startswith("2.3.")
    for name in ("pycocotools", "accelerate", "wandb", "pandas"):
        assert name in have, f"{name} is not installed"


def test_importing_ntt_does_not_import_sam2():
    """`import sam2` initialises a global Hydra that breaks the app: ntt must import it lazily."""
    import subprocess
    import sys

    code = (
        "import sys, ntt, ntt.runner.lifecycle, ntt.runner.main, ntt.backbones.sam2, ntt.backbones.dinov2; "
        "print('sam2' in sys.modules, 'dinov2' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
