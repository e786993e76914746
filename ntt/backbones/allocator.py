"""glibc malloc settings that stop the page-fault churn of the SAM2 decoder loop on Linux CPUs.

Every decoder call allocates and frees tensors of tens to hundreds of MB. glibc serves blocks above its
mmap threshold (at most 32 MB) with a fresh ``mmap`` and gives them back with ``munmap`` on free, and it
trims the top of the heap once more than 128 KB is free there; so every decoder call faulted its
temporaries in again, page by page (~44,000 minor faults per prompt, about as much kernel time as compute
time on our 2-core CPU). :func:`tune_malloc` makes glibc serve big blocks from the heap (``M_MMAP_MAX = 0``)
and keep freed memory for reuse (``M_TRIM_THRESHOLD`` = 2 GiB - 1), so after the first call the decoder
reuses memory that is already mapped: no page faults and no kernel time (benchmarks/README.md).

The cost: freed memory below the 2 GiB trim threshold is kept by the process instead of being returned to
the system, so the resident size stays near the peak of the run. The numbers are unaffected (allocation
never changes what is computed). Equivalent environment variables, for a process started by hand:
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``. ``NTT_MALLOC_TUNING=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["tune_malloc"]

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest value it accepts

_state: dict[str, bool] = {}


def tune_malloc(enabled: bool | None = None) -> bool:
    """Apply the settings once per process (later calls return the first result).

    Args:
        enabled: False = do nothing; None = on unless the environment sets ``NTT_MALLOC_TUNING=0``.

    Returns:
        True when glibc accepted both settings; False when disabled, not on Linux/glibc, or refused.
    """
    if enabled is None:
        enabled = os.environ.get("NTT_MALLOC_TUNING", "1").strip().lower() not in ("0", "false", "no", "off")
    if not enabled:
        return False
    if "applied" in _state:
        return _state["applied"]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            mallopt.restype = ctypes.c_int
            ok = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        except (OSError, AttributeError) as exc:  # musl or another libc without mallopt
            log.debug("malloc tuning not available: %s", exc)
    _state["applied"] = ok
    log.debug("malloc tuning (M_MMAP_MAX=0, M_TRIM_THRESHOLD=%d): %s", TRIM_THRESHOLD, ok)
    return ok
