"""The command line's conventions, one of each: the log format and set-up, and the user-error exit.

Every subcommand (`ntt run`, `ntt study`, `ntt segment`, ...) reports bad input or config by raising
:class:`ntt.utils.errors.UserError` (a message that names the file, annotation or config key and what to
do); the `ntt` dispatcher (and `ntt run`'s Hydra app) turns it into one log line and exit status 2.
`-v` / `--verbose` anywhere on the line (or `NTT_TRACEBACK=1`, `HYDRA_FULL_ERROR=1`) shows the traceback
too. Any other exception is a bug and keeps its traceback.

With several processes (torchrun, `accelerate launch`, MPI, a multi-task SLURM job) every log line starts
with `[rank <r>]` and only the main process logs below WARNING (`RankFilter`, on the handlers made here and
on those of Hydra's job_logging, conf/hydra/default.yaml); a line about this process's own share is logged by
every process (`extra=EVERY_RANK`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from ntt.utils.dist import WORLD_SIZE_VARS

# `rank` is set by `RankFilter`; conf/hydra/default.yaml's job_logging format is the same
LOG_FORMAT = "%(rank)s[%(asctime)s][%(name)s][%(levelname)s] %(message)s"
# the rank variable of each launcher, in the order of `WORLD_SIZE_VARS` (torch.distributed env://, MPI)
RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
USER_ERROR_EXIT = 2
VERBOSE_FLAGS = ("-v", "--verbose")
TRACEBACK_ENV = "NTT_TRACEBACK"
# `log.info(..., extra=EVERY_RANK)`: a line each process has its own of (its share of the images), kept on all ranks
EVERY_RANK = {"every_rank": True}

log = logging.getLogger("ntt")


def process_rank() -> tuple[int, int]:
    """`(rank, world size)` as the launcher announced them in the environment; `(0, 1)` for one process."""
    env = os.environ
    for size_var, rank_var in zip(WORLD_SIZE_VARS, RANK_VARS, strict=True):
        if env.get(size_var):
            return int(env.get(rank_var) or 0), int(env[size_var])
    return 0, 1


class RankFilter(logging.Filter):
    """With several processes: `[rank <r>] ` before every line (the `rank` field of the format), and records
    below WARNING only from the main process, or marked `extra=EVERY_RANK`. The rank is read at each record: a
    SLURM task learns it late."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank, world = process_rank()
        record.rank = f"[rank {rank}]" if world > 1 else ""
        every = getattr(record, "every_rank", False)
        return world <= 1 or rank == 0 or record.levelno >= logging.WARNING or every


def setup_logging(level: int = logging.INFO) -> None:
    """INFO logs in the one format (`RankFilter` on), unless the process already configured logging (Hydra's
    app, a test)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT)
        for handler in logging.getLogger().handlers:
            handler.addFilter(RankFilter())


def take_verbose(argv: Sequence[str]) -> list[str]:
    """`argv` without `-v` / `--verbose`; when one was there, tracebacks of user errors are shown
    (also in the subprocesses and Hydra jobs of this command, through the environment)."""
    if any(a in VERBOSE_FLAGS for a in argv):
        os.environ[TRACEBACK_ENV] = "1"
    return [a for a in argv if a not in VERBOSE_FLAGS]


def show_traceback() -> bool:
    """Whether user errors keep their traceback (`-v`, `NTT_TRACEBACK=1` or `HYDRA_FULL_ERROR=1`)."""
    return os.environ.get(TRACEBACK_ENV) == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"


def user_error_exit(err: BaseException) -> int:
    """Log a user error as one line (with its traceback when asked) and return the exit status 2."""
    if show_traceback():
        log.error("%s", err, exc_info=err)
    else:
        log.error("%s", err)
    return USER_ERROR_EXIT
