"""Shared test fixtures: repository paths, the team's shared folder, skips with reasons."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the body with ``n`` torch threads (then restore the count).

    Comparisons of 1 against 2 processes must hold the threads per process equal: `torchrun` gives each
    process OMP_NUM_THREADS=1, and on some CPUs the BLAS kernels' float results depend on the thread count
    (measured on an Intel Xeon with AVX-512: SAM2 decoder logits moved by 3e-7 and final scores in the last
    bit between 1 and 2 threads of ONE process). That is a property of the kernels, not of the sharding
    these tests check.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    # 2-core CI machines: keep torch from oversubscribing when pytest runs alongside other work. Under
    # pytest-xdist (`make test`: 2 workers) each worker gets cores // workers threads: on a busy machine a
    # 2-thread process loses much of its time in the kernels' thread barriers (measured: 2 single-thread
    # workers used 0.69x the CPU seconds and 0.46x the wall time of one 2-thread process on test_e2e.py +
    # test_resume.py). NTT_TEST_THREADS overrides the count.
    import torch

    threads = max(1, min(2, os.cpu_count() or 1))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = int(os.environ.get("NTT_TEST_THREADS", max(1, threads // workers)))
    torch.set_num_threads(threads)
    # The commands tests start (ntt run, ntt segment, ...) get the same count: some compare their bytes
    # with this process's, and BLAS results may depend on the thread count (see torch_threads).
    os.environ["OMP_NUM_THREADS"] = str(threads)
    yield
