"""Tests of ntt.refs: sampling (method.md §1.2), shot files (§1.6), refs I/O and validation."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
from collections import OrderedDict
from pathlib import Path

import pytest

from ntt.refs import (
    RefEntry,
    is_valid_annotation,
    load_refs,
    load_refs_with_meta,
    refs_from_coco,
    sample_references,
    save_refs,
    validate_refs,
)

PARITY = Path(__file__).resolve().parents[1].parent / "shared" / "parity"
FRUITS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fruits_nuts" / "data"


def _ann(ann_id, cat, img, bbox, **kw):
    return {"id": ann_id, "category_id": cat, "image_id": img, "bbox": list(bbox), "iscrowd": 0, **kw}


VALID = (20, 20, 50, 50)


def _pool(cat9_first: bool = False) -> dict:
    """Crafted pool: class 5 with 6 annotations (one invalid, two on image 2), class 9 with 5 (two invalid)."""
    cat5 = [
        _ann(11, 5, 1, VALID),
        _ann(12, 5, 2, VALID),
        _ann(13, 5, 3, (5, 20, 50, 50)),  # invalid: 5 px from the left border
        _ann(14, 5, 2, (100, 100, 40, 40)),  # valid, but image 2 again
        _ann(15, 5, 4, VALID),
        _ann(16, 5, 5, VALID),
    ]
    cat9 = [
        _ann(21, 9, 4, VALID),
        _ann(22, 9, 5, VALID, iscrowd=1),  # invalid: crowd
        _ann(23, 9, 6, (20, 20, 31, 50)),  # invalid: narrower than 32
        _ann(24, 9, 1, VALID),
        _ann(25, 9, 3, VALID),
    ]
    other = [_ann(31, 8, 1, VALID)]  # class 8 is not selected
    anns = (cat9 + cat5 if cat9_first else cat5 + cat9) + other
    return {
        "images": [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.jpg"} for i in range(1, 7)],
        "annotations": anns,
        "categories": [{"id": 5, "name": "five"}, {"id": 8, "name": "eight"}, {"id": 9, "name": "nine"}],
    }


def _ids(refs):
    return {c: [e.ann_ids[0] for e in lst] for c, lst in refs.items()}


# ------------------------------------------------------------------------------------------------ validity


@pytest.mark.parametrize(
    "bbox,crowd,valid",
    [
        ((10, 10, 32, 32), 0, True),  # every limit exactly met
        ((10, 10, 31.9, 40), 0, False),  # too narrow
        ((10, 10, 40, 31.9), 0, False),  # too short
        ((9.9, 10, 40, 40), 0, False),  # left margin
        ((10, 9.9, 40, 40), 0, False),  # top margin
        ((150, 10, 40, 40), 0, True),  # right margin exactly 10 (200 - 190)
        ((150.1, 10, 40, 40), 0, False),  # right margin 9.9
        ((10, 150.1, 40, 40), 0, False),  # bottom margin 9.9
        ((20, 20, 50, 50), 1, False),  # crowd
    ],
)
def test_is_valid_annotation(bbox, crowd, valid):
    assert is_valid_annotation({"bbox": list(bbox), "iscrowd": crowd}, 200, 200) is valid


def test_is_valid_annotation_missing_iscrowd_counts_as_zero():
    assert is_valid_annotation({"bbox": [20, 20, 50, 50]}, 200, 200)


# ------------------------------------------------------------------------------------------------ sampling


def test_sampling_known_answer_seed0():
    # random.Random(0) shuffles class 5 (first seen) to [15, 13, 12, 11, 16, 14]: take 15, skip 13 (invalid),
    # take 12. Class 9 (second shuffle of the same stream) becomes [21, 25, 22, 23, 24]: take 21, 25.
    refs = sample_references(_pool(), [5, 9], n_shot=2, seed=0)
    assert list(refs) == [5, 9]  # first-seen order
    assert _ids(refs) == {5: [15, 12], 9: [21, 25]}
    assert refs[5][0] == RefEntry(5, 4, [15])


def test_sampling_category_order_consumes_the_stream():
    # Same data, class 9 seen first in the JSON: class 9 now gets the first shuffle, class 5 the second.
    a = sample_references(_pool(), [5, 9], n_shot=2, seed=0)
    b = sample_references(_pool(cat9_first=True), [5, 9], n_shot=2, seed=0)
    assert list(b) == [9, 5]
    assert _ids(b) == {9: [21, 25], 5: [11, 12]}
    assert _ids(a)[5] != _ids(b)[5]
    c = sample_references(_pool(cat9_first=True), [5, 9], n_shot=2, seed=2)
    assert _ids(c) == {9: [24, 25], 5: [16, 11]}


def _emulate(coco, cats, n_shot, seed):
    """Literal transcription of method.md §1.2 steps 1-4 (COCO mode) on the global-equivalent stream."""
    rng = random.Random(seed)
    imgs = {im["id"]: im for im in coco["images"]}
    per = {}
    for ann in coco["annotations"]:
        if ann["category_id"] in cats:
            per.setdefault(ann["category_id"], []).append((ann["image_id"], ann["id"], ann))
    out = {}
    for c, lst in per.items():
        lst = list(lst)
        rng.shuffle(lst)
        taken, imgs_taken = [], set()
        for img, aid, ann in lst:
            if not is_valid_annotation(ann, imgs[img]["width"], imgs[img]["height"]) or img in imgs_taken:
                continue
            imgs_taken.add(img)
            taken.append(aid)
            if len(taken) == n_shot:
                break
        out[c] = taken
    return out


@pytest.mark.parametrize("seed", [0, 1, 7, 33, 42])
@pytest.mark.parametrize("cat9_first", [False, True])
def test_sampling_matches_spec_and_properties(seed, cat9_first):
    coco = _pool(cat9_first)
    refs = sample_references(coco, [9, 5], n_shot=2, seed=seed)
    assert _ids(refs) == _emulate(coco, {5, 9}, 2, seed)
    for c, lst in refs.items():
        assert len(lst) == 2
        assert all(e.category_id == c for e in lst)
        assert not {e.ann_ids[0] for e in lst} & {13, 22, 23}  # invalid ones never chosen
        assert len({e.image_id for e in lst}) == 2  # at most one instance per image per class
    assert 8 not in refs
    # deterministic
    assert _ids(sample_references(coco, [5, 9], n_shot=2, seed=seed)) == _ids(refs)


def test_sampling_not_enough_names_class_and_count():
    with pytest.raises(ValueError) as err:
        sample_references(_pool(), [5, 9], n_shot=4, seed=0)
    msg = str(err.value)
    assert "class 9 (nine)" in msg and "only 3" in msg and "n_shot=4" in msg and "allow_duplicates" in msg


def test_sampling_missing_class_is_an_error():
    with pytest.raises(ValueError, match=r"77 \(\?\)"):
        sample_references(_pool(), [5, 77], n_shot=1, seed=0)


def test_sampling_lvis_padding_cycles():
    refs = sample_references(_pool(), [5, 9], n_shot=5, seed=0, allow_duplicates=True)
    a5 = _ids(refs)[5]
    assert len(a5) == 5
    first4 = _emulate(_pool(), {5, 9}, 5, 0)[5]  # 4 distinct images available for class 5
    assert a5 == first4 + first4[:1]
    a9 = _ids(refs)[9]
    assert a9[3:] == a9[:2]  # padding with list[i % 3]


def test_sampling_allow_invalid_fallback():
    coco = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "annotations": [_ann(1, 3, 1, (0, 0, 5, 5)), _ann(2, 3, 2, (1, 1, 5, 5))],
        "categories": [{"id": 3, "name": "tiny"}],
    }
    refs = sample_references(coco, [3], n_shot=3, seed=0, allow_invalid=True, allow_duplicates=True)
    ids = _ids(refs)[3]
    assert sorted(ids[:2]) == [1, 2] and ids[2] == ids[0]
    with pytest.raises(ValueError, match="class 3"):
        sample_references(coco, [3], n_shot=1, seed=0, allow_invalid=True)  # no padding allowed -> error


def test_sampling_skips_isimpossible():
    coco = _pool()
    for a in coco["annotations"]:
        a["isimpossible"] = 1 if a["id"] in (11, 15) else 0
    refs = sample_references(coco, [5], n_shot=2, seed=0)
    assert not {11, 15} & set(_ids(refs)[5])
    kept = sample_references(coco, [5], n_shot=2, seed=0, remove_impossible=False)
    assert _ids(kept)[5] == [15, 12]


# ------------------------------------------------------------------------------------------------ shot files


def _shot_file():
    return {
        "images": [{"id": i, "width": 100, "height": 100} for i in (10, 11, 12)],
        "annotations": [
            _ann(100, 1, 10, VALID),
            _ann(200, 2, 12, VALID),  # class 2 has 1 instance -> padded
            _ann(101, 1, 10, VALID),  # image 10 holds two instances of class 1
            _ann(102, 1, 11, VALID),
            _ann(300, 3, 12, VALID),  # class 3 has 1 instance -> padded after class 2
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
    }


def test_refs_from_coco_reference_pkl_duplicates_first_instance():
    refs = refs_from_coco(_shot_file(), [1, 2, 3], 3, mode="reference_pkl")
    assert [(e.image_id, e.ann_ids) for e in refs[1]] == [(10, [100, 101]), (10, [100, 101]), (11, [102])]
    assert [e.ann_id for e in refs[1]] == [100, 100, 102]  # the bug: instance 101 is never used
    # classes with one entry are padded with copies of it (random.choices over a single entry)
    assert [e.ann_id for e in refs[2]] == [200, 200, 200]
    assert [e.ann_id for e in refs[3]] == [300, 300, 300]


def test_refs_from_coco_per_annotation():
    refs = refs_from_coco(_shot_file(), [1], 3, mode="per_annotation")
    assert list(refs) == [1]
    assert [(e.image_id, e.ann_ids) for e in refs[1]] == [(10, [100]), (10, [101]), (11, [102])]


def test_refs_from_coco_padding_stream_matches_reference():
    coco = {
        "images": [{"id": i, "width": 100, "height": 100} for i in range(5)],
        "annotations": [
            _ann(1, 7, 0, VALID),
            _ann(2, 6, 1, VALID),
            _ann(3, 6, 2, VALID),
            _ann(4, 7, 3, VALID),
        ],
        "categories": [{"id": 6, "name": "six"}, {"id": 7, "name": "seven"}],
    }
    refs = refs_from_coco(coco, [6, 7], 5, mode="per_annotation")
    rng = random.Random(42)  # the reference: module-level random.seed(42), then random.choices per class
    exp7 = [1, 4] + rng.choices([1, 4], k=3)  # class 7 is seen first
    exp6 = [2, 3] + rng.choices([2, 3], k=3)
    assert _ids(refs) == {7: exp7, 6: exp6}
    # known answer of that stream
    assert exp7 == [1, 4, 4, 1, 1] and exp6 == [2, 3, 2, 3, 3]


def test_refs_from_coco_padding_is_one_warning_naming_the_selected_classes_and_counts(caplog):
    coco = {
        "images": [{"id": i, "width": 100, "height": 100} for i in range(5)],
        "annotations": [_ann(1, 7, 0, VALID), _ann(2, 6, 1, VALID), _ann(3, 8, 2, VALID)],
        "categories": [{"id": 6, "name": "six"}, {"id": 7, "name": "seven"}, {"id": 8, "name": "eight"}],
    }
    with caplog.at_level(logging.INFO, logger="ntt.refs"):
        refs_from_coco(coco, [6, 7], 3, mode="per_annotation")
    (record,) = [r for r in caplog.records if "padded" in r.getMessage()]
    assert record.levelno == logging.WARNING
    msg = record.getMessage()
    assert "2 class(es)" in msg and "class 7 (seven): 1; class 6 (six): 1" in msg and "shots=3" in msg
    assert "eight" not in msg  # not selected: its padding changes nothing of this run


def test_refs_from_coco_never_truncates():
    with pytest.raises(ValueError) as err:
        refs_from_coco(_shot_file(), [1, 2], 2, mode="per_annotation")
    msg = str(err.value)
    assert "class 1 (a)" in msg and "3 reference entries" in msg and "shots=2" in msg and "truncated" in msg
    # an unselected class with too many entries does not matter
    assert list(refs_from_coco(_shot_file(), [2], 2)) == [2]


def test_refs_from_coco_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        refs_from_coco(_shot_file(), [1], 3, mode="nope")


# ------------------------------------------------------------------------------------------------ file I/O


def test_save_load_roundtrip(tmp_path):
    refs = sample_references(_pool(), [9, 5], n_shot=2, seed=0)
    path = tmp_path / "sub" / "refs.json"
    save_refs(path, refs, {"seed": 0, "source_json": "pool.json", "category_names": {5: "five", 9: "nine"}})
    doc = json.loads(path.read_text())
    assert doc["format"] == "ntt-refs" and doc["shots"] == 2 and doc["seed"] == 0
    assert doc["category_ids"] == [5, 9] and list(doc["refs"]) == ["5", "9"]
    assert doc["category_names"] == {"5": "five", "9": "nine"}
    assert doc["refs"]["5"] == [{"image_id": 4, "ann_ids": [15]}, {"image_id": 2, "ann_ids": [12]}]
    back, meta = load_refs_with_meta(path)
    assert {c: back[c] for c in refs} == dict(refs)
    assert meta["seed"] == 0 and meta["source_json"] == "pool.json"
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]


def test_load_reference_pkl_and_plain_json(tmp_path):
    data = OrderedDict([(3, [{"img_id": 5, "ann_ids": [50]}]), (1, [{"img_id": 6, "ann_ids": [60, 61]}])])
    pkl = tmp_path / "memory.pkl"
    pkl.write_bytes(pickle.dumps(data))
    refs = load_refs(pkl)
    assert list(refs) == [3, 1]
    assert refs[1] == [RefEntry(1, 6, [60, 61])]
    plain = tmp_path / "refs_plain.json"
    plain.write_text(
        json.dumps({"3": [{"img_id": 5, "ann_id": 50}], "1": [{"img_id": 6, "ann_ids": [60, 61]}]})
    )
    assert load_refs(plain) == refs


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_load_pkl_is_restricted(tmp_path):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({1: [_Evil()]}))
    with pytest.raises(pickle.UnpicklingError, match=r"bad.pkl.*(posix|os|nt)\.system"):
        load_refs(bad)


def test_load_refs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_refs(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"1": [{"ann_ids": [3]}]}')
    with pytest.raises(ValueError, match="class 1 entry 0"):
        load_refs(bad)
    coco = tmp_path / "shots.json"
    coco.write_text(json.dumps(_shot_file()))
    with pytest.raises(ValueError, match="n_shot"):
        load_refs(coco)
    refs = load_refs(coco, category_ids=[1], n_shot=3, coco_mode="reference_pkl")
    assert [e.ann_id for e in refs[1]] == [100, 100, 102]


# ------------------------------------------------------------------------------------------------ validation


def test_validate_refs_ok_and_errors():
    coco = _pool()
    refs = sample_references(coco, [5, 9], n_shot=2, seed=0)
    validate_refs(refs, coco, [5, 9], 2)
    broken = {
        5: [RefEntry(5, 4, [15]), RefEntry(5, 2, [999])],
        9: [RefEntry(9, 4, [21]), RefEntry(9, 1, [21]), RefEntry(9, 4, [11])],
    }
    with pytest.raises(ValueError) as err:
        validate_refs(broken, coco, [5, 9, 8], 2)
    msg = str(err.value)
    assert "class 8 (eight) has no references" in msg
    assert "class 5 (five) slot 1: annotation 999 is not in the dataset json" in msg
    assert "class 9 (nine) has 3 references but shots=2" in msg
    assert "annotation 21 is on image 4, not 1" in msg
    assert "annotation 11 has category 5, not 9" in msg


# ------------------------------------------------------------------------------------------------ fixture


@pytest.mark.parity
def test_fixture_refs_pkl_equals_json():
    if not (PARITY / "common" / "memory_refs.pkl").is_file():
        pytest.skip("parity fixture absent")
    from_pkl = load_refs(PARITY / "common" / "memory_refs.pkl")
    from_json = load_refs(PARITY / "common" / "refs.json")
    assert from_pkl == from_json
    assert _ids(from_pkl) == {1: [1, 16], 2: [6, 21], 3: [10, 13]}
    assert [e.image_id for e in from_pkl[3]] == [0, 1]
    if (FRUITS / "trainval.json").is_file():
        coco = json.loads((FRUITS / "trainval.json").read_text())
        validate_refs(from_pkl, coco, [1, 2, 3], 2)
