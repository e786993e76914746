"""The user-error type: bad input or config, reported as one clear message without a traceback.

Anything raised as (a subclass of) :class:`UserError` is the user's to fix: a missing or malformed file,
a config key with an impossible value, a device that is not there. The command-line app (`ntt.runner.main`)
prints such errors as one message and exits with status 2; every other exception is a bug and keeps its
traceback. `HYDRA_FULL_ERROR=1` (or `NTT_TRACEBACK=1`) shows the full trace of a user error too.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or config: the message names the file / annotation / config key and what to do."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (the message names the key, e.g. ``io.write_queue=0``)."""


class ImageError(UserError, OSError):
    """An image file that cannot be used: missing, undecodable, truncated, or of the wrong size."""


class ImageNotFoundError(ImageError, FileNotFoundError):
    """An image file named by an annotation json that does not exist."""


class ImageSizeError(ImageError, ValueError):
    """An image whose decoded size disagrees with its annotation json's width/height."""


class RunLockedError(UserError):
    """Another live process holds the run directory's lock."""
