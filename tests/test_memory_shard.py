"""Stage fill_memory over several processes (ntt/runner/memory_shard.py): same batches, same bank bytes, clear failures.

The unit tests simulate W processes in one (each rank's share encoded in turn, the exchange functions
replaced by lists); the last tests start two real CPU processes (gloo). Tiny random encoders: plumbing only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from helpers_memory import FakeEncoder, toy_dataset

from ntt.fill import fill_memory
from ntt.memory import BadReferenceError, reference_batches
from ntt.refs import RefEntry
from ntt.runner.memory_shard import (
    OtherProcessFailedError,
    OtherProcessUserError,
    batches_of_process,
    fill_memory_sharded,
)
from ntt.utils.errors import UserError


def _saved(bank, path: Path) -> bytes:
    bank.save(path)
    return path.read_bytes()


@pytest.mark.parametrize("n_jobs", [0, 1, 7, 8, 17])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batches_do_not_depend_on_the_number_of_processes(n_jobs, batch_size):
    batches = reference_batches(n_jobs, batch_size)
    assert [j for b in batches for j in b] == list(range(n_jobs))
    assert all(len(b) == batch_size for b in batches[:-1])
    for world_size in (1, 2, 3):
        shares = [batches_of_process(len(batches), r, world_size) for r in range(world_size)]
        assert sorted(b for share in shares for b in share) == list(range(len(batches)))  # each once
        assert shares[0] == list(range(0, len(batches), world_size))  # interleaved
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        reference_batches(3, 0)


def _three_image_refs(tmp_path):
    """The toy dataset plus a third image used only by job 3 (class 4, shot 1)."""
    coco = toy_dataset(tmp_path)
    shutil.copy(tmp_path / "0.png", tmp_path / "2.png")
    coco["images"].append({"id": 2, "file_name": "2.png", "width": 80, "height": 60})
    coco["annotations"].append(
        {
            "id": 6,
            "image_id": 2,
            "category_id": 4,
            "bbox": [20, 15, 30, 25],
            "segmentation": [[20, 15, 50, 15, 50, 40, 20, 40]],
        }
    )
    # jobs in canonical order: 0 = (2, ann 4, img 1), 1 = (2, ann 3, img 0), 2 = (4, ann 1, img 0), 3 = (4, ann 6, img 2)
    refs = {4: [RefEntry(4, 0, [1]), RefEntry(4, 2, [6])], 2: [RefEntry(2, 1, [4]), RefEntry(2, 0, [3])]}
    return coco, refs


class RecordingEncoder(FakeEncoder):
    """Records every batch it encodes (the crops' bytes)."""

    def __init__(self):
        super().__init__()
        self.batches: list[bytes] = []

    def forward(self, x):
        self.batches.append(x.numpy().tobytes())
        return super().forward(x)


def _simulate(world_size, kwargs, encoder):
    """Run fill_memory_sharded for every rank of a simulated world (rank 0 last); returns its bank."""
    parts = [None] * world_size

    def gather_for(rank):
        def gather(part):
            parts[rank] = part
            return parts if rank == 0 else None

        return gather

    for rank in reversed(range(world_size)):
        bank = fill_memory_sharded(
            rank=rank,
            world_size=world_size,
            all_gather=lambda report: [report] * world_size,
            gather=gather_for(rank),
            encoder=encoder,
            progress=False,
            **kwargs,
        )
        assert (bank is None) == (rank != 0)
    return bank


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_sharded_bank_is_byte_identical_to_one_process(tmp_path, keep, batch_size):
    coco, refs = _three_image_refs(tmp_path)
    kwargs = dict(
        refs=refs,
        dataset_json=coco,
        image_root=tmp_path,
        class_ids=[4, 2],
        batch_size=batch_size,
        keep_patch_features=keep,
        seed=3,
        config_hash="h",
    )
    enc = RecordingEncoder()
    one = fill_memory(**kwargs, encoder=enc, progress=False)
    expected = _saved(one, tmp_path / "one.pt")
    one_batches = sorted(enc.batches)
    for world_size in (1, 2, 3):
        enc = RecordingEncoder()
        bank = _simulate(world_size, kwargs, enc)
        assert sorted(enc.batches) == one_batches, world_size  # the very same encoder inputs, batch by batch
        assert _saved(bank, tmp_path / f"w{world_size}.pt") == expected, world_size
    assert one.instance_means.shape == (2, 2, 8) and torch.isfinite(one.instance_means).all()


def test_a_bad_reference_on_one_process_fails_every_process(tmp_path):
    coco, refs = _three_image_refs(tmp_path)
    (tmp_path / "2.png").write_bytes(b"not an image")  # job 3: batch 3 with batch_size=1, process 1 of 2
    kwargs = dict(refs=refs, dataset_json=coco, image_root=tmp_path, class_ids=[2, 4], batch_size=1)
    reports = []

    def exchange(report):
        reports.append(report)
        return [None, reports[0]]  # process 0 is fine, process 1 sends what it reported

    def no_gather(part):
        raise AssertionError("nothing may be gathered after a failure")

    with pytest.raises(
        BadReferenceError, match=r"class 4 \(four\), shot 1: annotation 6 on image 2: .*2.png"
    ):
        fill_memory_sharded(
            rank=1,
            world_size=2,
            all_gather=exchange,
            gather=no_gather,
            encoder=FakeEncoder(),
            progress=False,
            **kwargs,
        )
    with pytest.raises(OtherProcessUserError) as err:
        fill_memory_sharded(
            rank=0,
            world_size=2,
            all_gather=exchange,
            gather=no_gather,
            encoder=FakeEncoder(),
            progress=False,
            **kwargs,
        )
    assert isinstance(err.value, UserError)
    msg = str(err.value)
    assert msg.startswith(
        "fill_memory failed on process 1 of 2: BadReferenceError: fill_memory: class 4 (four)"
    )
    assert "annotation 6 on image 2" in msg and "2.png" in msg


def test_a_bug_on_another_process_is_not_a_user_error(tmp_path):
    coco, refs = _three_image_refs(tmp_path)

    class Broken(FakeEncoder):
        def forward(self, x):
            raise RuntimeError("CUDA out of memory")

    calls = []

    def exchange(report):
        calls.append(report)
        return calls * 2  # both processes failed alike

    with pytest.raises(RuntimeError, match="CUDA out of memory"):  # its own error, traceback kept
        fill_memory_sharded(
            refs,
            rank=0,
            world_size=2,
            all_gather=exchange,
            gather=None,
            encoder=Broken(),
            progress=False,
            dataset_json=coco,
            image_root=tmp_path,
            class_ids=[2, 4],
        )
    with pytest.raises(OtherProcessFailedError) as err:
        fill_memory_sharded(
            refs,
            rank=1,
            world_size=2,
            all_gather=lambda r: [calls[0], None],
            gather=None,
            encoder=FakeEncoder(),
            progress=False,
            dataset_json=coco,
            image_root=tmp_path,
            class_ids=[2, 4],
        )
    assert not isinstance(err.value, UserError)
    assert "process 0 of 2: RuntimeError: CUDA out of memory" in str(err.value)


# ---------------------------------------------------------------------------------------------------
# Two real processes (gloo on CPU)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_a_bad_reference_on_process_1_both_fail_clearly(tmp_path):
    """Process 1's reference image is broken: both processes exit with a user error naming it, no hang."""
    from ntt.data.synthetic import generate_synthetic_dataset

    data = tmp_path / "data"
    generate_synthetic_dataset(data, num_images=9, seed=0)
    train = json.loads((data / "train.json").read_text())
    # shots=1, batch_size=1: jobs = classes 1, 2, 3, 4; process 0 encodes classes 1 and 3, process 1 classes 2, 4
    anns = {c: [a for a in train["annotations"] if a["category_id"] == c] for c in (1, 2, 3, 4)}
    bad = anns[2][0]["image_id"]
    chosen = {2: anns[2][0], 4: anns[4][0]}
    for c in (1, 3):
        chosen[c] = next(a for a in anns[c] if a["image_id"] != bad)
    refs_file = tmp_path / "refs.json"
    refs_file.write_text(
        json.dumps({str(c): [{"img_id": a["image_id"], "ann_ids": [a["id"]]}] for c, a in chosen.items()})
    )
    file_name = next(im["file_name"] for im in train["images"] if im["id"] == bad)
    (data / file_name).write_bytes(b"not an image")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            HF_HOME=str(tmp_path / "hf"),
        )
        cmd = [
            sys.executable,
            "-m",
            "ntt",
            "run",
            "debug=smoke",
            "device=cpu",
            "dataset=synthetic",
            f"dataset.root={data}",
            f"dataset.refs_file={refs_file}",
            "shots=1",
            "matcher.memory.batch_size=1",
            f"paths.output_dir={tmp_path}",
            f"run_dir={tmp_path / 'run'}",
            "stages=[sample_refs,fill_memory]",
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [2, 2], [o[-3000:] for o in outs]  # one clear message each
    where = f"class 2 (square), shot 0: annotation {chosen[2]['id']} on image {bad}"
    assert where in outs[1] and file_name in outs[1], outs[1][-3000:]
    assert f"fill_memory failed on process 1 of 2: BadReferenceError: fill_memory: {where}" in outs[0], outs[
        0
    ][-3000:]
    assert not (tmp_path / "run" / "memory.pt").exists()
    assert not (tmp_path / "run" / "stage_fill_memory.json").exists()
