"""Fast paths vs parity mode: the agreement metrics on inputs with known answers (ntt/tools/agreement.py) and
the measuring tool end to end on the tiny random models (ntt/tools/fastpaths.py)."""

from __future__ import annotations

import json

import pytest
import torch
from pycocotools import mask as mask_utils

from ntt.tools.agreement import (
    AgreementAccumulator,
    DetectionSnapshot,
    ProposalSnapshot,
    ap_against_reference,
    compare_detections,
    compare_proposals,
    mask_iou,
    stats,
)


def _square(size: int, x: int, y: int, side: int) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y : y + side, x : x + side] = True
    return m


def test_mask_iou_known_values():
    a = _square(32, 4, 4, 10)
    shifted = _square(32, 6, 4, 10)  # 2 px right: intersection 8x10, union 12x10
    empty = torch.zeros(32, 32, dtype=torch.bool)
    got = mask_iou(torch.stack([a, a, empty, a]), torch.stack([a, shifted, empty, empty]))
    assert got.tolist() == pytest.approx([1.0, 80 / 120, 1.0, 0.0], abs=0)
    assert stats([1.0, 0.5, float("nan")]) == {"n": 2, "mean": 0.75, "min": 0.5, "max": 1.0}
    assert stats([])["mean"] is None


def _proposals(best: list[int], kept: list[int], masks: torch.Tensor, ious: torch.Tensor) -> ProposalSnapshot:
    return ProposalSnapshot(ious, torch.tensor(best), torch.tensor(kept), masks)


def test_compare_proposals_same_choice_iou_and_score():
    masks = torch.stack([_square(32, 2 * i, 0, 8) for i in range(4)])
    ious = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    ref = _proposals([1, 2, 3, 1], [0, 1, 2, 3], masks, ious)
    same = compare_proposals(ref, ref)
    assert bool(same["same_choice"].all()) and same["mask_iou"].tolist() == [1.0] * 4
    assert float(same["score_diff"].max()) == 0 and same["kept_both"] == 4

    # prompt 1 chooses another output (dropped from the mask IoUs), prompt 3's mask moves by 2 px and its
    # chosen IoU score by 0.25, prompt 0 is filtered out in the fast run
    fast_masks = masks.clone()
    fast_masks[3] = _square(32, 8, 0, 8)
    fast_ious = ious.clone()
    fast_ious[3, 1] += 0.25
    fast = _proposals([1, 3, 3, 1], [1, 2, 3], fast_masks[1:], fast_ious)
    got = compare_proposals(ref, fast)
    assert got["same_choice"].tolist() == [True, False, True, True]
    assert got["kept_ref"] == 4 and got["kept_fast"] == 3 and got["kept_both"] == 3
    assert sorted(got["mask_iou"].tolist()) == pytest.approx([6 * 8 / (10 * 8), 1.0])  # prompts 2 and 3
    assert float(got["score_diff"].max()) == pytest.approx(0.25)


def _detections(prompts, scores, labels, masks) -> DetectionSnapshot:
    return DetectionSnapshot(torch.tensor(prompts), torch.tensor(scores), torch.tensor(labels), masks)


def test_compare_detections_matches_by_prompt_and_counts_drops():
    masks = torch.stack([_square(64, 14 * i, 4, 12) for i in range(4)])
    ref = _detections([5, 9, 2, 7], [0.9, 0.8, 0.7, 0.6], [0, 0, 1, 1], masks)
    fast = _detections([9, 5, 7], [0.8, 0.85, 0.6], [0, 0, 1], masks[[1, 0, 3]])  # prompt 2 dropped
    got = compare_detections(ref, fast)
    assert (got["n_ref"], got["n_fast"], got["matched"], got["ref_only"], got["fast_only"]) == (4, 3, 3, 1, 0)
    assert got["mask_iou"].tolist() == [1.0, 1.0, 1.0] and bool(got["same_label"].all())
    assert float(got["score_diff"].max()) == pytest.approx(0.05, abs=1e-6)

    acc = AgreementAccumulator()
    acc.add(compare_proposals(*[_proposals([1], [0], masks[:1], torch.ones(1, 4))] * 2), got)
    summary = acc.summary()["detections"]
    assert summary["parity_only"] == 1 and summary["count_abs_diff_sum"] == 1 and summary["matched"] == 3


def _coco(masks: torch.Tensor, scores: list[float], image_id: int = 1, cat: int = 1) -> list[dict]:
    out = []
    for m, s in zip(masks, scores):
        rle = mask_utils.encode(m.numpy().astype("uint8", order="F"))
        bbox = [int(v) for v in mask_utils.toBbox(rle)]
        out.append(
            {
                "image_id": image_id,
                "category_id": cat,
                "score": s,
                "bbox": bbox,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
            }
        )
    return out


def test_ap_against_reference_self_is_one_and_a_drop_loses_recall():
    masks = torch.stack([_square(64, 14 * i, 4, 12) for i in range(4)])
    ref = _coco(masks, [0.9, 0.8, 0.7, 0.6])
    images, cats = [{"id": 1, "height": 64, "width": 64}], [{"id": 1, "name": "thing"}]
    self_ap = ap_against_reference(ref, ref, images=images, categories=cats)
    assert self_ap["segm_AP"] == 1.0 and self_ap["bbox_AP"] == 1.0 and self_ap["num_gt"] == 4
    # one of the four ground-truth detections missing: precision 1 up to recall 0.75, then nothing, so the
    # 101-point interpolated AP is 76 / 101 at every IoU threshold
    dropped = ap_against_reference(ref, ref[:2] + ref[3:], images=images, categories=cats)
    assert dropped["segm_AP"] == pytest.approx(76 / 101) and dropped["bbox_AP"] == pytest.approx(76 / 101)
    # only detections above the score threshold are ground truth: the dropped one (0.7) no longer counts
    above = ap_against_reference(ref, ref[:2] + ref[3:], images=images, categories=cats, score_thr=0.75)
    assert above["num_gt"] == 2 and above["segm_AP"] == 1.0
    assert ap_against_reference([], ref, images=images, categories=cats)["segm_AP"] is None


@pytest.mark.slow  # a measuring tool end to end (~9 s busy); the fast paths' equality: the tests above
def test_tool_end_to_end_tiny(tmp_path):
    from ntt.tools.fastpaths import RANDOM_WEIGHTS_NOTE, main

    path = main(
        [
            "--modes", "parity,parity_rerun,bf16,tf32",
            "--grid", "2",
            "--decoder-chunk", "4",
            "--warmup", "0",
            "--max-images", "1",
            "--synthetic-images", "12",
            "--shots", "1",
            "--data-root", str(tmp_path / "data"),
            "--out", str(tmp_path),
            "--no-progress",
        ]
    )  # fmt: skip
    report = json.loads(path.read_text())
    assert path.name.startswith("fastpaths-") and path.name.endswith("-cpu.json")
    assert path.with_suffix(".md").is_file() and "RANDOM WEIGHTS" in path.with_suffix(".md").read_text()
    assert report["WARNING"] == RANDOM_WEIGHTS_NOTE and report["settings"]["random_init"] is True
    modes = report["modes"]
    assert modes["tf32"]["status"].startswith("skipped") and "CPU" in modes["tf32"]["status"]
    assert modes["parity"]["ap_vs_parity"]["segm_AP"] == 1.0  # the AP computation's self-check

    rerun = modes["parity_rerun"]
    a = rerun["agreement"]
    assert rerun["status"] == "ok" and a["images"] == 1 and a["proposals"]["prompts"] == 4
    assert a["proposals"]["same_chosen_output"] == 1.0 and a["proposals"]["mask_iou"]["min"] == 1.0
    assert a["proposals"]["iou_score_abs_diff_all4"]["max"] == 0.0
    assert a["detections"]["parity_only"] == a["detections"]["fast_only"] == 0
    assert a["detections"]["parity"] >= 3  # the settings (nms_thr 1.0) leave detections to compare
    assert a["detections"]["score_abs_diff"]["max"] == 0.0 and rerun["ap_vs_parity"]["segm_AP"] == 1.0

    bf16 = modes["bf16"]
    b = bf16["agreement"]
    assert bf16["status"] == "ok" and b["proposals"]["iou_score_abs_diff_all4"]["max"] > 0  # not exact
    assert 0.5 < b["proposals"]["mask_iou"]["mean"] <= 1.0
    assert 0.0 <= bf16["ap_vs_parity"]["segm_AP"] <= 1.0
    assert bf16["timing"]["images"] == 1 and bf16["timing"]["images_per_s"] > 0
    assert len(report["table_markdown"]) == 2 + 4  # header, separator, one row per mode
