"""`ntt segment` with tiny RANDOM models on real images: inputs, outputs, failures, clear errors.

Plumbing, not accuracy: with random weights the masks and scores are meaningless. What is checked: a folder
of images without any json is segmented; references from a mask folder and from a prompt json; the COCO
results and dataset jsons; overlays sized like their images; a broken image is recorded and the others
kept; a saved bank reproduces the predictions; bad input fails with a message naming the problem.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import DATA, require_path
from PIL import Image

from ntt.app.references import load_reference_specs
from ntt.app.segment import main

FSS = DATA / "geti-instant-learn-samples" / "library" / "examples" / "assets" / "fss-1000"
MODELS = ["--sam2", "tiny_random", "--dinov2", "tiny_random", "--device", "cpu"]
GRID = ["proposer.points_per_side=4", "proposer.points_batch_size=16", "proposer.iou_thr=0.0"]


@pytest.fixture()
def fss(tmp_path):
    """refs/<class>/<name>.jpg + mask PNGs, and a folder of 2 target images plus a broken file."""
    require_path(FSS, "FSS-1000 sample (geti-instant-learn-samples)")
    refs, images = tmp_path / "refs", tmp_path / "images"
    (refs / "apple").mkdir(parents=True)
    (refs / "basketball").mkdir(parents=True)
    images.mkdir()
    shutil.copy(FSS / "images/apple/1.jpg", refs / "apple/a1.jpg")
    shutil.copy(FSS / "masks/apple/1.png", refs / "apple/a1.png")  # <name>.png beside <name>.jpg
    shutil.copy(FSS / "images/basketball/1.jpg", refs / "basketball/b1.jpg")
    shutil.copy(FSS / "masks/basketball/1.png", refs / "basketball/b1.mask.png")
    shutil.copy(FSS / "images/apple/5.jpg", images / "apple5.jpg")
    Image.open(FSS / "images/basketball/6.jpg").resize((200, 150)).save(images / "ball6.png")
    (images / "notes.txt").write_text("not an image, ignored")
    return tmp_path


def test_folder_of_images_without_json_gives_results_overlays_and_a_reusable_bank(fss, caplog):
    caplog.set_level("INFO")
    (fss / "images" / "zz_broken.jpg").write_bytes(b"not a jpeg")
    out = fss / "out"
    rc = main(
        ["--refs", str(fss / "refs"), "--images", str(fss / "images"), "--out", str(out), *MODELS, *GRID]
    )
    assert rc == 1  # one image failed; the others are kept
    assert "segmenting 2 image(s) on cpu with a 4x4 prompt grid: expect about" in caplog.text
    assert "first image took" in caplog.text
    failed = json.loads((out / "failed.json").read_text())
    assert [f["file_name"] for f in failed] == ["zz_broken.jpg"] and "zz_broken.jpg" in failed[0]["error"]
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["categories"] == [{"id": 1, "name": "apple"}, {"id": 2, "name": "basketball"}]
    sizes = {im["file_name"]: (im["width"], im["height"]) for im in dataset["images"]}
    assert sizes == {"apple5.jpg": (224, 224), "ball6.png": (200, 150)}  # read from the files
    ids = {im["id"] for im in dataset["images"]}
    preds = json.loads((out / "predictions.json").read_text())
    assert preds and {p["image_id"] for p in preds} <= ids
    for p in preds:
        assert set(p) == {"image_id", "category_id", "bbox", "score", "segmentation"} and p[
            "category_id"
        ] in (1, 2)
    for name, size in (("apple5", (224, 224)), ("ball6", (200, 150))):
        assert Image.open(out / "overlays" / f"{name}.png").size == size
    # the saved bank reproduces the predictions without the references
    again = fss / "again"
    rc = main(
        ["--bank", str(out / "bank.ntt"), "--images", str(fss / "images/apple5.jpg"), "--out", str(again)]
    )
    assert rc == 0
    first = [p for p in preds if p["image_id"] == 1]
    assert json.loads((again / "predictions.json").read_text()) == first


def test_prompt_json_references_with_boxes_and_points(fss, tmp_path):
    shutil.copy(FSS / "images/apple/2.jpg", fss / "a2.jpg")
    shutil.copy(FSS / "images/basketball/2.jpg", fss / "b2.jpg")
    spec = {
        "references": [
            {"image": "a2.jpg", "class": "apple", "points": [[110, 120]]},
            {"image": "b2.jpg", "class": "basketball", "boxes": [[20, 20, 200, 200]]},
            {"image": "refs/apple/a1.jpg", "class": "apple", "mask": "refs/apple/a1.png"},
        ]
    }
    (fss / "prompts.json").write_text(json.dumps(spec))
    specs = load_reference_specs(fss / "prompts.json")
    assert [s.cls for s in specs] == ["apple", "basketball", "apple"]
    out = fss / "out"
    rc = main(
        ["--refs", str(fss / "prompts.json"), "--images", str(fss / "images/ball6.png"), "--out", str(out)]
        + ["--no-overlays", *MODELS, *GRID]
    )
    assert rc == 0 and not (out / "overlays").exists()
    from ntt.bank import MemoryBank

    bank = MemoryBank.load(out / "bank.ntt")
    assert bank.category_names == ["apple", "basketball"] and bank.counts.tolist() == [2, 1]
    assert [r["prompt"] for r in bank.refs[0]] == ["points", "mask"]


def test_folder_references_fss_layout_are_read():
    require_path(FSS, "FSS-1000 sample (geti-instant-learn-samples)")
    specs = load_reference_specs(FSS)  # images/<class>/<n>.jpg + masks/<class>/<n>.png
    assert {s.cls for s in specs} == {"apple", "basketball"} and len(specs) == 20
    assert all(s.masks[0].parent.parent.name == "masks" for s in specs)


def test_bad_inputs_fail_clearly(fss, caplog):
    (fss / "refs" / "apple" / "a1.png").unlink()
    from ntt import cli

    argv = ["--refs", str(fss / "refs"), "--images", str(fss / "images"), "--out", str(fss / "o"), *MODELS]
    rc = cli.main(["segment", *argv])  # `ntt segment`: a user error is one line and exit status 2
    assert rc == 2 and "a1.jpg has no mask" in caplog.text
    (fss / "bad.json").write_text(json.dumps([{"image": "x.jpg", "class": "c", "box": [1, 2, 3, 4]}]))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['box'\]"):
        load_reference_specs(fss / "bad.json")
    (fss / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        load_reference_specs(fss / "empty")
    with pytest.raises(SystemExit):
        main(["--images", str(fss / "images"), "--out", str(fss / "o")])  # neither --refs nor --bank


# ----------------------------------------------------------------------------------------------------------
# Resume: nothing finished is lost, a rerun does only what is missing


def _three_images(root):
    """refs/ (apple, basketball) and images/ with three small pictures, under ``root``."""
    require_path(FSS, "FSS-1000 sample (geti-instant-learn-samples)")
    refs, images = root / "refs", root / "images"
    for cls, name in (("apple", "1"), ("basketball", "1")):
        (refs / cls).mkdir(parents=True)
        shutil.copy(FSS / f"images/{cls}/{name}.jpg", refs / cls / "r.jpg")
        shutil.copy(FSS / f"masks/{cls}/{name}.png", refs / cls / "r.mask.png")
    images.mkdir()
    shutil.copy(FSS / "images/apple/5.jpg", images / "a5.jpg")
    Image.open(FSS / "images/basketball/6.jpg").resize((200, 150)).save(images / "b6.png")
    shutil.copy(FSS / "images/basketball/7.jpg", images / "b7.jpg")
    return root


def _argv(root, out, *extra):
    return [
        "--refs",
        str(root / "refs"),
        "--images",
        str(root / "images"),
        "--out",
        str(out),
        *MODELS,
        *GRID,
        *extra,
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run over the three images: the bytes every resumed run must end with."""
    root = _three_images(tmp_path_factory.mktemp("uninterrupted"))
    assert main(_argv(root, root / "out")) == 0
    return root / "out"


@pytest.fixture()
def three(tmp_path):
    return _three_images(tmp_path)


@pytest.fixture()
def calls(monkeypatch):
    """Counts the images segmented (``Segmenter._predict_one``) and the banks encoded (``Segmenter.build``)."""
    from ntt.app.segmenter import Segmenter

    counts = {"images": 0, "builds": 0}
    predict_one, build = Segmenter._predict_one, Segmenter.build

    def counting_predict(self, *args, **kwargs):
        counts["images"] += 1
        return predict_one(self, *args, **kwargs)

    def counting_build(self, *args, **kwargs):
        counts["builds"] += 1
        return build(self, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "_predict_one", counting_predict)
    monkeypatch.setattr(Segmenter, "build", counting_build)
    return counts


def _same_outputs(out, ref) -> None:
    for name in ("predictions.json", "dataset.json", "bank.ntt"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    for png in sorted((ref / "overlays").iterdir()):
        assert (out / "overlays" / png.name).read_bytes() == png.read_bytes(), png.name
    assert not (out / "failed.json").exists()


KILL_AFTER_TWO = """
import os, signal, sys, torch
torch.set_num_threads(int(sys.argv[1]))  # the test process's threads: the same float results
from ntt.app.segmenter import Segmenter
from ntt.app.segment import main
predict_one, done = Segmenter._predict_one, []
def dying(self, *args, **kwargs):
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    done.append(1)
    return predict_one(self, *args, **kwargs)
Segmenter._predict_one = dying
main(sys.argv[2:])
"""


def test_killed_after_two_images_a_rerun_segments_only_the_third_and_ends_with_the_same_bytes(
    three, uninterrupted, calls, caplog
):
    import subprocess
    import sys

    import torch

    out = three / "out"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_TWO, str(torch.get_num_threads()), *_argv(three, out)],
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["file_name"] for line in lines] == ["a5.jpg", "b6.png"]  # kill -9 kept them
    with open(out / "predictions.jsonl", "a") as f:  # and a kill in the middle of a line: ended, then ignored
        f.write(lines[0][:40])
    caplog.set_level("INFO")
    assert main(_argv(three, out)) == 0
    assert calls == {"images": 1, "builds": 0}  # only the third image; the saved bank was kept
    assert "2 of 3 image(s) already segmented with this bank and these settings" in caplog.text
    assert "made from these references and settings, kept (not encoded again)" in caplog.text
    _same_outputs(out, uninterrupted)
    assert [
        json.loads(line)["file_name"] for line in (out / "predictions.jsonl").read_text().splitlines()[3:]
    ] == ["b7.jpg"]


def test_ctrl_c_keeps_the_finished_images_and_writes_their_jsons(three, uninterrupted, monkeypatch, caplog):
    from ntt import cli
    from ntt.app.segmenter import Segmenter

    predict_one, done = Segmenter._predict_one, []

    def interrupted(self, *args, **kwargs):
        if len(done) == 1:
            raise KeyboardInterrupt
        done.append(1)
        return predict_one(self, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "_predict_one", interrupted)
    out = three / "out"
    assert cli.main(["segment", *_argv(three, out)]) == 130
    assert "interrupted: 1 of 3 image(s) done and kept" in caplog.text
    assert "rerun the same command to segment the other 2" in caplog.text
    ref_preds = json.loads((uninterrupted / "predictions.json").read_text())
    assert json.loads((out / "predictions.json").read_text()) == [p for p in ref_preds if p["image_id"] == 1]
    images = json.loads((out / "dataset.json").read_text())["images"]
    assert images == json.loads((uninterrupted / "dataset.json").read_text())["images"][:1]


def test_an_edited_image_is_redone_and_a_changed_setting_redoes_every_image(
    three, uninterrupted, calls, caplog
):
    out = three / "out"
    shutil.copytree(uninterrupted, out)  # the finished run, in this test's folder
    Image.open(three / "images/b7.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        three / "images/b7.jpg"
    )
    caplog.set_level("INFO")
    assert main(_argv(three, out)) == 0
    assert calls == {"images": 1, "builds": 0}
    preds = json.loads((out / "predictions.json").read_text())
    ref_preds = json.loads((uninterrupted / "predictions.json").read_text())
    assert [p for p in preds if p["image_id"] != 3] == [p for p in ref_preds if p["image_id"] != 3]
    assert main(_argv(three, out, "matcher.nms_thr=0.6")) == 0
    assert calls == {"images": 4, "builds": 1}  # a new bank (it records the settings) and every image
    assert "line(s) of other settings, banks or older images ignored" in caplog.text


def test_deleted_overlays_are_redrawn_from_the_lines_without_segmenting(three, uninterrupted, calls):
    out = three / "out"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "overlays")
    assert main(_argv(three, out)) == 0
    assert calls == {"images": 0, "builds": 0}
    _same_outputs(out, uninterrupted)  # drawn from the lines: the same pictures
    assert main(_argv(three, out, "--max-draw", "1")) == 0  # other drawing settings: redrawn, not segmented
    assert calls == {"images": 0, "builds": 0}
    kept = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()[-3:]]
    assert [(line["file_name"], line["overlay"]) for line in kept] == [
        ("a5.jpg", [0.0, 1]),
        ("b6.png", [0.0, 1]),
        ("b7.jpg", [0.0, 1]),
    ]


def _full_disk_at(monkeypatch, file_name: str) -> None:
    """Writing ``file_name`` fails as on a full disk: ``[Errno 28]`` from the write, which names no file."""
    import errno
    import os

    from ntt.app import outputs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class FullFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def close(self):
            self.f.close()

        write = flush = full

    real_fdopen, real_open = os.fdopen, open

    def fdopen(fd, *args, **kwargs):  # write_bytes_atomic's temp file is named <file>.<random>.tmp
        f = real_fdopen(fd, *args, **kwargs)
        return (
            FullFile(f)
            if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(file_name + ".")
            else f
        )

    def append_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullFile(f) if "a" in mode and os.path.basename(path) == file_name else f

    monkeypatch.setattr(os, "fdopen", fdopen)
    monkeypatch.setattr(outputs, "open", append_open, raising=False)


@pytest.mark.parametrize("file_name", ["bank.ntt", "predictions.jsonl", "a5.png", "predictions.json"])
def test_a_full_disk_names_the_file_it_could_not_write(three, monkeypatch, caplog, file_name):
    import os

    from ntt import cli

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell the temp files apart")
    _full_disk_at(monkeypatch, file_name)
    out = three / "out"
    argv = ["--refs", str(three / "refs"), "--images", str(three / "images/a5.jpg"), "--out", str(out)]
    assert cli.main(["segment", *argv, *MODELS, *GRID]) == 2
    target = out / "overlays" / file_name if file_name.endswith(".png") else out / file_name
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors[-1] == f"cannot write {target}: [Errno 28] No space left on device"


# ----------------------------------------------------------------------------------------------------------
# The practitioner's rough edges: user errors before any work, the first contact


def test_a_read_only_out_fails_before_any_model_or_reference_work(fss, monkeypatch, caplog):
    import errno
    import os
    import tempfile

    from ntt import cli
    from ntt.app.segmenter import Segmenter

    out = fss / "read_only"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: let the write check meet what any other user meets

        def denied(*args, dir=None, **kwargs):
            raise PermissionError(
                errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, ".ntt-write-check")
            )

        monkeypatch.setattr(tempfile, "mkstemp", denied)
    monkeypatch.setattr(
        Segmenter, "from_config", lambda *a, **k: pytest.fail("models built before the check")
    )
    argv = ["--refs", str(fss / "refs"), "--images", str(fss / "images"), "--out", str(out), *MODELS]
    assert cli.main(["segment", *argv]) == 2
    assert caplog.records[-1].getMessage() == (
        f"output folder {out} is not writable ([Errno 13] Permission denied): pass another --out, or fix its "
        "permissions"
    )


def test_an_empty_class_folder_is_refused_with_its_path(fss, caplog):
    from ntt import cli

    (fss / "refs" / "cherry").mkdir()
    argv = ["--refs", str(fss / "refs"), "--images", str(fss / "images"), "--out", str(fss / "o"), *MODELS]
    assert cli.main(["segment", *argv]) == 2
    assert f"class folder {fss / 'refs' / 'cherry'} holds no reference image" in caplog.text


def test_help_shows_the_three_reference_formats_with_an_example_each(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for line in (
        "a folder", "refs/dog/1.jpg + refs/dog/1.mask.png",
        "a COCO json", "--refs refs/instances.json --ref-images refs/images",
        "a prompt json", '{"references": [{"image": "a.jpg", "class": "dog", "boxes": [[10, 20, 200, 240]]}]}',
        "--sam2 tiny_random --dinov2 tiny_random",
    ):  # fmt: skip
        assert line in text


def test_a_missing_checkpoint_points_to_the_offline_plumbing_run(fss, caplog):
    from ntt import cli

    argv = ["--refs", str(fss / "refs"), "--images", str(fss / "images"), "--out", str(fss / "o")]
    assert cli.main(["segment", *argv, "--device", "cpu", f"paths.checkpoints={fss / 'none'}"]) == 2
    message = caplog.records[-1].getMessage()
    assert "Checkpoint for backbone 'sam2.1_hiera_t' not found" in message and "ntt download" in message
    assert "`--sam2 tiny_random --dinov2 tiny_random` gives an offline plumbing run" in message


def test_a_coco_reference_json_without_its_image_folder_names_ref_images(fss, caplog):
    from ntt import cli

    ref_json = fss / "refs.json"  # its file_name entries are relative to refs/apple, not to the json's folder
    ref_json.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a1.jpg", "width": 224, "height": 224}],
        "categories": [{"id": 1, "name": "apple"}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50]}],
    }))  # fmt: skip
    argv = ["--refs", str(ref_json), "--images", str(fss / "images"), "--out", str(fss / "o"), *MODELS]
    assert cli.main(["segment", *argv]) == 2
    message = caplog.records[-1].getMessage()
    assert f"{ref_json}: annotation 7: image {fss / 'a1.jpg'} not found" in message
    assert "--ref-images" in message and "dataset.image_root" not in message


def test_a_second_run_does_not_segment_the_overlays_of_the_first(fss, calls, caplog):
    out = fss / "out"
    argv = ["--refs", str(fss / "refs"), "--out", str(out), *MODELS, *GRID]
    assert main([*argv, "--images", str(fss / "images")]) == 0
    shutil.copy(out / "overlays/apple5.png", fss / "images/apple5.jpg.overlay.png")  # the API's example name
    caplog.set_level("INFO")
    assert main([*argv, "--images", str(fss / "images"), str(out / "overlays")]) == 0
    assert (
        "1 overlay(s) written by ntt skipped" in caplog.text
        and "2 overlay(s) written by ntt skipped" in caplog.text
    )
    assert calls["images"] == 2  # the first run's two photos; the second had them and no overlay to do
    assert [im["file_name"] for im in json.loads((out / "dataset.json").read_text())["images"]] == [
        "apple5.jpg",
        "ball6.png",
    ]


# ----------------------------------------------------------------------------------------------------------
# Class subsets (--classes, issue 18)


def test_a_class_subset_segments_only_those_classes_and_enters_the_resume_key(three, calls):
    """--classes: dataset.json lists the chosen classes with their bank ids, bank.ntt keeps every class,
    and the subset is part of each image's key: the same subset again is kept, another one redoes."""
    from ntt.bank import MemoryBank

    out = three / "out"
    argv = ["--refs", str(three / "refs"), "--images", str(three / "images/a5.jpg"), "--out", str(out)]
    assert main([*argv, *MODELS, *GRID, "--classes", "basketball"]) == 0
    assert json.loads((out / "dataset.json").read_text())["categories"] == [{"id": 2, "name": "basketball"}]
    preds = json.loads((out / "predictions.json").read_text())
    assert preds and {p["category_id"] for p in preds} == {2}
    assert MemoryBank.load(out / "bank.ntt").category_names == ["apple", "basketball"]
    assert calls["images"] == 1
    assert main([*argv, *MODELS, *GRID, "--classes", " basketball,"]) == 0  # the same subset: kept
    assert calls["images"] == 1 and calls["builds"] == 1
    assert main([*argv, *MODELS, *GRID, "--classes", "apple"]) == 0  # another subset: segmented again
    assert calls["images"] == 2 and calls["builds"] == 1  # the saved bank is kept
    assert json.loads((out / "dataset.json").read_text())["categories"] == [{"id": 1, "name": "apple"}]


def test_an_unknown_class_in_classes_is_one_line_naming_the_close_names(three):
    from ntt.utils.errors import UserError

    argv = [
        "--refs",
        str(three / "refs"),
        "--images",
        str(three / "images/a5.jpg"),
        "--out",
        str(three / "o"),
    ]
    with pytest.raises(
        UserError, match=r"^--classes: no class 'basketbal' in the bank \(did you mean basketball\?\)"
    ):
        main([*argv, *MODELS, *GRID, "--classes", "basketbal"])
