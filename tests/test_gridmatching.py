"""FSOD-VFM's semantic side (ntt/gridmatching.py, method.md §3.4 / §5.13) against FSOD-VFM's own code.

The fixture (tests/fixtures/fsod_vfm_refs, made by its generate.py with FSOD-VFM's functions at f5559b6 and
OpenCV 4.14) holds every step; ntt must give the same bits on CPU: the same float32 operations in the same
order, so every comparison here is exact (``torch.equal``), none needs a tolerance.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_backbones import tiny_dinov2
from helpers_kernels import assert_fixture_close, on_fixture_kernels
from PIL import Image

from ntt.backbones.sam2 import imagenet_normalize
from ntt.bank import compute_prototypes
from ntt.gridmatching import (
    class_prototypes,
    cosine_top1,
    long_side_input,
    long_side_size,
    query_embeddings,
    reference_vectors,
    resize_masks_linear,
    sam_iou_decay,
)

FIXTURE = Path(__file__).parent / "fixtures" / "fsod_vfm_refs" / "fixture.npz"


@pytest.fixture(scope="module")
def fx():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def _masks(fx, key: str) -> torch.Tensor:
    width = fx[f"{key.split('_')[0]}_image"].shape[1]
    return torch.from_numpy(np.unpackbits(fx[key], axis=-1, count=width).astype(bool))


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _features(fx, which: str) -> torch.Tensor:
    """ntt's encoder on ntt's long-side input, channels first as theirs, checked against their digests."""
    x = long_side_input(Image.fromarray(fx[f"{which}_image"]))[None]
    feats = tiny_dinov2(0)(x, final_norm=False)[0]  # [h, w, D]
    if on_fixture_kernels():  # the fixture holds digests of the input and features: equal bits only here
        assert _sha(imagenet_normalize(x)) == str(fx[f"{which}_input_sha256"])
        assert _sha(feats.permute(2, 0, 1)[None]) == str(fx[f"{which}_feats_sha256"])
    return feats


def test_long_side_size_floors_to_the_patch():
    assert long_side_size(333, 250) == (630, 462)  # int(630 / 1.332) = 472 -> 33 patches
    assert long_side_size(250, 333) == (462, 630)
    assert long_side_size(2000, 10) == (630, 14)  # at least one patch


@pytest.mark.parity
def test_encoder_input_and_features_equal_fsod_vfm(fx):
    for which in ("ref", "query"):
        feats = _features(fx, which)  # asserts the input and feature digests
        assert feats.shape == (45, 45, 64)  # the square 630 transform: 45 x 45 whatever the aspect
        # other kernels: the bicubic resize and 12 ViT blocks of float32 GEMMs round differently; features of
        # magnitude ~2 agree to ~1e-6 (measured with AVX2: 7.7e-7; bound 1e-4 relative + 1e-5 absolute)
        want = torch.from_numpy(fx[f"{which}_feats_head"])
        assert_fixture_close(feats.permute(2, 0, 1)[None, :4], want, rtol=1e-4, atol=1e-5, what=which)


def test_final_norm_differs_from_fsod_vfm_features(fx):
    x = long_side_input(Image.fromarray(fx["ref_image"]))[None]
    normed = tiny_dinov2(0)(x)[0]
    assert not torch.allclose(normed, tiny_dinov2(0)(x, final_norm=False)[0], atol=1e-3)


@pytest.mark.parity
def test_grid_masks_equal_cv2(fx):
    for name in ("ref", "query", "blob0", "blob1", "blob2", "blob3"):
        shape = tuple(int(v) for v in fx[f"cv2_{name}_shape"])
        masks = np.unpackbits(fx[f"cv2_{name}_masks"], axis=-1, count=shape[-1]).astype(bool)
        values = fx[f"cv2_{name}_values"]
        got = resize_masks_linear(torch.from_numpy(masks), values.shape[1:])
        assert torch.equal(got, torch.from_numpy(values > 0.5)), name
    assert torch.equal(
        resize_masks_linear(_masks(fx, "ref_masks"), (45, 45)), torch.from_numpy(fx["ref_grid_masks"])
    )
    assert torch.equal(
        resize_masks_linear(_masks(fx, "query_masks"), (45, 45)), torch.from_numpy(fx["query_grid_masks"])
    )


@pytest.mark.parity
def test_reference_vectors_and_prototypes_equal_fsod_vfm(fx):
    feats = _features(fx, "ref")
    vectors, valid = reference_vectors(feats, torch.from_numpy(fx["ref_grid_masks"]))
    assert valid.tolist() == fx["ref_valid"].tolist()
    assert valid.tolist().count(False) == 2  # the all-zero and the one-pixel masks are dropped
    assert_fixture_close(vectors[valid], torch.from_numpy(fx["ref_vectors"])[valid], rtol=1e-4, atol=1e-5)
    classes = torch.from_numpy(fx["ref_classes"])
    per_class = [vectors[valid & (classes == c)] for c in range(len(fx["class_names"]))]
    protos = class_prototypes(per_class)
    assert list(fx["prototype_classes"]) == list(fx["class_names"])
    assert_fixture_close(protos, torch.from_numpy(fx["prototypes_dc"]).T, rtol=1e-4, atol=1e-5)
    # ntt's own formula (bank.compute_prototypes: normalised along the contiguous [C, D] rows) is the same
    # maths in another reduction order: equal within float32 rounding of unit vectors (a few 1e-8), not in
    # bits, so the FSOD-VFM mode uses class_prototypes
    ntt_protos = torch.cat([compute_prototypes(v[None]) for v in per_class])
    assert torch.allclose(ntt_protos, protos, rtol=0, atol=1e-7)


@pytest.mark.parity
def test_query_vectors_and_scores_equal_fsod_vfm(fx):
    feats = _features(fx, "query")
    emb = query_embeddings(feats, torch.from_numpy(fx["query_grid_masks"]))
    assert_fixture_close(emb, torch.from_numpy(fx["query_vectors"]), rtol=1e-4, atol=1e-5, what="vectors")
    assert torch.equal(emb[-2], torch.zeros(64))  # the empty proposal: zero vector, not NaN
    sim, labels, scores = cosine_top1(emb, torch.from_numpy(fx["prototypes_dc"]).T)
    assert_fixture_close(sim, torch.from_numpy(fx["query_sims"]), rtol=1e-4, atol=1e-5, what="cosines")
    if on_fixture_kernels():
        assert labels.tolist() == fx["query_labels"].tolist()
        assert scores.double().tolist() == fx["query_scores"].tolist()
    else:  # a label may differ only where two classes' cosines are a near-tie
        for i in np.flatnonzero(labels.numpy() != fx["query_labels"]):
            assert abs(float(sim[i, labels[i]]) - float(sim[i, int(fx["query_labels"][i])])) <= 1e-5, i
        np.testing.assert_allclose(scores.double().numpy(), fx["query_scores"], rtol=1e-4, atol=1e-5)
    assert bool((sim < 0).any())  # unclamped: FSOD-VFM keeps negative cosines (NTT clamps them to 0)


def test_cosine_top1_takes_the_first_of_tied_maxima():
    emb = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    sim, labels, scores = cosine_top1(emb, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    assert labels.tolist() == [0, 0] and scores.tolist() == [1.0, 0.0]
    assert cosine_top1(torch.zeros(0, 2), torch.eye(2))[1].shape == (0,)


def test_sam_iou_decay_known_values():
    out = sam_iou_decay(torch.tensor([1.0, 0.5, 0.8]), torch.tensor([0.45, 0.95, 0.25]))
    # sigmoid(0) = 0.5; sigmoid(10) = 0.9999546; sigmoid(-4) = 0.0179862 (float32: 1e-6 relative)
    assert torch.allclose(out, torch.tensor([0.5, 0.5 * 0.9999546, 0.8 * 0.0179862]), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------- wired into ntt's stages
FSOD_VFM_SEMANTICS = dict(encoder_input="long_side", final_norm=False, references="whole_image",
                          proposal_pooling="grid_mask", scoring="cosine")  # fmt: skip


@pytest.mark.parity
def test_whole_image_bank_prototypes_equal_fsod_vfm(fx):
    """fill_memory's path (FillPlan -> encode_references -> assemble_bank -> MemoryBank.prototypes) with
    FSOD-VFM's references gives their prototypes bit for bit, the two empty-on-grid references left out."""
    from helpers_memory import fixture_reference_jobs

    from ntt.data.images import pil_to_tensor
    from ntt.memory import FillPlan, assemble_bank, encode_references
    from ntt.utils.config import SemanticsConfig

    image = pil_to_tensor(Image.fromarray(fx["ref_image"]))
    masks = _masks(fx, "ref_masks")
    jobs = fixture_reference_jobs(fx, image, lambda i: masks[i])
    semantics = SemanticsConfig(**FSOD_VFM_SEMANTICS)
    plan = FillPlan.create(
        jobs, category_ids=[1, 2, 3], category_names=list(fx["class_names"]), encoder=tiny_dinov2(0),
        batch_size=1, semantics=semantics,
    )  # fmt: skip
    assert (plan.size, plan.grid) == (630, 45)
    bank = assemble_bank(plan, [encode_references(plan, tiny_dinov2(0), progress=False)], encoder_name="tiny")
    used = [bank.weight_sums[c, :n] for c, n in enumerate(bank.counts.tolist())]  # the rest is padding
    assert sum(int((w == 0).sum()) for w in used) == 2
    assert_fixture_close(bank.prototypes(), torch.from_numpy(fx["prototypes_dc"]).T, rtol=1e-4, atol=1e-5)
    assert bank.fill_settings["semantics"]["references"] == "whole_image"


def test_smoke_run_with_fsod_vfm_semantics(tmp_path):
    from conftest import torch_threads
    from test_e2e import SMALL_SYNTH, compose_cfg

    from ntt.runner import run_pipeline
    from ntt.runner.context import inference_params, make_context

    with torch_threads(2):
        fsod = [*SMALL_SYNTH, "matcher=fsod_vfm", "matcher.semantics.sam_iou_decay=true"]
        cfg = compose_cfg(tmp_path, *fsod)
        metrics = run_pipeline(cfg)
    run_dir = Path(str(cfg.run_dir))
    assert metrics["num_images"] == 2 and metrics["failed_images"] == []
    assert (run_dir / "predictions.json").is_file()
    assert "references: whole_image" in (run_dir / "config.yaml").read_text()
    params = inference_params(make_context(cfg))
    assert (params.encoder_input, params.proposal_pooling, params.scoring) == (
        "long_side",
        "grid_mask",
        "cosine",
    )
    # NTT's matcher has no semantics node: its keys carry nothing new
    paper = make_context(compose_cfg(tmp_path, *SMALL_SYNTH))
    assert "semantics" not in paper.cfg.matcher and paper.matcher.semantics.is_default
    assert paper.cfg.run_dir != cfg.run_dir


@pytest.mark.slow
def test_semantics_keys_change_the_stage_keys_they_affect(tmp_path):
    from conftest import torch_threads
    from test_e2e import SMALL_SYNTH, compose_cfg

    from ntt.bank import MemoryBank
    from ntt.runner import run_pipeline
    from ntt.runner.context import make_context
    from ntt.runner.keys import pass_key, predictions_key, stage_key

    fsod = [*SMALL_SYNTH, "matcher=fsod_vfm"]
    ctx = make_context(compose_cfg(tmp_path, *fsod))
    # each key is its own switch: one changed value changes the memory, test and pass keys it affects
    other = make_context(compose_cfg(tmp_path, *fsod, "matcher.semantics.final_norm=true"))
    assert stage_key(other, "fill_memory") != stage_key(ctx, "fill_memory")
    assert predictions_key(other) != predictions_key(ctx)
    assert pass_key(other) != pass_key(ctx)
    # SAM2 enters the memory key only when it makes the reference masks
    for masks, changes in (("sam2_box", True), ("annotation", False)):
        keys = [
            stage_key(make_context(compose_cfg(tmp_path, *fsod, f"matcher.semantics.reference_masks={masks}",
                                               f"backbone.sam2.init_seed={seed}")), "fill_memory")
            for seed in (0, 1)
        ]  # fmt: skip
        assert (keys[0] != keys[1]) is changes, masks
    # the memory stage with SAM2's box masks (a SAM2 image encoding per reference)
    with torch_threads(2):
        cfg = compose_cfg(tmp_path, *fsod, "matcher.semantics.reference_masks=sam2_box",
                          "stages=[sample_refs,fill_memory]")  # fmt: skip
        run_pipeline(cfg)
    bank = MemoryBank.load(Path(str(cfg.run_dir)) / "memory.pt")
    assert bank.fill_settings["semantics"]["reference_masks"] == "sam2_box"
    assert bank.prototypes().isfinite().all()


def test_bad_semantics_value_is_one_line(tmp_path):
    from ntt.utils.config import MatcherConfig, build_node
    from ntt.utils.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"matcher.semantics.scoring=dot: choose one of clamped_cosine, cosine"
    ):
        build_node({"semantics": {"scoring": "dot"}}, MatcherConfig)
    with pytest.raises(
        ConfigError, match=r"reference_masks=sam2_box needs matcher.semantics.references=whole"
    ):
        build_node({"semantics": {"reference_masks": "sam2_box"}}, MatcherConfig)
    with pytest.raises(
        ConfigError,
        match=r"reference_mask_precision=bfloat16 is read only with matcher.semantics.reference_masks=",
    ):
        build_node({"semantics": {"reference_mask_precision": "bfloat16"}}, MatcherConfig)
    with pytest.raises(
        ConfigError, match=r"reference_mask_precision=float16: choose one of float32, bfloat16"
    ):
        build_node({"semantics": {"reference_mask_precision": "float16"}}, MatcherConfig)


def test_sam2_box_mask_is_the_box_decoding_at_full_resolution(tmp_path):
    from helpers_backbones import tiny_sam2

    from ntt.boxproposals import boxes_to_frame, generate_box_proposals
    from ntt.data.images import load_test_image
    from ntt.postprocess import resize_masks_to_image
    from ntt.prompts import sam2_box_mask

    fx = np.load(FIXTURE)
    image = torch.from_numpy(fx["query_image"]).permute(2, 0, 1).double().div(255).float()
    Image.fromarray(fx["query_image"]).save(tmp_path / "q.png")
    sam2 = tiny_sam2(0)
    with torch.inference_mode():
        mask = sam2_box_mask(sam2, image, [40.0, 30.0, 100.0, 80.0])
        # the image as the test path loads it (PIL bicubic to 1024), the box as proposer=boxes decodes one
        image1024 = load_test_image(tmp_path / "q.png", 1024)
        box = boxes_to_frame(np.array([[40.0, 30.0, 140.0, 110.0]]), width=333, height=250)
        props = generate_box_proposals(sam2, sam2.encode_image(image1024[None]), box)
        want = resize_masks_to_image(props.logits, 250, 333)[0]
    assert mask.dtype == torch.bool and mask.shape == (250, 333)
    assert torch.equal(mask, want)


def test_whole_image_class_without_a_usable_reference_is_refused(fx):
    from ntt.data.images import pil_to_tensor
    from ntt.memory import BadReferenceError, FillPlan, ReferenceJob, assemble_bank, encode_references
    from ntt.utils.config import SemanticsConfig

    image = pil_to_tensor(Image.fromarray(fx["ref_image"]))
    masks = _masks(fx, "ref_masks")  # mask 1 is all zero, mask 4 one pixel: both empty on the grid
    box = fx["ref_boxes_xywh"][0].tolist()
    jobs = [
        ReferenceJob(c, 0, f"ref {i}", {}, lambda i=i: (image, masks[i], box)) for c, i in enumerate((0, 1))
    ]
    plan = FillPlan.create(jobs, category_ids=[7, 8], category_names=["a", "b"], encoder=tiny_dinov2(0),
                           semantics=SemanticsConfig(**FSOD_VFM_SEMANTICS))  # fmt: skip
    part = encode_references(plan, tiny_dinov2(0), progress=False)
    with pytest.raises(BadReferenceError, match=r"class 8 \(b\): every reference mask is empty on the 45x45"):
        assemble_bank(plan, [part], encoder_name="tiny")


def test_segmenter_refuses_fsod_vfm_semantics():
    from omegaconf import OmegaConf

    from ntt.app.settings import params_from_config
    from ntt.utils.errors import ConfigError

    cfg = OmegaConf.create({"proposer": {}, "matcher": {"semantics": {"scoring": "cosine"}}})
    with pytest.raises(ConfigError, match=r"matcher.semantics: the segmenter encodes and scores as NTT"):
        params_from_config(cfg)
    assert params_from_config(OmegaConf.create({"proposer": {}, "matcher": {}})).scoring == "clamped_cosine"
