"""ntt: training-free, reference-based instance segmentation (No Time to Train!)."""

__version__ = "0.1.0"
