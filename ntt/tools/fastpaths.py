"""Fast paths measured against parity mode: speed, memory and agreement in one command.

``make bench-fastpaths`` / ``python -m ntt.tools.fastpaths [--device cuda] [--sam2 OPTION] [--dinov2 OPTION]
[--grid P] [--modes a,b,...]``. Models are built with RANDOM weights from ``conf/backbone`` options (as
``ntt.tools.bench``): the figures measure speed and how far each fast path moves the outputs away from parity
mode's, never accuracy.

Each mode is the per-image test path (``ntt.inference.propose_image`` + ``classify_and_postprocess``, i.e.
``infer_image``) with some ``SAM2Backbone`` fast-path flags (:data:`MODES`). All modes share the same model
weights, images and class prototypes (the memory of ``--shots`` references per class sampled from the
dataset's reference json, as the pipeline does). Per image the modes run one after the other (parity
first, so load changes hit every mode alike); every mode first runs the first image once untimed (its time,
which includes ``torch.compile``'s compilation, is reported as ``warmup_s``).

Per mode: images/s and seconds per image over the timed images, peak memory (CUDA: max allocated during
the mode's calls, model weights included; CPU: growth of the process's peak RSS, a lower bound since the
peak is process-wide), and agreement with the parity run of the same images (``ntt.tools.agreement``):
proposal level (same chosen multimask output, IoU-score differences, mask IoU of the same proposal),
detection level (matched by source prompt: score difference, mask IoU, counts) and the AP of the mode's
detections with the parity detections above ``--gt-score-thr`` as the ground truth.

Random weights predict near-constant IoUs and masks that overlap each other by more than 0.9, so with the
paper's ``iou_thr=0.4`` / ``nms_thr=0.5`` (and even ``nms_thr=0.9``) one detection per image is left. The
defaults here therefore keep every prompt (``--iou-thr -1``) and turn NMS off (``--nms-thr 1.0``: a box
is removed only above IoU 1), so every proposal reaches soft merging and top-k (``--num-out 100``) and
there are proposals and detections to compare; all settings are recorded in the output.

Output: ``<out>/fastpaths-<YYYYmmdd>-<cpu|gpu-name>[-<tag>].json`` and ``.md`` (table, command, hardware,
load averages, the random-weights warning).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import resource
import shlex
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ntt.tools.agreement import (
    AgreementAccumulator,
    DetectionSnapshot,
    ProposalSnapshot,
    ap_against_reference,
    compare_detections,
    compare_proposals,
)
from ntt.tools.bench import _loadavg, _sync

__all__ = ["MODES", "FastMode", "main", "mode_backbone"]

log = logging.getLogger("ntt.tools.fastpaths")

RANDOM_WEIGHTS_NOTE = (
    "RANDOM WEIGHTS: every model was built with random_init=True and no checkpoint was loaded. Timings are "
    "speed only; agreement figures measure how far a fast path moves the outputs from parity mode's on the "
    "same inputs, never accuracy."
)
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class FastMode:
    """One way of running the per-image path.

    Attributes:
        name: key used on the command line and in the outputs.
        flags: ``SAM2Backbone`` attributes it sets (on top of the built backbone's).
        what: what it changes, in words.
        one_batch: decode all ``P * P`` prompts in one decoder call (``decoder_chunk`` and
            ``points_batch_size`` = ``P * P``; 1024 at the paper's 32x32 grid).
        cuda_only: why it is skipped on the CPU (None: runs everywhere).
    """

    name: str
    flags: dict[str, Any] = field(default_factory=dict)
    what: str = ""
    one_batch: bool = False
    cuda_only: str | None = None

    def flag_text(self) -> str:
        items = [f"{k}={v}" for k, v in self.flags.items()]
        if self.one_batch:
            items.append("decoder_chunk=points_batch_size=P*P")
        return ", ".join(items) or "(defaults)"


MODES: dict[str, FastMode] = {
    m.name: m
    for m in (
        FastMode("parity", what="parity mode: fp32, chunks of 16 prompts, eager"),
        FastMode(
            "parity_rerun",
            what="parity mode again: run-to-run noise floor (exactly 1.0 on the CPU; GPU kernels may differ)",
        ),
        FastMode("bf16", {"decoder_autocast": "bfloat16"}, "prompt decoder under torch.autocast(bfloat16)"),
        FastMode(
            "fp16",
            {"decoder_autocast": "float16"},
            "prompt decoder under torch.autocast(float16)",
            cuda_only="fp16 autocast on the CPU is emulated and slow: skipped on CPU",
        ),
        FastMode(
            "tf32",
            {"tf32": True},
            "TF32 matmuls/convolutions in the prompt decoder",
            cuda_only="TF32 does not exist on the CPU (identical to parity): skipped on CPU",
        ),
        FastMode("one_batch", what="all prompts of the grid in one decoder call", one_batch=True),
        FastMode(
            "compile",
            {"compile_decoder": True},
            "torch.compile (inductor) of the decoder step, static shapes",
        ),
        FastMode(
            "combo",
            {"decoder_autocast": "bfloat16", "tf32": True, "compile_decoder": True},
            "the GPU goal's combination: bf16 + TF32 + one decoder call + torch.compile",
            one_batch=True,
        ),
    )
}
DEFAULT_MODES = "parity,parity_rerun,bf16,fp16,tf32,one_batch,compile,combo"


def mode_backbone(base, mode: FastMode, grid_prompts: int, decoder_chunk: int | None = None):
    """A ``SAM2Backbone`` sharing ``base``'s model (same weights, no copy) with ``mode``'s flags.

    Args:
        base: the built ``ntt.backbones.sam2.SAM2Backbone`` (its own fast-path flags are ignored).
        mode: the mode.
        grid_prompts: ``P * P`` (the decoder chunk of a one-batch mode).
        decoder_chunk: prompts per decoder call of the other modes (default: parity's 16).
    """
    from ntt.backbones.sam2 import DEFAULT_DECODER_CHUNK, SAM2Backbone

    kw: dict[str, Any] = dict(
        decoder_chunk=decoder_chunk or DEFAULT_DECODER_CHUNK,
        decoder_autocast=None,
        tf32=False,
        compile_decoder=False,
    )
    kw.update(mode.flags)
    if mode.one_batch:
        kw["decoder_chunk"] = grid_prompts
    return SAM2Backbone(
        base.model,
        name=f"{base.name}[{mode.name}]",
        add_no_mem_embed=base.add_no_mem_embed,
        exact_attention=base.exact_attention,
        cached_decoder=True,
        **kw,
    )


# ----------------------------------------------------------------------------------------------------
# Data and prototypes
# ----------------------------------------------------------------------------------------------------


@dataclass
class EvalData:
    """Test images and the reference pool.

    Attributes:
        ref_ds: ``ntt.data.coco.CocoDataset`` the references are sampled from.
        test_ds: ``CocoDataset`` of the test images.
        test_ids: the image ids measured, in order.
        source: description for the report.
    """

    ref_ds: Any
    test_ds: Any
    test_ids: list[int]
    source: str


def load_data(args: argparse.Namespace) -> EvalData:
    """The synthetic smoke set (generated on first use) or a COCO json given by ``--coco-json``."""
    from ntt.data.coco import CocoDataset

    if args.coco_json:
        root = args.image_root or str(Path(args.coco_json).parent)
        ds = CocoDataset(args.coco_json, root)
        return EvalData(ds, ds, [], f"{args.coco_json} (references and test images from the same json)")
    root = Path(args.data_root or Path(os.environ.get("NTT_OUTPUT", "outputs")) / "datasets")
    root = root / f"synthetic_n{args.synthetic_images}_s0"
    if not (root / "train.json").is_file() or not (root / "test.json").is_file():
        from ntt.data.synthetic import generate_synthetic_dataset

        log.info("generating the synthetic dataset in %s", root)
        generate_synthetic_dataset(root, num_images=args.synthetic_images, seed=0)
    ref_ds = CocoDataset(root / "train.json", root)
    test_ds = CocoDataset(root / "test.json", root)
    return EvalData(ref_ds, test_ds, [], f"synthetic smoke set ({args.synthetic_images} images, seed 0)")


def build_prototypes(data: EvalData, dino, *, shots: int, seed: int, device) -> torch.Tensor:
    """``[C, D]`` prototypes of ``shots`` references per class sampled as the pipeline does; also picks the
    test images (with a single json: the images holding no reference)."""
    from ntt.memory import fill_memory
    from ntt.refs import sample_references

    cat_ids = list(data.ref_ds.category_ids)
    refs = sample_references(data.ref_ds.raw, cat_ids, shots, seed)
    bank = fill_memory(
        refs,
        dataset_json=data.ref_ds.raw,
        image_root=data.ref_ds.image_root,
        encoder=dino,
        class_ids=cat_ids,
        progress=False,
        shots=shots,
        seed=seed,
    )
    used = {e.image_id for lst in refs.values() for e in lst} if data.ref_ds is data.test_ds else set()
    data.test_ids = [i for i in data.test_ds.image_ids if i not in used]
    return bank.prototypes().to(device)


# ----------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------


class Interrupted(BaseException):
    """SIGTERM (e.g. from ``timeout``) during the measurement: stop and report what was measured so far.
    A BaseException so that the per-mode error handling does not take it for a failing mode."""


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(f"signal {signum}")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class ModeRun:
    """What one mode measured."""

    mode: FastMode
    backbone: Any
    status: str = "ok"
    warmup_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    load1: list[float] = field(default_factory=list)
    peak_mem_mib: float = 0.0
    rss_growth_mib: float = 0.0
    agreement: AgreementAccumulator = field(default_factory=AgreementAccumulator)
    coco: list[dict] = field(default_factory=list)


def run_image(run: ModeRun, image, info: dict, *, dino, prototypes, params, device):
    """The per-image path of one mode, timed (synchronised on CUDA). Returns (seconds, shared, det)."""
    from ntt.inference import classify_and_postprocess, propose_image

    p = params
    if run.mode.one_batch:
        g = p.points_per_side**2
        p = type(params)(**{**params.to_dict(), "points_batch_size": g})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = _peak_rss_mib()
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        shared = propose_image(image, sam2=run.backbone, dino=dino, params=p)
        det, _ = classify_and_postprocess(
            shared, prototypes, height=int(info["height"]), width=int(info["width"]), params=p
        )
    _sync(device)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        run.peak_mem_mib = max(run.peak_mem_mib, torch.cuda.max_memory_allocated(device) / 2**20)
    run.rss_growth_mib += _peak_rss_mib() - rss0
    return seconds, shared, det


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Build everything, run every mode on every image, return the report (see the module docstring)."""
    from tqdm import tqdm

    from ntt.data.images import load_test_image
    from ntt.inference import InferenceParams
    from ntt.results import detections_to_coco
    from ntt.tools.bench import build_models, device_slug, hardware_info

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available in this torch build / machine")
        # parity mode is fp32: TF32 off everywhere (as make parity-gpu); the tf32 mode enables it in the decoder
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    hardware = hardware_info(device)
    t_all = time.perf_counter()
    sam2, dino, sam2_kw, dino_kw = build_models(args.sam2, args.dinov2, device)
    data = load_data(args)
    prototypes = build_prototypes(data, dino, shots=args.shots, seed=args.seed, device=device)
    ids = data.test_ids[: args.max_images] if args.max_images else data.test_ids
    if not ids:
        raise SystemExit(f"{data.source}: no test images left to measure")
    params = InferenceParams(
        points_per_side=args.grid,
        points_batch_size=args.points_batch_size,
        iou_thr=args.iou_thr,
        nms_thr=args.nms_thr,
        num_out=args.num_out,
    )
    g = args.grid**2
    runs: list[ModeRun] = []
    skipped: dict[str, str] = {}
    for name in args.modes:
        mode = MODES[name]
        if mode.cuda_only and device.type != "cuda" and name not in args.force:
            skipped[name] = mode.cuda_only
            continue
        runs.append(ModeRun(mode, mode_backbone(sam2, mode, g, args.decoder_chunk)))
    cat_ids = list(data.test_ds.category_ids)

    def load(img_id: int):
        info = data.test_ds.image_info(img_id)
        path = data.test_ds.image_path(img_id)
        img = load_test_image(path, 1024, height=int(info["height"]), width=int(info["width"]))
        return img.to(device), info

    def attempt(run: ModeRun, image, info):
        """``run_image``, or None after recording the error (the mode is dropped, the others go on)."""
        if run.status != "ok":
            return None
        try:
            return run_image(run, image, info, dino=dino, prototypes=prototypes, params=params, device=device)
        except Exception as err:  # one mode failing (compiler missing, OOM) must not lose the others
            log.exception("mode %s failed", run.mode.name)
            first = str(err).splitlines()[0][:300] if str(err) else ""
            run.status = f"failed: {type(err).__name__}: {first}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    interrupted = None
    bar = tqdm(ids, desc="images x modes", unit="img", disable=not args.progress)
    try:
        image, info = load(ids[0])
        for run in (
            runs if args.warmup else []
        ):  # warm-up: first call (compilation, allocator, cuDNN autotuning) untimed
            log.info("warm-up of mode %s on image %d", run.mode.name, ids[0])
            out = attempt(run, image, info)
            if out is not None:
                run.warmup_s = out[0]
            del out
        for img_id in bar:
            image, info = load(img_id)
            ref = None
            for run in runs:
                out = attempt(run, image, info)
                if out is None:
                    continue
                seconds, shared, det = out
                del out  # nothing of this run may stay alive into the next mode's (peak memory)
                load1 = _loadavg()
                run.times_s.append(seconds)
                run.image_ids.append(img_id)
                run.load1.append(load1[0] if load1 else float("nan"))
                snap = (ProposalSnapshot.of(shared), DetectionSnapshot.of(det, shared))
                run.coco += detections_to_coco(det, img_id, cat_ids)
                del shared, det  # before the next mode runs
                if run.mode.name == "parity":
                    ref = snap
                elif ref is not None:
                    run.agreement.add(compare_proposals(ref[0], snap[0]), compare_detections(ref[1], snap[1]))
            del image
    except Interrupted as err:  # keep what was measured: the report below covers the images done
        interrupted = str(err)
        log.warning("interrupted (%s): reporting the images measured so far", err)
    bar.close()

    parity = next((r for r in runs if r.mode.name == "parity" and r.status == "ok"), None)
    if parity is not None and parity.times_s and not parity.coco:
        log.warning(
            "parity mode kept no detection on the %d image(s): detection agreement and AP are n/a (with random "
            "weights every semantic score can be <= 0, and those are dropped; try more images or the synthetic set)",
            len(parity.times_s),
        )
    modes_out: dict[str, Any] = {}
    for run in runs:
        modes_out[run.mode.name] = mode_report(run, parity, data.test_ds, args, device)
    for name, why in skipped.items():
        modes_out[name] = {
            "flags": MODES[name].flag_text(),
            "what": MODES[name].what,
            "status": f"skipped: {why}",
        }
    return {
        "WARNING": RANDOM_WEIGHTS_NOTE,
        "schema_version": SCHEMA_VERSION,
        "hardware": hardware,
        "device_slug": device_slug(device),
        "settings": {
            "device": args.device,
            "sam2_option": args.sam2,
            "sam2_config": sam2_kw.get("config"),
            "dinov2_option": args.dinov2,
            "dinov2_arch": dino_kw.get("arch"),
            "random_init": True,
            "data": data.source,
            "image_ids": ids,
            "shots": args.shots,
            "seed": args.seed,
            "params": params.to_dict(),
            "decoder_chunk": runs[0].backbone.decoder_chunk if runs else None,
            "warmup": args.warmup,
            "gt_score_thr": args.gt_score_thr,
            "modes": args.modes,
            "cuda_tf32_outside_tf32_modes": False if device.type == "cuda" else None,
            "threads": torch.get_num_threads(),
        },
        "modes": modes_out,
        "interrupted": interrupted,
        "total_wall_s": time.perf_counter() - t_all,
    }


def mode_report(run: ModeRun, parity: ModeRun | None, test_ds, args, device) -> dict[str, Any]:
    """JSON-ready figures of one mode (AP over the images both it and parity mode completed)."""
    out: dict[str, Any] = {"flags": run.mode.flag_text(), "what": run.mode.what, "status": run.status}
    if not run.times_s:
        return out
    total = sum(run.times_s)
    out["timing"] = {
        "images": len(run.times_s),
        "images_per_s": len(run.times_s) / total,
        "median_s_per_image": statistics.median(run.times_s),
        "times_s": run.times_s,
        "warmup_s": run.warmup_s,
        "warmup_minus_median_s": None
        if run.warmup_s is None
        else run.warmup_s - statistics.median(run.times_s),
        "load1": run.load1,
    }
    if parity is not None and parity.times_s and run is not parity:
        out["timing"]["speedup_vs_parity"] = (len(run.times_s) / total) / (
            len(parity.times_s) / sum(parity.times_s)
        )
    if device.type == "cuda":
        out["memory"] = {"cuda_peak_allocated_mib": round(run.peak_mem_mib, 1)}
    else:
        out["memory"] = {"cpu_peak_rss_growth_mib": round(run.rss_growth_mib, 1)}
    if parity is None:
        return out
    if run is not parity:  # parity is the reference; its AP against itself checks the AP computation (1.0)
        out["agreement"] = run.agreement.summary()
    common = set(parity.image_ids) & set(run.image_ids)
    out["ap_vs_parity"] = ap_against_reference(
        [r for r in parity.coco if r["image_id"] in common],
        [r for r in run.coco if r["image_id"] in common],
        images=[test_ds.image_info(i) for i in sorted(common)],
        categories=test_ds.categories,
        score_thr=args.gt_score_thr,
    )
    return out


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def _f(x, fmt: str = ".4f") -> str:
    return "n/a" if x is None else format(x, fmt)


def table_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per mode: speed, memory and the headline agreement figures."""
    rows = []
    cuda = report["settings"]["device"] == "cuda"
    for name, m in report["modes"].items():
        if "timing" not in m:
            rows.append((name, m["flags"], m["status"], *([""] * 8)))
            continue
        t, mem = m["timing"], m["memory"]
        mem_cell = (
            f"{mem['cuda_peak_allocated_mib']:.0f} MiB"
            if cuda
            else f"+{mem['cpu_peak_rss_growth_mib']:.0f} MiB RSS"
        )
        speed = f"{t['images_per_s']:.3g}" + (
            f" (x{t['speedup_vs_parity']:.2f})" if "speedup_vs_parity" in t else ""
        )
        a, ap = m.get("agreement"), m.get("ap_vs_parity")
        if a is None:
            ap_cell = (
                "n/a" if ap is None else f"{_f(ap['segm_AP'], '.3f')} / {_f(ap['bbox_AP'], '.3f')} (self)"
            )
            warm = "n/a" if t["warmup_s"] is None else f"{t['warmup_s']:.2f} s"
            rows.append((name, m["flags"], speed, warm, mem_cell, *(["reference"] * 5), ap_cell))
            continue
        p, d = a["proposals"], a["detections"]
        rows.append(
            (
                name,
                m["flags"],
                speed,
                "n/a" if t["warmup_s"] is None else f"{t['warmup_s']:.2f} s",
                mem_cell,
                _f(p["same_chosen_output"]),
                f"{_f(p['mask_iou']['mean'])} / {_f(p['mask_iou']['min'])}",
                f"{_f(p['iou_score_abs_diff']['mean'], '.1e')} / {_f(p['iou_score_abs_diff']['max'], '.1e')}",
                f"{d['fast']} vs {d['parity']} ({d['matched']} matched)",
                f"{_f(d['score_abs_diff']['max'], '.1e')} / {_f(d['mask_iou']['min'])}",
                f"{_f(ap['segm_AP'], '.3f')} / {_f(ap['bbox_AP'], '.3f')}",
            )
        )
    return rows


TABLE_HEADER = (
    "mode",
    "flags",
    "images/s (vs parity)",
    "warm-up (1st image)",
    "peak memory",
    "same chosen output",
    "proposal mask IoU mean / min",
    "IoU-score abs diff mean / max",
    "detections (fast vs parity)",
    "matched det. score abs diff max / mask IoU min",
    "AP vs parity segm / bbox",
)


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Markdown table of :func:`table_rows`."""

    def line(cells) -> str:
        return "| " + " | ".join(cells) + " |"

    return "\n".join([line(TABLE_HEADER), "|" + "---|" * len(TABLE_HEADER), *(line(r) for r in rows)])


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page."""
    hw, s = report["hardware"], report["settings"]
    p = s["params"]
    gpu = f", {hw['gpu_name']}" if "gpu_name" in hw else ""
    lines = [
        f"# Fast paths vs parity mode, {report['timestamp_utc'][:10]}, {report['device_slug']}",
        "",
        f"> **{report['WARNING']}**",
        "",
        f"- Command: `{report['command']}`",
        f"- Hardware: {hw['cpu_model']}, {hw['cpu_cores']} cores ({s['threads']} torch threads){gpu}, torch "
        f"{hw['torch']}; load average (1/5/15 min) at start {hw.get('load_average_1_5_15_at_start')}, at end "
        f"{report.get('load_average_1_5_15_at_end')}",
        f"- Models (random init): SAM2 `{s['sam2_option']}` + DINOv2 `{s['dinov2_option']}`; data: {s['data']}, "
        f"{len(s['image_ids'])} images (+{s['warmup']} warm-up run per mode), {s['shots']} shots, seed {s['seed']}",
        f"- Settings: {p['points_per_side']}x{p['points_per_side']} grid, iou_thr {p['iou_thr']}, nms_thr "
        f"{p['nms_thr']}, num_out {p['num_out']}; AP ground truth = parity detections with score > "
        f"{s['gt_score_thr']}",
        f"- Total wall time {report['total_wall_s']:.0f} s",
        *(
            [f"- **Interrupted ({report['interrupted']})**: the figures cover only the images finished"]
            if report.get("interrupted")
            else []
        ),
        "",
        format_table(table_rows(report)),
        "",
    ]
    return "\n".join(lines)


def _command_line(argv: list[str] | None) -> str:
    if argv is None:
        return shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    return (
        shlex.join(["python", "-m", "ntt.tools.fastpaths", *argv]) + "   # via ntt.tools.fastpaths.main(argv)"
    )


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ntt.tools.fastpaths",
        description="Fast paths vs parity mode: images/s, peak memory, agreement (RANDOM weights).",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    p.add_argument(
        "--sam2", default="tiny_random", help="conf/backbone/sam2 option, random init (tiny_random)"
    )
    p.add_argument(
        "--dinov2", default="tiny_random", help="conf/backbone/dinov2 option, random init (tiny_random)"
    )
    p.add_argument(
        "--grid", type=int, default=4, help="prompt grid side P (P*P prompts; default 4, paper 32)"
    )
    p.add_argument(
        "--points-batch-size", type=int, default=256, help="prompts per proposer batch (paper 256)"
    )
    p.add_argument(
        "--decoder-chunk", type=int, default=None, help="prompts per decoder call except one_batch/combo (16)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        choices=[0, 1],
        help="one untimed first-image run per mode (default 1)",
    )
    p.add_argument("--iou-thr", type=float, default=-1.0, help="proposal IoU filter (default -1: keep all)")
    p.add_argument(
        "--nms-thr", type=float, default=1.0, help="NMS IoU threshold (default 1.0: none removed; paper 0.5)"
    )
    p.add_argument("--num-out", type=int, default=100, help="final detections per image (paper 100)")
    p.add_argument(
        "--gt-score-thr",
        type=float,
        default=0.0,
        help="parity detections above this score are the AP ground truth",
    )
    p.add_argument(
        "--modes", default=DEFAULT_MODES, help=f"comma-separated, parity first (default {DEFAULT_MODES})"
    )
    p.add_argument("--force", default="", help="comma-separated CUDA-only modes to run on the CPU anyway")
    p.add_argument(
        "--coco-json", default=None, help="a COCO json with masks (default: the synthetic smoke set)"
    )
    p.add_argument("--image-root", default=None, help="image folder of --coco-json (default: its folder)")
    p.add_argument(
        "--data-root", default=None, help="where the synthetic set lives (default $NTT_OUTPUT/datasets)"
    )
    p.add_argument(
        "--synthetic-images", type=int, default=24, help="synthetic set size (default 24, as make smoke)"
    )
    p.add_argument("--max-images", type=int, default=4, help="test images measured (default 4; 0 = all)")
    p.add_argument("--shots", type=int, default=2, help="references per class for the prototypes (default 2)")
    p.add_argument("--seed", type=int, default=0, help="reference sampling seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="benchmarks", help="output folder (default benchmarks/)")
    p.add_argument("--tag", default="", help="appended to the output file names")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.force = {m.strip() for m in args.force.split(",") if m.strip()}
    unknown = [m for m in [*args.modes, *args.force] if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
    if not args.modes or args.modes[0] != "parity":
        p.error("--modes must start with parity (every other mode is compared with it)")
    if args.grid < 1 or args.max_images < 0 or args.shots < 1:
        p.error("--grid and --shots must be >= 1, --max-images >= 0")
    return args


def main(argv: list[str] | None = None) -> Path:
    """Measure, write ``fastpaths-*.json`` and ``.md``, print the table.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        Path of the written json.
    """
    from ntt.utils.console import setup_logging

    setup_logging()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    log.warning(RANDOM_WEIGHTS_NOTE)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        report = measure(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    report["timestamp_utc"] = started.isoformat(timespec="seconds")
    report["command"] = _command_line(argv)
    report["load_average_1_5_15_at_end"] = _loadavg()
    md = markdown(report)
    report["table_markdown"] = format_table(table_rows(report)).splitlines()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"-{re.sub(r'[^A-Za-z0-9_.-]+', '-', args.tag)}" if args.tag else ""
    path = out_dir / f"fastpaths-{started:%Y%m%d}-{report['device_slug']}{tag}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(md)
    log.info("wrote %s and %s", path, path.with_suffix(".md").name)
    print(md)
    return path


if __name__ == "__main__":
    main()
