"""Time saved by ``outputs="boxes"`` on a 4000x3000 image (issue 18 item 4). TINY RANDOM MODELS: plumbing
speed only (the number of detections, and so the mask work, is whatever random weights give).

Per round, interleaved: ``Segmenter.predict(image, outputs=...)`` then ``Instances.to_coco`` (what
``ntt segment`` does per image: RLE-encodes every mask with ``masks``, nothing with ``boxes``), for
``masks`` and ``boxes``. Checks on the way that both give the same boxes, labels and scores.

    .venv/bin/python benchmarks/outputs_boxes.py --rounds 2 --grid 6 --out benchmarks/outputs-boxes-<date>-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from ntt.app.segmenter import Segmenter
from ntt.app.settings import compose_config
from ntt.tools.machine import command_line, hardware_info, load_average

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main(argv: list[str] | None = None) -> None:
    from conftest import DATA
    from helpers_backbones import tiny_dinov2, tiny_sam2

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--grid", type=int, default=8, help="prompt grid side")
    ap.add_argument("--nms-thr", type=float, default=1.0, help="1.0: no suppression (more detections to output)")
    ap.add_argument("--size", type=int, nargs=2, default=[4000, 3000], metavar=("W", "H"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    fss = DATA / "geti-instant-learn-samples" / "library" / "examples" / "assets" / "fss-1000"
    overrides = [f"proposer.points_per_side={args.grid}", "proposer.points_batch_size=64", "proposer.iou_thr=0.0", f"matcher.nms_thr={args.nms_thr}"]
    cfg = compose_config(sam2="tiny_random", dinov2="tiny_random", overrides=overrides)
    seg = Segmenter(cfg, device="cpu", sam2=tiny_sam2(), dinov2=tiny_dinov2())
    seg.add_reference(fss / "images/apple/1.jpg", "apple", masks=fss / "masks/apple/1.png")
    seg.add_reference(fss / "images/basketball/1.jpg", "basketball", masks=fss / "masks/basketball/1.png")
    seg.build(progress=False)
    image = Image.open(fss / "images/apple/5.jpg").convert("RGB").resize(tuple(args.size))
    load_before = load_average()
    rows: dict[str, list[dict]] = {"masks": [], "boxes": []}
    ref = None
    for _ in range(args.rounds):
        for kind in ("masks", "boxes"):
            t0 = time.perf_counter()
            inst = seg.predict(image, outputs=kind, keep_image=False)
            t1 = time.perf_counter()
            coco = inst.to_coco(1)
            t2 = time.perf_counter()
            rows[kind].append({"predict_s": t1 - t0, "to_coco_s": t2 - t1, "total_s": t2 - t0})
            if kind == "masks":
                ref = inst
            else:
                assert torch.equal(ref.boxes, inst.boxes) and torch.equal(ref.scores, inst.scores)
                assert torch.equal(ref.labels, inst.labels)
            print(kind, len(inst), {k: round(v, 2) for k, v in rows[kind][-1].items()}, len(json.dumps(coco)))
    summary = {
        kind: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]} for kind, rs in rows.items()
    }
    report = {
        "WARNING": "tiny random models: plumbing speed only",
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command_line("benchmarks.outputs_boxes", argv),
        "hardware": hardware_info(torch.device("cpu")),
        "load_before": load_before,
        "load_after": load_average(),
        "settings": {"grid": args.grid, "nms_thr": args.nms_thr, "size_wh": args.size, "rounds": args.rounds},
        "detections": len(ref),
        "runs": rows,
        "median": summary,
        "saved_fraction_total": round(1 - summary["boxes"]["total_s"] / summary["masks"]["total_s"], 3),
    }
    print(json.dumps(report["median"]), report["saved_fraction_total"])
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
