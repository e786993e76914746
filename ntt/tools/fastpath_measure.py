"""The measurement of ``make bench-fastpaths``: every mode on every test image, timed and compared.

Data and prototypes as the pipeline makes them (:func:`load_data`, :func:`build_prototypes`), then per image
each mode's per-image path one after the other, parity first (:func:`measure`), and per mode the JSON-ready
figures (:func:`mode_report`). ``ntt.tools.fastpaths`` is the command and its report.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
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
from ntt.tools.fastpath_modes import MODES, FastMode, mode_backbone
from ntt.tools.machine import device_slug, hardware_info, load_average, peak_rss_mib, sync
from ntt.tools.random_models import build_models

log = logging.getLogger("ntt.tools.fastpaths")

RANDOM_WEIGHTS_NOTE = (
    "RANDOM WEIGHTS: every model was built with random_init=True and no checkpoint was loaded. Timings are "
    "speed only; agreement figures measure how far a fast path moves the outputs from parity mode's on the "
    "same inputs, never accuracy."
)
SCHEMA_VERSION = 1


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
    from ntt.fill import fill_memory
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


def raise_interrupted(signum, frame) -> None:
    raise Interrupted(f"signal {signum}")


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
    rss0 = peak_rss_mib()
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        shared = propose_image(image, sam2=run.backbone, dino=dino, params=p)
        det, _ = classify_and_postprocess(
            shared, prototypes, height=int(info["height"]), width=int(info["width"]), params=p
        )
    sync(device)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        run.peak_mem_mib = max(run.peak_mem_mib, torch.cuda.max_memory_allocated(device) / 2**20)
    run.rss_growth_mib += peak_rss_mib() - rss0
    return seconds, shared, det


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Build everything, run every mode on every image, return the report (see the module docstring)."""
    from tqdm import tqdm

    from ntt.data.images import load_test_image
    from ntt.inference import InferenceParams
    from ntt.results import detections_to_coco

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
                load1 = load_average()
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
