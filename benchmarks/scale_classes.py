"""Post-backbone cost per image against the number of classes in the bank (issue 18 item 3).

Times the stages after the backbones (method.md §5.4-5.8) with synthetic inputs of the real shapes, for
100, 1,000 and 10,000 classes: classification (clamped cosine + top-1), class-aware NMS, the ``score > 0``
filter, full-resolution masks + semantic soft merging (the upsampling of every kept mask is inside it),
top-k with the winners' full-resolution masks and boxes, and ``MemoryBank.prototypes()`` (what
``Segmenter.predict`` computes per image). Also the whole ``postprocess_detections`` call.

Inputs (seeded): ``P`` proposals (default 1024 = the paper's 32x32 grid with every proposal passing the
IoU filter, the worst case) with 256x256 low-res logits of random ellipses (so NMS and merging have overlaps
to work on), predicted IoUs in [0.4, 1), ``D``-dim unit embeddings (default 1024 = DINOv2 ViT-L/14) and ``C``
unit prototypes. Two label regimes:

* ``spread``: random embeddings and prototypes: the labels spread over ``min(P, C)`` classes (each class
  ~1 proposal at C=10,000): the worst case for every per-class loop;
* ``clustered``: each embedding = one of 20 class prototypes + noise: ~20 classes present, as in a real image.

Each ``C`` runs in its own process (peak RSS is per process) and each stage is timed ``--repeats`` times
(median). Timings only: the synthetic detections mean nothing.

    .venv/bin/python benchmarks/scale_classes.py --out benchmarks/scale-classes-<date>-cpu
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ntt.bank import compute_prototypes
from ntt.matching import classify
from ntt.ops import batched_nms, masks_to_boxes_inclusive
from ntt.postprocess import postprocess_detections, rank_top_k, resize_masks_to_image, semantic_soft_merge
from ntt.tools.machine import command_line, hardware_info, load_average

LOWRES = 256


def synthetic_inputs(p: int, c: int, d: int, regime: str, seed: int = 0) -> dict:
    """Low-res logits of random ellipses, predicted IoUs, embeddings and prototypes (see the module doc)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(LOWRES).float(), torch.arange(LOWRES).float(), indexing="ij")
    cy, cx = torch.rand(p, generator=g) * LOWRES, torch.rand(p, generator=g) * LOWRES
    ry, rx = 8 + torch.rand(p, generator=g) * 80, 8 + torch.rand(p, generator=g) * 80
    logits = torch.empty(p, LOWRES, LOWRES)
    for s in range(0, p, 64):  # 1 - ((y - cy)/ry)^2 - ((x - cx)/rx)^2, scaled: > 0 inside the ellipse
        e = slice(s, s + 64)
        logits[e] = 8 * (
            1
            - ((yy[None] - cy[e, None, None]) / ry[e, None, None]) ** 2
            - ((xx[None] - cx[e, None, None]) / rx[e, None, None]) ** 2
        )
    protos = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    if regime == "spread":
        emb = F.normalize(torch.randn(p, d, generator=g), dim=-1)
    else:
        present = torch.randperm(c, generator=g)[: min(20, c)]
        pick = present[torch.randint(len(present), (p,), generator=g)]
        emb = F.normalize(protos[pick] + 0.03 * torch.randn(p, d, generator=g), dim=-1)
    ious = 0.4 + 0.6 * torch.rand(p, generator=g)
    return {"logits": logits, "ious": ious, "emb": emb, "protos": protos}


def _median_s(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@torch.inference_mode()
def measure_one(c: int, args) -> dict:
    """All stages for ``c`` classes, one regime after the other (this process's peak RSS covers both)."""
    h, w = args.height, args.width
    rows = {}
    for regime in args.regimes:
        x = synthetic_inputs(args.proposals, c, args.dim, regime)
        logits, ious, emb, protos = x["logits"], x["ious"], x["emb"], x["protos"]
        boxes = masks_to_boxes_inclusive(logits > 0)
        r = {}
        r["classify_s"], (sim, labels, scores) = _median_s(lambda: classify(emb, protos), args.repeats)
        cap = args.num_out * 8
        r["nms_s"], keep = _median_s(lambda: batched_nms(boxes, ious, labels, 0.5)[:cap], args.repeats)
        r["score_filter_s"], keep_pos = _median_s(lambda: keep[scores[keep] > 0], args.repeats)

        def full(rows_):
            return resize_masks_to_image(logits[rows_], h, w)

        lab_pos = labels[keep_pos]
        r["masks_and_soft_merge_s"], merged = _median_s(
            lambda: semantic_soft_merge(
                lambda i: full(keep_pos[i]), lab_pos, emb[keep_pos], scores[keep_pos]
            ),
            args.repeats,
        )
        decayed = merged[1]

        def topk():
            order = rank_top_k(decayed, args.num_out)
            m = full(keep_pos[order])
            return masks_to_boxes_inclusive(m)

        r["topk_masks_boxes_s"], _ = _median_s(topk, args.repeats)
        r["postprocess_total_s"], (det, _) = _median_s(
            lambda: postprocess_detections(
                logits, ious, labels, scores, emb, height=h, width=w, lowres_boxes=boxes, num_out=args.num_out
            ),
            args.repeats,
        )
        shots = torch.randn(c, args.shots, args.dim)
        r["bank_prototypes_s"], _ = _median_s(lambda: compute_prototypes(shots), args.repeats)
        r.update(
            classes_present=int(torch.unique(labels).numel()),
            classes_after_nms=int(torch.unique(lab_pos).numel()),
            nms_kept=int(keep.numel()),
            after_score_filter=int(keep_pos.numel()),
            detections=len(det),
            sim_matrix_mib=round(sim.numel() * sim.element_size() / 2**20, 1),
            prototypes_mib=round(protos.numel() * protos.element_size() / 2**20, 1),
        )
        rows[regime] = r
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"classes": c, "peak_rss_mib": round(rss_kib / 1024, 1), "regimes": rows}


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Post-backbone cost vs classes in the bank (synthetic inputs: timings only)",
        "",
        f"- Command: `{report['command']}`",
        f"- Date (UTC): {report['timestamp_utc']}",
        f"- CPU: {report['hardware']['cpu_model']}, {report['hardware']['cpu_cores_usable']} usable cores, "
        f"{report['hardware']['torch_threads']} torch threads, torch {report['hardware']['torch']}",
        f"- Load average (1 min) before / after: {report['load_before']} / {report['load_after']}",
        f"- Settings: P={s['proposals']} proposals (256x256 logits), D={s['dim']}, output {s['height']}x"
        f"{s['width']}, num_out {s['num_out']}, {s['repeats']} repeats (median), bank of {s['shots']} shots/class",
        "",
        "| classes | regime | classes present | after NMS+filter | classify | NMS | score filter | masks + soft"
        " merge | top-k masks+boxes | postprocess total | bank.prototypes() | sim [P,C] | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        for regime, r in row["regimes"].items():
            ms = {k: f"{1000 * v:.1f} ms" for k, v in r.items() if k.endswith("_s")}
            lines.append(
                f"| {row['classes']:,} | {regime} | {r['classes_present']} | {r['after_score_filter']} "
                f"({r['classes_after_nms']} classes) | {ms['classify_s']} | {ms['nms_s']} | "
                f"{ms['score_filter_s']} | {ms['masks_and_soft_merge_s']} | {ms['topk_masks_boxes_s']} | "
                f"{ms['postprocess_total_s']} | {ms['bank_prototypes_s']} | {r['sim_matrix_mib']} MiB | "
                f"{row['peak_rss_mib']} MiB |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--proposals", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--height", type=int, default=600)
    ap.add_argument("--width", type=int, default=800)
    ap.add_argument("--num-out", type=int, default=100)
    ap.add_argument("--shots", type=int, default=10, help="references per class of the synthetic bank")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--regimes", nargs="+", default=["spread", "clustered"])
    ap.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one class count, json out
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure_one(args.one, args)))
        return
    load_before = load_average()
    results = []
    for c in args.classes:
        child = [sys.executable, __file__, "--one", str(c)] + [
            a for a in (argv if argv is not None else sys.argv[1:]) if a != "--out"
        ]
        if args.out is not None:  # drop the --out value as well
            child = [a for a in child if a != str(args.out)]
        proc = subprocess.run(child, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"classes={c}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    report = {
        "WARNING": "synthetic inputs: timings only",
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command_line("benchmarks.scale_classes", argv),
        "hardware": hardware_info(torch.device("cpu")),
        "load_before": load_before,
        "load_after": load_average(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "one")},
        "results": results,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps(report, indent=1) + "\n")
        Path(f"{args.out}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
