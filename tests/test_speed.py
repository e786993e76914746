"""The a-priori time estimate logged before per-image loops (ntt.utils.speed)."""

from __future__ import annotations

import pytest

from ntt.utils.speed import estimate_seconds_per_image, expected_time_message, format_seconds


@pytest.mark.parametrize(
    ("seconds", "text"), [(None, "unknown"), (12.4, "12 s"), (150, "2.5 min"), (7200, "2.0 h")]
)
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_cpu_with_the_paper_grid_points_to_the_cpu_preset():
    msg = expected_time_message(
        sam2="sam2_hiera_l",
        dinov2="dinov2_vitl14",
        points_per_side=32,
        device="cpu",
        n_images=10,
        cpu_hint="X=1",
    )
    est = estimate_seconds_per_image(
        sam2="sam2_hiera_l", dinov2="dinov2_vitl14", points_per_side=32, device="cpu"
    )
    assert msg.startswith("10 image(s), 32x32 prompt grid on cpu: expect about ")
    assert format_seconds(est) in msg and format_seconds(10 * est) in msg
    assert "X=1 (12x12 grid)" in msg


def test_small_grid_or_gpu_gives_no_cpu_hint():
    small = expected_time_message(
        sam2="sam2.1_hiera_t",
        dinov2="dinov2_vits14",
        points_per_side=12,
        device="cpu",
        n_images=1,
        cpu_hint="X=1",
    )
    assert "expect about" in small and "X=1" not in small
    gpu = expected_time_message(
        sam2="sam2_hiera_l",
        dinov2="dinov2_vitl14",
        points_per_side=32,
        device="cuda",
        n_images=1,
        cpu_hint="X=1",
    )
    assert "logged after the first one" in gpu and "X=1" not in gpu
