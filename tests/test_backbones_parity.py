"""The backbones reproduce the reference exactly: the parity fixture's tiny SAM2 and DINOv2, loaded through
``build_sam2`` / ``build_dinov2``, against ``../shared/parity/common/img14_proposals.npz``."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_backbones import PARITY, PARITY_MODELS, SHARED, TEST_CONF_DIR
from omegaconf import OmegaConf

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(not PARITY.is_dir(), reason=f"parity fixture not found at {PARITY}"),
]

IMAGE = SHARED / "data" / "fruits_nuts" / "data" / "images" / "6.jpg"  # image id 14
TOL = 1e-5
log = logging.getLogger(__name__)


def _load_image_1024() -> torch.Tensor:
    """As the fixture README says: PIL RGB, resize to 1024x1024 (default filter), /255 in float64, float32."""
    from PIL import Image

    img = Image.open(IMAGE).convert("RGB").resize((1024, 1024))
    arr = (np.asarray(img).astype(np.float64) / 255.0).astype(np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()[None]


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(PARITY / "common" / "img14_proposals.npz"))


@pytest.fixture(scope="module")
def image():
    if not IMAGE.is_file():
        pytest.skip(f"fruits_nuts image not found: {IMAGE}")
    return _load_image_1024()


@pytest.fixture(scope="module")
def sam2_outputs(image, ref):
    from ntt.backbones.sam2 import build_sam2

    model = build_sam2(
        name="sam2_parity_tiny",
        config=str(PARITY_MODELS / "sam2_tiny.yaml"),
        checkpoint=str(PARITY_MODELS / "sam2_tiny.pt"),
    )
    points = torch.from_numpy(ref["grid_points"]).float()[:, None, :]  # [64, 1, 2]
    labels = torch.ones(points.shape[:2], dtype=torch.int64)
    with torch.inference_mode():
        feats = model.encode_image(image)
        logits, ious = model.decode(
            feats, image_index=0, points=points, point_labels=labels
        )  # one batch of 64
    return logits, ious


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_dinov2_features_match_reference(image, ref):
    from ntt.backbones.dinov2 import build_dinov2

    arch = json.loads((PARITY_MODELS / "dinov2_tiny_arch.json").read_text())
    enc = build_dinov2(
        name="dinov2_parity_tiny",
        arch="custom",
        checkpoint=str(PARITY_MODELS / "dinov2_tiny.pth"),
        img_size=arch["img_size"],
        patch_size=arch["patch_size"],
        embed_dim=arch["embed_dim"],
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        mlp_ratio=arch["mlp_ratio"],
        ffn_layer=arch["ffn_layer"],
        num_register_tokens=arch["num_register_tokens"],
        init_values=arch["init_values"],
        qkv_bias=arch["qkv_bias"],
        proj_bias=arch["proj_bias"],
        ffn_bias=arch["ffn_bias"],
    )
    x518 = F.interpolate(image, size=(518, 518), mode="bicubic", align_corners=False)
    with torch.inference_mode():
        feats = enc(x518)
    assert feats.shape == (1, 37, 37, 64)
    diff = _maxdiff(feats[0].numpy(), ref["dino_feats"])
    log.info("dino_feats max abs diff %.3g", diff)
    assert diff <= TOL


def test_sam2_predicted_ious_match_reference(sam2_outputs, ref):
    logits, ious = sam2_outputs
    assert logits.shape == (64, 4, 256, 256) and ious.shape == (64, 4)
    assert _maxdiff(ious.numpy(), ref["grid_pred_ious_all4"]) <= TOL
    best = (1 + ious[:, 1:].argmax(dim=1)).numpy()
    assert np.array_equal(best, ref["grid_best_index"])


def test_sam2_logits_match_reference(sam2_outputs, ref):
    logits, ious = sam2_outputs
    best = 1 + ious[:, 1:].argmax(dim=1)
    chosen = logits[torch.arange(64), best]  # [64, 256, 256]; all 64 prompts pass the IoU filter here
    assert len(ref["points"]) == 64
    assert _maxdiff(chosen[:, ::8, ::8].numpy(), ref["lowres_logits_stride8"]) <= TOL
    idx = torch.from_numpy(ref["lowres_logits_full_index"])
    assert _maxdiff(chosen[idx].numpy(), ref["lowres_logits_full"]) <= TOL
    # identical software gives identical bits (informational: other CPUs/kernels may differ within TOL)
    summary = json.loads((PARITY / "paper" / "summary.json").read_text())
    want = next(c for c in summary["counts"] if c["img_id"] == 14)["lowres_logits_sha256"]
    got = hashlib.sha256(np.ascontiguousarray(chosen.numpy(), dtype=np.float32).tobytes()).hexdigest()
    log.info("full logits sha256 %s the reference's", "equals" if got == want else "differs from")


def test_parity_configs_name_the_fixture_files(tmp_path):
    """tests/configs/backbone/*/parity_tiny.yaml are ordinary backbone options pointing at the fixture."""
    for group, files in (("sam2", ("sam2_tiny.yaml", "sam2_tiny.pt")), ("dinov2", ("dinov2_tiny.pth",))):
        node = OmegaConf.load(TEST_CONF_DIR / "backbone" / group / "parity_tiny.yaml")
        cfg = OmegaConf.create({"paths": {"shared": str(SHARED)}, "backbone": {group: node}})
        resolved = OmegaConf.to_container(cfg.backbone[group], resolve=True)
        values = {str(v) for v in resolved.values()}
        for f in files:
            assert str(PARITY_MODELS / f) in values
        assert resolved["random_init"] is False
    dino = OmegaConf.load(TEST_CONF_DIR / "backbone" / "dinov2" / "parity_tiny.yaml")
    arch = json.loads((PARITY_MODELS / "dinov2_tiny_arch.json").read_text())
    for key in (
        "embed_dim",
        "depth",
        "num_heads",
        "mlp_ratio",
        "img_size",
        "patch_size",
        "num_register_tokens",
    ):
        assert dino[key] == arch[key], key


def test_parity_config_instantiates_the_fixture_dinov2(image, ref):
    from hydra.utils import instantiate

    node = OmegaConf.load(TEST_CONF_DIR / "backbone" / "dinov2" / "parity_tiny.yaml")
    cfg = OmegaConf.create({"paths": {"shared": str(SHARED)}, "backbone": {"dinov2": node}})
    enc = instantiate(cfg.backbone.dinov2, device="cpu")
    with torch.inference_mode():
        feats = enc(F.interpolate(image, size=(518, 518), mode="bicubic", align_corners=False))
    assert _maxdiff(feats[0].numpy(), ref["dino_feats"]) <= TOL
