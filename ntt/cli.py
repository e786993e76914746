"""`ntt` command: run the pipeline or a study, fetch checkpoints, prepare benchmarks, summarise, segment.

ntt run [hydra overrides]        same as `python -m ntt.run ...`
ntt study [hydra overrides]      every job of a sweep with ONE pass over the test images (ntt study --help)
ntt download NAME... | --all     official SAM2 / DINOv2 checkpoints (resumable, sha256-verified)
ntt summarize ROOT               metrics.json files -> summary.csv / summary.md
ntt synth OUT_DIR                write the synthetic COCO-format dataset
ntt segment --refs R --images D --out O [overrides]   segment your own images (ntt segment --help)
ntt visualize RUN_DIR            side-by-side ground truth | prediction PNGs of a benchmark run
ntt prepare BENCHMARK ...        public downloads -> benchmark jsons (coco|voc|cdfsod|lvis|masks)
"""

from __future__ import annotations

import logging
import sys

COMMANDS = ("run", "study", "download", "summarize", "synth", "segment", "visualize", "prepare")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        from ntt import run

        sys.argv = ["ntt run", *rest]
        run.main()
        return 0
    if cmd == "study":  # many memory banks, one pass over the test images (ntt/study.py)
        from ntt.study import main as study_main

        return study_main(rest)
    if cmd == "download":
        from ntt.backbones.checkpoints import download_main

        return int(download_main(rest) or 0)
    if cmd == "summarize":
        from ntt.summarize import main as summarize_main

        return summarize_main(rest)
    if cmd == "prepare":
        from ntt.prepare import main as prepare_main

        return prepare_main(rest)
    if cmd == "segment":
        from ntt.segment import main as segment_main

        return segment_main(rest)
    if cmd == "visualize":
        from ntt.visualize import main as visualize_main

        return visualize_main(rest)
    from ntt.data.synthetic import main as synth_main

    return int(synth_main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
