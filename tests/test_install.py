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


def _lock() -> dict[str, str]:
    """`constraints.txt`: normalised distribution name -> pinned version."""
    from conftest import REPO

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _required(dist: str, extras: tuple[str, ...] = (), seen: set[str] | None = None) -> set[str]:
    """Every distribution `dist` (with `extras`) needs on this machine, recursively (normalised names)."""
    from packaging.requirements import Requirement

    seen = set() if seen is None else seen
    for text in md.requires(dist) or []:
        req = Requirement(text)
        envs = [{"extra": e} for e in extras] or [{"extra": ""}]
        if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name not in seen:
            seen.add(name)
            try:
                _required(req.name, tuple(req.extras), seen)
            except md.PackageNotFoundError:
                pass
    return seen


def test_the_installed_versions_are_the_locked_ones():
    """A fresh `make setup` installs the versions the suite passed with (constraints.txt): every dependency of
    ntt[dev] is pinned there and installed at that version. Fails after a manual upgrade, or when a new
    dependency is missing from the file (`make lock` refreshes it)."""
    lock = _lock()
    have = {re.sub(r"[-_.]+", "-", k): v for k, v in _installed().items()}
    needed = _required("ntt", ("dev",)) - {"torch", "sam2", "dinov2"}  # pinned by the Makefile
    assert needed, "ntt's requirements were not found (is ntt installed?)"
    missing = sorted(n for n in needed if n not in lock)
    assert not missing, f"dependencies not pinned in constraints.txt: {missing} (run `make lock`)"
    wrong = sorted(f"{n} {have.get(n)} (locked {lock[n]})" for n in needed if have.get(n) != lock[n])
    assert not wrong, f"installed versions differ from constraints.txt: {wrong} (run `make setup`)"
