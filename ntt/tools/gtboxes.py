"""A stand-in detector for smoke runs of box prompts: a COCO json's ground-truth boxes as a boxes file.

`proposer=boxes` (method.md §5.11) reads a class-agnostic detector's boxes from `proposer.boxes_json`, a
COCO-results json ``[{"image_id", "bbox": [x, y, w, h], "score"}, ...]``. FSOD-VFM's detector (UPN) needs a
compiled CUDA op and its checkpoint; on a CPU without weights this tool writes the test set's own boxes,
jittered by a few pixels, with decreasing scores, so the box-prompt steps (the NTT-to-FSOD-VFM walk's smoke
version, `make smoke-ablation`) run end to end. Boxes from the ground truth are a perfect detector: numbers
made with them (and with random weights) measure plumbing only.

    python -m ntt.tools.gtboxes TEST_JSON OUT_JSON [--jitter 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def gt_boxes(coco: dict[str, Any], *, jitter: float = 3.0, seed: int = 0) -> list[dict[str, Any]]:
    """The annotations' boxes as detector entries, in annotation order.

    Args:
        coco: a COCO json (its `annotations`' `image_id` and `bbox`).
        jitter: each box coordinate moved by a uniform draw in [-jitter, jitter] pixels (0: the exact boxes).
        seed: seed of the jitter (same seed, same file).

    Returns:
        ``[{"image_id", "bbox": [x, y, w, h], "score"}, ...]``, scores 1.0, 0.99, ... (at least 0.01, the
        box proposer's default floor).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    entries = []
    for k, ann in enumerate(coco.get("annotations", [])):
        x, y, w, h = (float(v) for v in ann["bbox"])
        dx, dy, dw, dh = rng.uniform(-jitter, jitter, size=4) if jitter else (0.0, 0.0, 0.0, 0.0)
        box = [x + dx, y + dy, max(w + dw, 1.0), max(h + dh, 1.0)]
        score = max(round(1.0 - 0.01 * k, 3), 0.01)
        entries.append({"image_id": ann["image_id"], "bbox": [round(v, 2) for v in box], "score": score})
    return entries


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ntt.tools.gtboxes TEST_JSON OUT_JSON [--jitter J] [--seed S]`."""
    from ntt.utils.console import setup_logging
    from ntt.utils.errors import UserError

    ap = argparse.ArgumentParser(prog="python -m ntt.tools.gtboxes", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "test_json", type=Path, help="a COCO json with annotations (e.g. the synthetic test.json)"
    )
    ap.add_argument("out_json", type=Path, help="the boxes file to write (proposer.boxes_json)")
    ap.add_argument("--jitter", type=float, default=3.0, help="max pixels each coordinate moves (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the jitter (default 0)")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        coco = json.loads(args.test_json.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{args.test_json}: cannot read a COCO json ({err}): point TEST_JSON at one") from err
    entries = gt_boxes(coco, jitter=args.jitter, seed=args.seed)
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(entries))
    log.info("wrote %d ground-truth boxes (a stand-in detector) to %s", len(entries), args.out_json)
    return 0


if __name__ == "__main__":
    import sys

    from ntt.utils.console import user_error_exit
    from ntt.utils.errors import UserError

    try:
        sys.exit(main())
    except UserError as err:
        sys.exit(user_error_exit(err))
