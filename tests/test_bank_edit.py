"""Growing and shrinking a practitioner's bank exactly, and class subsets per predict call (ntt.bank_edit).

Tiny RANDOM models on FSS-1000 sample images: plumbing, not accuracy. "From scratch" is a new Segmenter
given the same references class by class (the order rule of ntt/bank_edit.py); an edited bank must be that
bank: the same saved bytes (tensors and metadata). The tiny encoder on the CPU gives each crop the same bits
whatever its batch-mates (checked below), so re-batching the references cannot hide a difference.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from conftest import DATA, require_path
from helpers_backbones import tiny_dinov2, tiny_sam2

import ntt.memory
from ntt.app.segmenter import Segmenter
from ntt.app.settings import compose_config
from ntt.bank import MemoryBank
from ntt.bank_edit import (
    BankEditError,
    describe,
    merge,
    remove_class,
    remove_reference,
    rename_class,
    subset,
)
from ntt.utils.files import sha256_file

FSS = DATA / "geti-instant-learn-samples" / "library" / "examples" / "assets" / "fss-1000"
FIXTURE = Path(__file__).parent / "fixtures" / "banks" / "bank_v2_main.ntt"
TINY = ["proposer.points_per_side=4", "proposer.points_batch_size=16", "proposer.iou_thr=0.0"]

# (class, FSS class folder, image number): "pear" is apple pictures under another name (a third class)
A1, A2, B1, B2, P1 = (
    ("apple", "apple", 1),
    ("apple", "apple", 2),
    ("basketball", "basketball", 1),
    (
        "basketball",
        "basketball",
        2,
    ),
    ("pear", "apple", 3),
)


def segmenter(*overrides: str) -> Segmenter:
    cfg = compose_config(sam2="tiny_random", dinov2="tiny_random", overrides=[*TINY, *overrides])
    return Segmenter(cfg, device="cpu", sam2=tiny_sam2(), dinov2=tiny_dinov2())


def add(seg: Segmenter, ref: tuple[str, str, int], **kwargs) -> None:
    cls, folder, i = ref
    seg.add_reference(FSS / f"images/{folder}/{i}.jpg", cls, masks=FSS / f"masks/{folder}/{i}.png", **kwargs)


@functools.cache
def _scratch(refs: tuple, category_id: int | None) -> MemoryBank:
    seg = segmenter()
    for ref in refs:
        add(seg, ref, category_id=category_id)
    return seg.build(progress=False)


def scratch(*refs, category_id: int | None = None) -> MemoryBank:
    """The bank a new segmenter builds from ``refs`` (added in this order; edits return new banks)."""
    return _scratch(refs, category_id)


def file_bytes(bank: MemoryBank, path: Path) -> bytes:
    return bank.save(path).read_bytes()


def assert_same_bank(got: MemoryBank, want: MemoryBank, tmp_path: Path) -> None:
    """Equal saved files (every tensor and the metadata), so equal prototypes too."""
    assert got.meta() == want.meta()
    assert file_bytes(got, tmp_path / "got.ntt") == file_bytes(want, tmp_path / "want.ntt")
    assert got.prototypes().numpy().tobytes() == want.prototypes().numpy().tobytes()


@pytest.fixture(scope="module")
def full() -> MemoryBank:
    require_path(FSS, "FSS-1000 sample (geti-instant-learn-samples)")
    return scratch(A1, B1, A2, P1)  # = the bank of A1, A2, B1, P1: classes in order of first appearance


def test_the_tiny_encoder_gives_each_reference_the_same_bits_in_any_batch(full):
    """The premise of the byte comparisons: batch size 1 (every crop alone) gives the batch-8 bank."""
    seg = segmenter("matcher.memory.batch_size=1")
    for ref in (A1, B1, A2, P1):
        add(seg, ref)
    assert torch.equal(seg.build(progress=False).instance_means, full.instance_means)


def test_a_loaded_bank_grows_by_encoding_only_the_new_references(full, tmp_path, monkeypatch):
    seg = segmenter()
    add(seg, A1)
    add(seg, B1)
    saved = seg.save(tmp_path / "two.ntt")
    grown = Segmenter.load(saved, device="cpu", sam2=tiny_sam2(), dinov2=tiny_dinov2())
    add(grown, A2)  # a reference of a known class
    add(grown, P1)  # a new class: id 3
    encoded = []
    real = ntt.memory.encode_references
    monkeypatch.setattr(
        ntt.memory,
        "encode_references",
        lambda plan, *a, **k: encoded.extend(plan.jobs) or real(plan, *a, **k),
    )
    bank = grown.build(progress=False)
    assert [j.description for j in encoded] == [
        "class 'apple' reference 0 (2.jpg)",
        "class 'pear' reference 0 (3.jpg)",
    ]  # the loaded references are not encoded again
    assert bank.category_names == ["apple", "basketball", "pear"] and bank.category_ids == [1, 2, 3]
    assert bank.counts.tolist() == [2, 1, 1]
    assert_same_bank(bank, full, tmp_path)
    assert grown.class_names == ["apple", "basketball", "pear"]


def test_remove_rename_and_merge_give_the_bank_built_from_scratch(full, tmp_path):
    no_apple = remove_class(full, "apple")
    assert no_apple.category_names == ["basketball", "pear"] and no_apple.category_ids == [1, 2]  # 1..C
    assert_same_bank(no_apple, scratch(B1, P1), tmp_path)
    assert_same_bank(remove_reference(full, "apple", 0), scratch(A2, B1, P1), tmp_path)
    assert_same_bank(
        remove_reference(full, "pear", -1), scratch(A1, A2, B1), tmp_path
    )  # last ref: class gone
    renamed = rename_class(full, "basketball", "ball")
    assert_same_bank(renamed, scratch(A1, A2, ("ball", "basketball", 1), P1), tmp_path)
    assert_same_bank(merge(scratch(A1, B1), scratch(A2, P1)), full, tmp_path)
    # a sequence: remove a class, then merge it back: it comes last, with the next id
    again = merge(remove_class(full, "apple"), scratch(A1, A2))
    assert again.category_names == ["basketball", "pear", "apple"] and again.category_ids == [1, 2, 3]
    assert_same_bank(again, scratch(B1, P1, A1, A2), tmp_path)
    # the edits survive a save -> load
    assert_same_bank(MemoryBank.load(again.save(tmp_path / "again.ntt")), again, tmp_path)


def test_given_category_ids_are_kept_through_edits(tmp_path):
    require_path(FSS, "FSS-1000 sample (geti-instant-learn-samples)")
    seg = segmenter()
    add(seg, A1, category_id=5)
    add(seg, B1, category_id=9)
    bank = seg.build(progress=False)
    assert bank.category_ids == [5, 9] and bank.refs[0][0]["category_id"] == 5
    seg9 = segmenter()
    add(seg9, B1, category_id=9)
    assert_same_bank(remove_class(bank, "apple"), seg9.build(progress=False), tmp_path)
    with pytest.raises(BankEditError, match="category id 5 is used by both 'apple' and 'pear'"):
        merge(bank, scratch(("pear", "apple", 3), category_id=5))


def test_edit_errors_name_the_class_and_the_close_names(full):
    with pytest.raises(
        BankEditError, match=r"no class 'aple' in the bank \(did you mean apple\?\); its classes"
    ):
        remove_class(full, "aple")
    with pytest.raises(BankEditError, match="already has a class 'pear'"):
        rename_class(full, "apple", "pear")
    with pytest.raises(BankEditError, match=r"has 1 reference\(s\) \(0..0\), not 3"):
        remove_reference(full, "pear", 3)
    with pytest.raises(BankEditError, match="no class would be left"):
        remove_class(subset(full, ["pear"]), "pear")
    other = MemoryBank(**{**vars(full), "fill_settings": {**full.fill_settings, "context_ratio": 0.5}})
    with pytest.raises(BankEditError, match="encoded their references differently"):
        merge(full, other)
    benchmark = MemoryBank(
        instance_means=full.instance_means[:, :1], weight_sums=full.weight_sums[:, :1], category_ids=[1, 2, 3],
        category_names=["a", "b", "c"], shots=1,
    )  # fmt: skip
    with pytest.raises(BankEditError, match="benchmark run's memory"):
        remove_class(benchmark, "a")


def test_references_record_their_sources_and_describe_lists_them(full):
    """Mask references (box and click references: tests/test_api.py)."""
    ref = full.refs[0][0]
    assert ref["image_sha256"] == sha256_file(FSS / "images/apple/1.jpg") and ref["prompt"] == "mask"
    assert len(ref["mask_sha256"]) == 64 and "category_id" not in ref  # counted, not given
    assert full.meta()["format_version"] == 3
    text = describe(full)
    assert "3 classes, 4 references; encoder dinov2_tiny_random (D=64); format ntt-memory v3" in text
    assert "\n  [1] apple: 2 references\n      0: 1.jpg  mask sha256 " in text
    assert (
        f"\n  [3] pear: 1 reference\n      0: 3.jpg  mask sha256 {full.refs[2][0]['mask_sha256'][:12]}"
        in text
    )


def test_a_bank_written_by_the_previous_format_loads_and_grows(tmp_path):
    """tests/fixtures/banks/bank_v2_main.ntt: written by main at ff085b0 (ntt-memory v2, no sources):
    apple 1.jpg + 2.jpg and basketball 1.jpg as masks, the tiny random models and TINY settings."""
    require_path(FSS, "FSS-1000 sample (geti-instant-learn-samples)")
    old = MemoryBank.load(FIXTURE)
    assert json.loads(torch.load(FIXTURE, weights_only=True)["meta_json"])["format_version"] == 2
    assert old.category_names == ["apple", "basketball"] and old.counts.tolist() == [2, 1]
    assert not old.records_sources and old.format_version() == 2
    now = scratch(A1, B1, A2)
    assert torch.equal(old.instance_means, now.instance_means)  # the same features as today's encoding
    seg = Segmenter.load(FIXTURE, device="cpu", sam2=tiny_sam2(), dinov2=tiny_dinov2())
    add(seg, P1)
    grown = seg.build(progress=False)
    want = scratch(A1, B1, A2, P1)
    # bytes of every tensor; the old references' metadata lacks the sources ntt did not record then
    for name in ("instance_means", "weight_sums", "counts"):
        assert getattr(grown, name).numpy().tobytes() == getattr(want, name).numpy().tobytes()
    assert grown.prototypes().numpy().tobytes() == want.prototypes().numpy().tobytes()
    assert grown.category_ids == [1, 2, 3] and grown.refs[2] == want.refs[2]
    assert grown.refs[0] == old.refs[0] and "image_sha256" not in grown.refs[0][0]


# ----------------------------------------------------------------------------------------------------------
# Class subsets per call


@pytest.fixture(scope="module")
def three_class_segmenter(full) -> Segmenter:
    seg = segmenter()
    seg.use_bank(full)
    return seg


def test_predict_with_a_class_subset_equals_a_bank_of_only_those_classes(three_class_segmenter, full):
    seg = three_class_segmenter
    image = FSS / "images/basketball/6.jpg"
    got = seg.predict([image], classes=["pear", "basketball"], progress=False)[0]
    only = segmenter()
    only.use_bank(scratch(B1, P1))  # those classes' references alone, from scratch
    want = only.predict(image)
    assert len(got) > 0
    assert torch.equal(got.masks, want.masks) and torch.equal(got.boxes, want.boxes)
    assert torch.equal(got.scores, want.scores) and torch.equal(got.labels, want.labels)
    assert got.names == want.names == ["basketball", "pear"]
    assert got.category_ids == [2, 3] and want.category_ids == [1, 2]  # the whole bank's ids are kept
    ids = {1: 2, 2: 3}
    assert got.to_coco(1) == [{**r, "category_id": ids[r["category_id"]]} for r in want.to_coco(1)]
    assert seg.bank is full  # the call's subset leaves the segmenter's bank alone


def test_an_unknown_class_in_a_subset_is_one_line_with_the_close_names(three_class_segmenter):
    with pytest.raises(
        BankEditError,
        match=r"^predict\(classes=...\): no class 'basketbal' in the bank \(did you mean basketball\?\); its classes: apple, basketball, pear$",
    ):  # noqa: E501
        three_class_segmenter.predict(FSS / "images/apple/5.jpg", classes=["basketbal"])
    with pytest.raises(BankEditError, match="the subset is empty"):
        three_class_segmenter.predict(FSS / "images/apple/5.jpg", classes=[])


# ----------------------------------------------------------------------------------------------------------
# ntt bank


def test_ntt_bank_show_remove_rename_merge_edit_the_file_exactly(full, tmp_path, capsys, caplog):
    from ntt import cli

    path = full.save(tmp_path / "bank.ntt")
    assert cli.main(["bank", "show", str(path)]) == 0
    assert "3 classes, 4 references" in capsys.readouterr().out
    assert (
        cli.main(["bank", "remove", str(path), "apple", "--ref", "0", "--out", str(tmp_path / "r.ntt")]) == 0
    )
    assert (tmp_path / "r.ntt").read_bytes() == file_bytes(remove_reference(full, "apple", 0), tmp_path / "x")
    assert cli.main(["bank", "rename", str(path), "pear", "plum"]) == 0  # in place
    assert path.read_bytes() == file_bytes(rename_class(full, "pear", "plum"), tmp_path / "x")
    assert cli.main(["bank", "remove", str(path), "apple"]) == 0
    other = scratch(A1, A2).save(tmp_path / "apples.ntt")
    assert cli.main(["bank", "merge", str(path), str(other), "--out", str(tmp_path / "m.ntt")]) == 0
    merged = MemoryBank.load(tmp_path / "m.ntt")
    assert merged.category_names == ["basketball", "plum", "apple"] and merged.category_ids == [1, 2, 3]
    assert cli.main(["bank", "remove", str(path), "appel"]) == 2  # one line, exit status 2
    assert "remove_class: no class 'appel' in the bank; its classes: basketball, plum" in caplog.text


def test_ntt_bank_add_encodes_new_references_into_a_saved_bank(tmp_path):
    require_path(FSS, "FSS-1000 sample (geti-instant-learn-samples)")
    from ntt.app.bank_cli import main

    path = scratch(A1, B1).save(tmp_path / "bank.ntt")
    prompts = {"references": [{"image": str(FSS / "images/apple/2.jpg"), "class": "apple",
                               "mask": str(FSS / "masks/apple/2.png")},
                              {"image": str(FSS / "images/apple/3.jpg"), "class": "pear",
                               "mask": str(FSS / "masks/apple/3.png")}]}  # fmt: skip
    (tmp_path / "more.json").write_text(json.dumps(prompts))
    assert main(["add", str(path), "--refs", str(tmp_path / "more.json"), "--device", "cpu"]) == 0
    grown = MemoryBank.load(path)
    want = scratch(A1, B1, A2, P1)
    assert grown.counts.tolist() == [2, 1, 1] and grown.category_names == ["apple", "basketball", "pear"]
    assert grown.instance_means.numpy().tobytes() == want.instance_means.numpy().tobytes()
    assert grown.prototypes().numpy().tobytes() == want.prototypes().numpy().tobytes()
