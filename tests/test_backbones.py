"""Backbone builders: documented shapes, every shipped config, strict checkpoint loading, clear errors,
building inside Hydra."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers_backbones import (
    CONF_DIR,
    REPO_ROOT,
    TINY_DINO,
    TINY_SAM2_CONFIG,
    random_images,
    tiny_dinov2,
    tiny_sam2,
)
from omegaconf import OmegaConf

from ntt.backbones.checkpoints import OFFICIAL_CHECKPOINTS, CheckpointError, MissingCheckpointError
from ntt.backbones.dinov2 import ARCHS, build_dinov2
from ntt.backbones.sam2 import SAM2ImageFeatures, build_sam2
from ntt.backbones.sam2_configs import instantiate_sam2, packaged_sam2_configs, resolve_sam2_config

EXPECTED_PACKAGED = [
    "sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1/sam2.1_hiera_l.yaml",
    "sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1/sam2.1_hiera_t.yaml",
    "sam2/sam2_hiera_b+.yaml",
    "sam2/sam2_hiera_l.yaml",
    "sam2/sam2_hiera_s.yaml",
    "sam2/sam2_hiera_t.yaml",
]


@pytest.fixture(scope="module")
def sam2_feats():
    model = tiny_sam2()
    images = random_images(2, 1024, seed=1)
    with torch.inference_mode():
        return model, images, model.encode_image(images)


# ----------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------


def test_sam2_encode_shapes(sam2_feats):
    model, _, feats = sam2_feats
    assert model.image_size == 1024
    assert isinstance(feats, SAM2ImageFeatures)
    assert feats.image_embed.shape == (2, 256, 64, 64)
    assert [tuple(f.shape) for f in feats.high_res_feats] == [(2, 32, 256, 256), (2, 64, 128, 128)]
    assert feats.image_embed.dtype == torch.float32
    assert torch.isfinite(feats.image_embed).all()


def test_sam2_encode_batch_matches_single(sam2_feats):
    model, images, feats = sam2_feats
    with torch.inference_mode():
        single = model.encode_image(images[1:2])
    torch.testing.assert_close(single.image_embed, feats.image_embed[1:2], atol=1e-5, rtol=0)
    for a, b in zip(single.high_res_feats, feats.high_res_feats):
        torch.testing.assert_close(a, b[1:2], atol=1e-5, rtol=0)


def test_sam2_encode_rejects_wrong_size():
    with pytest.raises(ValueError, match="1024"):
        tiny_sam2().encode_image(torch.zeros(1, 3, 512, 512))


def test_sam2_decode_points_shapes_and_image_index(sam2_feats):
    model, _, feats = sam2_feats
    points = torch.tensor([[[100.0, 200.0]], [[512.0, 512.0]], [[900.5, 30.0]]])
    with torch.inference_mode():
        logits, ious = model.decode(feats, image_index=1, points=points, point_labels=torch.ones(3, 1))
        second = SAM2ImageFeatures(feats.image_embed[1:2], [f[1:2] for f in feats.high_res_feats])
        logits_sel, ious_sel = model.decode(second, image_index=0, points=points)
        logits0, _ = model.decode(feats, image_index=0, points=points)
    assert logits.shape == (3, 4, 256, 256) and ious.shape == (3, 4)
    assert logits.dtype == torch.float32 and ious.dtype == torch.float32
    assert torch.equal(logits, logits_sel) and torch.equal(ious, ious_sel)  # default labels = positive
    assert not torch.equal(logits, logits0)  # image_index selects the image


def test_sam2_decode_negative_points_boxes_and_both(sam2_feats):
    model, _, feats = sam2_feats
    points = torch.tensor([[[100.0, 200.0], [300.0, 300.0]], [[512.0, 512.0], [10.0, 10.0]]])
    labels = torch.tensor([[1, 0], [1, 0]])
    boxes = torch.tensor([[50.0, 60.0, 400.0, 500.0], [0.0, 0.0, 1023.0, 1023.0]])
    with torch.inference_mode():
        lp, ip = model.decode(feats, points=points, point_labels=labels)
        lb, ib = model.decode(feats, boxes=boxes)
        lpb, ipb = model.decode(feats, points=points[:, :1], boxes=boxes)
    for logits, ious in ((lp, ip), (lb, ib), (lpb, ipb)):
        assert logits.shape == (2, 4, 256, 256) and ious.shape == (2, 4)
        assert torch.isfinite(logits).all() and torch.isfinite(ious).all()
    assert not torch.equal(lb, lpb)
    with pytest.raises(ValueError):
        model.decode(feats)
    with pytest.raises(ValueError):
        model.decode(feats, points=torch.zeros(2, 2))


def test_sam2_no_mem_embed_flag(sam2_feats):
    model, images, feats = sam2_feats
    assert model.add_no_mem_embed is False
    model.add_no_mem_embed = True
    try:
        with torch.inference_mode():
            with_embed = model.encode_image(images[:1])
    finally:
        model.add_no_mem_embed = False
    diff = with_embed.image_embed - feats.image_embed[:1]
    torch.testing.assert_close(
        diff, model.model.no_mem_embed.view(1, -1, 1, 1).expand_as(diff), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(with_embed.high_res_feats[0], feats.high_res_feats[0][:1], atol=1e-5, rtol=0)


def test_dinov2_shapes():
    enc = tiny_dinov2()
    assert (enc.img_size, enc.patch_size, enc.embed_dim, enc.grid_size) == (518, 14, 64, 37)
    with torch.inference_mode():
        out = enc(random_images(2, 518))
        other = enc(random_images(1, 224))
    assert out.shape == (2, 37, 37, 64) and out.dtype == torch.float32
    assert other.shape == (1, 16, 16, 64)  # other sizes interpolate the position embedding
    with pytest.raises(ValueError, match="multiple of the patch size"):
        enc(torch.zeros(1, 3, 100, 100))


def test_dinov2_register_tokens_dropped_and_keys():
    enc = build_dinov2(
        name="reg",
        checkpoint=None,
        random_init=True,
        num_register_tokens=4,
        interpolate_antialias=True,
        interpolate_offset=0.0,
        **TINY_DINO,
    )
    assert tuple(enc.model.state_dict()["register_tokens"].shape) == (1, 4, 64)
    with torch.inference_mode():
        x = random_images(1, 518)
        out = enc(x)
        ff = enc.model.forward_features((x - 0.5) / 0.25)
    assert out.shape == (1, 37, 37, 64)
    assert ff["x_norm_regtokens"].shape == (1, 4, 64) and ff["x_norm_patchtokens"].shape == (1, 1369, 64)


def test_dinov2_reg_class_equals_package_without_registers():
    """The register-capable subclass with 0 registers and the classic interpolation settings computes
    exactly what the installed dinov2 code computes, at the native and at other sizes."""
    from ntt.backbones.dinov2 import _dinov2_classes, _make_reg_class

    plain = tiny_dinov2().model
    vit_cls, block_cls, attn_cls = _dinov2_classes()
    from functools import partial

    reg = _make_reg_class(vit_cls)(
        img_size=518,
        patch_size=14,
        embed_dim=64,
        depth=2,
        num_heads=2,
        mlp_ratio=4.0,
        init_values=1e-5,
        block_chunks=0,
        block_fn=partial(block_cls, attn_class=attn_cls),
        num_register_tokens=0,
        interpolate_antialias=False,
        interpolate_offset=0.1,
    ).eval()
    reg.load_state_dict(plain.state_dict(), strict=True)
    with torch.inference_mode():
        for h, w in ((518, 518), (280, 420)):
            x = random_images(1, max(h, w))[..., :h, :w]
            a = plain.forward_features(x)["x_norm_patchtokens"]
            b = reg.forward_features(x)["x_norm_patchtokens"]
            assert torch.equal(a, b), (h, w)


def test_dinov2_official_arch_table():
    assert ARCHS["vitl14"] == dict(embed_dim=1024, depth=24, num_heads=16, ffn_layer="mlp")
    assert ARCHS["vitg14"] == dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglufused")
    enc = build_dinov2(name="dinov2_vits14", arch="vits14", checkpoint=None, random_init=True)
    sd = enc.model.state_dict()
    assert enc.embed_dim == 384 and len(enc.model.blocks) == 12
    assert "blocks.11.ls2.gamma" in sd and "mask_token" in sd and "blocks.0.attn.qkv.bias" in sd
    assert not any(k.startswith("blocks.0.0.") for k in sd)  # block_chunks=0: official key names
    assert tuple(sd["pos_embed"].shape) == (1, 1370, 384)
    assert tuple(sd["patch_embed.proj.weight"].shape) == (384, 3, 14, 14)
    with pytest.raises(ValueError, match="contradicts"):
        build_dinov2(name="x", arch="vits14", checkpoint=None, random_init=True, embed_dim=64)
    with pytest.raises(ValueError, match="unknown arch"):
        build_dinov2(name="x", arch="vith14", checkpoint=None, random_init=True)
    with pytest.raises(ValueError, match="custom"):
        build_dinov2(name="x", arch="custom", checkpoint=None, random_init=True)


@pytest.mark.slow
def test_dinov2_vitg14_swiglu_keys():
    enc = build_dinov2(name="dinov2_vitg14", arch="vitg14", checkpoint=None, random_init=True)
    sd = enc.model.state_dict()
    assert tuple(sd["blocks.0.mlp.w12.weight"].shape) == (8192, 1536)
    assert tuple(sd["blocks.0.mlp.w3.weight"].shape) == (1536, 4096)
    assert enc.embed_dim == 1536 and len(enc.model.blocks) == 40


def test_random_init_is_seeded_and_loud(caplog):
    from ntt.backbones.sam2 import build_sam2 as build

    with caplog.at_level(logging.WARNING):
        a = build(name="t", config=TINY_SAM2_CONFIG, checkpoint=None, random_init=True, init_seed=3)
    assert "RANDOM WEIGHTS" in caplog.text and "plumbing/speed only".upper() in caplog.text
    b = build(name="t", config=TINY_SAM2_CONFIG, checkpoint=None, random_init=True, init_seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    d1 = build_dinov2(
        name="d", checkpoint=None, random_init=True, init_seed=3, **TINY_DINO
    ).model.state_dict()
    d2 = build_dinov2(
        name="d", checkpoint=None, random_init=True, init_seed=4, **TINY_DINO
    ).model.state_dict()
    assert not torch.equal(d1["blocks.0.attn.qkv.weight"], d2["blocks.0.attn.qkv.weight"])


# ----------------------------------------------------------------------------------------------------
# Every packaged SAM2 config
# ----------------------------------------------------------------------------------------------------


def test_packaged_sam2_configs_are_the_expected_ones():
    assert packaged_sam2_configs() == EXPECTED_PACKAGED
    for c in EXPECTED_PACKAGED:
        assert resolve_sam2_config(c).is_file()
        assert resolve_sam2_config("configs/" + c) == resolve_sam2_config(c)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(c, marks=pytest.mark.slow) if "_l.yaml" in c or "b+" in c else c
        for c in EXPECTED_PACKAGED
    ],
)
def test_packaged_sam2_config_builds_and_loads_strictly(config):
    from ntt.backbones.checkpoints import load_state_dict_strict

    model = build_sam2(name="x", config=config, checkpoint=None, random_init=True)
    # the key -> shape set the config expects (built once more on the CPU: Hiera cannot be built on `meta`)
    expected = {
        k: tuple(v.shape) for k, v in instantiate_sam2(resolve_sam2_config(config)).state_dict().items()
    }
    sd = model.model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # what the strict loader expects is exactly this key set
    other = build_sam2(name="x", config=config, checkpoint=None, random_init=True, init_seed=1).model
    load_state_dict_strict(other, sd, path="<memory>")
    assert all(torch.equal(other.state_dict()[k], v) for k, v in sd.items())
    assert model.image_size == 1024 and model.embed_dim == 256 and model.embed_size == 64
    if config.startswith("sam2.1/"):
        assert "no_obj_embed_spatial" in sd  # a SAM2.1 parameter: the right config family was built
    else:
        assert "no_obj_embed_spatial" not in sd


# ----------------------------------------------------------------------------------------------------
# Checkpoints: round trip, strictness, missing files
# ----------------------------------------------------------------------------------------------------


def test_sam2_checkpoint_round_trip(tmp_path):
    src = tiny_sam2(init_seed=7)
    path = tmp_path / "tiny_sam2.pt"
    torch.save({"model": src.model.state_dict()}, path)
    loaded = build_sam2(name="tiny", config=TINY_SAM2_CONFIG, checkpoint=str(path))
    images = random_images(1, 1024, seed=5)
    points = torch.tensor([[[300.0, 700.0]], [[20.0, 1000.0]]])
    with torch.inference_mode():
        fa, fb = src.encode_image(images), loaded.encode_image(images)
        assert torch.equal(fa.image_embed, fb.image_embed)
        la, ia = src.decode(fa, points=points)
        lb, ib = loaded.decode(fb, points=points)
    assert torch.equal(la, lb) and torch.equal(ia, ib)


@pytest.mark.parametrize("wrapper", ["plain", "teacher", "model", "teacher_training"])
def test_dinov2_checkpoint_round_trip(tmp_path, wrapper):
    src = tiny_dinov2(init_seed=7)
    sd = src.model.state_dict()
    obj = {
        "plain": sd,
        "teacher": {"teacher": sd},
        "model": {"model": sd},
        "teacher_training": {
            "teacher": {
                **{f"backbone.{k}": v for k, v in sd.items()},
                "dino_head.mlp.0.weight": torch.zeros(2, 2),
            }
        },
    }[wrapper]
    path = tmp_path / "dino.pth"
    torch.save(obj, path)
    loaded = build_dinov2(name="t", checkpoint=str(path), **TINY_DINO)
    x = random_images(2, 518, seed=3)
    with torch.inference_mode():
        assert torch.equal(src(x), loaded(x))


def test_strict_loading_names_file_and_keys(tmp_path):
    sd = dict(tiny_sam2().model.state_dict())
    missing = dict(sd)
    del missing["sam_mask_decoder.iou_token.weight"]
    p = tmp_path / "missing.pt"
    torch.save({"model": missing}, p)
    with pytest.raises(CheckpointError) as err:
        build_sam2(name="t", config=TINY_SAM2_CONFIG, checkpoint=str(p))
    assert str(p) in str(err.value) and "sam_mask_decoder.iou_token.weight" in str(err.value)
    assert "missing keys" in str(err.value)

    extra = dict(sd)
    extra["foo.bar"] = torch.zeros(1)
    p = tmp_path / "extra.pt"
    torch.save({"model": extra}, p)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): foo\.bar") as err:
        build_sam2(name="t", config=TINY_SAM2_CONFIG, checkpoint=str(p))
    assert str(p) in str(err.value)

    p = tmp_path / "plain.pt"
    torch.save(sd, p)  # not the official {"model": ...} format
    with pytest.raises(CheckpointError, match="official SAM2 format") as err:
        build_sam2(name="t", config=TINY_SAM2_CONFIG, checkpoint=str(p))
    assert str(p) in str(err.value)

    dsd = dict(tiny_dinov2().model.state_dict())
    dsd["pos_embed"] = torch.zeros(1, 5, 64)
    dsd.pop("norm.bias")
    p = tmp_path / "dino_bad.pth"
    torch.save(dsd, p)
    with pytest.raises(CheckpointError) as err:
        build_dinov2(name="t", checkpoint=str(p), **TINY_DINO)
    msg = str(err.value)
    assert str(p) in msg and "norm.bias" in msg and "pos_embed" in msg and "shape mismatches" in msg

    p = tmp_path / "garbage.pt"
    p.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="Cannot read checkpoint"):
        build_dinov2(name="t", checkpoint=str(p), **TINY_DINO)


def test_missing_checkpoint_error(tmp_path):
    path = tmp_path / "ckpts" / "sam2_hiera_large.pt"
    with pytest.raises(MissingCheckpointError) as err:
        build_sam2(name="sam2_hiera_l", config="sam2/sam2_hiera_l.yaml", checkpoint=str(path))
    msg = str(err.value)
    assert str(path.resolve()) in msg and "sam2_hiera_large.pt" in msg
    assert "ntt download sam2_hiera_l" in msg and "make checkpoints" in msg

    with pytest.raises(MissingCheckpointError, match="ntt download dinov2_vitl14"):
        build_dinov2(
            name="dinov2_vitl14", arch="vitl14", checkpoint=str(tmp_path / "dinov2_vitl14_pretrain.pth")
        )
    with pytest.raises(MissingCheckpointError, match="random_init"):
        build_sam2(name="sam2_hiera_l", config="sam2/sam2_hiera_l.yaml", checkpoint=None)
    with pytest.raises(MissingCheckpointError, match="not an official checkpoint"):
        build_dinov2(name="mine", checkpoint=str(tmp_path / "x.pth"), **TINY_DINO)


def test_unknown_sam2_config():
    with pytest.raises(FileNotFoundError, match="sam2.1/sam2.1_hiera_l.yaml"):
        build_sam2(name="x", config="sam2_hiera_xl.yaml", checkpoint=None, random_init=True)


# ----------------------------------------------------------------------------------------------------
# Configs and Hydra
# ----------------------------------------------------------------------------------------------------


def _option_files(group: str) -> list[Path]:
    return sorted((CONF_DIR / "backbone" / group).glob("*.yaml"))


def test_every_backbone_yaml_composes_and_matches_registry(tmp_path):
    from hydra import compose, initialize_config_dir

    sam_opts = [p.stem for p in _option_files("sam2")]
    dino_opts = [p.stem for p in _option_files("dinov2")]
    assert {"sam2_hiera_l", "sam2.1_hiera_t", "tiny_random"} <= set(sam_opts) and len(sam_opts) == 9
    assert {"vits14", "vitb14", "vitl14", "vitg14", "tiny_random"} <= set(dino_opts)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for group, opts in (("sam2", sam_opts), ("dinov2", dino_opts)):
            for opt in opts:
                cfg = compose(overrides=[f"+backbone/{group}={opt}", f"+paths.checkpoints={tmp_path}"])
                node = cfg.backbone[group]
                assert "device" not in node
                if opt == "tiny_random":
                    assert node.random_init is True and node.checkpoint is None
                    continue
                assert node.random_init is False
                info = OFFICIAL_CHECKPOINTS[node.name]  # yaml name == registry name
                assert info.family == group
                assert Path(node.checkpoint) == tmp_path / info.filename
                if group == "sam2":
                    assert node._target_ == "ntt.backbones.sam2.build_sam2"
                    assert resolve_sam2_config(node.config).is_file()
                    assert node.add_no_mem_embed is False and node.exact_attention is True
                else:
                    assert node._target_ == "ntt.backbones.dinov2.build_dinov2"
                    assert node.arch in ARCHS and node.name == f"dinov2_{opt}"
                    assert node.num_register_tokens == (4 if opt.endswith("_reg4") else 0)


def test_tiny_random_yaml_instantiates(tmp_path):
    from hydra.utils import instantiate

    for group in ("sam2", "dinov2"):
        node = OmegaConf.load(CONF_DIR / "backbone" / group / "tiny_random.yaml")
        cfg = OmegaConf.create({"paths": {"checkpoints": str(tmp_path)}, "backbone": {group: node}})
        model = instantiate(cfg.backbone[group], device="cpu")
        assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert model.embed_dim == 64


def test_missing_official_checkpoint_via_yaml(tmp_path):
    from hydra.utils import instantiate

    node = OmegaConf.load(CONF_DIR / "backbone" / "dinov2" / "vitl14.yaml")
    cfg = OmegaConf.create({"paths": {"checkpoints": str(tmp_path)}, "backbone": {"dinov2": node}})
    with pytest.raises(Exception, match="ntt download dinov2_vitl14") as err:
        instantiate(cfg.backbone.dinov2, device="cpu")
    # hydra wraps errors of the target in InstantiationException; ours is the cause
    assert isinstance(err.value, MissingCheckpointError) or isinstance(
        err.value.__cause__, MissingCheckpointError
    )


def test_build_while_global_hydra_is_initialised():
    """Simulates the app: Hydra is initialised (as under @hydra.main) while SAM2 is built."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(overrides=["+backbone/sam2=tiny_random", "+paths.checkpoints=/nonexistent"])
        model = instantiate(cfg.backbone.sam2, device="cpu")
        assert GlobalHydra.instance().is_initialized()
        cfg2 = compose(overrides=["+backbone/dinov2=tiny_random", "+paths.checkpoints=/nonexistent"])
        assert cfg2.backbone.dinov2.embed_dim == 64
    assert model.image_size == 1024
    assert not GlobalHydra.instance().is_initialized()


_APP = """
import sys
import hydra
from hydra.core.global_hydra import GlobalHydra

FIRST = sys.argv.pop(1)
if FIRST == "build_before_app":  # sam2 first imported outside Hydra, then the app starts
    from ntt.backbones.sam2 import build_sam2
    build_sam2(name="t", config="sam2_tiny.yaml", checkpoint=None, random_init=True)
    assert not GlobalHydra.instance().is_initialized(), "sam2 left its global Hydra behind"

@hydra.main(config_path=None, config_name="app", version_base="1.3")
def main(cfg):
    from hydra.utils import instantiate
    assert "sam2" not in sys.modules or FIRST == "build_before_app"
    sam = instantiate(cfg.backbone.sam2, device="cpu")
    dino = instantiate(cfg.backbone.dinov2, device="cpu")
    assert GlobalHydra.instance().is_initialized()
    print("APP-OK", sam.image_size, dino.embed_dim, cfg.backbone.sam2.name)

main()
"""


@pytest.mark.parametrize("first", ["app_first", "build_before_app"])
def test_build_inside_a_real_hydra_app(tmp_path, first):
    """A real @hydra.main app (fresh process, so sam2's import-time Hydra init really runs)."""
    (tmp_path / "app.yaml").write_text(
        textwrap.dedent(
            f"""\
            defaults:
              - backbone/sam2: tiny_random
              - backbone/dinov2: tiny_random
              - _self_
            paths:
              checkpoints: {tmp_path}
            hydra:
              searchpath: [file://{CONF_DIR}]
              run:
                dir: {tmp_path}/run
              output_subdir: null
            """
        )
    )
    script = tmp_path / "app.py"
    script.write_text(_APP)
    res = subprocess.run(
        [sys.executable, str(script), first, f"--config-dir={tmp_path}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "APP-OK 1024 64 sam2_tiny_random" in res.stdout


def test_exact_attention_option(sam2_feats):
    from ntt.backbones.sam2 import SAM2Backbone

    model, _, feats = sam2_feats
    points = torch.tensor([[[100.0, 200.0]], [[700.0, 300.0]]])
    with torch.inference_mode():
        exact = model.decode(feats, points=points)
        model.exact_attention = False
        try:
            default = model.decode(feats, points=points)
        finally:
            model.exact_attention = True
    for a, b in zip(exact, default):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # only the kernel choice differs
    with pytest.raises(ValueError, match="exact_attention"):
        SAM2Backbone(model.model, name="x", exact_attention="sometimes")
    assert SAM2Backbone(model.model, name="x", exact_attention="always").exact_attention == "always"
