"""ntt.proposals: grid, best-of-3 selection, strict IoU filter, ceil-division decoder batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ntt.proposals import Proposals, generate_proposals, point_grid, select_best_multimask


def test_point_grid_hand_values():
    assert point_grid(2).tolist() == [[0.5, 0.5], [0.5, 1023.5], [1023.5, 0.5], [1023.5, 1023.5]]
    g3 = point_grid(3)
    v = [0.5, 512.0, 1023.5]
    assert g3.tolist() == [[x, y] for x in v for y in v]  # prompt k = (v[k // 3], v[k % 3])
    assert point_grid(1).tolist() == [[0.5, 0.5]]
    assert point_grid(32).shape == (1024, 2)
    assert point_grid(32)[1].tolist() == pytest.approx([0.5, 33.5])
    assert point_grid(2, image_size=8).tolist() == [[0.5, 0.5], [0.5, 7.5], [7.5, 0.5], [7.5, 7.5]]


@pytest.mark.parity
def test_point_grid_bit_exact_vs_fixture(parity_dir):
    want = np.load(parity_dir / "common" / "img14_proposals.npz")["grid_points"]
    got = point_grid(8).numpy()
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.int32), want.view(np.int32))


def test_select_best_multimask_ignores_token0_and_ties_go_first():
    ious = torch.tensor([[0.99, 0.1, 0.5, 0.5], [0.0, 0.2, 0.1, 0.3], [0.0, 0.7, 0.7, 0.7]])
    logits = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4, 1, 1).expand(3, 4, 2, 2)
    best, best_iou, idx = select_best_multimask(logits, ious)
    assert idx.tolist() == [2, 3, 1]
    assert best_iou.tolist() == pytest.approx([0.5, 0.3, 0.7])
    assert best[:, 0, 0].tolist() == [2.0, 7.0, 9.0]  # row r, output idx -> value 4 r + idx
    assert best.shape == (3, 2, 2)


class FakeSAM2:
    """decode() returns masks and IoUs that encode the prompt, and records the batch sizes."""

    def __init__(self, iou_of_point, res: int = 8):
        self.iou_of_point = iou_of_point
        self.res = res
        self.calls: list[int] = []

    def decode(self, feats, *, image_index=0, points=None, point_labels=None):
        assert points.ndim == 3 and points.shape[1:] == (1, 2)
        assert point_labels.shape == points.shape[:2] and bool((point_labels == 1).all())
        b = points.shape[0]
        self.calls.append(b)
        ious = torch.stack([self.iou_of_point(p) for p in points[:, 0]])  # [b, 4]
        # logits of output j for a prompt = x + 1000 * j: lets the test see which output was kept
        base = points[:, 0, 0][:, None] + 1000 * torch.arange(4.0)[None]
        logits = base[:, :, None, None].expand(b, 4, self.res, self.res).clone()
        return logits, ious


def test_generate_proposals_ceil_batches_decode_every_prompt():
    sam = FakeSAM2(lambda p: torch.tensor([0.0, 0.9, 0.8, 0.7]))
    props = generate_proposals(sam, None, points_per_side=3, points_batch_size=4)
    assert sam.calls == [4, 4, 1]  # 9 prompts -> ceil(9 / 4) = 3 batches
    assert isinstance(props, Proposals) and len(props) == 9
    assert props.grid_index.tolist() == list(range(9))
    assert torch.equal(props.points, point_grid(3))
    assert props.grid_best_index.tolist() == [1] * 9
    assert props.logits[:, 0, 0].tolist() == [x + 1000.0 for x in point_grid(3)[:, 0].tolist()]
    assert props.grid_ious_all.shape == (9, 4)


def test_generate_proposals_strict_iou_filter():
    # per-prompt best IoU: prompt k gets iou table row k; thr 0.4 (float32(0.4) == thr -> dropped)
    best = torch.tensor([0.4, 0.41, 0.3, 0.4000001], dtype=torch.float32)
    grid = point_grid(2)

    def iou_of_point(p):
        k = int(((grid - p).abs().sum(1) == 0).nonzero()[0])
        return torch.tensor([1.0, 0.0, float(best[k]), 0.0])

    sam = FakeSAM2(iou_of_point)
    props = generate_proposals(sam, None, points_per_side=2, points_batch_size=3, iou_thr=0.4)
    assert props.grid_index.tolist() == [1, 3]
    assert props.pred_ious.tolist() == [best[1].item(), best[3].item()]
    assert props.grid_pred_ious.tolist() == best.tolist()
    assert props.grid_best_index.tolist() == [2, 2, 2, 2]
    assert props.points.tolist() == [grid[1].tolist(), grid[3].tolist()]
    assert props.logits[:, 0, 0].tolist() == [2000.5, 3023.5]  # output 2 of prompts x = 0.5 / 1023.5

    every = generate_proposals(sam, None, points_per_side=2, points_batch_size=3, iou_thr=0.4, keep_all=True)
    assert every.grid_index.tolist() == [0, 1, 2, 3]


def test_generate_proposals_none_pass():
    sam = FakeSAM2(lambda p: torch.tensor([0.9, 0.1, 0.1, 0.1]))
    props = generate_proposals(sam, None, points_per_side=2, points_batch_size=256)
    assert len(props) == 0
    assert props.logits.shape == (0, 8, 8) and props.points.shape == (0, 2)
    assert sam.calls == [4]
