"""A rough a-priori time per image, logged before a long loop so a CPU user knows what to expect.

Basis: ``benchmarks/README.md`` (CPU, 2026-11-24, 2 cores / 2 torch threads, random weights, timings
only): SAM2.1 Hiera-T image encoder 1.97 s, DINOv2 ViT-S/14 forward 0.89 s, SAM2 prompt decoder 86 ms per
point prompt, 0.48x that since the 2026-11-29 decoder speedups (~41 ms). The decoder is the same for every
SAM2 size, so on a CPU the prompt grid dominates (a 32x32 grid: ~42 s of decoding per image). Check against a
whole-image measurement (2026-11-29, quiet 2 cores): SAM2 Hiera-L + DINOv2 ViT-L/14 at 32x32 took 55 s per
image; this estimate gives ~71 s for that pair, on the safe side. Encoder costs of other sizes are scaled by their approximate compute
relative to the measured ones; other thread counts by ``(2 / threads) ** 0.7`` (sub-linear: the measured
machine used 2 cores). It is an order of magnitude, not a measurement: the measured time of the first image
is logged after it. No GPU figure is known here (none was measured), so on a GPU the estimate is None.
"""

from __future__ import annotations

__all__ = ["estimate_seconds_per_image", "expected_time_message", "format_seconds"]

# 86 ms per prompt measured on 2026-11-24 with the official decoder path; the 2026-11-29 A/B
# (benchmarks/README.md: malloc tuning + cached decoder) cut decoder CPU time per prompt to 0.48x.
DECODER_S_PER_PROMPT = 0.086 * 0.48
POSTPROCESS_S_PER_PROMPT = 0.003  # pooling + NMS + soft merging, ~0.7 s per 256 proposals at 600x800
SAM2_ENCODER_S = 1.97
DINOV2_S = 0.89
REFERENCE_THREADS = 2
# approximate compute relative to the measured models (Hiera-T, ViT-S/14)
SAM2_SCALE = {
    "tiny_random": 0.1,
    "hiera_t": 1.0,
    "hiera_s": 1.3,
    "hiera_b+": 2.5,
    "hiera_bplus": 2.5,
    "hiera_l": 6.5,
}
DINOV2_SCALE = {"tiny_random": 0.05, "vits14": 1.0, "vitb14": 4.0, "vitl14": 14.0, "vitg14": 52.0}


def _scale(name: str, table: dict[str, float]) -> float:
    for key, value in table.items():
        if key in name:
            return value
    return max(table.values())  # unknown model: assume the largest


def estimate_seconds_per_image(
    *, sam2: str, dinov2: str, points_per_side: int, device: str, threads: int | None = None
) -> float | None:
    """Rough seconds per image for the whole test path; None on a GPU (no measured basis).

    Args:
        sam2: SAM2 config name (``sam2.1_hiera_t``, ``sam2_hiera_l``, ``sam2_tiny_random``...).
        dinov2: DINOv2 config name (``dinov2_vits14``...).
        points_per_side: prompt grid side (``P * P`` prompts).
        device: ``cpu``, ``cuda``...
        threads: torch CPU threads (default: ``torch.get_num_threads()``).
    """
    if not str(device).startswith("cpu"):
        return None
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    prompts = int(points_per_side) ** 2
    seconds = (
        SAM2_ENCODER_S * _scale(sam2, SAM2_SCALE)
        + DINOV2_S * _scale(dinov2, DINOV2_SCALE)
        + prompts * (DECODER_S_PER_PROMPT + POSTPROCESS_S_PER_PROMPT)
    )
    return seconds * (REFERENCE_THREADS / max(1, int(threads))) ** 0.7


def format_seconds(seconds: float | None) -> str:
    """``"45 s"``, ``"3.2 min"``, ``"1.5 h"``; ``"unknown"`` for None.

    Args:
        seconds: a duration.
    """
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def expected_time_message(
    *, sam2: str, dinov2: str, points_per_side: int, device: str, n_images: int, cpu_hint: str
) -> str:
    """The line logged before a per-image loop: the expected time, and on a CPU with a large grid a pointer
    to the CPU preset.

    Args:
        sam2: SAM2 config name.
        dinov2: DINOv2 config name.
        points_per_side: prompt grid side.
        device: ``cpu``, ``cuda``...
        n_images: images in the loop.
        cpu_hint: how to switch to the CPU preset in the caller's interface (e.g. ``proposer=cpu_fast``).
    """
    est = estimate_seconds_per_image(sam2=sam2, dinov2=dinov2, points_per_side=points_per_side, device=device)
    grid = f"{points_per_side}x{points_per_side} prompt grid on {device}"
    if est is None:
        return f"{n_images} image(s), {grid}: the time per image is logged after the first one"
    msg = (
        f"{n_images} image(s), {grid}: expect about {format_seconds(est)} per image, "
        f"{format_seconds(est * n_images)} in all (rough estimate; the measured time follows the first image)"
    )
    if str(device).startswith("cpu") and points_per_side > 16:
        fast = estimate_seconds_per_image(sam2=sam2, dinov2=dinov2, points_per_side=12, device=device)
        msg += f". For a quick look on a CPU, {cpu_hint} (12x12 grid) takes about {format_seconds(fast)} per image"
    return msg
