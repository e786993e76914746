"""LVIS reference sampling with the authors' settings (method.md §1.2 step 5, §1.3): ntt's sampler against the
authors' own function, run on the same crafted LVIS-style jsons (tests/authors_few_shot_sampling.py holds
their code verbatim, commit 214fc79).

The jsons hold every case their LVIS settings touch: a rare class with one instance (padded), a rare class
whose two instances share an image (one entry, padded), classes with only invalid instances (tiny, at the
border, crowd: the invalid fallback, with and without padding), a class mixing valid and invalid ones, a
frequent class with many instances on few images, an `isimpossible` flag (kept: remove_bad=False) and
categories met in an order other than their ids.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
from authors_few_shot_sampling import run_authors_lvis_sampler
from helpers_pipeline import run_smoke

from ntt.refs import RefEntry, load_refs, sample_references, save_refs
from ntt.utils.config import SamplingSpec

W, H = 320, 240  # every crafted image


def _box(rng: random.Random, kind: str) -> list[float]:
    """A box of the kind asked: `valid` (>= 32x32, >= 10 px from every border) or one invalid reason."""
    if kind == "valid":
        w, h = rng.uniform(32, 120), rng.uniform(32, 100)
        return [rng.uniform(10, W - 10 - w), rng.uniform(10, H - 10 - h), w, h]
    if kind == "tiny":
        return [rng.uniform(20, 200), rng.uniform(20, 150), rng.uniform(2, 31.9), rng.uniform(2, 40)]
    if kind == "border":
        return [rng.uniform(0, 9.9), rng.uniform(20, 100), 50.0, 50.0]
    raise ValueError(kind)


def _lvis_pool(seed: int = 0) -> dict:
    """A crafted LVIS-style reference pool (the layout `ntt prepare lvis` writes: iscrowd 0 everywhere, LVIS
    image and category fields kept), annotations in an interleaved, non-id order.

    category id: what it holds
      3 (rare_one): 1 valid instance                         -> padded by repetition
      4 (rare_pair): 2 valid instances on one image          -> one entry, padded
      5 (tiny_only): 3 invalid (tiny / border) instances     -> invalid fallback (first K), padded below K=3
      6 (crowd_only): 1 crowd instance                       -> invalid fallback, padded
      7 (mixed): 2 valid on distinct images + 4 invalid     -> the valid ones, padded (no fallback)
      9 (frequent): 40 instances on 8 images, 1 invalid in 4 -> K distinct images, no padding up to K=8
      2 (impossible): 3 valid, one with isimpossible=1      -> kept (the authors' remove_bad=False)
    """
    rng = random.Random(seed)
    plan: list[tuple[int, int, str, dict]] = [(3, 1, "valid", {}), (4, 2, "valid", {}), (4, 2, "valid", {})]
    plan += [(5, 3, "tiny", {}), (5, 4, "border", {}), (5, 4, "tiny", {})]
    plan += [(6, 5, "valid", {"iscrowd": 1})]
    plan += [(7, 6, "valid", {}), (7, 7, "valid", {})] + [
        (7, 8 + i % 2, ("tiny", "border")[i % 2], {}) for i in range(4)
    ]
    plan += [(9, 10 + i % 8, "tiny" if i % 4 == 3 else "valid", {}) for i in range(40)]
    plan += [
        (2, 11, "valid", {"isimpossible": 1}),
        (2, 12, "valid", {"isimpossible": 0}),
        (2, 13, "valid", {}),
    ]
    rng.shuffle(plan)  # categories first met in a shuffled order, images interleaved
    annotations = []
    ids = rng.sample(range(1000, 9000), len(plan))  # annotation ids unrelated to the file order
    for ann_id, (cat, img, kind, extra) in zip(ids, plan):
        x, y, w, h = _box(rng, kind)
        ann = {"id": ann_id, "image_id": img, "category_id": cat, "bbox": [x, y, w, h], "area": w * h}
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        ann.update({"iscrowd": 0, **extra})
        annotations.append(ann)
    names = {
        2: "impossible",
        3: "rare_one",
        4: "rare_pair",
        5: "tiny_only",
        6: "crowd_only",
        7: "mixed",
        9: "frequent",
    }
    freq = {2: "r", 3: "r", 4: "r", 5: "r", 6: "r", 7: "c", 9: "f"}
    return {
        "images": [
            {"id": i, "width": W, "height": H, "file_name": f"train2017/{i:012d}.jpg", "neg_category_ids": [],
             "not_exhaustive_category_ids": []}
            for i in range(1, 18)
        ],
        "annotations": annotations,
        "categories": [{"id": c, "name": names[c], "frequency": freq[c]} for c in sorted(names)],
    }  # fmt: skip


LVIS = SamplingSpec(allow_invalid=True, allow_duplicates=True, remove_impossible=False)


def _ntt(coco: dict, n_shot: int, seed: int) -> dict:
    cats = [c["id"] for c in coco["categories"]]
    return sample_references(
        coco,
        cats,
        n_shot,
        seed,
        allow_invalid=LVIS.allow_invalid,
        allow_duplicates=LVIS.allow_duplicates,
        remove_impossible=LVIS.remove_impossible,
    )


def _layout(refs) -> list:
    """Ordered (category, [(image, ann_ids)]) of an ntt RefSet or of the authors' pkl dict."""
    out = []
    for cat, lst in refs.items():
        if lst and isinstance(lst[0], RefEntry):
            out.append((int(cat), [(e.image_id, list(e.ann_ids)) for e in lst]))
        else:
            out.append((int(cat), [(e["img_id"], list(e["ann_ids"])) for e in lst]))
    return out


def _authors(tmp_path: Path, coco: dict, n_shot: int, seed: int, tag: str = "") -> tuple[dict, Path]:
    src = tmp_path / f"pool{tag}.json"
    src.write_text(json.dumps(coco))
    pkl = tmp_path / f"authors{tag}_{n_shot}shot_seed{seed}.pkl"
    theirs = run_authors_lvis_sampler(
        str(src), str(pkl), n_shot, [c["name"] for c in coco["categories"]], seed
    )
    return theirs, pkl


@pytest.mark.parametrize("n_shot", [1, 3, 5, 10])
@pytest.mark.parametrize("seed", [42, 0, 7])
def test_lvis_sampling_equals_the_authors_function(tmp_path, n_shot, seed, capsys):
    coco = _lvis_pool()
    theirs, pkl = _authors(tmp_path, coco, n_shot, seed)
    ours = _ntt(coco, n_shot, seed)
    assert _layout(ours) == _layout(theirs)  # same classes, same order, same slots
    assert all(len(lst) == n_shot for lst in ours.values()) and len(ours) == 7
    # written as refs.json, ours and theirs (read back from their pkl) are the same bytes
    save_refs(tmp_path / "ours.json", ours, {"seed": seed})
    save_refs(tmp_path / "theirs.json", load_refs(pkl), {"seed": seed})
    assert (tmp_path / "ours.json").read_bytes() == (tmp_path / "theirs.json").read_bytes()


def test_lvis_cases_give_the_known_answers(tmp_path):
    """Hand-checkable consequences of the authors' rules at K=3 (seed 42), whatever the shuffles drew."""
    coco = _lvis_pool()
    refs = _ntt(coco, 3, 42)
    anns = {a["id"]: a for a in coco["annotations"]}
    by_cat = {c: [anns[e.ann_id] for e in lst] for c, lst in refs.items()}
    assert [a["id"] for a in by_cat[3]] == [by_cat[3][0]["id"]] * 3  # one instance, repeated
    assert len({a["id"] for a in by_cat[4]}) == 1  # two instances on one image: one entry, repeated
    tiny = [a["id"] for a in by_cat[5]]
    assert len(set(tiny)) == 3 and all(anns[i]["category_id"] == 5 for i in tiny)  # the 3 invalid ones
    assert by_cat[6][0]["iscrowd"] == 1 and len({a["id"] for a in by_cat[6]}) == 1  # crowd only: fallback
    mixed = [a["id"] for a in by_cat[7]]
    assert mixed[2] == mixed[0] and {anns[i]["image_id"] for i in mixed[:2]} == {6, 7}  # valid only, padded
    assert len({a["image_id"] for a in by_cat[9]}) == 3  # frequent: 3 distinct images
    # one shuffle per class in first-met order from one stream: a different seed draws differently
    assert _layout(_ntt(coco, 3, 42)) == _layout(refs) and _layout(_ntt(coco, 3, 43)) != _layout(refs)


def test_a_class_without_annotations_is_left_out_like_the_authors(tmp_path, caplog):
    coco = _lvis_pool()
    coco["categories"].append({"id": 11, "name": "absent", "frequency": "r"})
    theirs, _ = _authors(tmp_path, coco, 2, 42, tag="_absent")
    with caplog.at_level(logging.WARNING, logger="ntt.refs"):
        ours = _ntt(coco, 2, 42)
    assert 11 not in ours and _layout(ours) == _layout(theirs)
    assert "11 (absent)" in caplog.text


def test_the_coco_settings_still_stop_where_lvis_pads():
    with pytest.raises(ValueError, match=r"class 3 \(rare_one\) has only 1 valid reference"):
        sample_references(_lvis_pool(), [3], 2, 42)


def test_dataset_lvis_samples_like_the_authors_through_the_stage(tmp_path):
    """`ntt run dataset=lvis stages=[sample_refs]`: the config's sampling keys and seed 42 reach the sampler;
    refs.json holds the authors' references and records the settings."""
    root = tmp_path / "lvis"
    root.mkdir()
    coco = _lvis_pool()
    (root / "lvis_v1_train.json").write_text(json.dumps(coco))
    (root / "lvis_v1_val.json").write_text(json.dumps(coco))
    run_smoke(tmp_path, "dataset=lvis", f"dataset.root={root}", "shots=4", "stages=[sample_refs]")
    doc = json.loads((tmp_path / "run" / "refs.json").read_text())
    assert doc["seed"] == 42 and doc["shots"] == 4
    assert doc["sampling"] == {
        "allow_invalid": True,
        "allow_duplicates": True,
        "remove_impossible": False,
        "all_classes": True,
    }
    theirs, pkl = _authors(tmp_path, coco, 4, 42)
    assert _layout(load_refs(tmp_path / "run" / "refs.json")) == sorted(_layout(theirs))


def test_a_class_subset_gets_its_references_from_the_draw_over_all_classes(tmp_path):
    """The authors' LVIS script samples every class (`--dataset lvis`) whatever split it then evaluates: a
    subset run (here 3 of the 7 classes) must take its references from that one draw, which differs from a
    draw over the subset alone (the shuffles of the other classes come first in the shared stream)."""
    root = tmp_path / "lvis"
    root.mkdir()
    coco = _lvis_pool()
    for name in ("lvis_v1_train.json", "lvis_v1_val.json"):
        (root / name).write_text(json.dumps(coco))
    subset = "dataset.class_names=[mixed,frequent,impossible]"
    common = ("dataset=lvis", f"dataset.root={root}", "shots=3", "stages=[sample_refs]", subset)
    run_smoke(tmp_path / "all", *common)
    run_smoke(tmp_path / "sub", *common, "dataset.sampling.all_classes=false")
    theirs, _ = _authors(tmp_path, coco, 3, 42)
    wanted = [(c, lst) for c, lst in sorted(_layout(theirs)) if c in (2, 7, 9)]
    assert _layout(load_refs(tmp_path / "all" / "run" / "refs.json")) == wanted
    assert _layout(load_refs(tmp_path / "sub" / "run" / "refs.json")) != wanted


def test_the_sampling_keys_on_a_dataset_that_does_not_write_them_say_to_add_them():
    """COCO/VOC configs leave `dataset.sampling` out (their run ids stay as they were): setting one of its keys
    there needs Hydra's `+`, and the message says so (before: "`dataset.sampling` is not a config key (did
    you mean dataset.sampling?)")."""
    from ntt.utils.compose import compose
    from ntt.utils.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        compose(["dataset.sampling.allow_duplicates=true"])
    assert str(err.value) == (
        "dataset.sampling.allow_duplicates=true: the chosen `dataset` option does not set `dataset.sampling`: "
        "add it with `+dataset.sampling.allow_duplicates=true`"
    )
    cfg = compose(["+dataset.sampling.allow_duplicates=true"])
    assert dict(cfg.dataset.sampling) == {"allow_duplicates": True}
    assert dict(compose(["dataset=lvis", "dataset.sampling.all_classes=false"]).dataset.sampling) == {
        "allow_invalid": True,
        "allow_duplicates": True,
        "remove_impossible": False,
        "all_classes": False,
    }
