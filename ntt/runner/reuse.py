"""Reuse per-image test results across run directories of one dataset/backbones/shots/seed.

Settings that change only what is evaluated or how (``eval.*``, ``dataset.max_test_images``,
``dataset.test_image_ids``) give a new run directory (ntt/utils/identity.py), but not new detections: an
image's detections depend only on the prediction settings (``predictions_key`` in ntt/runner/keys.py).
Before segmenting, the test stage copies the finished per-image results of sibling directories
(``<K>shot_seed<S>/*/``) made with the same prediction settings, so no image is segmented twice.

The memory stages are reused the same way (`adopt_sibling_artifact`): a sibling's artifact is copied when its
stage manifest records the present stage key (config + input file digests, `ntt.runner.keys.stage_key`), its
artifact is unchanged and its recorded input files still have the same content.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from ntt.utils.files import write_bytes_atomic

log = logging.getLogger(__name__)

REUSED_SHARD = "rank_reused.jsonl"


def _siblings(run_dir: Path) -> list[Path]:
    here = run_dir.resolve()
    return [p for p in sorted(run_dir.parent.glob("*/predictions")) if p.parent.resolve() != here]


def find_sibling_lines(run_dir: Path, keys: dict[int, str]) -> dict[int, str]:
    """Per image id, a finished sibling result line (raw JSON) that carries the key ``keys[id]``."""
    found: dict[int, str] = {}
    for sib in _siblings(run_dir):
        if len(found) == len(keys):
            break
        for shard in sorted(sib.glob("rank*.jsonl")):
            with open(shard) as f:
                for raw in f:
                    try:
                        rec = json.loads(raw)
                    except json.JSONDecodeError:
                        continue
                    img = rec.get("image_id")
                    if rec.get("ok") and img in keys and img not in found and rec.get("key") == keys[img]:
                        found[img] = raw.rstrip("\n")
    return found


def reuse_sibling_lines(run_dir: Path, pred_dir: Path, keys: dict[int, str]) -> int:
    """Copy sibling results whose per-image key matches (records that carry a ``key``).

    Args:
        run_dir: this run's directory.
        pred_dir: its ``predictions/`` folder (created).
        keys: image id -> the key a reusable record must carry.

    Returns:
        The number of images copied.
    """
    found = find_sibling_lines(run_dir, keys)
    if found:
        pred_dir.mkdir(parents=True, exist_ok=True)
        with open(pred_dir / REUSED_SHARD, "a") as sink:
            sink.write("".join(line + "\n" for line in found.values()))
        log.info("test: reused %d image result(s) from sibling run directories", len(found))
    return len(found)


def adopt_sibling_artifact(
    run_dir: Path,
    stage: str,
    artifact: str,
    key: str,
    is_current: Callable[[Path, dict], bool],
) -> Path | None:
    """Copy a sibling run directory's artifact of `stage` made under the same stage key; its source or None.

    Args:
        run_dir: this run's directory (siblings: the other directories beside it).
        stage: stage name (its manifest is ``stage_<stage>.json``).
        artifact: the artifact's file name.
        key: the present stage key; only a manifest recording exactly this key qualifies.
        is_current: ``(sibling dir, its manifest) -> bool``: the artifact's digest and the recorded input
            files still match (``ntt.runner.plan`` checks them like its own).
    """
    here = run_dir.resolve()
    for sib in sorted(p for p in run_dir.parent.iterdir() if p.is_dir() and p.resolve() != here):
        manifest = sib / f"stage_{stage}.json"
        try:
            rec = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("key") != key or rec.get("artifact") != artifact or not (sib / artifact).is_file():
            continue
        if not is_current(sib, rec):
            continue
        # artifact first, manifest last (each atomically): an interruption leaves no manifest without its file
        for name in (artifact, manifest.name):
            write_bytes_atomic(run_dir / name, (sib / name).read_bytes())
        log.info("stage %s: %s reused from %s (same stage key)", stage, artifact, sib)
        return sib
    return None
