"""The machine a measurement runs on and the load on it, shared by every tool (bench, fastpaths, study_ratio).

A timing means little without the hardware that made it and the CPU other processes used meanwhile (on a
shared 2-core machine competing load inflates timings several-fold), so every report records both.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

# Cores' worth of CPU used by other processes above which a measurement is reported as contended.
CONTENTION_CORES = 0.25


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (rounded to 0.01), None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def hardware_info(device: torch.device) -> dict[str, Any]:
    """Hostname-free description of the machine and software."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "os": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    info["load_average_1_5_15_at_start"] = load_average()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu_name=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    return info


def device_slug(device: torch.device) -> str:
    """``cpu`` or the GPU name in lower-case dashes (``nvidia-h100-80gb-hbm3``), for output file names."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-") or "gpu"


def machine_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine since boot (all cores; /proc/stat), None if unavailable."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_seconds_and_faults() -> tuple[float, int]:
    """(user + system CPU seconds, minor page faults) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously: a timing must wait for them)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that made a report: the process's own, or ``python -m <module> ARGS`` when a tool's
    ``main(argv)`` was called from Python."""
    if argv is None:
        return shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    return shlex.join(["python", "-m", module, *argv]) + f"   # via {module}.main(argv)"
