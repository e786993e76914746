"""ntt.matching: pooled mask embeddings (dense / adjoint) and top-1 classification."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ntt.matching import classify, interpolation_matrix, mask_embeddings, top1, upsample_features

NAN = float("nan")


@pytest.mark.parametrize("method", ["dense", "adjoint"])
def test_constant_features_give_the_normalised_constant(method):
    feats = torch.tensor([3.0, 4.0]).expand(5, 5, 2).contiguous()
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 2:5, 7:9] = True
    masks[1, 15, 15] = True
    e = mask_embeddings(masks, feats, method=method)
    assert torch.allclose(e, torch.tensor([[0.6, 0.8], [0.6, 0.8]]), atol=1e-6)


@pytest.mark.parametrize("method", ["dense", "adjoint"])
def test_ramp_on_2x2_grid_hand_computed(method):
    # channel 0 = 1, channel 1 = row index (0 / 1). Bilinear 2 -> 4 (align_corners False) samples source rows
    # (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 -> clamped: 0, 0.25, 0.75, 1 in channel 1.
    feats = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, 1] = True  # row 1 -> mean (1, 0.25)
    masks[1, 0] = True
    masks[1, 3] = True  # rows 0 and 3 -> mean (1, 0.5)
    masks[2, 2, 1:3] = True  # row 2 -> (1, 0.75)
    e = mask_embeddings(masks, feats, method=method)
    want = torch.tensor([[1, 0.25], [1, 0.5], [1, 0.75]])
    want = want / want.norm(dim=1, keepdim=True)
    assert torch.allclose(e, want, atol=1e-6)


def test_interpolation_matrix_known_weights():
    u = interpolation_matrix(2, 4)
    assert torch.allclose(u, torch.tensor([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1.0]]))
    x = torch.randn(37, 29, 1)
    up = upsample_features(x, (256, 200))[..., 0]
    sep = interpolation_matrix(37, 256) @ x[..., 0] @ interpolation_matrix(29, 200).T
    assert (sep - up).abs().max() < 1e-5


def test_adjoint_equals_dense_on_random_data():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(37, 37, 64, generator=g)
    masks = torch.rand(40, 256, 256, generator=g) > torch.rand(40, 1, 1, generator=g)
    masks[3] = False
    masks[4] = False
    masks[4, 100, 17] = True  # single pixel
    dense = mask_embeddings(masks, feats, method="dense", chunk_size=16)
    adj = mask_embeddings(masks, feats, method="adjoint", chunk_size=7)
    assert torch.equal(dense.isnan(), adj.isnan())
    assert dense[3].isnan().all() and not dense[4].isnan().any()
    assert (dense - adj).nan_to_num().abs().max() < 1e-5


def test_empty_masks_and_no_masks():
    feats = torch.randn(4, 4, 3)
    e = mask_embeddings(torch.zeros(2, 8, 8, dtype=torch.bool), feats)
    assert e.isnan().all()
    assert mask_embeddings(torch.zeros(0, 8, 8, dtype=torch.bool), feats).shape == (0, 3)
    with pytest.raises(ValueError):
        mask_embeddings(torch.zeros(1, 8, 8, dtype=torch.bool), feats, method="nope")


def test_classify_clamp_ties_and_nan():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    s = 1 / math.sqrt(2)
    emb = torch.tensor([[0.6, 0.8], [s, s], [0.0, -1.0], [NAN, NAN], [-0.6, 0.8]])
    sim, labels, scores = classify(emb, protos)
    assert labels.tolist() == [1, 0, 0, 0, 1]  # tie -> first; all-zero (clamped) row -> 0; NaN row -> 0
    assert sim[2].tolist() == [0.0, 0.0, 0.0]
    assert sim[3].isnan().all() and scores[3].isnan()
    assert scores[[0, 1, 2, 4]].tolist() == pytest.approx([0.8, s, 0.0, 0.8])
    assert labels.dtype == torch.int64


def test_classify_matches_torch_topk_semantics_with_partial_nan():
    # A NaN prototype makes that column NaN: topk picks it (NaN is largest)
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [NAN, 0.0], [NAN, NAN]])
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sim, labels, scores = classify(emb, protos)
    assert labels.tolist() == [2, 2]
    top = torch.topk(sim, 1)
    assert labels.tolist() == top.indices[:, 0].tolist()
    # Random rows with exact ties and NaNs vs torch.topk on CPU with C = 3 (the fixture's C). For C >= 4 the
    # CPU topk kernel (nth_element) does NOT return the first of tied maxima, e.g. [0, 0, 0, 0, 0] -> 2;
    # CUDA's topk (the paper runs) and the specification (method.md §12b item 1) take the first, as classify does.
    g = torch.Generator().manual_seed(1)
    sim_like = torch.randint(-2, 3, (300, 3), generator=g).float() / 2
    sim_like[torch.rand(300, 3, generator=g) < 0.1] = NAN
    lab, sc = top1(sim_like)
    ref = torch.topk(sim_like, 1)
    assert lab.tolist() == ref.indices[:, 0].tolist()
    assert torch.equal(sc.isnan(), ref.values[:, 0].isnan())
    assert sim_like[1].isnan().tolist() == [False, False, True] and lab[1] == 2
    assert top1(torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0]]))[0].tolist() == [0]


def test_classify_empty():
    sim, labels, scores = classify(torch.zeros(0, 4), torch.zeros(3, 4))
    assert sim.shape == (0, 3) and labels.shape == (0,) and scores.shape == (0,)


def _unpack(packed: np.ndarray) -> torch.Tensor:
    n = packed.shape[0]
    return torch.from_numpy(np.unpackbits(packed, axis=1)[:, :65536].reshape(n, 256, 256).astype(bool))


def _assert_close_nan(got: np.ndarray, want: np.ndarray, atol: float) -> float:
    assert np.array_equal(np.isnan(got), np.isnan(want))
    diff = np.nan_to_num(np.abs(got.astype(np.float64) - want))
    assert diff.max() <= atol
    return float(diff.max())


@pytest.mark.parity
@pytest.mark.parametrize("img", [14, 15, 16])
def test_fixture_embeddings_and_classification(parity_dir, img):
    d = np.load(parity_dir / "common" / f"img{img}_proposals.npz")
    protos = torch.from_numpy(np.load(parity_dir / "common" / "memory.npz")["prototypes"])
    masks = _unpack(d["masks256_packed"])
    feats = torch.from_numpy(d["dino_feats"])
    for method in ("dense", "adjoint"):
        e = mask_embeddings(masks, feats, method=method)
        _assert_close_nan(e.numpy(), d["embeddings"], 1e-5)
        sim, labels, scores = classify(e, protos)
        _assert_close_nan(sim.numpy(), d["sim"], 1e-5)
        assert np.array_equal(labels.numpy(), d["labels"])
        _assert_close_nan(scores.numpy(), d["scores"], 1e-5)
