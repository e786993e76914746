"""The N-bank study ratio: one `ntt study` of many memory banks against one run (RANDOM weights: timings only).

`ntt study` shares each image's memory-independent work (DINOv2 features, SAM2 encoding and prompt decoding,
the IoU filter, masks and pooled embeddings) among all the banks of a shots x seeds study; each bank only adds
its classification, NMS, soft merging, encoding and evaluation. This measures what that buys: with the memory
stages of every job done once beforehand, each round deletes the test outputs of every run directory and runs
the single job (`python -m ntt run`), then the whole study (`python -m ntt study`), in fresh processes,
interleaved. Per command it records the wall time, the test stage's time (single run: its "stage test done"
log line; study: from the "study pass" log line to the last bank's "stage test done") and the CPU that other
processes used meanwhile (`/proc/stat`); results go to ``benchmarks/study-ratio-<date>-<device>.json``.

Usage::

    python -m ntt.tools.study_ratio                       # 6 shot counts x 10 seeds, 12 images, tiny models (~4 min)
    python -m ntt.tools.study_ratio --quick               # 2 x 2 banks, 2 images (seconds; the test uses it)
    python -m ntt.tools.study_ratio --models paper --device cuda --grid 32   # SAM2 Hiera-L + DINOv2 ViT-L/14
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ntt.tools.machine import CONTENTION_CORES, command_line, device_slug, hardware_info, machine_busy_s
from ntt.utils.files import write_json_atomic

log = logging.getLogger(__name__)

WARNING = (
    "RANDOM WEIGHTS: timings only, no accuracy. With random weights NMS keeps ~1 detection per image and bank, "
    "so the per-bank soft merging and encoding are cheaper than with real weights."
)
TEST_OUTPUTS = ("predictions", "predictions.json", "metrics.json", "stage_test.json")
_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")
_TEST_DONE = re.compile(r"stage test done in ([0-9.]+) s")


def _stamp(line: str) -> float | None:
    m = _STAMP.match(line)
    if not m:
        return None
    return dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def single_test_seconds(log_text: str) -> float | None:
    """The single run's test stage time, from its "stage test done in X s" line (None if absent)."""
    m = _TEST_DONE.search(log_text)
    return float(m.group(1)) if m else None


def study_pass_seconds(log_text: str) -> float | None:
    """The study's test pass: from its first "study pass" line to the last "stage test done" line."""
    start = end = None
    for line in log_text.splitlines():
        if start is None and "study pass " in line:
            start = _stamp(line)
        elif "stage test done in" in line:
            end = _stamp(line) or end
    return None if start is None or end is None else round(end - start, 3)


def clean_test_outputs(output_dir: Path) -> int:
    """Delete the test stage's outputs of every run directory under `output_dir` (memory stages kept)."""
    n = 0
    for stage_file in output_dir.rglob("stage_fill_memory.json"):
        for name in TEST_OUTPUTS:
            path = stage_file.parent / name
            if path.is_dir():
                shutil.rmtree(path)
                n += 1
            elif path.exists():
                path.unlink()
                n += 1
    return n


def timed(cmd: list[str], env: dict[str, str], log_file: Path) -> dict[str, Any]:
    """Run `cmd` to completion (output to `log_file`); wall time, its CPU time and the others' load."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, load0, t0 = machine_busy_s(), os.getloadavg()[0], time.perf_counter()
    with open(log_file, "w") as out:
        rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - t0
    busy1, r1 = machine_busy_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    other = None if busy0 is None or busy1 is None else round(max(0.0, busy1 - busy0 - cpu) / wall, 2)
    if rc != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed (exit {rc}); see {log_file}")
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 2),
        "other_load_cores": other,
        "load1_before": round(load0, 2),
        "load1_after": round(os.getloadavg()[0], 2),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ntt.tools.study_ratio", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 shots x 2 seeds, 2 images, 1 round (seconds)")
    p.add_argument("--shots", default="1,2,3,5,10,30", help="shot counts of the study (default: the paper's)")
    p.add_argument("--seeds", type=int, default=10, help="seeds per shot count (default 10)")
    p.add_argument("--images", type=int, default=12, help="test images (default 12)")
    p.add_argument("--dataset-images", type=int, default=120, help="images of the synthetic dataset")
    p.add_argument("--grid", type=int, default=8, help="prompt grid points per side (default 8)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved single/study rounds (default 2)")
    p.add_argument("--device", default="cpu", help="the runs' `device` (default cpu)")
    p.add_argument(
        "--models",
        default="tiny",
        choices=sorted(MODELS),
        help="tiny: the smoke run's tiny backbones; paper: SAM2 Hiera-L + DINOv2 ViT-L/14 (random init)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="OVERRIDE", help="extra Hydra override for every job"
    )
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    p.add_argument("--out", default="benchmarks", help="folder of the result json (default: benchmarks/)")
    args = p.parse_args(argv)
    if args.quick:
        args.shots, args.seeds, args.images, args.dataset_images, args.rounds = "1,2", 2, 2, 12, 1
    return args


SEEDS = [42, 13, 27, 36, 88, 33, 69, 55, 77, 99]
# `debug=smoke` first (its variant, shots and small-run settings), then the backbones
MODELS = {
    "tiny": [],
    "paper": [
        "backbone/sam2=sam2_hiera_l",
        "backbone/dinov2=vitl14",
        "backbone.sam2.random_init=true",
        "backbone.dinov2.random_init=true",
    ],
}


def main(argv: list[str] | None = None) -> Path:
    """Measure the study ratio and write the result json; returns its path."""
    from ntt.utils.console import setup_logging

    setup_logging()
    args = parse_args(argv)
    shots = [int(s) for s in args.shots.split(",")]
    seeds = (SEEDS + list(range(100, 100 + args.seeds)))[: args.seeds]
    common = [
        "dataset=synthetic",
        f"dataset.synthetic.num_images={args.dataset_images}",
        "debug=smoke",
        *MODELS[args.models],
        f"device={args.device}",
        f"proposer.points_per_side={args.grid}",
        f"proposer.points_batch_size={args.grid * args.grid}",
        "proposer.iou_thr=0",  # random weights: keep the proposals, so the per-bank work is not empty
        f"dataset.max_test_images={args.images}",
        *args.set,
    ]
    single = [sys.executable, "-m", "ntt", "run", *common, f"shots={shots[-1]}", f"seed={seeds[0]}"]
    study = [
        sys.executable,
        "-m",
        "ntt",
        "study",
        *common,
        "shots=" + ",".join(map(str, shots)),
        "seed=" + ",".join(map(str, seeds)),
    ]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ntt-bench-study-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NTT_OUTPUT=str(work / "outputs"), HYDRA_FULL_ERROR="1")
    log.warning(WARNING)
    started = dt.datetime.now(dt.timezone.utc)
    hardware = hardware_info(torch.device(args.device))
    log.info("memory stages of every job (one single run, then the study; %d banks)", len(shots) * len(seeds))
    setup = {
        "single": timed(single, env, work / "setup_single.log"),
        "study": timed(study, env, work / "setup_study.log"),
    }
    rounds = []
    for r in range(args.rounds):
        rec: dict[str, Any] = {"round": r}
        for name, cmd in (("single", single), ("study", study)):
            clean_test_outputs(work / "outputs")
            log.info("round %d/%d: %s", r + 1, args.rounds, name)
            logf = work / f"round{r}_{name}.log"
            rec[name] = timed(cmd, env, logf)
            text = logf.read_text(errors="replace")
            rec[name]["test_s"] = single_test_seconds(text) if name == "single" else study_pass_seconds(text)
        rounds.append(rec)

    def med(name: str, key: str) -> float | None:
        vals = [x[name][key] for x in rounds if x[name].get(key) is not None]
        return statistics.median(vals) if vals else None

    ratio = {
        key: (
            round(med("study", key) / med("single", key), 3)
            if med("single", key) and med("study", key)
            else None
        )
        for key in ("test_s", "wall_s")
    }
    result = {
        "WARNING": WARNING,
        "timestamp_utc": started.isoformat(timespec="seconds"),
        "command": command_line("ntt.tools.study_ratio", argv),
        "hardware": hardware,
        "settings": {
            "banks": len(shots) * len(seeds),
            "shots": shots,
            "seeds": seeds,
            "test_images": args.images,
            "overrides": common,
            "single_job": f"shots={shots[-1]} seed={seeds[0]}",
        },
        "setup_memory_stages": setup,
        "rounds": rounds,
        "ratio_study_over_single": {"test_stage": ratio["test_s"], "whole_command": ratio["wall_s"]},
        "contention_warnings": [
            f"round {x['round']} {n}: other processes used {x[n]['other_load_cores']} cores"
            for x in rounds
            for n in ("single", "study")
            if (x[n]["other_load_cores"] or 0) > CONTENTION_CORES
        ],
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    out = out_dir / f"study-ratio-{started:%Y%m%d}-{device_slug(torch.device(args.device))}{suffix}.json"
    write_json_atomic(out, result, indent=1)
    log.info(
        "%d banks vs one run: test stage %sx, whole command %sx -> %s",
        len(shots) * len(seeds),
        ratio["test_s"],
        ratio["wall_s"],
        out,
    )
    if result["contention_warnings"]:
        log.warning("measured under load: %s", "; ".join(result["contention_warnings"]))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
