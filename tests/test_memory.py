"""Tests of ntt.memory: crops, mask weights, instance means, prototypes, MemoryBank, fill and postprocess."""

from __future__ import annotations

import io
import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DATA, PARITY
from helpers_memory import FakeEncoder, toy_dataset

from ntt.bank import MEMORY_FORMAT_VERSION, MemoryBank, compute_prototypes
from ntt.data.images import load_reference_image
from ntt.data.masks import ann_to_mask
from ntt.fill import fill_memory, postprocess_memory
from ntt.memory import (
    BadReferenceError,
    context_crop_box,
    crop_reference,
    instance_mean,
    mask_patch_weights,
)
from ntt.refs import RefEntry, load_refs
from ntt.utils.errors import UserError

FRUITS = DATA / "fruits_nuts" / "data"  # NTT_SHARED is honoured (tests/conftest.py)


# ------------------------------------------------------------------------------------------------ crops


def test_context_crop_box_worked_example():
    # method.md §3.1: integer box (100, 50, 300, 171), side 240 around (200, 110.5)
    assert context_crop_box((100.7, 50.2, 200.0, 120.9), 640, 480, 0.2) == (80, 0, 320, 230)


def test_context_crop_box_clips_and_truncates():
    # box at the bottom-right corner: clipped to the image
    assert context_crop_box((600, 450, 40, 30), 640, 480, 0.2) == (596, 441, 640, 480)
    # context_ratio 0: the square of side max(bw, bh)
    assert context_crop_box((10, 10, 20, 10), 100, 100, 0.0) == (10, 5, 30, 25)
    # float64 matters (method.md §12b item 6): side = 170 * 1.2 = 204.0 in float64 but 204.0000081 in float32, so a
    # float32 implementation would put the left edge at int(23.999996) = 23 instead of 24
    assert context_crop_box((97.56, 261.14, 58.13, 170.69), 640, 640, 0.2) == (24, 244, 228, 448)


def test_crop_reference_matches_explicit_interpolation():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 48, 64, generator=g)
    mask = torch.zeros(48, 64)
    mask[10:30, 20:40] = 1
    crop, soft = crop_reference(image, mask, (20, 10, 20, 20), context_ratio=0.2, size=28)
    x1, y1, x2, y2 = context_crop_box((20, 10, 20, 20), 64, 48, 0.2)
    assert (x1, y1, x2, y2) == (18, 8, 42, 32)
    exp_img = F.interpolate(image[None, :, y1:y2, x1:x2], size=(28, 28), mode="bicubic", align_corners=False)
    exp_mask = F.interpolate(
        mask[None, None, y1:y2, x1:x2], size=(28, 28), mode="bilinear", align_corners=False
    )
    assert torch.equal(crop, exp_img[0]) and torch.equal(soft, exp_mask[0, 0])
    assert crop.shape == (3, 28, 28) and soft.shape == (28, 28)
    assert float(soft.min()) >= 0.0 and float(soft.max()) <= 1.0
    assert 0 < int(((soft > 0) & (soft < 1)).sum())  # soft edges, not binarised
    # bicubic overshoot is kept (no clamp)
    checker = torch.zeros(3, 48, 64)
    checker[:, ::2] = 1.0
    c2, _ = crop_reference(checker, mask, (20, 10, 20, 20), size=56)
    assert float(c2.max()) > 1.0 or float(c2.min()) < 0.0


def test_crop_reference_identity_when_crop_has_the_output_size():
    image = torch.rand(3, 40, 40)
    mask = torch.ones(40, 40)
    crop, soft = crop_reference(image, mask, (0, 0, 40, 40), context_ratio=0.0, size=40)
    assert torch.equal(crop, image) and torch.equal(soft, mask)


def test_crop_reference_empty_box():
    with pytest.raises(ValueError, match="empty context crop"):
        crop_reference(torch.rand(3, 10, 10), torch.ones(10, 10), (3, 3, 0.5, 0.5))


# ------------------------------------------------------------------------------------------------ weights


def test_mask_patch_weights_nearest_samples_top_left_pixels():
    soft = torch.arange(28 * 28, dtype=torch.float32).reshape(28, 28) / 1000.0
    w = mask_patch_weights(soft, 2)
    assert w.tolist() == [soft[0, 0].item(), soft[0, 14].item(), soft[14, 0].item(), soft[14, 14].item()]
    area = mask_patch_weights(soft, 2, mask_pooling="area")
    exp = [soft[:14, :14].mean(), soft[:14, 14:].mean(), soft[14:, :14].mean(), soft[14:, 14:].mean()]
    assert area.tolist() == pytest.approx([float(v) for v in exp], abs=1e-6)
    with pytest.raises(ValueError, match="mask_pooling"):
        mask_patch_weights(soft, 2, mask_pooling="max")


def test_mask_patch_weights_518_to_37_takes_pixel_14i():
    soft = torch.rand(518, 518, generator=torch.Generator().manual_seed(1))
    w = mask_patch_weights(soft, 37).reshape(37, 37)
    idx = torch.arange(37) * 14
    assert torch.equal(w, soft[idx][:, idx])
    # a thin line between the sampled pixels is invisible to "nearest" but not to "area"
    line = torch.zeros(518, 518)
    line[:, 20] = 1.0
    assert float(mask_patch_weights(line, 37).sum()) == 0.0
    assert float(mask_patch_weights(line, 37, mask_pooling="area").sum()) > 0.0


# ------------------------------------------------------------------------------------------------ means


def test_instance_mean_by_hand():
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    w = torch.tensor([1.0, 0.0, 0.5])
    got = instance_mean(feats, w)
    assert got.tolist() == pytest.approx([(1 + 2.5) / 1.5, (2 + 3) / 1.5], abs=1e-6)
    assert torch.isnan(instance_mean(feats, torch.zeros(3))).all()


def test_compute_prototypes_by_hand():
    means = torch.tensor([[[3.0, 0.0], [1.0, 0.0]], [[0.0, 2.0], [0.0, 4.0]], [[3.0, 4.0], [9.0, 12.0]]])
    p = compute_prototypes(means)
    assert torch.allclose(p, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), atol=1e-6)
    # mean of un-normalised means, not of normalised ones: [3,0] and [0,1] -> [1.5, .5] direction
    q = compute_prototypes(torch.tensor([[[3.0, 0.0], [0.0, 1.0]]]))
    assert q[0].tolist() == pytest.approx([3 / math.sqrt(10), 1 / math.sqrt(10)], abs=1e-6)


# ------------------------------------------------------------------------------------------------ bank


def _bank(k=2, d=4, **kw):
    g = torch.Generator().manual_seed(3)
    args = dict(
        instance_means=torch.randn(3, k, d, generator=g),
        weight_sums=torch.rand(3, k, generator=g) + 1.0,
        category_ids=[1, 2, 3],
        category_names=["a", "b", "c"],
        shots=k,
        seed=33,
        encoder="fake",
        config_hash="abc",
        refs=[[{"image_id": i, "ann_id": 10 * i + j} for j in range(k)] for i in range(3)],
    )
    args.update(kw)
    return MemoryBank(**args)


def test_bank_roundtrip_and_prototypes(tmp_path):
    bank = _bank()
    assert bank.feature_dim == 4
    path = tmp_path / "run" / "memory.pt"
    bank.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["memory.pt"]  # no temp file left
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"meta_json", "instance_means", "weight_sums"}
    back = MemoryBank.load(path, expect={"shots": 2, "category_ids": [1, 2, 3], "encoder": "fake"})
    assert torch.equal(back.instance_means, bank.instance_means)
    assert torch.equal(back.weight_sums, bank.weight_sums)
    assert back.meta() == bank.meta()
    assert torch.equal(back.prototypes(), compute_prototypes(bank.instance_means))


def test_bank_load_names_every_mismatch(tmp_path):
    path = tmp_path / "memory.pt"
    _bank(k=10, d=4).save(path)
    with pytest.raises(ValueError) as err:
        MemoryBank.load(path, expect={"shots": 30, "seed": 33, "encoder": "dinov2_large"})
    msg = str(err.value)
    assert "memory.pt" in msg and "shots=10, but this run has shots=30" in msg
    assert "encoder='fake', but this run has encoder='dinov2_large'" in msg
    assert "seed=" not in msg  # matching fields are not listed
    assert "rerun stage fill_memory" in msg
    with pytest.raises(ValueError, match="unknown field"):
        MemoryBank.load(path, expect={"nope": 1})
    with pytest.raises(FileNotFoundError, match="fill_memory"):
        MemoryBank.load(tmp_path / "absent.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an ntt memory file"):
        MemoryBank.load(tmp_path / "other.pt")


def test_postprocess_is_idempotent_and_refuses_non_finite_means():
    bank = _bank()
    p1 = postprocess_memory(bank)
    assert p1.postprocessed and not bank.postprocessed
    p2 = postprocess_memory(p1)
    assert torch.equal(p2.instance_means, bank.instance_means) and p2.meta() == p1.meta()
    bad = bank.instance_means.clone()
    bad[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite instance means for classes \[2\]"):
        postprocess_memory(_bank(instance_means=bad))


# A uniform bank's file must keep the bytes format-1 writers gave it: run directories record the sha256 of
# memory.pt / memory_postprocessed.pt, and resuming compares them. The metadata is pinned as the literal
# JSON string; the tensors' bytes are torch.save's own (compared against torch.save of the same payload, so
# the guard holds on every torch version, whose zip layout may differ).
V1_META_JSON = (
    '{"category_ids": [1, 5], "category_names": ["a", "b"], "config_hash": "abc123", "encoder": "fake", '
    '"feature_dim": 3, "fill_settings": {"context_ratio": 0.2, "grid_size": 4, "img_size": 56, '
    '"mask_pooling": "nearest"}, "format": "ntt-memory", "format_version": 1, "ntt_version": "0.1.0", '
    '"postprocessed": true, "refs": [[{"ann_id": 10, "image_id": 1}, {"ann_id": 11, "image_id": 1}], '
    '[{"ann_id": 20, "image_id": 2}, {"ann_id": 21, "image_id": 3}]], "seed": 33, "shots": 2}'
)


def _tiny_known_bank(**kw) -> MemoryBank:
    args = dict(
        instance_means=torch.arange(12, dtype=torch.float32).reshape(2, 2, 3) / 7.0 - 1.0,
        weight_sums=torch.tensor([[1.5, 2.0], [0.25, 3.0]]),
        category_ids=[1, 5],
        category_names=["a", "b"],
        shots=2,
        seed=33,
        encoder="fake",
        config_hash="abc123",
        ntt_version="0.1.0",
        refs=[
            [{"image_id": 1, "ann_id": 10}, {"image_id": 1, "ann_id": 11}],
            [{"image_id": 2, "ann_id": 20}, {"image_id": 3, "ann_id": 21}],
        ],
        postprocessed=True,
        fill_settings={"context_ratio": 0.2, "mask_pooling": "nearest", "img_size": 56, "grid_size": 4},
    )
    args.update(kw)
    return MemoryBank(**args)


def test_uniform_bank_file_keeps_the_format_1_bytes(tmp_path):
    bank = _tiny_known_bank()
    bank.save(tmp_path / "memory.pt")
    expected = io.BytesIO()
    torch.save(
        {"meta_json": V1_META_JSON, "instance_means": bank.instance_means, "weight_sums": bank.weight_sums},
        expected,
    )
    assert (tmp_path / "memory.pt").read_bytes() == expected.getvalue()
    back = MemoryBank.load(tmp_path / "memory.pt")
    assert back.counts.tolist() == [2, 2] and not back.ragged and back.config == {}


def test_ragged_bank_roundtrip_and_prototypes_of_own_references(tmp_path):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(2, 3, 8, generator=g)
    means[1, 1:] = 0.0  # the padding of class 1 (1 reference)
    bank = MemoryBank(
        instance_means=means,
        weight_sums=torch.ones(2, 3),
        category_ids=[1, 2],
        category_names=["a", "b"],
        counts=torch.tensor([3, 1]),
        encoder="x",
        refs=[[{"source": "s"}] * 3, [{"source": "t"}]],
        config={"matcher": {"nms_thr": 0.5}},
    )
    assert bank.ragged and bank.shots is None
    bank.save(tmp_path / "bank.ntt")
    raw = torch.load(tmp_path / "bank.ntt", weights_only=True)
    assert set(raw) == {"meta_json", "instance_means", "weight_sums", "counts"}
    assert json.loads(raw["meta_json"])["format_version"] == 2
    back = MemoryBank.load(tmp_path / "bank.ntt")
    assert back.counts.tolist() == [3, 1] and back.config == bank.config and back.meta() == bank.meta()
    want = torch.stack([compute_prototypes(means[:1])[0], compute_prototypes(means[1:, :1])[0]])
    assert torch.equal(back.prototypes(), want)  # the same computation per class: bit-identical
    with pytest.raises(ValueError, match="shots=3 but the classes have"):
        MemoryBank(
            instance_means=means,
            weight_sums=torch.ones(2, 3),
            category_ids=[1, 2],
            category_names=["a", "b"],
            shots=3,
            counts=torch.tensor([3, 1]),
        )


def test_newer_bank_format_is_refused(tmp_path):
    meta = json.loads(V1_META_JSON)
    meta["format_version"] = MEMORY_FORMAT_VERSION + 1  # was 3 while the newest was 2 (issue 18 added v3)
    bank = _tiny_known_bank()
    torch.save(
        {
            "meta_json": json.dumps(meta),
            "instance_means": bank.instance_means,
            "weight_sums": bank.weight_sums,
        },
        tmp_path / "m.pt",
    )
    with pytest.raises(ValueError, match=f"version {MEMORY_FORMAT_VERSION + 1} is newer than this ntt"):
        MemoryBank.load(tmp_path / "m.pt")


# ------------------------------------------------------------------------------------------------ fill


def _expected_mean(coco, root, enc, ann_id, pooling="nearest"):
    ann = next(a for a in coco["annotations"] if a["id"] == ann_id)
    info = next(im for im in coco["images"] if im["id"] == ann["image_id"])
    img = load_reference_image(root / info["file_name"], info["height"], info["width"])
    mask = torch.from_numpy(ann_to_mask(ann, info["height"], info["width"])).float()
    crop, soft = crop_reference(img, mask, ann["bbox"], size=enc.img_size)
    with torch.no_grad():
        feats = enc(crop[None]).reshape(-1, enc.embed_dim)
    w = mask_patch_weights(soft, enc.grid_size, mask_pooling=pooling)
    return instance_mean(feats, w), w.sum()


def test_fill_memory_order_batching_and_metadata(tmp_path):
    coco = toy_dataset(tmp_path)
    refs = {4: [RefEntry(4, 0, [1]), RefEntry(4, 1, [2])], 2: [RefEntry(2, 1, [4]), RefEntry(2, 0, [3])]}
    enc = FakeEncoder()
    bank = fill_memory(
        refs,
        dataset_json=coco,
        image_root=tmp_path,
        encoder=enc,
        class_ids=[4, 2],
        batch_size=3,
        progress=False,
        seed=7,
        config_hash="h",
    )
    assert enc.calls == [3, 1]
    assert bank.category_ids == [2, 4] and bank.category_names == ["two", "four"]  # sorted class index
    assert bank.shots == 2 and bank.feature_dim == 8 and bank.seed == 7 and not bank.postprocessed
    assert bank.refs == [
        [{"image_id": 1, "ann_id": 4}, {"image_id": 0, "ann_id": 3}],
        [{"image_id": 0, "ann_id": 1}, {"image_id": 1, "ann_id": 2}],
    ]
    assert bank.fill_settings == {
        "context_ratio": 0.2,
        "mask_pooling": "nearest",
        "img_size": 56,
        "grid_size": 4,
    }
    for (c, k), ann_id in {(0, 0): 4, (0, 1): 3, (1, 0): 1, (1, 1): 2}.items():
        mean, wsum = _expected_mean(coco, tmp_path, enc, ann_id)
        assert torch.allclose(bank.instance_means[c, k], mean, atol=1e-6), (c, k)
        assert float(bank.weight_sums[c, k]) == pytest.approx(float(wsum), abs=1e-6)
    one = fill_memory(
        refs,
        dataset_json=coco,
        image_root=tmp_path,
        encoder=enc,
        class_ids=[2, 4],
        batch_size=1,
        progress=False,
        keep_patch_features=True,
    )
    assert torch.allclose(one.instance_means, bank.instance_means, atol=1e-6)
    assert one.patch_features.shape == (2, 2, 16, 8) and one.patch_weights.shape == (2, 2, 16)
    assert torch.allclose(one.patch_weights.sum(-1), one.weight_sums)


def test_fill_memory_all_zero_mask_error_and_area_fix(tmp_path):
    coco = toy_dataset(tmp_path)
    refs = {2: [RefEntry(2, 1, [4]), RefEntry(2, 1, [5])]}
    enc = FakeEncoder(img_size=42)  # 3x3 grid samples crop columns 0, 14, 28; the line is at ~21
    with pytest.raises(ValueError) as err:
        fill_memory(refs, dataset_json=coco, image_root=tmp_path, encoder=enc, class_ids=[2], progress=False)
    msg = str(err.value)
    assert isinstance(err.value, UserError)  # the CLI prints it as one message
    assert "class 2 (two), shot 1: annotation 5 on image 1" in msg and "all-zero" in msg
    assert "mask_pooling='area'" in msg
    bank = fill_memory(
        refs,
        dataset_json=coco,
        image_root=tmp_path,
        encoder=enc,
        class_ids=[2],
        progress=False,
        mask_pooling="area",
    )
    assert torch.isfinite(bank.instance_means).all()
    mean, _ = _expected_mean(coco, tmp_path, enc, 5, pooling="area")
    assert torch.allclose(bank.instance_means[0, 1], mean, atol=1e-6)


def test_fill_memory_validates_refs_and_images(tmp_path):
    coco = toy_dataset(tmp_path)
    enc = FakeEncoder()
    with pytest.raises(ValueError, match="class 2 .* has 1 references but shots=2"):
        fill_memory(
            {2: [RefEntry(2, 1, [4])], 4: [RefEntry(4, 0, [1])] * 2},
            dataset_json=coco,
            image_root=tmp_path,
            encoder=enc,
            class_ids=[2, 4],
            shots=2,
            progress=False,
        )
    (tmp_path / "1.png").unlink()
    with pytest.raises(BadReferenceError, match=r"class 2 \(two\), shot 0: annotation 4 on image 1: .*1.png"):
        fill_memory(
            {2: [RefEntry(2, 1, [4])]},
            dataset_json=coco,
            image_root=tmp_path,
            encoder=enc,
            class_ids=[2],
            progress=False,
        )


# ------------------------------------------------------------------------------------------------ fixture


class TinyDINOv2(torch.nn.Module):
    """The parity fixture's tiny DINOv2 built with the official dinov2 package (see parity/README.md)."""

    def __init__(self, weights: Path):
        super().__init__()
        from dinov2.layers import MemEffAttention
        from dinov2.layers import NestedTensorBlock as Block
        from dinov2.models.vision_transformer import DinoVisionTransformer

        self.vit = DinoVisionTransformer(
            img_size=518,
            patch_size=14,
            embed_dim=64,
            depth=2,
            num_heads=2,
            mlp_ratio=4,
            init_values=1e-5,
            ffn_layer="mlp",
            block_chunks=0,
            qkv_bias=True,
            proj_bias=True,
            ffn_bias=True,
            block_fn=partial(Block, attn_class=MemEffAttention),
        )
        self.vit.load_state_dict(torch.load(weights, map_location="cpu"), strict=True)
        self.vit.eval()
        self.register_buffer("mean", torch.tensor((0.485, 0.456, 0.406))[:, None, None])
        self.register_buffer("std", torch.tensor((0.229, 0.224, 0.225))[:, None, None])
        self.img_size, self.patch_size, self.embed_dim, self.grid_size = 518, 14, 64, 37

    def forward(self, x):
        x = (x - self.mean) / self.std
        tokens = self.vit.prepare_tokens_with_masks(x)
        for blk in self.vit.blocks:
            tokens = blk(tokens)
        return self.vit.norm(tokens)[:, 1:].reshape(x.shape[0], 37, 37, 64)


@pytest.mark.parity
@pytest.mark.data
def test_fixture_memory_parity():
    if not (PARITY / "common" / "memory.npz").is_file() or not (FRUITS / "trainval.json").is_file():
        pytest.skip("parity fixture or fruits_nuts data absent")
    pytest.importorskip("dinov2")
    refs = load_refs(PARITY / "common" / "refs.json")
    coco = json.loads((FRUITS / "trainval.json").read_text())
    enc = TinyDINOv2(PARITY / "models" / "dinov2_tiny.pth")
    bank = fill_memory(
        refs,
        dataset_json=coco,
        image_root=FRUITS / "images",
        encoder=enc,
        class_ids=[1, 2, 3],
        keep_patch_features=True,
        progress=False,
    )
    ref = np.load(PARITY / "common" / "memory.npz")

    def maxdiff(a, b):
        return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())

    assert bank.category_names == ["date", "fig", "hazelnut"]
    assert maxdiff(bank.patch_weights, ref["ref_mask_weights"]) <= 1e-6
    assert maxdiff(bank.weight_sums, ref["ref_mask_weight_sums"]) <= 1e-4
    assert maxdiff(bank.patch_features[0, 0], ref["ref_feats_c0_k0"]) <= 1e-5
    assert maxdiff(bank.instance_means, ref["instance_means"]) <= 1e-5
    assert maxdiff(bank.prototypes(), ref["prototypes"]) <= 1e-5
    assert maxdiff(bank.instance_means.mean(1), ref["prototypes_unnormalized"]) <= 1e-5
    assert ref["fill_counts"].tolist() == [bank.shots] * 3
