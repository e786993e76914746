"""The one error of `ntt prepare`: bad or incomplete input data (a user error: one line, exit status 2)."""

from __future__ import annotations

from ntt.utils.errors import UserError


class PrepareError(UserError, RuntimeError):
    """Data preparation cannot go on: the one-line message names the file and what to do."""
