"""How exactly a test can match a fixture: bit for bit on the CPU kernels it was made with, else within rounding.

The FSOD-VFM fixtures (tests/fixtures/fsod_vfm*) were made with the AVX-512 kernels (an Intel Xeon): float sums
there (GEMMs, interpolation) run in the same order as in ntt on those kernels, so the tests demand equal bits.
On AVX2 kernels (an AVX2-only CPU, or `ATEN_CPU_CAPABILITY=avx2`) the same sums are blocked differently and
their last bits differ; thresholded or ranked results then agree except where a value is a near-tie. Each test
states its tolerance for that case.
"""

from __future__ import annotations

import numpy as np
import torch

FIXTURE_KERNELS = "AVX512"


def on_fixture_kernels() -> bool:
    """Whether this process runs the CPU kernels the FSOD-VFM fixtures were made with (then: equal bits)."""
    return torch.backends.cpu.get_cpu_capability() == FIXTURE_KERNELS


def assert_fixture_close(got, want, *, rtol: float, atol: float, what: str = "") -> None:
    """``got == want`` bit for bit on the fixture's kernels, else within ``rtol`` / ``atol`` (float rounding)."""
    got_t = torch.as_tensor(np.asarray(got)) if not isinstance(got, torch.Tensor) else got
    want_t = torch.as_tensor(np.asarray(want)) if not isinstance(want, torch.Tensor) else want
    if on_fixture_kernels():
        assert got_t.dtype == want_t.dtype and torch.equal(got_t, want_t), f"{what}: not bit for bit"
    else:
        err = (got_t.double() - want_t.double()).abs().max().item() if got_t.numel() else 0.0
        assert torch.allclose(got_t.double(), want_t.double(), rtol=rtol, atol=atol), (
            f"{what}: max |diff| {err}"
        )


def on_fixture_bf16_kernels() -> bool:
    """Whether this process runs the bfloat16 kernels the FSOD-VFM end-to-end fixture was made with (AVX-512
    with AMX tiles: oneDNN's bfloat16 GEMMs and convolutions use them; without them bfloat16 products are
    summed in another order, and a bfloat16 rounding moves by a whole bfloat16 step, 2**-8 relative)."""
    import os

    isa = os.environ.get("DNNL_MAX_CPU_ISA", "").upper()
    limited = isa not in (
        "",
        "ALL",
        "AVX512_CORE_AMX",
        "AVX512_CORE_AMX_FP16",
        "AVX10_1_512_AMX",
        "AVX10_1_512_AMX_FP16",
    )
    return on_fixture_kernels() and torch.cpu._is_amx_tile_supported() and not limited
