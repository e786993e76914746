"""`ntt` command (also `python -m ntt`): one dispatcher, one log set-up, one user-error exit.

ntt run [hydra overrides]        run the stages of one config (Hydra app; `-m` for a multirun)
ntt study [hydra overrides]      every job of a sweep with ONE pass over the test images (ntt study --help)
ntt segment --refs R --images D --out O [overrides]   segment your own images (ntt segment --help)
ntt bank show|add|remove|rename|merge BANK ...        show or edit a saved reference bank (bank.ntt)
ntt visualize RUN_DIR            side-by-side ground truth | prediction PNGs of a benchmark run
ntt summarize ROOT               metrics.json files -> summary.csv / summary.md
ntt report PATH                  one self-contained HTML page of a run, a study or an `ntt segment` folder
ntt download NAME... | --all     official SAM2 / DINOv2 checkpoints (resumable, sha256-verified)
ntt prepare BENCHMARK ...        public downloads -> benchmark jsons (coco|voc|cdfsod|lvis|masks)
ntt synth OUT_DIR                write the synthetic COCO-format dataset

-v / --verbose anywhere on the line: show the traceback of an error in the input or config (which is
otherwise one line, exit status 2).
"""

from __future__ import annotations

import importlib
import sys

# command -> module whose `main(argv) -> int` runs it (imported on use: `ntt --help` stays light)
COMMANDS = {
    "run": "ntt.runner.main:run_main",
    "study": "ntt.runner.main:study_main",
    "segment": "ntt.app.segment:main",
    "bank": "ntt.app.bank_cli:main",
    "visualize": "ntt.app.visualize:main",
    "summarize": "ntt.runner.summarize:main",
    "report": "ntt.report.main:main",
    "download": "ntt.backbones.download:download_main",
    "prepare": "ntt.prepare:main",
    "synth": "ntt.data.synthetic:main",
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch `ntt <command> ...`; returns the exit status (2 for a user error or an unknown command)."""
    from ntt.utils.console import setup_logging, take_verbose, user_error_exit
    from ntt.utils.errors import UserError

    argv = take_verbose(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    setup_logging()
    module, func = COMMANDS[argv[0]].split(":")
    try:
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    except UserError as err:
        return user_error_exit(err)


if __name__ == "__main__":
    sys.exit(main())
