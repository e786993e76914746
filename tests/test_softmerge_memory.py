"""Memory-bounded soft merging (ntt.postprocess.semantic_soft_merge, method.md §10 item 4): bit-identical to
the whole-class implementation it replaced, and the producer is never asked for more than the budget allows."""

from __future__ import annotations

import weakref

import pytest
import torch

from ntt.postprocess import _semantic_similarity, resize_masks_to_image, semantic_soft_merge


def _reference_soft_merge(masks, labels, embeddings, scores):
    """The implementation before the memory bound (whole class at once, chunked float32 matmul)."""
    sem = _semantic_similarity(embeddings.float())
    ios = torch.zeros(labels.shape[0], dtype=torch.float32)
    areas = torch.zeros(labels.shape[0], dtype=torch.float64)
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c, as_tuple=True)[0]
        m = masks[idx]
        n = m.shape[0]
        flat = m.reshape(n, -1)
        chunk = max(1, min(1 << 24, (1 << 26) // max(n, 1), flat.shape[1]))
        inter = torch.zeros(n, n, dtype=torch.float64)
        for s in range(0, flat.shape[1], chunk):
            part = flat[:, s : s + chunk].float()
            inter += (part @ part.T).double()
        area = flat.sum(dim=1).double()
        ios_mat = (inter / area[:, None]).float()
        lower = torch.ones(n, n, dtype=torch.bool).tril(diagonal=-1)
        vals = torch.where(lower, ios_mat * sem[idx][:, idx], torch.zeros(()))
        ios_c = vals.amax(dim=1)
        ios[idx] = torch.where(area == 0, torch.full_like(ios_c, float("nan")), ios_c)
        areas[idx] = area
    return ios, scores * (1 - ios) ** 0.5, areas


def _random_masks(gen, n, h, w):
    """Rectangles of random size (some touching the borders, some full-image, some empty) with holes."""
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for k in range(n):
        kind = int(torch.randint(0, 10, (1,), generator=gen))
        if kind == 0:
            continue  # empty
        if kind == 1:
            masks[k] = True  # full image: touches every border
            continue
        y0 = int(torch.randint(0, h, (1,), generator=gen))
        x0 = int(torch.randint(0, w, (1,), generator=gen))
        y1 = int(torch.randint(y0 + 1, h + 1, (1,), generator=gen)) if kind != 2 else h
        x1 = int(torch.randint(x0 + 1, w + 1, (1,), generator=gen)) if kind != 3 else w
        masks[k, y0:y1, x0:x1] = torch.rand(y1 - y0, x1 - x0, generator=gen) > 0.2
    return masks


def _inputs(seed, n, h, w, n_classes):
    gen = torch.Generator().manual_seed(seed)
    masks = _random_masks(gen, n, h, w)
    labels = torch.randint(0, n_classes, (n,), generator=gen)
    labels[0] = n_classes  # a class with a single mask
    emb = torch.nn.functional.normalize(torch.randn(n, 16, generator=gen), dim=1)
    scores = torch.rand(n, generator=gen)
    return masks, labels, emb, scores


def _assert_identical(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert torch.equal(torch.isnan(g), torch.isnan(w))
        assert torch.equal(torch.nan_to_num(g, nan=-7.0), torch.nan_to_num(w, nan=-7.0))


# max_bytes: whole-class path; crops all kept; crops partly kept (some produced again); nothing kept, 1 per block.
@pytest.mark.parametrize("max_bytes", [1 << 30, 40 * 30 * 40, 4 * 30 * 40 * 4, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounded_soft_merge_equals_whole_class(seed, max_bytes):
    masks, labels, emb, scores = _inputs(seed, 60, 30, 40, n_classes=2)
    want = _reference_soft_merge(masks, labels, emb, scores)
    assert torch.isnan(want[0]).any()  # empty masks are in the test
    got = semantic_soft_merge(lambda idx: masks[idx], labels, emb, scores, max_bytes=max_bytes)
    _assert_identical(got, want)
    _assert_identical(semantic_soft_merge(masks, labels, emb, scores, max_bytes=max_bytes), want)


def test_bounded_soft_merge_equals_whole_class_on_upsampled_logits():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(40, 16, 16, generator=gen) * 4 - 2
    logits[3] = -5.0  # empty at full resolution
    h, w = 61, 47
    masks = resize_masks_to_image(logits, h, w)
    labels = torch.zeros(40, dtype=torch.int64)
    emb = torch.nn.functional.normalize(torch.randn(40, 8, generator=gen), dim=1)
    scores = torch.rand(40, generator=gen)
    want = _reference_soft_merge(masks, labels, emb, scores)
    for max_bytes in (1 << 30, 40 * h * w, 8 * h * w, 0):
        got = semantic_soft_merge(
            lambda idx: resize_masks_to_image(logits[idx], h, w), labels, emb, scores, max_bytes=max_bytes
        )
        _assert_identical(got, want)


class _RecordingProducer:
    """Full-resolution masks on demand, recording the bytes of produced masks still alive at every call."""

    def __init__(self, masks):
        self.masks = masks
        self.alive: list[weakref.ref] = []
        self.max_call = 0
        self.max_alive = 0
        self.calls = 0

    def __call__(self, idx):
        out = self.masks[idx].clone()
        self.calls += 1
        self.alive = [r for r in self.alive if r() is not None]
        self.alive.append(weakref.ref(out))
        self.max_call = max(self.max_call, out.numel())
        self.max_alive = max(self.max_alive, sum(r().numel() for r in self.alive))
        return out


def test_producer_asked_within_budget():
    h, w, n = 50, 64, 120
    masks, labels, emb, scores = _inputs(3, n, h, w, n_classes=1)
    labels[:] = 0  # one big class: the whole-class path would hold 120 masks
    max_bytes = 32 * h * w  # block of 2 masks, whole class needs 4x fewer masks
    prod = _RecordingProducer(masks)
    got = semantic_soft_merge(prod, labels, emb, scores, max_bytes=max_bytes)
    _assert_identical(got, _reference_soft_merge(masks, labels, emb, scores))
    assert prod.max_call <= 2 * h * w  # never more than one block per call
    assert prod.max_alive <= 2 * 2 * h * w  # at most two blocks alive
    # A budget holding the whole class asks for it in blocks but keeps it all (one call per block).
    prod = _RecordingProducer(masks)
    semantic_soft_merge(prod, labels, emb, scores, max_bytes=16 * n * h * w)
    assert prod.max_call <= n * h * w and prod.calls <= 1 + n
