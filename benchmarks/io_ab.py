"""Where the test loop's time goes, for several `io` settings, interleaved (RANDOM WEIGHTS: timings only).

Each round runs `python -m ntt run` once per `io` setting (in that order, in a fresh process and a fresh
output folder, so every run segments every image), then reads `predictions/timing_rank0.json`: seconds per
image, per section (ntt/utils/timing.py) and `outside_models_fraction`. One JSON line per run, with the 1-minute
load average before and after. Used for benchmarks/README.md ("Data path").

    python benchmarks/io_ab.py --rounds 3 --out /tmp/io_ab.jsonl -- debug=smoke dataset=fruits_nuts \
        paths.data=/path/to/data dataset.max_test_images=null
    python benchmarks/io_ab.py --settings default --rounds 1 -- dataset=fruits_nuts paths.data=... \
        backbone/sam2=sam2_hiera_l backbone.sam2.random_init=true ...   # paper size (minutes per image)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "w0_sync": ["io.num_workers=0", "io.async_write=false"],
    "w0_async": ["io.num_workers=0", "io.async_write=true"],
    "w1_sync": ["io.num_workers=1", "io.async_write=false"],
    "w1_async": ["io.num_workers=1", "io.async_write=true"],
    "default": [],
}


def run_once(name: str, overrides: list[str], out_root: Path) -> dict:
    out = out_root / name
    cmd = [
        sys.executable,
        "-m",
        "ntt",
        "run",
        "device=cpu",
        f"paths.output_dir={out}",
        *overrides,
        *SETTINGS[name],
    ]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    timing = json.loads(next(out.rglob("predictions/timing_rank0.json")).read_text())
    return {
        "setting": name,
        "process_wall_s": round(wall, 2),
        "load1_before": round(load0, 2),
        "load1_after": round(os.getloadavg()[0], 2),
        **timing,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["w0_sync", "w0_async", "w1_sync", "w1_async"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, required=True, help="JSON lines file (appended)")
    p.add_argument("overrides", nargs="*", help="`ntt run` overrides after --")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ntt_io_ab_") as tmp:
        for r in range(args.rounds):
            for name in args.settings:
                row = run_once(name, args.overrides, Path(tmp) / f"r{r}")
                row.update(round=r, overrides=args.overrides, date=time.strftime("%Y-%m-%d"))
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(
                    json.dumps({k: row[k] for k in ("setting", "round", "seconds_per_image", "load1_before")})
                )


if __name__ == "__main__":
    main()
