"""The command line's conventions, one of each: the log format and set-up, and the user-error exit.

Every subcommand (`ntt run`, `ntt study`, `ntt segment`, ...) reports bad input or config by raising
:class:`ntt.utils.errors.UserError` (a message that names the file, annotation or config key and what to
do); the `ntt` dispatcher (and `ntt run`'s Hydra app) turns it into one log line and exit status 2.
`-v` / `--verbose` anywhere on the line (or `NTT_TRACEBACK=1`, `HYDRA_FULL_ERROR=1`) shows the traceback
too. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"
USER_ERROR_EXIT = 2
VERBOSE_FLAGS = ("-v", "--verbose")
TRACEBACK_ENV = "NTT_TRACEBACK"

log = logging.getLogger("ntt")


def setup_logging(level: int = logging.INFO) -> None:
    """INFO logs in the one format, unless the process already configured logging (Hydra's app, a test)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT)


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
