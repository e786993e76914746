"""SAM2 prompt decoder: eager vs ``compile_decoder`` per prompt, interleaved (RANDOM WEIGHTS: timings only).

One process: build a SAM2 model with random weights (default the paper's Hiera-L), encode one smooth random
image once, then decode the same chunk of point prompts with the eager cached decoder (parity mode) and
with ``torch.compile`` of it (``compile_decoder=True``, same chunk: static shapes), alternating E C E C ...
Prints the time of the first compiled call (compilation included), per-prompt wall and CPU time of each
round with the 1-min load average, and the largest differences of the outputs. Used for
benchmarks/README.md ("Fast paths").

    python benchmarks/compile_ab.py --sam2 sam2_hiera_l --chunk 16 --rounds 5 --out benchmarks/compile-ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sam2", default="sam2_hiera_l", help="conf/backbone/sam2 option (random init)")
    p.add_argument("--chunk", type=int, default=16, help="prompts per decoder call (decoder_chunk)")
    p.add_argument("--rounds", type=int, default=5, help="timed E/C pairs")
    p.add_argument("--out", default=None, help="also write the result json here")
    args = p.parse_args()

    from ntt.backbones.sam2 import build_sam2
    from ntt.proposals import point_grid
    from ntt.tools.fastpath_modes import MODES, mode_backbone
    from ntt.tools.hotspots import smooth_images
    from ntt.tools.machine import cpu_seconds_and_faults
    from ntt.tools.random_models import option_kwargs

    torch.manual_seed(0)
    with torch.inference_mode():
        base = build_sam2(**option_kwargs("sam2", args.sam2), device="cpu")
        eager = mode_backbone(base, MODES["parity"], args.chunk, decoder_chunk=args.chunk)
        compiled = mode_backbone(base, MODES["compile"], args.chunk, decoder_chunk=args.chunk)
        image = smooth_images(1, 1024, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
        feats = base.encode_image(image)
        side = int(args.chunk**0.5 + 0.999)
        pts = point_grid(side)[: args.chunk, None, :]
        cache = base.prepare_decoder(feats, 0)

        def run(bb):
            t0, (c0, _), load = time.perf_counter(), cpu_seconds_and_faults(), os.getloadavg()[0]
            out = bb.decode_best(feats, points=pts, cache=cache)
            wall, (c1, _) = time.perf_counter() - t0, cpu_seconds_and_faults()
            return out, {"wall_s": wall, "cpu_s": c1 - c0, "load1": round(load, 2)}

        ref, first_eager = run(eager)
        got, first_compiled = run(compiled)  # compiles
        rounds = []
        for _ in range(args.rounds):
            _, e = run(eager)
            _, c = run(compiled)
            rounds.append({"eager": e, "compiled": c})
    n = args.chunk
    res = {
        "WARNING": "RANDOM WEIGHTS: timings only",
        "sam2": args.sam2,
        "chunk": n,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "first_eager_s": first_eager["wall_s"],
        "first_compiled_s": first_compiled["wall_s"],
        "rounds": rounds,
        "eager_ms_per_prompt_median": 1e3 * statistics.median(r["eager"]["wall_s"] for r in rounds) / n,
        "compiled_ms_per_prompt_median": 1e3 * statistics.median(r["compiled"]["wall_s"] for r in rounds) / n,
        "eager_cpu_ms_per_prompt_median": 1e3 * statistics.median(r["eager"]["cpu_s"] for r in rounds) / n,
        "compiled_cpu_ms_per_prompt_median": 1e3
        * statistics.median(r["compiled"]["cpu_s"] for r in rounds)
        / n,
        "max_abs_diff_logits": float((got[0] - ref[0]).abs().max()),
        "max_abs_diff_ious": float((got[1] - ref[1]).abs().max()),
        "same_chosen_output": bool(torch.equal(got[2], ref[2])),
        "load1_min_max": [
            min(r[k]["load1"] for r in rounds for k in r),
            max(r[k]["load1"] for r in rounds for k in r),
        ],
    }
    res["speedup_wall"] = res["eager_ms_per_prompt_median"] / res["compiled_ms_per_prompt_median"]
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
