"""A/B of the per-image test path between two ntt source trees (RANDOM WEIGHTS: timings only, no accuracy).

Runs ``ntt.inference.infer_image`` and ``ntt.proposals.generate_proposals`` of each tree in its own fresh
process, alternating A B A B ..., and prints one JSON line per run. Used for benchmarks/README.md
("Parity-path speedups"): A = a checkout of the code before the speedups (``git worktree add /tmp/ntt-base
<commit>``), B = this checkout.

    python benchmarks/ab_per_image.py --a /tmp/ntt-base --b . --rounds 2 --grid 8 --batch 64 \
        --sam2 sam2_hiera_l --dinov2 vitl14 --out benchmarks/ab-<date>.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import importlib, json, os, resource, sys, time
import torch
sys.path.insert(0, os.environ["AB_SRC"])
def _build_models():  # where a tree keeps it: today's, after the tools wing (ntt/tools/bench.py), before it
    for name in ("ntt.tools.random_models", "ntt.tools.bench", "ntt.bench"):
        try:
            return importlib.import_module(name).build_models
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"{os.environ['AB_SRC']}: no build_models in ntt.tools.random_models / ntt.tools.bench / ntt.bench")
build_models = _build_models()
from ntt.inference import InferenceParams, infer_image
from ntt.proposals import generate_proposals

grid, batch, sam2_opt, dino_opt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]

def usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt

def measure(fn):
    load = os.getloadavg()[0]
    u0, s0, f0 = usage(); t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0; u1, s1, f1 = usage()
    return out, dict(wall_s=round(wall, 3), user_s=round(u1 - u0, 2), sys_s=round(s1 - s0, 2),
                     minflt=f1 - f0, load1_before=round(load, 2), load1_after=round(os.getloadavg()[0], 2))

with torch.inference_mode():
    sam2, dino, _, _ = build_models(sam2_opt, dino_opt, torch.device("cpu"))
    if os.environ.get("AB_CACHED_DECODER") == "0":  # the official per-prompt decoder path, one call per batch
        sam2.cached_decoder, sam2.decoder_chunk = False, batch
    g = torch.Generator().manual_seed(0)
    low = torch.rand(1, 3, 16, 16, generator=g)
    image = torch.nn.functional.interpolate(low, size=(1024, 1024), mode="bilinear")[0].clamp(0, 1)
    protos = torch.nn.functional.normalize(torch.randn(3, int(dino.embed_dim), generator=g), dim=1)
    params = InferenceParams(points_per_side=grid, points_batch_size=batch)
    warm = InferenceParams(points_per_side=2, points_batch_size=batch)
    infer_image(image, 600, 800, sam2=sam2, dino=dino, prototypes=protos, params=warm)  # warm-up
    (det, _), whole = measure(lambda: infer_image(image, 600, 800, sam2=sam2, dino=dino, prototypes=protos, params=params))
    if os.environ.get("AB_WHOLE_ONLY") == "1":
        print("AB-RESULT " + json.dumps(dict(infer_image=whole, prompts=grid * grid)))
        raise SystemExit(0)
    feats, enc = measure(lambda: sam2.encode_image(image[None]))
    props, dec = measure(lambda: generate_proposals(sam2, feats, points_per_side=grid, points_batch_size=batch, iou_thr=0.0))
    print("AB-RESULT " + json.dumps(dict(infer_image=whole, sam2_encoder=enc, proposals=dec, prompts=grid * grid,
        logits_sum=float(props.logits.double().sum()), ious_sum=float(props.grid_ious_all.double().sum()))))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="source tree A (baseline)")
    ap.add_argument("--b", default=".", help="source tree B (default: this checkout)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sam2", default="sam2_hiera_l")
    ap.add_argument("--dinov2", default="vitl14")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=SRC[:KEY=VAL,...]",
        help="an extra tree/environment to run after A and B in each round, e.g. 'C=.:NTT_MALLOC_TUNING=0' "
        "(allocator off) or 'D=.:AB_CACHED_DECODER=0' (official decoder path, one call per batch)",
    )
    ap.add_argument(
        "--whole-only",
        action="store_true",
        help="time only infer_image (skip the separate encoder/proposals runs)",
    )
    args = ap.parse_args()
    runs: list[tuple[str, str, dict[str, str]]] = [("A", args.a, {}), ("B", args.b, {})]
    for spec in args.variant:
        label, _, rest = spec.partition("=")
        src, _, envs = rest.partition(":")
        extra = dict(kv.split("=", 1) for kv in envs.split(",") if kv)
        runs.append((label, src or ".", extra))
    for r in range(args.rounds):
        for label, src, extra in runs:
            env = dict(os.environ, AB_SRC=str(Path(src).resolve()), **extra)
            if args.whole_only:
                env["AB_WHOLE_ONLY"] = "1"
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, str(args.grid), str(args.batch), args.sam2, args.dinov2],
                env=env,
                capture_output=True,
                text=True,
                cwd=str(Path(src).resolve()),
            )
            lines = [x for x in proc.stdout.splitlines() if x.startswith("AB-RESULT ")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"{label} ({src}) failed:\n{proc.stderr[-3000:]}")
            rec = dict(
                round=r,
                tree=label,
                src=str(src),
                env=extra,
                grid=args.grid,
                batch=args.batch,
                sam2=args.sam2,
                dinov2=args.dinov2,
                **json.loads(lines[-1][len("AB-RESULT ") :]),
            )
            print(json.dumps(rec), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
