"""`python -m ntt.tools.bench --quick`: the result json is complete and the pooling side check holds.

No timing assertions: the quick run uses tiny random models and small shapes, only plumbing is checked.
"""

from __future__ import annotations

import json
import math

import pytest

from ntt.tools.bench import RANDOM_WEIGHTS_NOTE, main

# Every timed measurement of the json, as a path of keys under "results".
TIMINGS = [
    ("dinov2_forward",),
    ("sam2_image_encoder",),
    ("sam2_decoder",),
    ("mask_pooling", "dense"),
    ("mask_pooling", "adjoint"),
    ("soft_merge", "semantic_soft_merge"),
    ("soft_merge", "resize_masks_to_image"),
    ("sam2_decoder_paths", "official"),
    ("sam2_decoder_paths", "cached"),
    ("infer_image",),
]


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.slow  # ~16 s busy: a measuring tool's plumbing (`make bench ARGS=--quick`), no result of the method
def test_quick_bench_writes_complete_json(tmp_path):
    path = main(["--quick", "--out", str(tmp_path)])
    assert (
        path.parent == tmp_path and path.name.startswith("results-") and path.name.endswith("-cpu-quick.json")
    )
    report = json.loads(path.read_text())

    assert report["WARNING"] == RANDOM_WEIGHTS_NOTE and "TIMINGS ONLY" in report["WARNING"]
    assert report["settings"]["random_init"] is True and report["settings"]["quick"] is True
    for key in ("timestamp_utc", "command", "hardware", "table_markdown"):
        assert report[key], key
    assert isinstance(report["contention_warnings"], list)  # may be non-empty on a busy machine
    hw = report["hardware"]
    assert hw["cpu_model"] and hw["cpu_cores"] >= 1 and hw["torch"] and hw["device"] == "cpu"
    assert "--quick" in report["command"]

    results = report["results"]
    assert set(results) == {t[0] for t in TIMINGS}
    for keys in TIMINGS:
        t = results
        for k in keys:
            t = t[k]
        assert _positive(t["median_s"]) and _positive(t["min_s"]), keys
        assert t["min_s"] <= t["median_s"] and t["repeats"] == len(t["times_s"]) >= 1, keys
        assert all(_positive(x) for x in t["times_s"]), keys
        assert "cpu_time_per_wall" in t and "other_load_cores" in t, keys

    dec = results["sam2_decoder"]
    assert dec["batch_prompts"] >= 1 and _positive(dec["per_prompt_median_s"])
    assert dec["shapes"]["logits"][:2] == [dec["batch_prompts"], 4]

    # the cached decoder computes what the official one does (bit-identical from 8 prompts per call on;
    # --quick decodes 2 prompts per call, where other matmul kernels may change the last bits)
    paths = results["sam2_decoder_paths"]
    assert paths["max_abs_diff_logits"] < 1e-5 and paths["official"]["minflt_per_prompt_median"] >= 0

    # dense and adjoint pooling are the same linear map: they must agree up to float rounding
    pool = results["mask_pooling"]
    assert math.isfinite(pool["max_abs_diff"]) and pool["max_abs_diff"] < 1e-4
    assert pool["shapes"]["embeddings"] == [pool["shapes"]["masks"][0], pool["shapes"]["feats"][-1]]

    assert results["soft_merge"]["shapes"]["masks"][1:] == report["settings"]["image_hw"]
    assert results["infer_image"]["prompts"] == report["settings"]["grid"] ** 2
