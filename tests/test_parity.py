"""Parity with the authors' reference code, stage by stage (../shared/parity, see its README).

ntt's normal pipeline (the Hydra app's `run_pipeline`, the normal backbone builders and config groups) runs
in parity mode on the fixture: tiny random-weight SAM2 + DINOv2 saved in the official formats, the
authors' fixed 2-shot reference pkl on fruits_nuts, target images 14, 15, 16, in the two settings
`paper` (nms_thr 0.5) and `nms_off` (nms_thr 1.0). Every stored quantity is compared with the README's
tolerances, in pipeline order; the first quantity that differs fails the test and is named, so a mismatch
points at the first stage that differs. The fixture and its tolerances are never changed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import PARITY, REPO, SHARED, require_path
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from pycocotools import mask as mask_utils

pytestmark = pytest.mark.parity
SETTINGS = {"paper": 0.5, "nms_off": 1.0}
IMAGES = (14, 15, 16)
ATOL = 1e-5


class Mismatch(AssertionError):
    pass


class Checker:
    """Compares in pipeline order and raises at the first difference, naming the stage and quantity."""

    def __init__(self, setting: str):
        self.setting = setting
        self.checked: list[str] = []

    def fail(self, stage: str, what: str, detail: str):
        raise Mismatch(
            f"[{self.setting}] first mismatch at stage `{stage}`, quantity `{what}`: {detail} "
            f"(passed before it: {len(self.checked)} comparisons, last: "
            f"{self.checked[-1] if self.checked else 'none'})"
        )

    def close(self, stage, what, got, want, atol=ATOL, rel_to=None):
        got = np.asarray(got, dtype=np.float64)
        want = np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            self.fail(stage, what, f"shape {got.shape} != expected {want.shape}")
        nan_g, nan_w = np.isnan(got), np.isnan(want)
        if not np.array_equal(nan_g, nan_w):
            self.fail(
                stage,
                what,
                f"NaN at different positions: got {np.argwhere(nan_g)[:5].tolist()}, "
                f"expected {np.argwhere(nan_w)[:5].tolist()}",
            )
        ok = ~nan_w
        tol = atol * (np.abs(np.asarray(rel_to, dtype=np.float64)) if rel_to is not None else 1.0)
        diff = np.abs(got - want)
        bad = ok & (diff > tol)
        if bad.any():
            idx = tuple(np.argwhere(bad)[0])
            self.fail(
                stage,
                what,
                f"max abs diff {diff[ok].max():.3g} > tolerance; first at {idx}: "
                f"got {got[idx]!r}, expected {want[idx]!r}",
            )
        self.checked.append(f"{stage}:{what}")

    def equal(self, stage, what, got, want):
        got, want = np.asarray(got), np.asarray(want)
        if got.shape != want.shape or not np.array_equal(got, want):
            self.fail(
                stage,
                what,
                f"got {got.tolist() if got.size < 40 else got.shape}, "
                f"expected {want.tolist() if want.size < 40 else want.shape}",
            )
        self.checked.append(f"{stage}:{what}")

    def masks(self, stage, what, got, want, min_iou=0.999):
        """Binary masks: identical, or per-item IoU above `min_iou` (pixels at logits ~0 may flip)."""
        got, want = np.asarray(got, bool), np.asarray(want, bool)
        if got.shape != want.shape:
            self.fail(stage, what, f"shape {got.shape} != expected {want.shape}")
        for i in range(len(want)):
            inter = np.logical_and(got[i], want[i]).sum()
            union = np.logical_or(got[i], want[i]).sum()
            iou = 1.0 if union == 0 else inter / union
            if iou <= min_iou:
                self.fail(stage, what, f"item {i}: mask IoU {iou:.6f} <= {min_iou}")
        self.checked.append(f"{stage}:{what}")


def _run_pipeline(setting: str, out_dir: Path) -> Path:
    from ntt.pipeline import run_pipeline

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="main",
            overrides=[
                f"hydra.searchpath=[file://{REPO / 'tests' / 'configs'}]",
                "dataset=parity_fruits",
                "backbone/sam2=parity_tiny",
                "backbone/dinov2=parity_tiny",
                "proposer=parity_grid8",
                "matcher=paper",
                f"matcher.nms_thr={SETTINGS[setting]}",
                "eval=coco",
                "logger=none",
                "shots=2",
                "seed=42",
                f"variant=parity_{setting}",
                "device=cpu",
                "trace=true",
                "fail_fast=true",
                f"paths.output_dir={out_dir}",
                f"++paths.shared={SHARED}",  # test-only key of tests/configs
            ],
        )
    run_pipeline(cfg)
    return Path(str(cfg.run_dir))


def _unpack(packed: np.ndarray) -> np.ndarray:
    return np.unpackbits(packed, axis=1)[:, :65536].reshape(-1, 256, 256).astype(bool)


def _check_refs(c: Checker, run: Path):
    want = json.loads((PARITY / "common" / "refs.json").read_text())
    got = json.loads((run / "refs.json").read_text())
    want_pairs = _ref_pairs(want)
    got_pairs = _ref_pairs(got)
    c.equal("sample_refs", "reference (category, img_id, ann_id) per slot", got_pairs, want_pairs)


def _ref_pairs(data) -> list[tuple[int, int, int]]:
    """Normalise a refs document to [(category_id, image_id, first ann id)] in slot order."""
    if isinstance(data, dict) and "refs" in data:
        data = data["refs"]
    pairs = []
    if isinstance(data, dict):
        for cat, entries in sorted(data.items(), key=lambda kv: int(kv[0])):
            for e in entries:
                ann = e.get("ann_ids", [e.get("ann_id")])
                ann = ann[0] if isinstance(ann, list) else ann
                pairs.append((int(cat), int(e.get("img_id", e.get("image_id"))), int(ann)))
    else:
        for e in data:
            pairs.append((int(e["category_id"]), int(e["image_id"]), int(e["ann_ids"][0])))
    return pairs


def _check_memory(c: Checker, run: Path):
    import torch

    want = np.load(PARITY / "common" / "memory.npz")
    trace = np.load(run / "trace" / "memory.npz")
    c.close("fill_memory", "ref_mask_weights", trace["mask_weights"], want["ref_mask_weights"], atol=1e-6)
    c.close(
        "fill_memory",
        "ref_mask_weight_sums",
        trace["mask_weights"].sum(-1),
        want["ref_mask_weight_sums"],
        atol=1e-4,
    )
    feats = trace["patch_features"][0, 0].reshape(-1, want["ref_feats_c0_k0"].shape[-1])
    c.close("fill_memory", "ref_feats_c0_k0", feats, want["ref_feats_c0_k0"])
    bank = torch.load(run / "memory_postprocessed.pt", map_location="cpu", weights_only=True)
    means = bank["instance_means"] if isinstance(bank, dict) else bank.instance_means
    c.close("fill_memory", "instance_means", np.asarray(means), want["instance_means"])
    c.close("postprocess_memory", "prototypes", trace["prototypes"], want["prototypes"])


PROPOSAL_FLOAT_KEYS = ["grid_pred_ious_all4", "grid_pred_ious", "pred_ious"]


def _check_image(c: Checker, run: Path, setting: str, img: int):
    want = np.load(PARITY / "common" / f"img{img}_proposals.npz")
    post = np.load(PARITY / setting / f"img{img}_post.npz")
    got = np.load(run / "trace" / f"img{img}.npz")
    st = f"test/img{img}"
    c.close(f"{st}/dinov2", "dino_feats", got["dino_feats"], want["dino_feats"])
    c.equal(f"{st}/grid", "grid_points", got["grid_points"], want["grid_points"])
    c.close(f"{st}/sam2", "grid_pred_ious_all4", got["grid_pred_ious_all4"], want["grid_pred_ious_all4"])
    c.equal(f"{st}/sam2", "grid_best_index", got["grid_best_index"], want["grid_best_index"])
    c.close(f"{st}/sam2", "grid_pred_ious", got["grid_pred_ious"], want["grid_pred_ious"])
    c.equal(f"{st}/iou_filter", "N", len(got["pred_ious"]), len(want["pred_ious"]))
    c.equal(f"{st}/iou_filter", "points", got["points"], want["points"])
    c.close(f"{st}/iou_filter", "pred_ious", got["pred_ious"], want["pred_ious"])
    logits = got["logits"]
    c.close(f"{st}/proposals", "lowres_logits_stride8", logits[:, ::8, ::8], want["lowres_logits_stride8"])
    c.close(f"{st}/proposals", "logits_min", logits.min(axis=(1, 2)), want["logits_min"])
    c.close(f"{st}/proposals", "logits_max", logits.max(axis=(1, 2)), want["logits_max"])
    c.close(
        f"{st}/proposals",
        "logits_sum",
        logits.astype(np.float64).sum(axis=(1, 2)),
        want["logits_sum"],
        rel_to=want["logits_abs_sum"],
    )
    if "lowres_logits_full" in want.files:
        idx = want["lowres_logits_full_index"]
        c.close(f"{st}/proposals", "lowres_logits_full", logits[idx], want["lowres_logits_full"])
    c.masks(f"{st}/proposals", "masks256", logits > 0, _unpack(want["masks256_packed"]))
    c.equal(f"{st}/proposals", "lowres_boxes_xyxy", got["lowres_boxes_xyxy"], want["lowres_boxes_xyxy"])
    c.close(f"{st}/matching", "embeddings", got["embeddings"], want["embeddings"])
    c.close(f"{st}/matching", "sim", got["sim"], want["sim"])
    c.equal(f"{st}/matching", "labels", got["labels"], want["labels"])
    c.close(f"{st}/matching", "scores", got["scores"], want["scores"])
    c.equal(f"{st}/nms", "nms_keep", got["nms_keep"], post["nms_keep"])
    c.equal(f"{st}/nms", "nms_keep_pos", got["nms_keep_pos"], post["nms_keep_pos"])
    c.close(f"{st}/soft_merge", "ios", got["ios"], post["ios"])
    c.close(f"{st}/soft_merge", "scores_decayed", got["scores_decayed"], post["scores_decayed"])
    c.equal(f"{st}/top_k", "final_order", got["final_order"], post["final_order"])
    c.equal(f"{st}/top_k", "final_proposal", got["final_proposal"], post["final_proposal"])
    c.close(f"{st}/top_k", "final_scores", got["final_scores"], post["final_scores"])
    c.equal(f"{st}/top_k", "final_labels", got["final_labels"], post["final_labels"])
    c.equal(f"{st}/top_k", "final_boxes_xyxy", got["final_boxes_xyxy"], post["final_boxes_xyxy"])


def _check_results(c: Checker, run: Path, setting: str):
    want = json.loads((PARITY / setting / "coco_results.json").read_text())
    got = json.loads((run / "predictions.json").read_text())
    c.equal("results", "number of detections", len(got), len(want))
    c.equal("results", "image_id", [r["image_id"] for r in got], [r["image_id"] for r in want])
    c.equal("results", "category_id", [r["category_id"] for r in got], [r["category_id"] for r in want])
    c.equal("results", "bbox", [r["bbox"] for r in got], [r["bbox"] for r in want])
    c.close("results", "score", [r["score"] for r in got], [r["score"] for r in want])
    gm = [mask_utils.decode(_rle(r["segmentation"])) for r in got]
    wm = [mask_utils.decode(_rle(r["segmentation"])) for r in want]
    c.masks("results", "segmentation (RLE masks)", np.stack(gm), np.stack(wm))
    want_eval = json.loads((PARITY / setting / "cocoeval.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    for iou_type in ("bbox", "segm"):
        stats = want_eval[iou_type] if isinstance(want_eval[iou_type], list) else want_eval[iou_type]["stats"]
        c.close(
            "eval", f"COCOeval {iou_type} stats", [metrics[iou_type][n] for n in names], stats, atol=1e-12
        )


def _rle(seg):
    seg = dict(seg)
    if isinstance(seg["counts"], str):
        seg["counts"] = seg["counts"].encode()
    return seg


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_pipeline_matches_reference_stage_by_stage(setting, tmp_path):
    require_path(PARITY, "parity fixture")
    require_path(SHARED / "data" / "fruits_nuts", "fruits_nuts dataset")
    run = _run_pipeline(setting, tmp_path)
    c = Checker(setting)
    _check_refs(c, run)
    _check_memory(c, run)
    for img in IMAGES:
        _check_image(c, run, setting, img)
    _check_results(c, run, setting)
    assert len(c.checked) >= 90  # every quantity of the README was compared (96 today)
