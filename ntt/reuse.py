"""Reuse per-image test results across run directories of one dataset/backbones/shots/seed.

Settings that change only what is evaluated or how (``eval.*``, ``dataset.max_test_images``,
``dataset.test_image_ids``) give a new run directory (ntt/identity.py), but not new detections: an
image's detections depend only on the prediction settings (``predictions_key`` in ntt/pipeline.py).
Before segmenting, the test stage copies the finished per-image results of sibling directories
(``<K>shot_seed<S>/*/``) made with the same prediction settings, so no image is segmented twice.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

REUSED_SHARD = "rank_reused.jsonl"


def _siblings(run_dir: Path) -> list[Path]:
    here = run_dir.resolve()
    return [p for p in sorted(run_dir.parent.glob("*/predictions")) if p.parent.resolve() != here]


def reuse_sibling_lines(run_dir: Path, pred_dir: Path, keys: dict[int, str]) -> int:
    """Copy sibling results whose per-image key matches (records that carry a ``key``).

    Args:
        run_dir: this run's directory.
        pred_dir: its ``predictions/`` folder (created).
        keys: image id -> the key a reusable record must carry.

    Returns:
        The number of images copied.
    """
    found: dict[int, str] = {}
    for sib in _siblings(run_dir):
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
    if found:
        pred_dir.mkdir(parents=True, exist_ok=True)
        with open(pred_dir / REUSED_SHARD, "a") as sink:
            sink.write("".join(line + "\n" for line in found.values()))
        log.info("test: reused %d image result(s) from sibling run directories", len(found))
    return len(found)
