"""FSOD-VFM's graph-diffusion re-scoring (``matcher.merge=diffusion``, method.md §5.12) and ``merge=none``.

The fixture (tests/fixtures/fsod_vfm/diffusion_cases.npz) holds FSOD-VFM's own code's outputs at commit
f5559b6 (its generator says how it ran their code); ntt must give the same numbers bit for bit on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_kernels import assert_fixture_close, on_fixture_kernels
from helpers_pipeline import compose_smoke

from ntt.diffusion import decay_scores, fsod_vfm_grid, graph_diffusion, resize_masks_linear
from ntt.postprocess import postprocess_detections, rank_top_k
from ntt.utils.config import DiffusionConfig, MatcherConfig, build_node
from ntt.utils.errors import ConfigError

FIXTURE = Path(__file__).parent / "fixtures" / "fsod_vfm" / "diffusion_cases.npz"


@pytest.fixture(scope="module")
def cases():
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def _masks(z, prefix: str) -> torch.Tensor:
    shape = tuple(int(v) for v in z[f"{prefix}_shape"])
    bits = np.unpackbits(z[f"{prefix}_masks"], axis=-1, count=shape[-1]).astype(bool)
    return torch.from_numpy(bits.reshape(shape))


def _count(z, prefix: str, last: str) -> int:
    return sum(1 for k in z if k.startswith(prefix) and k.endswith(last))


def test_fixture_is_fsod_vfm_at_f5559b6_and_covers_every_case_kind(cases):
    assert cases["versions"][-1] == "f5559b6" and "ipp=True" in cases["versions"]
    assert _count(cases, "diff", "_pi") == 8 and _count(cases, "resize", "_out") == 9
    assert _count(cases, "pipe", "_order") == 3


@pytest.mark.parity
def test_graph_diffusion_equals_fsod_vfm_bit_for_bit(cases):
    for k in range(_count(cases, "diff", "_pi")):
        alpha, steps = cases[f"diff{k}_params"]
        cfg = DiffusionConfig(alpha=float(alpha), steps=int(steps))
        got = graph_diffusion(_masks(cases, f"diff{k}"), torch.from_numpy(cases[f"diff{k}_labels"]), cfg)
        want = torch.from_numpy(cases[f"diff{k}_pi"])
        # other kernels: the walk's float32 matrix-vector sums round differently in the last bits; pi reaches
        # ~200 in nested cases, so a relative bound (30 steps of a few ulps each); measured with AVX2: 1.2e-7
        assert got.dtype == torch.float32
        assert_fixture_close(got, want, rtol=1e-5, atol=1e-6, what=f"case {k}")
    # the cases include pi > 1 (nested masks: the decay factor clamps to 0) and the one-mask image
    assert cases["diff3_pi"].max() > 1 and cases["diff1_pi"].tolist() == [0.0]


def test_fsod_vfm_grid_is_its_square_45x45_token_grid_whatever_the_image_size():
    # get_dinov2_features: resize_with_aspect_ratio(630) then the transform's Resize((630, 630)) (main.py's
    # --dinov2_image_size default): the feature map its masks_for_ios are resized to is always 45x45
    for h, w in ((480, 640), (640, 480), (128, 96), (1000, 1000), (20, 3000)):
        assert fsod_vfm_grid(h, w) == (45, 45)


@pytest.mark.parity
def test_masks_reach_a_grid_exactly_as_cv2_resize_does(cases):
    # the fixture's grids are resize_with_aspect_ratio's sizes / 14 (down, up, exactly 2x): resize targets
    for k in range(_count(cases, "resize", "_out")):
        full = _masks(cases, f"resize{k}")
        grid = tuple(int(v) for v in cases[f"resize{k}_grid"])
        want = np.unpackbits(cases[f"resize{k}_out"], axis=-1, count=grid[1]).astype(bool)
        got = resize_masks_linear(full, grid).numpy()
        assert np.array_equal(got, want.reshape(got.shape)), f"case {k}: {(got != want).sum()} pixels differ"


@pytest.mark.parity
def test_decay_and_top_100_equal_fsod_vfm(cases):
    """Their per-image block: decay each score by max(0, 1 - pi) ** lamb (float32), stable sort, top 100."""
    for k in range(_count(cases, "pipe", "_order")):
        alpha, steps, lamb = cases[f"pipe{k}_params"]
        cfg = DiffusionConfig(alpha=float(alpha), steps=int(steps), lamb=float(lamb))
        pi = graph_diffusion(_masks(cases, f"pipe{k}"), torch.from_numpy(cases[f"pipe{k}_cat_ids"]), cfg)
        decayed = decay_scores(torch.from_numpy(cases[f"pipe{k}_scores"]), pi, cfg.lamb)
        order = rank_top_k(decayed, 100)
        want_order, want_final = cases[f"pipe{k}_order"], cases[f"pipe{k}_final"]
        if on_fixture_kernels():
            assert order.tolist() == want_order.tolist(), f"case {k}"
            assert decayed[order].double().tolist() == want_final.tolist(), f"case {k}"
        else:  # pi's last bits (above) move the scores by ulps: the same scores, swapped only at near-ties
            np.testing.assert_allclose(decayed[order].double().numpy(), want_final, rtol=1e-5, atol=1e-7)
            for pos in np.flatnonzero(order.numpy() != want_order):
                a, b = int(order[pos]), int(want_order[pos])
                assert abs(float(decayed[a]) - float(decayed[b])) <= 1e-5, (
                    f"case {k}: rank {pos} not a near-tie"
                )
    assert len(cases["pipe0_order"]) == 100 < int(cases["pipe0_shape"][0])  # the cut happened


@pytest.mark.parity
def test_solve_gives_the_iterations_fixed_point(cases):
    """solver=solve vs FSOD-VFM's loop on its converged cases (alpha 0.3, 30 steps, tol 1e-6).

    The loop stops once a step moves pi by < tol, so the two may differ by about tol; measured: <= 6e-8.
    """
    for k in range(_count(cases, "diff", "_pi")):
        alpha, steps = cases[f"diff{k}_params"]
        if (alpha, steps) != (0.3, 30) or k == 5:
            continue
        cfg = DiffusionConfig(alpha=0.3, steps=30, solver="solve")
        got = graph_diffusion(_masks(cases, f"diff{k}"), torch.from_numpy(cases[f"diff{k}_labels"]), cfg)
        assert torch.allclose(got, torch.from_numpy(cases[f"diff{k}_pi"]), rtol=0, atol=1e-6), f"case {k}"


def _line_masks(*rows: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r] for r in rows])


def test_known_answers_of_the_walk_and_its_fix_flags():
    # m1 inside m0; m2 covers 3 of m0's 4 pixels, both of m1's: A = [[0,0,0],[1,0,0],[1,2/3,0]], p = [0,1,1]
    masks, labels = _line_masks("1111", "1100", "1110"), torch.zeros(3, dtype=torch.int64)
    pi = graph_diffusion(masks, labels, DiffusionConfig())
    # pi0 = 0, pi1 = 0.7 * 1, pi2 = 0.3 * (1 * 0 + 2/3 * 0.7) + 0.7
    assert torch.allclose(pi, torch.tensor([0.0, 0.7, 0.84]), atol=1e-6)
    fixed = graph_diffusion(masks, labels, DiffusionConfig(row_normalize=True))  # row 2 / (5/3)
    assert torch.allclose(fixed, torch.tensor([0.0, 0.7, 0.3 * 0.4 * 0.7 + 0.7]), atol=1e-6)
    full = graph_diffusion(masks, labels, DiffusionConfig(lower_triangle=False, steps=500, tol=0.0))
    a = np.array([[0, 2 / 4, 3 / 4], [1, 0, 1], [1, 2 / 3, 0]])  # every other mask covers
    want = np.linalg.solve(np.eye(3) - 0.3 * a, 0.7 * a.max(axis=1))
    assert np.allclose(full.numpy(), want, atol=1e-6)
    # one mask in the image, and a class of one among others: 0
    assert graph_diffusion(masks[:1], labels[:1], DiffusionConfig()).tolist() == [0.0]
    two = graph_diffusion(masks, torch.tensor([0, 1, 0]), DiffusionConfig())
    assert two[1] == 0 and torch.allclose(two[2], torch.tensor(0.3 * 0 + 0.7 * 1.0))  # m2 inside m0 there


def test_decay_clamps_at_zero_and_lamb_zero_keeps_the_scores():
    scores, pi = torch.tensor([0.8, 0.5, 0.4]), torch.tensor([0.0, 0.75, 1.5])
    assert torch.allclose(decay_scores(scores, pi, 0.5), torch.tensor([0.8, 0.25, 0.0]))
    assert torch.equal(decay_scores(scores, pi, 0.0), scores)  # pow(0, 0) = 1, as FSOD-VFM's torch.pow


def _postprocess_args(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.full((n, 256, 256), -1.0)
    for i in range(n):
        y, x = torch.randint(0, 160, (2,), generator=g).tolist()
        logits[i, y : y + 40 + 10 * i, x : x + 60] = 1.0
    piou = torch.linspace(0.9, 0.5, n)
    labels = torch.tensor([0, 1] * (n // 2))
    scores = torch.rand(n, generator=g) * 0.8 + 0.1
    emb = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)
    return logits, piou, labels, scores, emb


def test_merge_none_ranks_the_raw_scores_and_diffusion_matches_the_module():
    args = _postprocess_args()
    det, tr = postprocess_detections(*args, height=128, width=96, nms_thr=1.0, merge="none")
    keep = tr["nms_keep_pos"]
    assert torch.equal(tr["scores_decayed"], args[3][keep]) and not tr["ios"].any()
    assert det.scores.tolist() == sorted(args[3][keep].tolist(), reverse=True)
    cfg = DiffusionConfig(grid="lowres")
    det, tr = postprocess_detections(
        *args, height=128, width=96, nms_thr=1.0, merge="diffusion", diffusion=cfg
    )
    keep = tr["nms_keep_pos"]
    pi = graph_diffusion(args[0][keep] > 0, args[2][keep], cfg)
    assert torch.equal(tr["ios"], pi) and pi.max() > 0  # the blobs overlap: something decays
    assert torch.equal(tr["scores_decayed"], decay_scores(args[3][keep], pi, 0.5))


def test_diffusion_on_the_fsod_vfm_grid_resizes_the_full_resolution_masks():
    args = _postprocess_args()
    det, tr = postprocess_detections(*args, height=128, width=96, nms_thr=1.0, merge="diffusion")
    keep = tr["nms_keep_pos"]
    from ntt.postprocess import resize_masks_to_image

    full = resize_masks_to_image(args[0][keep], 128, 96)
    grid = resize_masks_linear(full, fsod_vfm_grid(128, 96))
    assert tuple(grid.shape[1:]) == (45, 45)
    assert torch.equal(tr["ios"], graph_diffusion(grid, args[2][keep], DiffusionConfig()))
    # order=score ranks A by the classification score instead of the proposer's order
    _, tr_s = postprocess_detections(
        *args, height=128, width=96, nms_thr=1.0, merge="diffusion", diffusion=DiffusionConfig(order="score")
    )
    perm = torch.sort(args[3][keep], descending=True, stable=True).indices
    want = torch.empty_like(tr_s["ios"])
    want[perm] = graph_diffusion(grid[perm], args[2][keep][perm], DiffusionConfig())
    assert torch.equal(tr_s["ios"], want) and not torch.equal(tr_s["ios"], tr["ios"])


def test_dino_grid_is_the_runs_feature_grid():
    args = _postprocess_args()
    cfg = DiffusionConfig(grid="dino")
    _, tr = postprocess_detections(
        *args, height=128, width=96, nms_thr=1.0, merge="diffusion", diffusion=cfg, dino_grid=(7, 9)
    )
    keep = tr["nms_keep_pos"]
    from ntt.postprocess import resize_masks_to_image

    grid = resize_masks_linear(resize_masks_to_image(args[0][keep], 128, 96), (7, 9))
    assert torch.equal(tr["ios"], graph_diffusion(grid, args[2][keep], cfg))
    with pytest.raises(ValueError, match="grid=dino needs"):
        postprocess_detections(*args, height=128, width=96, nms_thr=1.0, merge="diffusion", diffusion=cfg)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"merge": "diffuse"}, "matcher.merge=diffuse: choose one of soft, diffusion, none"),
        (
            {"diffusion": {"grid": "full"}},
            "matcher.diffusion.grid=full: choose one of fsod_vfm, dino, lowres",
        ),
        ({"diffusion": {"alpha": 1.5}}, "matcher.diffusion.alpha=1.5: use a weight in [0, 1)"),
        ({"diffusion": {"steps": 0}}, "matcher.diffusion.steps=0: use a number of steps >= 1"),
        ({"diffusion": {"steps": "many"}}, "matcher.diffusion.steps=many: expected a whole number"),
        ({"diffusion": {"alpah": 0.2}}, "did you mean matcher.diffusion.alpha?"),
        (
            {"diffusion": {"solver": "solve", "lower_triangle": False}},
            "matcher.diffusion.solver=solve needs matcher.diffusion.lower_triangle=true",
        ),
    ],
)
def test_bad_values_are_refused_with_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        build_node(override, MatcherConfig)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_default_keys_stay_out_of_every_identity(tmp_path):
    from ntt.inference import InferenceParams
    from ntt.utils.identity import config_id, identity_keys, portable_config

    cfg = compose_smoke(tmp_path)
    assert config_id(cfg) == "04157930"  # debug=smoke's id before matcher.merge existed (main at c250f4e)
    for data in (identity_keys(cfg), portable_config(cfg)):
        assert "merge" not in data["matcher"] and "diffusion" not in data["matcher"]
    fields = [f.name for f in dataclasses.fields(InferenceParams)]
    semantics = ("encoder_input", "long_side", "input_size", "final_norm", "proposal_pooling", "scoring",
                 "sam_iou_decay")  # fmt: skip
    later = (
        "prompts",
        "stability_fallback",
        "merge",
        "diffusion",
        *semantics,
        "score_filter",
    )  # added after runs were recorded
    assert list(InferenceParams().to_dict()) == [f for f in fields if f not in later]
    assert list(InferenceParams(merge="none").to_dict()) == [
        f for f in fields if f not in later[:2] + later[3:]
    ]
    assert list(InferenceParams(merge="diffusion", prompts="boxes").to_dict()) == [
        f
        for f in fields
        if f not in (*semantics, "score_filter")  # NTT's semantics (§5.13) and score filter (§5.14) stay out
    ]
    # diffusion settings are inert (and out of the id) unless merge=diffusion; then each one counts
    assert config_id(compose_smoke(tmp_path, "matcher.diffusion.alpha=0.5")) == "04157930"
    ids = {
        config_id(compose_smoke(tmp_path, *o))
        for o in [(), ("matcher.merge=none",), ("matcher.merge=diffusion",)]
        + [("matcher.merge=diffusion", "matcher.diffusion.alpha=0.5")]
    }
    assert len(ids) == 4
    keys = identity_keys(compose_smoke(tmp_path, "matcher.merge=diffusion"))["matcher"]
    assert keys["merge"] == "diffusion" and keys["diffusion"]["grid"] == "fsod_vfm"


SMALL = ("dataset=synthetic", "dataset.synthetic.num_images=9", "dataset.max_test_images=1")


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    """One output folder for both runs: the synthetic data is made once, the second run adopts the first's
    memory stages (same stage keys) and runs only its test stage."""
    return tmp_path_factory.mktemp("merge_runs")


@pytest.mark.parametrize("merge", ["diffusion", "none"])
def test_smoke_run_with_another_merge_writes_results_in_its_own_directory(smoke_out, merge):
    """`ntt run debug=smoke matcher.merge=<merge>` (tiny random models: plumbing only)."""
    from ntt.runner import run_pipeline

    cfg = compose_smoke(
        smoke_out, f"matcher.merge={merge}", "run_dir=${paths.output_dir}/${run_name}", small=SMALL
    )
    metrics = run_pipeline(cfg)
    run_dir = Path(str(cfg.run_dir))
    assert metrics["num_images"] == 1 and metrics["failed_images"] == []
    assert run_dir.name != "smoke-04157930" and run_dir.name.startswith("smoke-")
    preds = json.loads((run_dir / "predictions.json").read_text())
    assert 0 < len(preds) == metrics["num_detections"] <= 100
    recorded = json.loads((run_dir / "metrics.json").read_text())["config"]["matcher"]
    assert recorded["merge"] == merge and ("diffusion" in recorded) == (merge == "diffusion")
