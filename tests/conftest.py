"""Shared test fixtures: repository paths, the team's shared folder, skips with reasons."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NTT_SHARED", REPO.parent / "shared")).resolve()
PARITY = SHARED / "parity"
DATA = SHARED / "data"


def require_path(path: Path, what: str) -> Path:
    """Skip the calling test, with a reason, when a shared fixture folder is absent."""
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set NTT_SHARED to the team's shared folder)")
    return path


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return require_path(PARITY, "parity fixture")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require_path(DATA, "shared datasets")


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    # 2-core CI machines: keep torch from oversubscribing when pytest runs alongside other work.
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
